package relay

import (
	"strings"
	"testing"

	"relay/config"
)

func TestRcptAllowedFrom(t *testing.T) {
	ctl := config.NewControl(&config.Config{Relay: config.Relay{LocalDomains: []string{"example.test", ".sub.example.test"}}})
	for _, tc := range []struct {
		rcpt string
		ok   bool
	}{
		{"user@example.test", true},
		{"user@EXAMPLE.TEST", true},
		{"user@a.sub.example.test", true},
		{"user@sub.example.test", false}, // leading dot: subdomains only
		{"user@example.test.", false},    // trailing dot, as qmail
		{"user@evil.test", false},
		{"user%evil.test@example.test", false},
		{"evil.test!user@example.test", false},
		{"user@evil.test@example.test", false}, // a quoted "user@evil.test" reaches us unquoted
		{"user@example.test@evil.test", false},
		{"user", false},
		{"@example.test", false},
		{"user@", false},
	} {
		if got := rcptAllowedFrom(tc.rcpt, ctl.RcptHostAllowed); got != tc.ok {
			t.Errorf("rcptAllowedFrom(%q) = %v, want %v", tc.rcpt, got, tc.ok)
		}
	}
}

func FuzzRcptAllowedFrom(f *testing.F) {
	for _, s := range []string{"a@example.test", "a%b@example.test", "a@b@example.test", "x@EXAMPLE.test", "a@evil.test", "!@example.test", "a@example.test."} {
		f.Add(s)
	}
	ctl := config.NewControl(&config.Config{Relay: config.Relay{LocalDomains: []string{"example.test"}}})
	f.Fuzz(func(t *testing.T, rcpt string) {
		if !rcptAllowedFrom(rcpt, ctl.RcptHostAllowed) {
			return
		}
		// Anything accepted has exactly one '@', no routing characters
		// in its local part, and a local domain.
		local, domain, _ := strings.Cut(rcpt, "@")
		if strings.Count(rcpt, "@") != 1 || strings.ContainsAny(local, "%!") || local == "" {
			t.Fatalf("accepted %q", rcpt)
		}
		if !strings.EqualFold(domain, "example.test") {
			t.Fatalf("accepted %q for domain %q", rcpt, domain)
		}
	})
}
