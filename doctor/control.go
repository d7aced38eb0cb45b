package doctor

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"relay/config"
)

// checkControl: relay reads qmail's control files, rcpthosts lists the
// domains, and the TOML does not quietly accept or relay more than qmail
// would.
func (r *run) checkControl() {
	dir := r.cfg.Relay.QmailControlDir
	qmailControl := filepath.Join(r.o.QmailHome, "control")
	if dir == "" {
		if st, err := statPath(qmailControl); err == nil && st.dir {
			r.add("control files", Warn, fmt.Sprintf(`set [relay] qmail_control_dir = "%s" in %s, then systemctl reload relay`, qmailControl, r.o.Config),
				"relay does not read qmail's control files (me, rcpthosts, morercpthosts, databytes, badmailfrom): only [relay] local_domains = %q are accepted from anyone", r.cfg.Relay.LocalDomains)
		} else {
			r.ok("control files", "no qmail control directory: [relay] local_domains %q are accepted from anyone", r.cfg.Relay.LocalDomains)
		}
	} else {
		r.checkRcptHosts(dir)
	}
	r.checkRelayNetworks()
}

// checkRcptHosts: rcpthosts is there and not empty, the daemon may read
// every control file relay reads, and local_domains adds nothing qmail
// would not accept.
func (r *run) checkRcptHosts(dir string) {
	const check = "control files"
	path := filepath.Join(dir, "rcpthosts")
	var v verdict
	f, err := os.Open(path)
	var hosts []string
	if err == nil {
		hosts, err = config.ParseControlList(f)
		f.Close()
	}
	if errors.Is(err, fs.ErrPermission) && !r.root() {
		r.notChecked(check, fmt.Sprintf("%s cannot be read: %v", path, unwrapPath(err)))
		return
	}
	me := r.cfg.Hostname
	addMe := fmt.Sprintf("echo %s >> %s (and every domain this server takes mail for, one a line)", me, path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		v.bad(Fail, addMe, "%s is missing: relay then takes mail from the internet only for local_domains %q", path, r.cfg.Relay.LocalDomains)
	case err != nil:
		v.bad(Fail, "chmod 644 "+path, "%s: %v", path, err)
	case len(hosts) == 0:
		v.bad(Fail, addMe, "%s lists no domain: relay takes mail from the internet only for local_domains %q", path, r.cfg.Relay.LocalDomains)
	}
	if c, who, ok := r.daemonCred(); ok {
		for _, name := range config.ControlFiles() {
			f := filepath.Join(dir, name)
			if _, serr := statPath(f); serr != nil {
				continue
			}
			if rerr := c.reach(f, 4); rerr != nil {
				v.bad(Fail, reachFix(rerr, 4), "%s cannot read %s (%v): relay will not start or reload", who, f, rerr)
			}
		}
	}
	if len(r.cfg.Relay.LocalDomains) > 0 {
		only := *r.cfg
		only.Relay.LocalDomains = nil
		if ctl, cerr := config.ReadControl(&only); cerr == nil {
			var extra []string
			for _, d := range r.cfg.Relay.LocalDomains {
				if !ctl.RcptHostAllowed(d) {
					extra = append(extra, d)
				}
			}
			if len(extra) > 0 {
				v.bad(Warn, fmt.Sprintf("add them to %s, or delete [relay] local_domains from %s; then systemctl reload relay", path, r.o.Config),
					"[relay] local_domains adds %s to rcpthosts: relay accepts mail for them from anyone, where qmail-smtpd would not", strings.Join(extra, ", "))
			}
		}
	}
	r.emit(check, &v, fmt.Sprintf("%s lists %d domain(s); the daemon may read what relay reads in %s", path, len(hosts), dir))
}

// checkRelayNetworks: who may relay is qmail's tcprules, and
// relay_networks adds no one quietly (nor everyone).
func (r *run) checkRelayNetworks() {
	const check = "relay_networks"
	rc := r.cfg.Relay
	var v verdict
	for _, n := range rc.RelayNetworks {
		if p, err := config.ParseNetwork(n); err == nil && p.Bits() < 8 {
			v.bad(Fail, fmt.Sprintf("delete %q from [relay] relay_networks in %s, then systemctl reload relay", n, r.o.Config),
				"relay_networks has %s: much of the internet may relay through this server", n)
		}
	}
	switch {
	case rc.TCPRules != "":
		if len(rc.RelayNetworks) > 0 {
			v.bad(Warn, fmt.Sprintf("delete [relay] relay_networks from %s (tcprules alone then decides), or write those networks into %s; then systemctl reload relay", r.o.Config, rc.TCPRules),
				"relay_networks %q may relay besides tcprules' RELAYCLIENT rules in %s", rc.RelayNetworks, rc.TCPRules)
		}
		if r.daemon != nil {
			if err := procCred(r.daemon).reach(rc.TCPRules, 4); err != nil {
				v.bad(Fail, reachFix(err, 4), "the daemon (%s) cannot read %s: %v", userName(r.daemon.uid), rc.TCPRules, err)
			}
		}
		r.emit(check, &v, fmt.Sprintf("only tcprules' RELAYCLIENT rules (%s) may relay", rc.TCPRules))
	default:
		if st, err := statPath("/etc/tcp.smtp"); err == nil && !st.dir {
			v.bad(Warn, fmt.Sprintf(`set [relay] tcprules = "/etc/tcp.smtp" in %s, then systemctl reload relay`, r.o.Config),
				"relay does not read /etc/tcp.smtp, qmail-smtpd's tcprules: its RELAYCLIENT rules do not apply")
		}
		r.emit(check, &v, fmt.Sprintf("%q may relay (no tcprules file)", rc.RelayNetworks))
	}
}

