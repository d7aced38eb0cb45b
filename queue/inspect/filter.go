package inspect

import (
	"fmt"
	"net/netip"
	"strings"
)

// Filter narrows a listing. The zero value matches every message.
type Filter struct {
	// Sender matches the envelope sender exactly, case-insensitively;
	// "@domain" matches every sender at that domain and "<>" the null
	// sender. Empty matches any.
	Sender string
	UID    *int         // origin "invoked by uid N"
	IP     netip.Prefix // network origin's client address within
}

// Match reports whether m passes every filter set.
func (f *Filter) Match(m *Message) bool {
	switch {
	case f.Sender == "":
	case f.Sender == "<>":
		if m.Sender != "" {
			return false
		}
	case strings.HasPrefix(f.Sender, "@"):
		at := strings.LastIndexByte(m.Sender, '@')
		if at < 0 || !strings.EqualFold(m.Sender[at:], f.Sender) {
			return false
		}
	default:
		if !strings.EqualFold(m.Sender, f.Sender) {
			return false
		}
	}
	if f.UID != nil && (m.Origin.UID == nil || *m.Origin.UID != *f.UID) {
		return false
	}
	if f.IP.IsValid() {
		addr, err := netip.ParseAddr(m.Origin.IP)
		if err != nil || m.Origin.Kind != KindNetwork || !f.IP.Contains(addr.Unmap()) {
			return false
		}
	}
	return true
}

// ParsePrefix reads an address ("192.0.2.7", "2001:db8::1") as a prefix of
// its full length, or a CIDR prefix ("192.0.2.0/24"). IPv4-mapped IPv6 forms
// are turned into IPv4, as the client addresses they are compared with are.
func ParsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("not an IP address or prefix: %q", s)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("not an IP address or prefix: %q", s)
	}
	if p.Addr().Is4In6() {
		if p.Bits() < 96 {
			return netip.Prefix{}, fmt.Errorf("IPv4-mapped prefix shorter than /96: %q", s)
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p.Masked(), nil
}
