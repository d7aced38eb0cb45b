package config

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// TCPRules is a parsed tcprules text file (tcp.smtp), matched the way
// tcpserver looks up tcp.smtp.cdb.
//
// Address forms: an exact IPv4 address; a dotted prefix ending in '.'
// ("10.", "192.168.1."); a last-octet range ("1.2.3.10-20", which stands
// for one exact rule per address, as tcprules(1) expands it); the empty
// address (the default rule). For IPv6 an exact address in any form, a
// prefix of whole 16-bit groups ending in ':' as ucspi-tcp6 writes them
// ("2001:db8:"), and, for either family, CIDR "addr/bits". The "=host",
// "=.domain", "=" and "info@addr" forms are accepted but never match:
// relay does no reverse DNS or ident lookups.
//
// tcprules itself silently skips lines it cannot use; relay reports them,
// so a typo cannot quietly drop a rule.
type TCPRules struct {
	byPrefix map[netip.Prefix]TCPRule
	bits4    []int // prefix lengths present for IPv4, longest first
	bits6    []int // the same for IPv6
	def      *TCPRule
}

// TCPRule is what a matched tcprules line says.
type TCPRule struct {
	Allow bool
	Env   map[string]string // e.g. RELAYCLIENT: "" ; DATABYTES: "0"
	Line  int               // line of the rule in its file
}

// Match returns the most specific rule for ip, in tcprules' lookup order
// (exact address, then ever shorter prefixes, then the default rule). ok
// is false when no rule matches, which tcpserver treats as allow.
// IPv4-mapped IPv6 addresses are matched as IPv4.
func (t *TCPRules) Match(ip netip.Addr) (rule TCPRule, ok bool) {
	if t == nil || !ip.IsValid() {
		return TCPRule{}, false
	}
	ip = ip.Unmap().WithZone("")
	bits := t.bits6
	if ip.Is4() {
		bits = t.bits4
	}
	for _, b := range bits {
		p, _ := ip.Prefix(b)
		if r, ok := t.byPrefix[p]; ok {
			return r, true
		}
	}
	if t.def != nil {
		return *t.def, true
	}
	return TCPRule{}, false
}

// Len is the number of address rules, the default rule included
// ("=host" and "info@" rules, which never match, are not counted).
func (t *TCPRules) Len() int {
	if t == nil {
		return 0
	}
	n := len(t.byPrefix)
	if t.def != nil {
		n++
	}
	return n
}

