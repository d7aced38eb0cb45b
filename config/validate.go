package config

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// validator collects every semantic problem of a decoded config, each at
// the position of the key that causes it.
type validator struct {
	file string
	pos  *positions
	errs Errors
	// warns are problems that do not stop relay: a setting that can
	// never take effect as written.
	warns Errors
	// skip holds keys already reported as undecodable, whose defaults
	// stand in for them: problems under them would only repeat those.
	skip map[string]bool
}

func (v *validator) add(key, format string, args ...any) {
	for k := key; k != ""; {
		if v.skip[k] {
			return
		}
		i := strings.LastIndexAny(k, ".[")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	line, col := v.pos.pos(key)
	v.errs = append(v.errs, Error{File: v.file, Line: line, Col: col, Key: key, Msg: fmt.Sprintf(format, args...)})
}

// warn records a problem that does not stop relay, at key's position.
func (v *validator) warn(key, format string, args ...any) {
	line, col := v.pos.pos(key)
	v.warns = append(v.warns, Error{File: v.file, Line: line, Col: col, Key: key, Msg: fmt.Sprintf(format, args...)})
}

func (v *validator) config(c *Config) {
	if strings.ContainsFunc(c.Hostname, isSpaceOrControl) {
		v.add("hostname", "must not contain spaces or control characters")
	}
	if c.DataDir == "" {
		v.add("data_dir", "must not be empty")
	}
	v.listeners(c)
	v.tls(c)
	v.submissionAuth(c)
	v.relay(&c.Relay)
	v.positive("auth.timeout", c.Auth.Timeout.Duration)
	v.pace("auth.fail_limit", c.Auth.FailLimit)
	v.delivery(&c.Delivery)
	v.local(&c.Local)
	v.admin(&c.Admin)
	v.policy(&c.Policy)
	v.webservers(c.Webservers)
	v.notify(&c.Notify)
	v.dkim(&c.DKIM)
}

func isSpaceOrControl(r rune) bool { return r <= ' ' || r == 0x7f }

func (v *validator) listeners(c *Config) {
	if len(c.Listen) == 0 {
		v.add("listen", "at least one [[listen]] is needed")
	}
	seen := map[string]int{}
	for i, l := range c.Listen {
		key := fmt.Sprintf("listen[%d]", i)
		switch l.Mode {
		case ModeSMTP, ModeSubmission, ModeSMTPS:
			if err := checkHostPort(l.Addr); err != nil {
				v.add(key+".addr", "%v", err)
				continue
			}
		case ModeLocal:
			if l.Addr == "" {
				v.add(key+".addr", "must name the unix socket path")
				continue
			}
		case "":
			v.add(key+".mode", "missing; one of smtp, submission, smtps, local")
			continue
		default:
			v.add(key+".mode", "unknown mode %q; one of smtp, submission, smtps, local", l.Mode)
			continue
		}
		if strings.HasSuffix(l.Addr, ":0") {
			continue // every ":0" is its own ephemeral port
		}
		if j, dup := seen[l.Addr]; dup {
			v.add(key+".addr", "%q is already used by listen[%d]", l.Addr, j)
			continue
		}
		seen[l.Addr] = i
	}
}

// checkHostPort accepts "host:port" with a numeric port; the host may be
// empty (all addresses), an IP or a name.
func checkHostPort(addr string) error {
	if addr == "" {
		return fmt.Errorf("missing; want host:port")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port", addr)
	}
	if strings.ContainsFunc(host, isSpaceOrControl) {
		return fmt.Errorf("%q: bad host", addr)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || (n == 0 && port != "0") {
		return fmt.Errorf("%q: port must be a number from 0 to 65535", addr)
	}
	return nil
}

func (v *validator) tls(c *Config) {
	switch {
	case c.TLS.Cert != "" && c.TLS.Key == "":
		v.add("tls.key", "tls.cert is set but tls.key is not")
	case c.TLS.Key != "" && c.TLS.Cert == "":
		v.add("tls.cert", "tls.key is set but tls.cert is not")
	case c.TLS.Cert == "":
		for i, l := range c.Listen {
			if l.Mode == ModeSMTPS {
				v.add(fmt.Sprintf("listen[%d].mode", i), "smtps needs tls.cert and tls.key")
			}
		}
	}
}

// submissionAuth warns about a submission listener that can never offer
// AUTH, where every MAIL is refused (530): AUTH waits for STARTTLS when
// auth.require_tls is set, and STARTTLS needs a certificate; and without a
// checkpassword or users_file there is nothing to log in against. (smtps
// without a certificate is an error, in tls.)
func (v *validator) submissionAuth(c *Config) {
	noTLS := c.Auth.RequireTLS && c.TLS.Cert == ""
	noBackend := c.Auth.Checkpassword == "" && c.Auth.UsersFile == ""
	for i, l := range c.Listen {
		if l.Mode != ModeSubmission {
			continue
		}
		key := fmt.Sprintf("listen[%d].mode", i)
		switch {
		case noTLS && noBackend:
			v.warn(key, "submission listener %s can never offer AUTH, so it refuses all mail: auth.require_tls = true and no [tls] certificate for STARTTLS, and neither auth.checkpassword nor auth.users_file is set", l.Addr)
		case noTLS:
			v.warn(key, "submission listener %s can never offer AUTH, so it refuses all mail: auth.require_tls = true and no [tls] certificate for STARTTLS (set tls.cert and tls.key, or auth.require_tls = false)", l.Addr)
		case noBackend:
			v.warn(key, "submission listener %s can never offer AUTH, so it refuses all mail: neither auth.checkpassword nor auth.users_file is set", l.Addr)
		}
	}
}

func (v *validator) relay(r *Relay) {
	for i, d := range r.LocalDomains {
		if d == "" || strings.ContainsFunc(d, isSpaceOrControl) || strings.Contains(d, "@") {
			v.add(fmt.Sprintf("relay.local_domains[%d]", i), "%q is not a domain name", d)
		}
	}
	for i, n := range r.RelayNetworks {
		if _, err := ParseNetwork(n); err != nil {
			v.add(fmt.Sprintf("relay.relay_networks[%d]", i), "%v", err)
		}
	}
	v.nonNegative("relay.max_message_bytes", r.MaxMessageBytes)
	v.nonNegative("relay.max_recipients", int64(r.MaxRecipients))
	v.nonNegative("relay.max_connections", int64(r.MaxConnections))
	v.nonNegative("relay.max_connections_per_ip", int64(r.MaxConnectionsPerIP))
	v.positive("relay.timeout", r.Timeout.Duration)
	v.positive("relay.max_session", r.MaxSession.Duration)
	v.pace("relay.conn_rate_per_ip", r.ConnRatePerIP)
}

// ParseNetwork parses a relay_networks entry: a CIDR prefix ("10.0.0.0/8",
// "2001:db8::/32") or a bare IP, which stands for itself alone. The result
// is masked; IPv4-mapped IPv6 addresses are taken as IPv4.
func ParseNetwork(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR prefix or IP address", s)
		}
		if p.Addr().Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q: zones are not allowed", s)
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR prefix or IP address", s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func (v *validator) nonNegative(key string, n int64) {
	if n < 0 {
		v.add(key, "must not be negative")
	}
}

func (v *validator) positive(key string, d time.Duration) {
	if d <= 0 {
		v.add(key, "must be longer than 0s")
	}
}

func (v *validator) delivery(d *Delivery) {
	switch d.Method {
	case DeliverSMTP:
		if err := checkHostPort(d.SMTPAddr); err != nil {
			v.add("delivery.smtp_addr", "needed by method smtp: %v", err)
		}
	case DeliverMaildir:
		if d.Maildir == "" {
			v.add("delivery.maildir", "needed by method maildir")
		}
	case DeliverQmailQueue, DeliverQmailInject:
		if !filepath.IsAbs(d.Command) {
			v.add("delivery.command", "method %s needs an absolute path here, not %q", d.Method, d.Command)
		}
	case DeliverQmailDirect:
		if !filepath.IsAbs(d.QueueDir) {
			v.add("delivery.queue_dir", "method qmail-direct needs qmail's queue as an absolute path, not %q", d.QueueDir)
		}
	default:
		v.add("delivery.method", "unknown method %q; one of qmail-queue, qmail-inject, smtp, maildir, qmail-direct", d.Method)
	}
	v.positive("delivery.timeout", d.Timeout.Duration)
}

func (v *validator) local(l *Local) {
	if !filepath.IsAbs(l.QmailQueue) {
		v.add("local.qmail_queue", "must be an absolute path, not %q", l.QmailQueue)
	}
	if l.OnDaemonDown != "accept" && l.OnDaemonDown != "defer" {
		v.add("local.on_daemon_down", "%q: one of accept, defer", l.OnDaemonDown)
	}
	for i, u := range l.ExemptUsers {
		if u == "" || strings.ContainsFunc(u, isSpaceOrControl) || strings.Contains(u, ":") {
			v.add(fmt.Sprintf("local.exempt_users[%d]", i), "%q is not a user name", u)
		}
	}
	v.nonNegative("local.max_connections", int64(l.MaxConnections))
}

func (v *validator) admin(a *Admin) {
	if err := checkHostPort(a.Listen); err != nil {
		v.add("admin.listen", "%v", err)
		return
	}
	switch {
	case a.TLSCert != "" && a.TLSKey == "":
		v.add("admin.tls_key", "admin.tls_cert is set but admin.tls_key is not")
	case a.TLSKey != "" && a.TLSCert == "":
		v.add("admin.tls_cert", "admin.tls_key is set but admin.tls_cert is not")
	}
	if IsLoopbackListen(a.Listen) {
		return
	}
	if a.TokenFile == "" {
		v.add("admin.listen", "non-loopback admin listen needs token_file")
	}
	if a.TLSCert == "" && a.TLSKey == "" && !a.InsecurePlainHTTP {
		v.add("admin.listen", "non-loopback admin listen needs tls_cert and tls_key (HTTPS), or insecure_plain_http = true to send the token in clear on purpose")
	}
}

// IsLoopbackListen reports whether a host:port listen address only
// accepts connections from this machine (127.0.0.0/8, ::1, "localhost").
// An empty host means every address, so it is not loopback.
func IsLoopbackListen(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

func (v *validator) policy(p *Policy) {
	if p.Mode != PolicyEnforce && p.Mode != PolicyObserve {
		v.add("policy.mode", "%q: one of enforce, observe", p.Mode)
	}
	switch p.OverLimit {
	case OverLimitDefer, OverLimitReject, OverLimitHold, OverLimitQueue:
	default:
		v.add("policy.over_limit", "%q: one of defer, reject, hold, queue", p.OverLimit)
	}
	v.nonNegative("policy.suspend_after", int64(p.SuspendAfter))
	if p.QueueMax < 1 {
		v.add("policy.queue_max", "must be at least 1 (messages waiting per identity)")
	}
	seenKind := map[string]int{}
	for i, kind := range p.SuspendKinds {
		key := fmt.Sprintf("policy.suspend_kinds[%d]", i)
		if KindRank(kind) == NumKinds {
			v.add(key, "%q is not an identity kind; one of %s", kind, strings.Join(IdentityKinds(), ", "))
		} else if j, dup := seenKind[kind]; dup {
			v.add(key, "%q repeats policy.suspend_kinds[%d]", kind, j)
		} else {
			seenKind[kind] = i
		}
	}
	v.positive("policy.reserve_timeout", p.ReserveTimeout.Duration)
	for _, kind := range IdentityKinds() {
		if l := p.Limits.ForKind(kind); l != nil {
			key := "policy.limits." + kind
			v.nonNegative(key+".max_rcpts_per_msg", int64(l.MaxRcptsPerMsg))
			v.rates(key+".rcpts", l.Rcpts)
			v.rates(key+".msgs", l.Msgs)
			v.pace(key+".pace", l.Pace)
		}
	}
	for i, a := range p.Allow {
		key := fmt.Sprintf("policy.allow[%d]", i)
		if err := checkAllowMatch(a.Match); err != nil {
			v.add(key+".match", "%v", err)
		}
		v.nonNegative(key+".max_rcpts_per_msg", int64(a.MaxRcptsPerMsg))
		v.rates(key+".rcpts", a.Rcpts)
		v.rates(key+".msgs", a.Msgs)
		if a.Unlimited && (a.MaxRcptsPerMsg != 0 || len(a.Rcpts) > 0 || len(a.Msgs) > 0) {
			v.add(key+".unlimited", "unlimited = true cannot be combined with max_rcpts_per_msg, rcpts or msgs")
		}
		v.pace(key+".pace", a.Pace)
		switch a.Action {
		case "", OverLimitDefer, OverLimitReject, OverLimitHold, OverLimitQueue:
		default:
			v.add(key+".action", "%q: one of defer, reject, hold, queue (or leave it out for policy.over_limit)", a.Action)
		}
	}
}

// maxPaceBurst bounds N of a pace: the burst of its token bucket.
const maxPaceBurst = 1_000_000

// pace checks a pace "N/D": a rate of at most maxPaceBurst per D.
func (v *validator) pace(key string, r OptRate) {
	if r.On() && r.N > maxPaceBurst {
		v.add(key, "%s: N is the burst and must be at most %d", r.String(), maxPaceBurst)
	}
}

// checkAllowMatch checks a [[policy.allow]] match: an identity id
// (docs/design.md §3) with a known kind and something after the colon.
func checkAllowMatch(m string) error {
	kind, rest, ok := strings.Cut(m, ":")
	if m == "" {
		return fmt.Errorf("missing; an identity such as \"sender:news@example.com\"")
	}
	if KindRank(kind) == NumKinds {
		return fmt.Errorf("%q must start with a kind: %s, then ':'", m, strings.Join(IdentityKinds(), ", "))
	}
	if !ok || rest == "" {
		return fmt.Errorf("%q: nothing after the kind %q", m, kind)
	}
	if strings.ContainsFunc(rest, isSpaceOrControl) {
		return fmt.Errorf("%q: must not contain spaces", m)
	}
	return nil
}

// rates reports list entries whose window repeats an earlier one: two caps
// on the same window are a typo, and only the smaller could ever act.
func (v *validator) rates(key string, rs []Rate) {
	seen := map[time.Duration]int{}
	for i, r := range rs {
		if j, dup := seen[r.Window]; dup {
			v.add(fmt.Sprintf("%s[%d]", key, i), "window %s repeats %s[%d]", FormatWindow(r.Window), key, j)
			continue
		}
		seen[r.Window] = i
	}
}

var webserverName = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)

func (v *validator) webservers(ws []Webserver) {
	names := map[string]int{}
	for i, w := range ws {
		key := fmt.Sprintf("webserver[%d]", i)
		if !webserverName.MatchString(w.Name) {
			v.add(key+".name", "%q: want letters, digits, '_', '.' or '-'", w.Name)
		} else if j, dup := names[w.Name]; dup {
			v.add(key+".name", "%q is already the name of webserver[%d]", w.Name, j)
		} else {
			names[w.Name] = i
		}
		if a, err := netip.ParseAddr(w.Addr); err != nil || a.Zone() != "" {
			v.add(key+".addr", "%q is not an IP address", w.Addr)
		}
	}
}

func (v *validator) notify(n *Notify) {
	if n.Webhook != "" {
		u, err := url.Parse(n.Webhook)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			v.add("notify.webhook", "%q is not an http or https URL", n.Webhook)
		}
	}
	if n.Email != "" && (!strings.Contains(n.Email, "@") || strings.ContainsFunc(n.Email, isSpaceOrControl)) {
		v.add("notify.email", "%q is not an email address", n.Email)
	}
}