// checkTLS: each certificate relay serves loads with its key, is valid
// now and for 14 days more, and its key is the daemon's alone.
func (r *run) checkTLS() {
	if r.cfg.TLS.Cert != "" {
		r.checkCert("tls", r.cfg.TLS.Cert, r.cfg.TLS.Key, "systemctl reload relay", r.cfg.Hostname)
	}
	if r.cfg.Admin.TLSCert != "" {
		r.checkCert("admin tls", r.cfg.Admin.TLSCert, r.cfg.Admin.TLSKey, r.restartFix(), "")
	}
}

func (r *run) checkCert(check, certPath, keyPath, load, host string) {
	var v verdict
	renew := fmt.Sprintf("put a renewed certificate in %s (and its key in %s), then %s", certPath, keyPath, load)
	pemBytes, err := os.ReadFile(certPath)
	if errors.Is(err, fs.ErrPermission) && !r.root() {
		r.notChecked(check, fmt.Sprintf("%s cannot be read: %v", certPath, unwrapPath(err)))
		return
	}
	if err != nil {
		v.bad(Fail, renew, "%v", err)
		r.emit(check, &v, "")
		return
	}
	leaf, err := firstCert(pemBytes)
	if err != nil {
		v.bad(Fail, renew, "%s: %v", certPath, err)
		r.emit(check, &v, "")
		return
	}
	now := r.o.Now
	day := "2006-01-02"
	switch {
	case now.After(leaf.NotAfter):
		v.bad(Fail, renew, "%s expired on %s: clients refuse STARTTLS, and submission cannot log in", certPath, leaf.NotAfter.UTC().Format(day))
	case now.Before(leaf.NotBefore):
		v.bad(Fail, renew, "%s is not valid before %s", certPath, leaf.NotBefore.UTC().Format(day))
	case leaf.NotAfter.Sub(now) < certMinValidity:
		v.bad(Fail, renew, "%s expires on %s, in %d day(s)", certPath, leaf.NotAfter.UTC().Format(day), int(leaf.NotAfter.Sub(now).Hours()/24))
	}
	if host != "" {
		if err := leaf.VerifyHostname(host); err != nil {
			v.bad(Warn, renew, "%s does not name %s, the name relay greets with: clients that check names refuse it", certPath, host)
		}
	}
	if _, err := tls.LoadX509KeyPair(certPath, keyPath); err != nil {
		if errors.Is(err, fs.ErrPermission) && !r.root() {
			v.bad(Warn, "run relay doctor as root", "not checked as uid %d: %s cannot be read", r.euid, keyPath)
		} else {
			v.bad(Fail, renew, "%s with %s: %v", certPath, keyPath, err)
		}
	}
	if st, err := statPath(keyPath); err == nil {
		c, who, known := r.daemonCred()
		owner := daemonUser
		if known {
			owner = userName(c.uid)
		}
		fix := fmt.Sprintf("chown %s %s && chmod 600 %s", owner, keyPath, keyPath)
		if st.mode&0o004 != 0 {
			v.bad(Fail, fix, "the private key %s is %s: every local user can read it", keyPath, st)
		}
		if known {
			if err := c.reach(keyPath, 4); err != nil {
				if re := (*reachError)(nil); errors.As(err, &re) && re.dir {
					fix = reachFix(err, 4)
				}
				v.bad(Fail, fix, "%s cannot read %s (%v): relay will not start with it", who, keyPath, err)
			}
		}
	}
	r.emit(check, &v, fmt.Sprintf("%s valid until %s (%d days), key %s", certPath, leaf.NotAfter.UTC().Format(day), int(leaf.NotAfter.Sub(now)/(24*time.Hour)), keyPath))
}

// firstCert parses the first certificate of a PEM file: the one served.
func firstCert(b []byte) (*x509.Certificate, error) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, errors.New("no CERTIFICATE block")
		}
		if blk.Type == "CERTIFICATE" {
			return x509.ParseCertificate(blk.Bytes)
		}
	}
}