// ParseTCPRules parses tcprules text. name is used in error positions.
// Every bad line is reported (as Errors, with name:line:col); as in
// tcprules' cdb, the first rule for an address wins over later ones.
func ParseTCPRules(name string, r io.Reader) (*TCPRules, error) {
	t := &TCPRules{byPrefix: map[netip.Prefix]TCPRule{}}
	var errs Errors
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := strings.TrimRight(sc.Text(), "\r")
		if strings.TrimSpace(line) == "" || line[0] == '#' {
			continue
		}
		addr, instr, ok := strings.Cut(line, ":")
		// An IPv6 address holds colons: the instruction starts after
		// the first ':' that is followed by allow or deny, which no hex
		// group can be.
		if i := instructionStart(line); i > 0 {
			addr, instr, ok = line[:i-1], line[i:], true
		}
		if !ok {
			errs = append(errs, Error{File: name, Line: lineNo, Col: 1, Msg: "want address:allow or address:deny"})
			continue
		}
		rule, col, err := parseInstructions(instr)
		if err != nil {
			errs = append(errs, Error{File: name, Line: lineNo, Col: len(addr) + 2 + col, Msg: err.Error()})
			continue
		}
		rule.Line = lineNo
		prefixes, never, err := parseRuleAddress(addr)
		if err != nil {
			errs = append(errs, Error{File: name, Line: lineNo, Col: 1, Msg: err.Error()})
			continue
		}
		switch {
		case never:
		case prefixes == nil:
			if t.def == nil {
				t.def = &rule
			}
		default:
			for _, p := range prefixes {
				if _, dup := t.byPrefix[p]; !dup {
					t.byPrefix[p] = rule
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, Error{File: name, Line: lineNo + 1, Col: 1, Msg: err.Error()})
	}
	if len(errs) > 0 {
		return nil, errs
	}
	for p := range t.byPrefix {
		if p.Addr().Is4() {
			t.bits4 = append(t.bits4, p.Bits())
		} else {
			t.bits6 = append(t.bits6, p.Bits())
		}
	}
	for _, bits := range []*[]int{&t.bits4, &t.bits6} {
		slices.Sort(*bits)
		slices.Reverse(*bits)
		*bits = slices.Compact(*bits)
	}
	return t, nil
}

// instructionStart returns the index just after the first ':' that starts
// "allow" or "deny", or 0.
func instructionStart(line string) int {
	for i := 0; i < len(line); i++ {
		if line[i] == ':' && (strings.HasPrefix(line[i+1:], "allow") || strings.HasPrefix(line[i+1:], "deny")) {
			return i + 1
		}
	}
	return 0
}

// parseInstructions parses "allow" or "deny" and the ",VAR=<q>value<q>"
// items after it; any character may serve as the quote <q> (tcprules(1)).
// col is the 0-based offset of a problem in s.
func parseInstructions(s string) (rule TCPRule, col int, err error) {
	rest := s
	switch {
	case strings.HasPrefix(s, "allow"):
		rule.Allow = true
		rest = s[len("allow"):]
	case strings.HasPrefix(s, "deny"):
		rest = s[len("deny"):]
	default:
		return rule, 0, fmt.Errorf("instruction must be allow or deny, not %q", s)
	}
	for rest != "" {
		at := len(s) - len(rest)
		if rest[0] != ',' {
			return rule, at, fmt.Errorf("want ,VAR=\"value\" after the instruction, not %q", rest)
		}
		name, after, ok := strings.Cut(rest[1:], "=")
		if !ok || name == "" || strings.ContainsAny(name, ",\x00") {
			return rule, at, fmt.Errorf("want ,VAR=\"value\", not %q", rest)
		}
		if after == "" {
			return rule, at, fmt.Errorf("%s: missing quoted value", name)
		}
		quote := after[0]
		end := strings.IndexByte(after[1:], quote)
		if end < 0 {
			return rule, at, fmt.Errorf("%s: value has no closing %c", name, quote)
		}
		if rule.Env == nil {
			rule.Env = map[string]string{}
		}
		rule.Env[name] = after[1 : 1+end]
		rest = after[2+end:]
	}
	return rule, 0, nil
}

// parseRuleAddress turns a rule's address into the prefixes it stands
// for. prefixes is nil for the default rule; never is true for forms that
// need DNS or ident and so never match here.
func parseRuleAddress(a string) (prefixes []netip.Prefix, never bool, err error) {
	switch {
	case a == "":
		return nil, false, nil
	case a[0] == '=' || strings.Contains(a, "@"):
		return nil, true, nil
	case strings.Contains(a, "/"):
		p, err := ParseNetwork(a)
		if err != nil {
			return nil, false, err
		}
		return []netip.Prefix{p}, false, nil
	case strings.Contains(a, ":"):
		return parseRuleAddress6(a)
	}
	return parseRuleAddress4(a)
}

func parseRuleAddress4(a string) ([]netip.Prefix, bool, error) {
	bad := func() ([]netip.Prefix, bool, error) {
		return nil, false, fmt.Errorf("%q is not an IPv4 address, a prefix ending in '.' or a range like 1.2.3.10-20", a)
	}
	if strings.HasSuffix(a, ".") {
		parts := strings.Split(strings.TrimSuffix(a, "."), ".")
		if len(parts) > 3 {
			return bad()
		}
		var ip [4]byte
		for i, p := range parts {
			n, ok := octet(p)
			if !ok {
				return bad()
			}
			ip[i] = n
		}
		return []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4(ip), 8*len(parts))}, false, nil
	}
	head, last, _ := cutLast(a, ".")
	if lo, hi, isRange := strings.Cut(last, "-"); isRange {
		base, err := netip.ParseAddr(head + ".0")
		from, ok1 := octet(lo)
		to, ok2 := octet(hi)
		if err != nil || !base.Is4() || !ok1 || !ok2 || from > to {
			return bad()
		}
		ip := base.As4()
		out := make([]netip.Prefix, 0, int(to)-int(from)+1)
		for n := int(from); n <= int(to); n++ {
			ip[3] = byte(n)
			out = append(out, netip.PrefixFrom(netip.AddrFrom4(ip), 32))
		}
		return out, false, nil
	}
	ip, err := netip.ParseAddr(a)
	if err != nil || !ip.Is4() {
		return bad()
	}
	return []netip.Prefix{netip.PrefixFrom(ip, 32)}, false, nil
}

// parseRuleAddress6 accepts an exact IPv6 address or a prefix of 1 to 7
// whole groups ending in ':' ("2001:db8:").
func parseRuleAddress6(a string) ([]netip.Prefix, bool, error) {
	if ip, err := netip.ParseAddr(a); err == nil && ip.Zone() == "" {
		ip = ip.Unmap()
		return []netip.Prefix{netip.PrefixFrom(ip, ip.BitLen())}, false, nil
	}
	bad := func() ([]netip.Prefix, bool, error) {
		return nil, false, fmt.Errorf("%q is not an IPv6 address or a prefix of whole groups ending in ':'", a)
	}
	if !strings.HasSuffix(a, ":") {
		return bad()
	}
	groups := strings.Split(strings.TrimSuffix(a, ":"), ":")
	if len(groups) > 7 {
		return bad()
	}
	var ip [16]byte
	for i, g := range groups {
		if len(g) == 0 || len(g) > 4 {
			return bad()
		}
		n, err := strconv.ParseUint(g, 16, 16)
		if err != nil {
			return bad()
		}
		ip[2*i], ip[2*i+1] = byte(n>>8), byte(n)
	}
	return []netip.Prefix{netip.PrefixFrom(netip.AddrFrom16(ip), 16*len(groups))}, false, nil
}

// octet parses a decimal 0-255 without sign or leading zero (tcpserver
// compares text, so "010." would never match 10.x.x.x).
func octet(s string) (byte, bool) {
	if s == "" || len(s) > 3 || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	n := 0
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	if n > 255 {
		return 0, false
	}
	return byte(n), true
}

func cutLast(s, sep string) (before, after string, found bool) {
	if i := strings.LastIndex(s, sep); i >= 0 {
		return s[:i], s[i+len(sep):], true
	}
	return "", s, false
}
