package doctor

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"relay/config"
)

// holder is a listening TCP socket and, when it can be seen, the process
// holding it.
type holder struct {
	sock listenSock
	p    *proc // nil when unknown
}

// holders returns the listening sockets addr (host:port) would compete
// with: on its port, at its address or a wildcard one; every address
// when addr's host is a wildcard or a name.
func (r *run) holders(addr string) []holder {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil
	}
	port, err := net.LookupPort("tcp", portStr)
	if err != nil {
		return nil
	}
	want, specific := netip.Addr{}, false
	if a, err := netip.ParseAddr(host); err == nil && !a.IsUnspecified() {
		want, specific = a.Unmap(), true
	}
	var out []holder
	for _, s := range r.procs.listening() {
		if int(s.addr.Port()) != port {
			continue
		}
		if specific && s.addr.Addr() != want && !s.addr.Addr().IsUnspecified() {
			continue
		}
		h := holder{sock: s}
		if pid, ok, _ := r.procs.socketOwner(s.inode); ok {
			h.p = r.procs.get(pid)
		}
		if h.p == nil {
			h.p = r.tcpserverOn(s.addr)
		}
		out = append(out, h)
	}
	return out
}

// judgeHolders adds to v what holds addr: the daemon (ok), nobody, or
// another process (FAIL, with how to stop it).
func (r *run) judgeHolders(v *verdict, addr, what string) {
	hs := r.holders(addr)
	if len(hs) == 0 {
		v.bad(Fail, r.startFix(), "nothing listens on %s, so %s is not there", addr, what)
		return
	}
	for _, h := range hs {
		switch {
		case h.p != nil && r.daemon != nil && h.p.pid == r.daemon.pid:
			v.note("%s held by the daemon", h.sock.addr)
		case h.p != nil:
			v.bad(Fail, r.stopFix(h.p)+"; then "+r.startFix(), "%s holds %s, not relay", r.describeHolder(h.p), h.sock.addr)
		case r.daemon != nil && h.sock.uid == r.daemon.uid:
			v.note("%s held by uid %s, the daemon's user (the process is seen by root only)", h.sock.addr, userName(h.sock.uid))
		default:
			v.bad(Fail, "run relay doctor as root to see which process, and stop it", "a process of uid %s, not the daemon's, holds %s (which one, only root can see)", userName(h.sock.uid), h.sock.addr)
		}
	}
}

// describeHolder names a process, and what a tcpserver runs.
func (r *run) describeHolder(p *proc) string {
	if _, _, prog, ok := parseTCPServer(p.argv); ok {
		return fmt.Sprintf("%s pid %d running %s", filepath.Base(p.argv[0]), p.pid, strings.Join(prog, " "))
	}
	return p.describe()
}

// stopFix is how to stop a process for good: the daemontools service,
// the systemd unit, or the process itself.
func (r *run) stopFix(p *proc) string {
	if parent := r.procs.get(p.ppid); parent != nil && parent.name == "supervise" {
		dir, err := r.procs.link(parent.pid, "cwd")
		if err != nil {
			return fmt.Sprintf("take down the daemontools service supervise pid %d runs (svc -dx DIR, and remove its link from svscan's directory)", parent.pid)
		}
		if scan := r.procs.get(parent.ppid); scan != nil && scan.name == "svscan" {
			if sdir, err := r.procs.link(scan.pid, "cwd"); err == nil {
				if link := serviceLink(sdir, dir); link != "" {
					return "rm " + link + " && svc -dx " + dir
				}
			}
		}
		return "svc -dx " + dir + " (and remove its link from svscan's directory)"
	}
	if u := r.procs.unit(p.pid); u != "" && u != r.unitName() {
		return "systemctl disable --now " + u
	}
	return fmt.Sprintf("kill %d (and remove whatever starts it at boot)", p.pid)
}

