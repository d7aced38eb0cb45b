package relay

import (
	"encoding/base64"
	"strings"
	"testing"

	"relay/config"
	"relay/policy"
)

// Issue 12 in the SMTP front end: require_uid, script identities, the
// address normal form at MAIL, the check at the end of DATA.

func TestRequireUID(t *testing.T) {
	cfg := testConfig()
	cfg.Auth.RequireTLS = false
	cfg.Webservers = []config.Webserver{{Name: "web1", Addr: "127.0.0.7", RequireUID: true, Accounts: map[uint32]string{1001: "alice"}}}
	ck := &fakeChecker{}
	h := &fakeHandoff{}
	s := testServer(t, cfg, Deps{Policy: ck, Handoff: h, Auth: fakeAuth{"bob", "pw"}}, nil)
	const invoked = "Received: (qmail 5 invoked by uid 1001); 28 Nov 2026 02:41:53 -0000\r\n"
	sendFrom := func(from, data string, login bool) (string, string) {
		ck.mu.Lock()
		ck.calls = nil
		ck.mu.Unlock()
		c := dialRawFrom(t, "tcp", tcpAddr(s, 0), "127.0.0.7")
		c.hello("web")
		if login {
			c.expect("AUTH PLAIN "+base64.StdEncoding.EncodeToString([]byte("\x00bob\x00pw")), "235")
		}
		got := c.mail(from, []string{"x@far.test"}, data)
		c.cmd("QUIT")
		return got, ck.log()
	}
	send := func(data string, login bool) (string, string) { return sendFrom("www@example.test", data, login) }
	delivered := len(h.deliveries())

	// qmail's line first, the PHP header of the same uid: the uid and the
	// script count.
	got, calls := send(invoked+"X-PHP-Originating-Script: 1001:mailer.php\r\n\r\nb\r\n.\r\n", false)
	if !strings.HasPrefix(got, "250 ok") || !strings.Contains(calls, "ids uid:web1:1001[alice|mailer.php],script:web1:1001:mailer.php[alice|mailer.php]") {
		t.Fatalf("%q; calls %q", got, calls)
	}
	delivered++
	// A PHP header of another uid is ignored: charged to the Received uid,
	// no script id under the other uid.
	got, calls = send(invoked+"X-PHP-Originating-Script: 1002:blame.php\r\n\r\nb\r\n.\r\n", false)
	if !strings.HasPrefix(got, "250 ok") || !strings.Contains(calls, "ids uid:web1:1001[alice|]; ") || strings.Contains(calls, "1002") || strings.Contains(calls, "script:") {
		t.Fatalf("%q; calls %q", got, calls)
	}
	delivered++
	// A script talking SMTP itself: no qmail line first, whatever follows.
	for i, data := range []string{
		"X-PHP-Originating-Script: 1001:form.php\r\nSubject: s\r\n\r\nb\r\n.\r\n",
		"Received: from x by y; 1 Jan 2026 00:00:00 -0000\r\n" + invoked + "\r\nb\r\n.\r\n",
		"Subject: no received at all\r\n\r\nb\r\n.\r\n",
		"Received: (qmail 5 invoked by uid 1001) no date\r\n\r\nb\r\n.\r\n",
	} {
		got, calls = send(data, false)
		if !strings.HasPrefix(got, "550 5.7.1 ") || strings.Contains(calls, "ids ") || strings.Contains(calls, "commit") || !strings.HasSuffix(calls, "abort") {
			t.Fatalf("forged %d: %q; calls %q", i, got, calls)
		}
	}
	// The web server's own qmail-send bounces: "invoked for bounce" first
	// and a bounce's envelope sender pass, counted on the address alone;
	// the same line with any other sender is refused.
	const bounce = "Received: (qmail 8 invoked for bounce); 28 Nov 2026 02:41:53 -0000\r\nFrom: MAILER-DAEMON@web1.test\r\n\r\nb\r\n.\r\n"
	got, calls = sendFrom("", bounce, false)
	if !strings.HasPrefix(got, "250 ok") || !strings.HasPrefix(calls, "begin ip:127.0.0.7") || strings.Contains(calls, "uid:") {
		t.Fatalf("bounce: %q; calls %q", got, calls)
	}
	delivered++
	for i, c := range []struct{ from, data string }{
		{"www@example.test", bounce},
		{"", "Received: (qmail 8 invoked for bounce) no date\r\n\r\nb\r\n.\r\n"},
		{"", "Received: from x by y; 1 Jan 2026 00:00:00 -0000\r\n" + bounce},
	} {
		got, calls = sendFrom(c.from, c.data, false)
		if !strings.HasPrefix(got, "550 5.7.1 ") || strings.Contains(calls, "commit") {
			t.Fatalf("not a bounce %d: %q; calls %q", i, got, calls)
		}
	}
	if n := len(h.deliveries()); n != delivered {
		t.Fatalf("%d messages handed off, want %d: refused ones reached the hand-off", n, delivered)
	}
	// One event per minute per web server, naming it; every refusal logged.
	ck.mu.Lock()
	evs := ck.events
	ck.mu.Unlock()
	if len(evs) != 1 || evs[0].Kind != policy.EventRefused || evs[0].Identity != "ip:127.0.0.7" || !strings.Contains(evs[0].Detail, "web server web1 (127.0.0.7)") {
		t.Fatalf("events %+v", evs)
	}
	// A session that logged in is counted by its login: webmail on the
	// web server sends without qmail's line.
	got, calls = send("Subject: webmail\r\n\r\nb\r\n.\r\n", true)
	if !strings.HasPrefix(got, "250 ok") || !strings.HasPrefix(calls, "begin user:bob,ip:127.0.0.7") {
		t.Fatalf("logged in: %q; calls %q", got, calls)
	}
	// A script path that could not be an id names no script.
	got, calls = send(invoked+"X-PHP-Originating-Script: 1001:a\tb.php\r\n\r\nb\r\n.\r\n", false)
	if !strings.HasPrefix(got, "250 ok") || strings.Contains(calls, "script:") {
		t.Fatalf("%q; calls %q", got, calls)
	}
}