// dkim checks the [dkim] section. The keys themselves are package dkim's to
// read (relay serve and check-config do).
func (v *validator) dkim(d *DKIM) {
	for _, a := range []struct{ key, val string }{{"dkim.unowned_from", d.UnownedFrom}, {"dkim.foreign_dmarc", d.ForeignDMARC}} {
		switch a.val {
		case FromAccept, FromHold, FromReject:
		default:
			v.add(a.key, "%q: one of accept, hold, reject", a.val)
		}
	}
	if d.DNS != "" {
		if ap, err := netip.ParseAddrPort(d.DNS); err != nil || ap.Port() == 0 || ap.Addr().Zone() != "" {
			v.add("dkim.dns", "%q: want an IP address and port, e.g. \"127.0.0.1:53\" or \"[::1]:53\"", d.DNS)
		}
	}
	from := false
	for i, h := range d.Headers {
		if !isFieldName(h) {
			v.add(fmt.Sprintf("dkim.headers[%d]", i), "%q is not a header field name", h)
		}
		from = from || strings.EqualFold(h, "From")
	}
	if !from {
		v.add("dkim.headers", "must include From (it is what DKIM signs for)")
	}
	names := map[string]int{}
	for i, dom := range d.Domains {
		key := fmt.Sprintf("dkim.domain[%d]", i)
		name := strings.ToLower(strings.TrimSuffix(dom.Name, "."))
		if !IsDomainName(name) {
			v.add(key+".name", "%q is not a domain name", dom.Name)
		} else if j, dup := names[name]; dup {
			v.add(key+".name", "%q already has dkim.domain[%d]", dom.Name, j)
		} else {
			names[name] = i
		}
		if len(dom.Owners) == 0 {
			v.add(key+".owners", "empty: nobody would own %s; remove the entry to let its logins own it", dom.Name)
		}
		for j, o := range dom.Owners {
			if err := checkOwner(o); err != nil {
				v.add(fmt.Sprintf("%s.owners[%d]", key, j), "%v", err)
			}
		}
	}
}

// checkOwner checks a [[dkim.domain]] owner: an identity id of a strong
// kind (docs/design.md §3), * globs allowed. Envelope senders and their domains
// are anyone's to write, so they cannot own a domain.
func checkOwner(o string) error {
	kind, rest, ok := strings.Cut(o, ":")
	switch kind {
	case KindUser, KindUID, "script", KindIP:
	case KindSender, KindDomain:
		return fmt.Errorf("%q: %s ids are whatever the client writes; owners are user, uid, script or ip ids", o, kind)
	default:
		return fmt.Errorf("%q must start with a kind: user, uid, script or ip, then ':'", o)
	}
	if !ok || rest == "" {
		return fmt.Errorf("%q: nothing after the kind %q", o, kind)
	}
	if strings.ContainsFunc(rest, isSpaceOrControl) {
		return fmt.Errorf("%q: must not contain spaces", o)
	}
	return nil
}

// isFieldName reports whether s is a header field name (RFC 5322 §3.6.8:
// printable ASCII but ':').
func isFieldName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f || c == ':' {
			return false
		}
	}
	return true
}

// IsDomainName reports whether s is a lower-case DNS name of letters,
// digits and '-' (no leading or trailing dot, labels of 1-63, 253 at most).
func IsDomainName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}