// serviceLink finds the entry of svscan's directory that leads to dir.
func serviceLink(scanDir, dir string) string {
	ents, err := os.ReadDir(scanDir)
	if err != nil {
		return ""
	}
	for _, e := range ents {
		p := filepath.Join(scanDir, e.Name())
		if t, err := filepath.EvalSymlinks(p); err == nil && t == dir {
			return p
		}
	}
	return ""
}

// tcpserverOn returns a tcpserver (or sslserver) process started for a
// listening address, which any user can see in /proc: what holds a socket
// whose owner only root can see.
func (r *run) tcpserverOn(addr netip.AddrPort) *proc {
	for _, p := range r.procs.all() {
		host, ps, _, ok := parseTCPServer(p.argv)
		if !ok {
			continue
		}
		if n, err := net.LookupPort("tcp", ps); err != nil || n != int(addr.Port()) {
			continue
		}
		// tcpserver's host: 0 for every address, an IP, or a name.
		if a, err := netip.ParseAddr(host); err == nil && a.Unmap() != addr.Addr() && !a.IsUnspecified() {
			continue
		}
		if host == "0" && !addr.Addr().IsUnspecified() {
			continue
		}
		return p
	}
	return nil
}

// tcpserverOpts are the options of ucspi-tcp's tcpserver (and
// ucspi-ssl's sslserver) that take an argument.
const tcpserverOpts = "xtuglbBcaiNTwzZkKC"

// parseTCPServer reads a tcpserver command line: tcpserver [options]
// host port program [arg ...].
func parseTCPServer(argv []string) (host, port string, prog []string, ok bool) {
	if len(argv) == 0 {
		return "", "", nil, false
	}
	switch filepath.Base(argv[0]) {
	case "tcpserver", "sslserver":
	default:
		return "", "", nil, false
	}
	i := 1
	for i < len(argv) {
		a := argv[i]
		if a == "--" {
			i++
			break
		}
		if len(a) < 2 || a[0] != '-' {
			break
		}
		i++
		for j := 1; j < len(a); j++ {
			if strings.IndexByte(tcpserverOpts, a[j]) >= 0 {
				if j == len(a)-1 {
					i++ // the argument is the next word
				}
				break
			}
		}
	}
	if i+2 >= len(argv) {
		return "", "", nil, false // host, port and a program are needed
	}
	return argv[i], argv[i+1], argv[i+2:], true
}

// runsQmailSMTPD reports whether a command line runs qmail-smtpd.
func runsQmailSMTPD(argv []string) bool {
	return slices.ContainsFunc(argv, func(a string) bool { return filepath.Base(a) == "qmail-smtpd" })
}

// checkListeners: every [[listen]] is the daemon's; a local socket
// answers and every local user may connect to it.
func (r *run) checkListeners() {
	for _, l := range r.cfg.Listen {
		var v verdict
		check := "listen " + l.Addr
		if l.Mode != config.ModeLocal {
			r.judgeHolders(&v, l.Addr, "relay's "+l.Mode+" listener")
			r.emit(check, &v, l.Mode)
			continue
		}
		p := r.probes[l.Addr]
		switch {
		case errors.Is(p.err, syscall.ENOENT):
			v.bad(Fail, r.startFix(), "no socket at %s: relay qq finds no daemon (local.on_daemon_down decides every local message)", l.Addr)
		case errors.Is(p.err, syscall.ECONNREFUSED):
			v.bad(Fail, r.startFix(), "%s exists but nothing listens on it (left by a daemon that stopped)", l.Addr)
		case p.pid == 0 && p.err != nil:
			v.bad(Fail, r.startFix(), "%s: %v", l.Addr, p.err)
		case r.daemon != nil && p.pid != r.daemon.pid:
			holder := fmt.Sprintf("pid %d", p.pid)
			if hp := r.procs.get(p.pid); hp != nil {
				holder = hp.describe()
			}
			v.bad(Fail, "stop "+holder+"; then "+r.restartFix(), "%s is answered by %s, not the daemon", l.Addr, holder)
		case p.err != nil:
			v.bad(Fail, "the daemon's log says why (journalctl -u relay -n 50)", "pid %d accepts on %s but does not greet: %v", p.pid, l.Addr, p.err)
		case !strings.HasPrefix(p.greeting, "220"):
			v.bad(Fail, "the daemon's log says why (journalctl -u relay -n 50)", "pid %d on %s greets %q", p.pid, l.Addr, p.greeting)
		default:
			v.note("%q", p.greeting)
		}
		if !errors.Is(p.err, syscall.ENOENT) {
			if err := others.reach(l.Addr, 2); err != nil {
				v.bad(Fail, reachFix(err, 2), "local users cannot connect (relay qq runs as each of them): %v", err)
			}
		}
		r.emit(check, &v, fmt.Sprintf("local socket of pid %d", p.pid))
	}
}