func TestLocalScriptIdentity(t *testing.T) {
	path := sockPath(t)
	ck := &fakeChecker{}
	testServer(t, testConfig(config.Listener{Addr: path, Mode: config.ModeLocal}), Deps{Policy: ck}, nil)
	for _, c := range []struct {
		header, want string
	}{
		{"X-PHP-Originating-Script: " + uidString() + ":form.php\r\n", "script:local:" + uidString() + ":form.php"},
		{"X-PHP-Originating-Script: 4242:form.php\r\n", ""},
	} {
		ck.mu.Lock()
		ck.calls = nil
		ck.mu.Unlock()
		cl := dialRaw(t, "unix", path)
		cl.hello("localhost")
		if got := cl.mail("www@example.test", []string{"x@far.test"}, c.header+"Subject: s\r\n\r\nb\r\n.\r\n"); !strings.HasPrefix(got, "250 ok") {
			t.Fatalf("got %q", got)
		}
		calls := ck.log()
		if c.want == "" && strings.Contains(calls, "script:") || c.want != "" && !strings.Contains(calls, ","+c.want+"[") {
			t.Fatalf("header %q: calls %q", c.header, calls)
		}
	}
}

func TestSenderNormalFormAtMail(t *testing.T) {
	cfg := testConfig()
	cfg.Relay.RelayNetworks = []string{"127.0.0.0/8"}
	ck := &fakeChecker{}
	s := testServer(t, cfg, Deps{Policy: ck}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	for _, bad := range []string{"a@[x.org]", "a@[IPv6:x.org]", "a@[1.2.3]", "a@x.[org]"} {
		if got := c.cmd("MAIL FROM:<" + bad + ">"); got != "501 5.1.7 bad sender address syntax (#5.1.7)\r\n" {
			t.Fatalf("MAIL FROM:<%s>: %q", bad, got)
		}
	}
	c.expect("MAIL FROM:<a@[127.0.0.1]>", "250")
	c.expect("RSET", "250")
	c.expect("MAIL FROM:<SPAM@X.ORG.>", "250")
	c.expect("RSET", "250")
	if log := ck.log(); !strings.Contains(log, "begin ip:127.0.0.1,sender:spam@x.org,domain:x.org") || !strings.Contains(log, "sender:a@[127.0.0.1],domain:[127.0.0.1]") {
		t.Fatalf("calls %q", log)
	}
}

// A transaction refused by the check at the end of DATA is handed off to
// no one.
func TestRecheckAtEndOfData(t *testing.T) {
	for _, tc := range []struct {
		name string
		d    policy.Decision
		want string
	}{
		{"defer", policy.Decision{Action: policy.Defer, Identity: "ip:127.0.0.1", Limit: "3 recipients/1h"}, "451 4.7.1 ip:127.0.0.1 is over 3 recipients/1h\r\n"},
		{"reject", policy.Decision{Action: policy.Reject, Identity: "ip:127.0.0.1", Limit: "suspended", Suspended: true}, "550 5.7.1 ip:127.0.0.1 is suspended\r\n"},
		{"hold", policy.Decision{Action: policy.Hold, Identity: "ip:127.0.0.1", Limit: "3 recipients/1h"}, "451 4.7.1 ip:127.0.0.1 is over 3 recipients/1h\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.Relay.RelayNetworks = []string{"127.0.0.0/8"}
			ck := &fakeChecker{recheck: tc.d, logRecheck: true}
			h := &fakeHandoff{}
			s := testServer(t, cfg, Deps{Policy: ck, Handoff: h}, nil)
			c := dialRaw(t, "tcp", tcpAddr(s, 0))
			c.hello("x")
			body := "Subject: s\r\n\r\n" + strings.Repeat("body line\r\n", 20000) + ".\r\n"
			if got := c.mail("a@example.test", []string{"x@far.test"}, body); got != tc.want {
				t.Fatalf("final reply %q, want %q", got, tc.want)
			}
			if d := h.deliveries(); len(d) != 0 {
				t.Fatalf("handed off %d", len(d))
			}
			if log := ck.log(); !strings.HasSuffix(log, "msg; recheck; abort") {
				t.Fatalf("calls %q", log)
			}
			// Accepted at the end: handed off and committed.
			ck.mu.Lock()
			ck.recheck = policy.Decision{}
			ck.mu.Unlock()
			if got := c.mail("a@example.test", []string{"x@far.test"}, body); !strings.HasPrefix(got, "250 ok") {
				t.Fatalf("accepted at the end: %q", got)
			}
			if log := ck.log(); !strings.HasSuffix(log, "msg; recheck; commit") {
				t.Fatalf("calls %q", log)
			}
		})
	}
}
