package policy

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"
)

func TestIdentityConstructors(t *testing.T) {
	cases := []struct {
		got  Identity
		id   string
		kind string
	}{
		{UserID("Bob"), "user:Bob", "user"},
		{LocalUID(1001, "bob"), "uid:local:1001", "uid"},
		{WebUID("web1", 33, "www", "contact.php"), "uid:web1:33", "uid"},
		{SenderID("Alice@Example.COM"), "sender:alice@example.com", "sender"},
		{SenderID(""), "sender:<>", "sender"},
		{IPID(netip.MustParseAddr("192.0.2.7")), "ip:192.0.2.7", "ip"},
		{IPID(netip.MustParseAddr("::ffff:192.0.2.7")), "ip:192.0.2.7", "ip"},
		{IPID(netip.MustParseAddr("2001:db8:1:2:aaaa:bbbb:cccc:dddd")), "ip:2001:db8:1:2::/64", "ip"},
		{IPID(netip.MustParseAddr("fe80::1%eth0")), "ip:fe80::/64", "ip"},
	}
	for _, c := range cases {
		if c.got.ID != c.id || c.got.Kind != c.kind {
			t.Errorf("got %+v, want id %q kind %q", c.got, c.id, c.kind)
		}
	}
	if w := WebUID("web1", 33, "www", "contact.php"); w.Account != "www" || w.Script != "contact.php" {
		t.Errorf("WebUID lost account or script: %+v", w)
	}
	if d, ok := DomainID("a@b@Example.ORG"); !ok || d.ID != "domain:example.org" || d.Kind != "domain" {
		t.Errorf("DomainID: %+v %v", d, ok)
	}
	for _, bad := range []string{"", "nodomain", "x@"} {
		if d, ok := DomainID(bad); ok {
			t.Errorf("DomainID(%q) = %+v, want none", bad, d)
		}
	}
}

func TestGlob(t *testing.T) {
	cases := []struct {
		pat, s string
		want   bool
	}{
		{"sender:news@example.com", "sender:news@example.com", true},
		{"sender:news@example.com", "sender:news@example.comx", false},
		{"sender:*@lists.example.com", "sender:a@lists.example.com", true},
		{"sender:*@lists.example.com", "sender:a@evil.com", false},
		{"sender:*@lists.example.com", "sender:a@lists.example.com.evil", false},
		{"uid:web1:*", "uid:web1:33", true},
		{"uid:web1:*", "uid:web2:33", false},
		{"sender:*-bounces*@*", "sender:list-bounces+x@example.com", true},
		{"sender:a*a", "sender:a", false},
		{"sender:a*a", "sender:aa", true},
	}
	for _, c := range cases {
		if got := compileGlob(c.pat).matches(c.s); got != c.want {
			t.Errorf("%q matches %q = %v, want %v", c.pat, c.s, got, c.want)
		}
	}
}

// FuzzGlob checks the matcher against a regexp doing the same.
func FuzzGlob(f *testing.F) {
	f.Add("sender:*@lists.example.com", "sender:x@lists.example.com")
	f.Add("a*a*a", "aaaa")
	f.Add("*", "")
	f.Add("**x", "yx")
	f.Fuzz(func(t *testing.T, pat, s string) {
		parts := strings.Split(pat, "*")
		for i := range parts {
			parts[i] = regexp.QuoteMeta(parts[i])
		}
		re, err := regexp.Compile(`^(?s:` + strings.Join(parts, ".*") + `)$`)
		if err != nil {
			t.Skip()
		}
		if got, want := compileGlob(pat).matches(s), re.MatchString(s); got != want {
			t.Fatalf("%q matches %q = %v, regexp says %v", pat, s, got, want)
		}
	})
}