// smtpPorts are the ports mail may come in on: nothing but relay should
// answer there.
var smtpPorts = []int{25, 465, 587}

// checkOtherSMTP: no other SMTP server (a tcpserver running qmail-smtpd)
// answers on ports 25, 465 and 587 beside relay, and something answers on
// port 25.
func (r *run) checkOtherSMTP() {
	configured := map[int]bool{}
	if r.cfg != nil {
		for _, l := range r.cfg.Listen {
			if l.Mode == config.ModeLocal {
				continue
			}
			if _, ps, err := net.SplitHostPort(l.Addr); err == nil {
				if n, err := net.LookupPort("tcp", ps); err == nil {
					configured[n] = true
				}
			}
		}
	}
	for _, port := range smtpPorts {
		if configured[port] {
			continue // checkListeners judged who holds it
		}
		check := "port " + strconv.Itoa(port)
		hs := r.holders(":" + strconv.Itoa(port))
		if len(hs) == 0 {
			if port == 25 && r.cfg != nil {
				r.add(check, Warn, `add [[listen]] addr = "0.0.0.0:25" mode = "smtp" to `+r.o.Config+", then "+r.restartFix(),
					"nothing listens on port 25 and relay's config has no listener there: this server takes no mail from the internet")
			}
			continue
		}
		var v verdict
		for _, h := range hs {
			switch {
			case h.p != nil && r.daemon != nil && h.p.pid == r.daemon.pid:
				v.note("held by the daemon")
			case h.p != nil && runsQmailSMTPD(h.p.argv):
				v.bad(Fail, r.stopFix(h.p), "%s answers on port %d: mail there is neither counted nor limited by relay", r.describeHolder(h.p), port)
			case h.p != nil:
				v.bad(Fail, "stop it, or give port "+strconv.Itoa(port)+" to relay ([[listen]] in "+r.o.Config+")", "%s listens on port %d: mail there does not pass relay", r.describeHolder(h.p), port)
			case r.daemon != nil && h.sock.uid == r.daemon.uid:
				v.note("held by uid %s, the daemon's user", userName(h.sock.uid))
			default:
				v.bad(Warn, "run relay doctor as root", "not checked as uid %d: a process of uid %s listens on port %d (which one, only root can see)", r.euid, userName(h.sock.uid), port)
			}
		}
		r.emit(check, &v, "")
	}
}

// reachError is a path some user cannot reach: a directory on the way or
// the file itself.
type reachError struct {
	path string
	dir  bool
	st   fileStat
}

func (e *reachError) Error() string {
	what := "file"
	if e.dir {
		what = "directory"
	}
	return fmt.Sprintf("%s %s is %s", what, e.path, e.st)
}

// reachFix is the chmod that lets others reach what err names.
func reachFix(err error, bit uint32) string {
	var re *reachError
	if !errors.As(err, &re) {
		return ""
	}
	if re.dir {
		return "chmod o+x " + re.path
	}
	return "chmod o+" + map[uint32]string{4: "r", 2: "w", 1: "x"}[bit] + " " + re.path
}
