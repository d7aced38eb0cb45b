package relay

import (
	"context"
	"encoding/base64"
	"net/netip"
	"strings"
	"testing"
)

// foldAuth accepts its login in any letter case, as vchkpw does (vpopmail
// lowercases the login before looking it up).
type foldAuth struct{ login, password string }

func (a foldAuth) Authenticate(_ context.Context, login, password string, _ netip.Addr) error {
	if strings.EqualFold(login, a.login) && password == a.password {
		return nil
	}
	return ErrAuthBad
}
func (a foldAuth) Enabled() bool { return true }

// TestLoginCaseIsOneIdentity: a checkpassword that ignores case lets a
// client log in as ALICE@EXAMPLE.TEST, Alice@example.test, ... With the
// login used verbatim as the identity, each spelling would be its own
// user: identity with its own counters, and a suspended user:alice would
// go on sending as user:Alice.
func TestLoginCaseIsOneIdentity(t *testing.T) {
	cfg := testConfig()
	cfg.Auth.RequireTLS = false
	checker := &fakeChecker{}
	s := testServer(t, cfg, Deps{Auth: foldAuth{"alice@example.test", "pw"}, Policy: checker}, nil)
	for _, login := range []string{"alice@example.test", "ALICE@Example.TEST"} {
		c := dialRaw(t, "tcp", tcpAddr(s, 0))
		c.hello("client.test")
		c.expect("AUTH PLAIN "+base64.StdEncoding.EncodeToString([]byte("\x00"+login+"\x00pw")), "235")
		c.expect("MAIL FROM:<a@example.test>", "250")
		c.expect("QUIT", "221")
	}
	log := checker.log()
	if strings.Contains(log, "user:ALICE") || strings.Count(log, "begin user:alice@example.test,") != 2 {
		t.Fatalf("one account, two logins: want user:alice@example.test twice, policy saw %q", log)
	}
}

// TestRcptHostsASCIIFold: rcpthosts is matched with ASCII case folding, as
// qmail's case_lowerb does. Unicode lowercasing would turn the Kelvin sign
// U+212A into 'k', so a domain that is not local would pass as a local one.
func TestRcptHostsASCIIFold(t *testing.T) {
	cfg := testConfig()
	cfg.Relay.LocalDomains = []string{"kelvin.test"}
	s := testServer(t, cfg, Deps{}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("client.test")
	c.expect("MAIL FROM:<a@far.test>", "250")
	c.expect("RCPT TO:<x@KELVIN.test>", "250")
	c.expect("RCPT TO:<x@\u212Aelvin.test>", "553")
}

// TestLongAddressRefused: an unauthenticated client may give RCPTs for a
// local domain, and each accepted one is kept until DATA. With addresses
// as long as a command line (64 KiB), max_recipients of them hold megabytes
// per connection (and without max_recipients, without bound). Paths far
// beyond RFC 5321's 256 octets are refused instead of kept.
func TestLongAddressRefused(t *testing.T) {
	h := &fakeHandoff{}
	s := testServer(t, testConfig(), Deps{Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("client.test")
	long := strings.Repeat("a", 2000)
	c.expect("MAIL FROM:<"+long+"@far.test>", "501 5.1.7")
	c.expect("MAIL FROM:<a@far.test>", "250")
	c.expect("RCPT TO:<"+long+"@example.test>", "501 5.1.3")
	ok := strings.Repeat("b", 200) + "@example.test"
	if got := c.mail("a@far.test", []string{ok}, "Subject: x\r\n\r\nhi\r\n.\r\n"); !strings.HasPrefix(got, "250 ") {
		t.Fatalf("DATA: %q", got)
	}
	if d := h.deliveries(); len(d) != 1 || len(d[0].env.To) != 1 || d[0].env.To[0] != ok {
		t.Fatalf("deliveries: %+v", d)
	}
}

// TestControlCharsInAddressRefused: go-smtp passes a bare CR, a NUL or an
// ESC inside an address through. RFC 5321 §4.1.2 allows none of them
// (qtextSMTP and quoted-pairSMTP are %d32-126), and in the stored envelope
// they become a line break in the Return-Path and Delivered-To header
// lines qmail-local and the Maildir hand-off write, or a NUL in
// qmail-queue's envelope. They are refused at MAIL and RCPT.
func TestControlCharsInAddressRefused(t *testing.T) {
	h := &fakeHandoff{}
	s := testServer(t, testConfig(), Deps{Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("client.test")
	for _, from := range []string{"a\r@far.test", "a@far.test\rX-Spam: no", "a\x00@far.test", "\"a\x1b[2J\"@far.test", "a@far\x7f.test"} {
		c.expect("MAIL FROM:<"+from+">", "501 5.")
	}
	c.expect("MAIL FROM:<a@far.test>", "250")
	for _, to := range []string{"b\r@example.test", "b@example.test\rX: y", "b\x00Tx@example.test", "\"b\x01\"@example.test"} {
		c.expect("RCPT TO:<"+to+">", "501 5.")
	}
	if got := c.mail("a@far.test", []string{"b@example.test"}, "Subject: x\r\n\r\nhi\r\n.\r\n"); !strings.HasPrefix(got, "250 ") {
		t.Fatalf("DATA: %q", got)
	}
	if d := h.deliveries(); len(d) != 1 || d[0].env.From != "a@far.test" || len(d[0].env.To) != 1 {
		t.Fatalf("deliveries: %+v", d)
	}
}

// TestMalformedAuthReplies: a PLAIN response relay cannot use, as the
// initial response or after the 334, is answered 501 5.5.x with relay's
// (or RFC 4954's) text, never a library's error text; an authorization
// identity other than the login has one refusal. The session goes on.
func TestMalformedAuthReplies(t *testing.T) {
	cfg := testConfig()
	cfg.Auth.RequireTLS = false
	s := testServer(t, cfg, Deps{Auth: fakeAuth{"bob", "pw"}}, nil)
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	malformed := "501 5.5.4 malformed auth input (#5.5.4)\r\n"
	for _, tc := range []struct {
		name  string
		lines []string // client lines; the reply to the last one is checked
		want  string
	}{
		{"bad base64 as initial response", []string{"AUTH PLAIN !!notbase64"}, "501 5.5.2 "},
		{"bad base64 after 334", []string{"AUTH PLAIN", "#$%"}, "501 5.5.2 "},
		{"two fields as initial response", []string{"AUTH PLAIN " + b64("bob\x00pw")}, malformed},
		{"two fields after 334", []string{"AUTH PLAIN", b64("bob\x00pw")}, malformed},
		{"four fields", []string{"AUTH PLAIN " + b64("\x00bob\x00pw\x00x")}, malformed},
		{"one field", []string{"AUTH PLAIN " + b64("bobpw")}, malformed},
		{"empty response after 334", []string{"AUTH PLAIN", "="}, malformed},
		{"empty login", []string{"AUTH LOGIN", "="}, malformed},
		{"other authzid", []string{"AUTH PLAIN " + b64("root\x00bob\x00pw")}, "535 5.7.8 authorization identity must be empty or the login (#5.7.1)\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRaw(t, "tcp", tcpAddr(s, 0))
			c.hello("client.test")
			var got string
			for _, l := range tc.lines {
				got = c.cmd(l)
			}
			if !strings.HasPrefix(got, tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			for _, lib := range []string{"sasl", "illegal", "454"} {
				if strings.Contains(got, lib) {
					t.Fatalf("library text in %q", got)
				}
			}
			c.expect("AUTH PLAIN "+b64("\x00bob\x00pw"), "235")
		})
	}
}
