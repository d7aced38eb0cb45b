package dkim

import (
	"context"
	"crypto"
	"slices"
	"strings"
	"testing"

	"relay/config"
)

func TestFromDomains(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want []string
	}{
		{[]string{" Alice <alice@Example.COM.>"}, []string{"example.com"}},
		{[]string{"alice@example.com, bob@example.org"}, []string{"example.com", "example.org"}},
		{[]string{"a@example.com", " b@EXAMPLE.com"}, []string{"example.com"}},
		{[]string{`"boss@bank.example" <x@example.net>`}, []string{"example.net"}}, // the display name is not an address
		{[]string{"=?x-unknown?q?J=F6rg?= <j@example.com>"}, []string{"example.com"}},
		{[]string{"Bob (unclosed <bob@example.com>"}, []string{"example.com"}}, // does not parse: lenient
		{[]string{"<bob@example.com"}, []string{"example.com"}},
		{[]string{"bob@example.com (Bob"}, []string{"example.com"}},
		{[]string{"undisclosed-recipients:;"}, nil},
		{[]string{"bob@[192.0.2.1]"}, nil},
		{[]string{"no address here"}, nil},
		{nil, nil},
	} {
		if got := FromDomains(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("FromDomains(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func FuzzFromDomains(f *testing.F) {
	for _, s := range []string{"Alice <alice@example.com>", "a@b.c, d@e.f", `"x@y" <z@w.example>`, "<a@b", "g: a@b.example, c@d.example;", "=?utf-8?b?w7Y=?= <x@y.example>"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		for _, d := range FromDomains([]string{v}) {
			if !config.IsDomainName(d) || !strings.Contains(strings.ToLower(v), d) && !strings.Contains(strings.ToLower(v), "=?") {
				t.Fatalf("FromDomains(%q) gave %q", v, d)
			}
		}
	})
}

func TestMatchGlob(t *testing.T) {
	for _, tc := range []struct {
		p, s string
		want bool
	}{
		{"user:*@example.com", "user:alice@example.com", true},
		{"user:*@example.com", "user:alice@example.com.evil", false},
		{"user:*@example.com", "user:alice@sub.example.com", false},
		{"uid:web1:*", "uid:web1:1001", true},
		{"uid:web1:*", "uid:web10:1001", false},
		{"script:web1:33:/var/www/*", "script:web1:33:/var/www/a/b.php", true},
		{"*", "anything", true},
		{"a*b*c", "aXXbYYc", true},
		{"a*b*c", "aXXbYY", false},
		{"uid:local:1001", "uid:local:10011", false},
		{"", "", true},
	} {
		if got := matchGlob(tc.p, tc.s); got != tc.want {
			t.Errorf("matchGlob(%q, %q) = %v", tc.p, tc.s, got)
		}
	}
}

func FuzzMatchGlob(f *testing.F) {
	f.Add("user:*@example.com", "user:a@example.com")
	f.Add("a*b*c*", "abcabc")
	f.Fuzz(func(t *testing.T, p, s string) {
		got := matchGlob(p, s)
		if !strings.Contains(p, "*") && got != (p == s) {
			t.Fatalf("matchGlob(%q, %q) = %v without a star", p, s, got)
		}
		if strings.Contains(p, "*") && got && !strings.HasPrefix(s, p[:strings.IndexByte(p, '*')]) {
			t.Fatalf("matchGlob(%q, %q): the prefix does not match", p, s)
		}
	})
}

// policies is a PolicyLookup from a map; it counts lookups.
type policies struct {
	p     map[string]string
	asked []string
}

func (p *policies) lookup(_ context.Context, d string) string {
	p.asked = append(p.asked, d)
	return p.p[d]
}

func TestDecide(t *testing.T) {
	keys := map[string]crypto.Signer{"s1@example.com": ed25519Key(), "s1@shop.example": ed25519Key(), "s1@hoster.example": ed25519Key()}
	base := config.DKIM{UnownedFrom: config.FromReject, ForeignDMARC: config.FromReject, Domains: []config.DKIMDomain{
		{Name: "shop.example", Owners: []string{"uid:local:1001", "uid:web1:*", "user:*@example.com"}},
	}}
	s := testSet(t, base, keys)
	dns := &policies{p: map[string]string{"bank.example": "reject", "news.example": "quarantine", "blog.example": "none"}}
	ours := func(d string) bool { return d == "example.net" }
	type want struct {
		action Action
		domain string
		reason string
	}
	for _, tc := range []struct {
		name string
		from []string
		ids  []string
		want want
	}{
		{"login owns its domain", []string{"a@example.com"}, []string{"user:alice@example.com", "ip:192.0.2.1"}, want{Sign, "example.com", ""}},
		{"subdomain signed by parent", []string{"a@mail.example.com"}, []string{"user:alice@example.com"}, want{Sign, "example.com", ""}},
		{"login in the From: subdomain", []string{"a@mail.example.com"}, []string{"user:bob@mail.example.com"}, want{Sign, "example.com", ""}},
		{"login in a sibling is no owner", []string{"a@example.com"}, []string{"user:bob@other.example.com"}, want{Reject, "example.com", ReasonUnownedFrom}},
		{"login elsewhere", []string{"a@example.com"}, []string{"user:mallory@evil.example"}, want{Reject, "example.com", ReasonUnownedFrom}},
		{"uid without entry", []string{"a@example.com"}, []string{"uid:local:1001"}, want{Reject, "example.com", ReasonUnownedFrom}},
		{"root", []string{"a@example.com"}, []string{"uid:local:0"}, want{Reject, "example.com", ReasonUnownedFrom}},
		{"entry: uid", []string{"a@shop.example"}, []string{"uid:local:1001"}, want{Sign, "shop.example", ""}},
		{"entry: web glob", []string{"a@shop.example"}, []string{"uid:web1:33"}, want{Sign, "shop.example", ""}},
		{"entry: other uid", []string{"a@shop.example"}, []string{"uid:local:1002"}, want{Reject, "shop.example", ReasonUnownedFrom}},
		{"entry is the whole list", []string{"a@shop.example"}, []string{"user:bob@shop.example"}, want{Reject, "shop.example", ReasonUnownedFrom}},
		{"entry: login pattern", []string{"a@shop.example"}, []string{"user:ALICE@example.com"}, want{Sign, "shop.example", ""}},
		{"hoster's customers do not own hoster.example", []string{"ceo@hoster.example"}, []string{"user:bob@cust1.hoster.example"}, want{Reject, "hoster.example", ReasonUnownedFrom}},
		{"but their own subdomain", []string{"bob@cust1.hoster.example"}, []string{"user:bob@cust1.hoster.example"}, want{Sign, "hoster.example", ""}},
		{"foreign p=reject", []string{"x@bank.example"}, []string{"user:alice@example.com"}, want{Reject, "bank.example", ReasonDMARCReject}},
		{"foreign p=quarantine", []string{"x@news.example"}, []string{"user:alice@example.com"}, want{Reject, "news.example", ReasonDMARCQuarantine}},
		{"foreign p=none", []string{"x@blog.example"}, []string{"user:alice@example.com"}, want{Unsigned, "", ""}},
		{"foreign without record", []string{"x@gmail.example"}, []string{"user:alice@example.com"}, want{Unsigned, "", ""}},
		{"ours without keys", []string{"x@example.net"}, []string{"user:alice@example.com"}, want{Unsigned, "", ""}},
		{"two From: fields", []string{"a@example.com", "b@example.com"}, []string{"user:alice@example.com"}, want{Unsigned, "example.com", ReasonSeveralFrom}},
		{"two domains", []string{"a@example.com, b@example.net"}, []string{"user:alice@example.com"}, want{Unsigned, "example.com", ReasonSeveralFrom}},
		{"owned and a foreign reject", []string{"a@example.com, b@bank.example"}, []string{"user:alice@example.com"}, want{Reject, "bank.example", ReasonDMARCReject}},
		{"no From:", nil, []string{"user:alice@example.com"}, want{Unsigned, "", ""}},
	} {
		v := s.Decide(context.Background(), Message{From: tc.from, IDs: tc.ids, HeaderComplete: true, Ours: ours}, dns.lookup)
		got := want{v.Action, v.Domain, v.Reason}
		if got != tc.want {
			t.Errorf("%s: got %+v, want %+v (%s)", tc.name, got, tc.want, v.Text)
		}
		if v.Action == Sign && len(v.Keys) == 0 {
			t.Errorf("%s: Sign without keys", tc.name)
		}
		if v.Action == Reject && v.Text == "" {
			t.Errorf("%s: text %q", tc.name, v.Text)
		}
	}
	for _, d := range dns.asked {
		if d == "example.net" || strings.HasSuffix(d, "example.com") || d == "shop.example" {
			t.Errorf("DMARC looked up for our own %s", d)
		}
	}

	v := s.Decide(context.Background(), Message{From: []string{"x@bank.example"}, HeaderComplete: true}, dns.lookup)
	if !strings.Contains(v.Text, "bank.example") || !strings.Contains(v.Text, "p=reject") {
		t.Errorf("text %q does not name the domain and its policy", v.Text)
	}
	v = s.Decide(context.Background(), Message{From: []string{"a@example.com"}, IDs: []string{"user:a@example.com"}}, dns.lookup)
	if v.Action != Unsigned || v.Reason != ReasonLongHeader {
		t.Errorf("a header cut short: %+v", v)
	}
}

func TestDecideActions(t *testing.T) {
	keys := map[string]crypto.Signer{"s1@example.com": ed25519Key()}
	dns := &policies{p: map[string]string{"bank.example": "reject"}}
	for _, tc := range []struct {
		unowned, foreign string
		from             string
		want             Action
		lookups          int
	}{
		{config.FromAccept, config.FromAccept, "a@example.com", Unsigned, 0},
		{config.FromHold, config.FromAccept, "a@example.com", Hold, 0},
		{config.FromReject, config.FromAccept, "a@example.com", Reject, 0},
		{config.FromAccept, config.FromAccept, "a@bank.example", Unsigned, 0}, // accept: no lookup at all
		{config.FromAccept, config.FromHold, "a@bank.example", Hold, 1},
		{config.FromAccept, config.FromReject, "a@bank.example", Reject, 1},
		{"", "", "a@bank.example", Unsigned, 0}, // a config built in code
	} {
		s := testSet(t, config.DKIM{UnownedFrom: tc.unowned, ForeignDMARC: tc.foreign}, keys)
		dns.asked = nil
		v := s.Decide(context.Background(), Message{From: []string{tc.from}, IDs: []string{"user:bob@elsewhere.example"}, HeaderComplete: true}, dns.lookup)
		if v.Action != tc.want || len(dns.asked) != tc.lookups {
			t.Errorf("%+v: got %v after %d lookups", tc, v.Action, len(dns.asked))
		}
		if tc.want == Unsigned && tc.from == "a@example.com" && v.Reason != ReasonUnownedFrom {
			t.Errorf("accepted unowned mail has reason %q", v.Reason)
		}
	}
}

func TestSignedHeaders(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{[]string{"From", "Subject"}, []string{"From", "From", "Subject"}},
		{[]string{"Subject", "from", "From", "To"}, []string{"Subject", "from", "From", "To"}},
		{[]string{"Subject"}, []string{"From", "From", "Subject"}},
	} {
		if got := signedHeaders(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("signedHeaders(%q) = %q", tc.in, got)
		}
	}
	if got := signedHeaders(nil); countFrom(strings.Join(got, ":")) != 2 || len(got) != len(config.DefaultDKIMHeaders())+1 {
		t.Errorf("default %q", got)
	}
}
