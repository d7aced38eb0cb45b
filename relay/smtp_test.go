package relay

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"relay/config"
	"relay/queue"
)

func TestGreetingAndEHLO(t *testing.T) {
	s := testServer(t, testConfig(), Deps{Auth: fakeAuth{"bob", "pw"}}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	if b := c.reply(); !strings.HasPrefix(b, "220 mail.example.test ESMTP") {
		t.Fatalf("banner %q", b)
	}
	ehlo := c.expect("EHLO client.example.test", "250-")
	for _, want := range []string{"PIPELINING", "8BITMIME", "SIZE"} {
		if !strings.Contains(ehlo, want) {
			t.Errorf("EHLO lacks %s: %q", want, ehlo)
		}
	}
	// No TLS configured and require_tls: neither STARTTLS nor AUTH.
	for _, absent := range []string{"STARTTLS", "AUTH"} {
		if strings.Contains(ehlo, absent) {
			t.Errorf("EHLO offers %s: %q", absent, ehlo)
		}
	}
	c.expect("QUIT", "221")
}

func TestAuthOfferedWithoutTLSWhenAllowed(t *testing.T) {
	cfg := testConfig()
	cfg.Auth.RequireTLS = false
	s := testServer(t, cfg, Deps{Auth: fakeAuth{"bob", "pw"}}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	if ehlo := c.hello("x"); !strings.Contains(ehlo, "AUTH PLAIN LOGIN") {
		t.Fatalf("EHLO = %q", ehlo)
	}
}

func TestRelayControl(t *testing.T) {
	rules, err := config.ParseTCPRules("tcp.smtp", strings.NewReader(
		"127.0.0.3:allow,RELAYCLIENT=\"\"\n127.0.0.4:deny\n127.0.0.5:allow\n"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.Hostname = "mail.example.test"
	cfg.Relay.LocalDomains = []string{"example.test", ".sub.example.test"}
	cfg.Relay.RelayNetworks = []string{"127.0.0.2/32"}
	cfg.Auth.RequireTLS = false
	cfg.TCPRules = rules
	cfg.Webservers = []config.Webserver{{Name: "web1", Addr: "127.0.0.6"}}
	s := testServer(t, cfg, Deps{Auth: fakeAuth{"bob", "pw"}}, nil)
	addr := tcpAddr(s, 0)

	const denied = "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
	tricks := []string{
		"RCPT TO:<user@evil.test>",
		"RCPT TO:<user%evil.test@example.test>",
		"RCPT TO:<evil.test!user@example.test>",
		"RCPT TO:<@example.test:user@evil.test>",
		"RCPT TO:<\"user@evil.test\"@example.test>",
		"RCPT TO:<user@evil.test@example.test>",
		"RCPT TO:<user@example.test.>",
		"RCPT TO:<user@sub.example.test>",
		"RCPT TO:<user@EVIL.TEST>",
	}
	local := []string{
		"RCPT TO:<user@example.test>",
		"RCPT TO:<User@EXAMPLE.TEST>",
		"RCPT TO:<user@a.sub.example.test>",
		"RCPT TO:<@relay.test:user@example.test>",
	}

	t.Run("internet client", func(t *testing.T) {
		c := dialRawFrom(t, "tcp", addr, "127.0.0.1")
		c.hello("x")
		c.expect("MAIL FROM:<a@remote.test>", "250")
		for _, r := range tricks {
			if got := c.cmd(r); got != denied {
				t.Errorf("%s: %q", r, got)
			}
		}
		for _, r := range local {
			c.expect(r, "250")
		}
	})
	relayClients := map[string]string{
		"relay_networks":       "127.0.0.2",
		"tcprules RELAYCLIENT": "127.0.0.3",
		"webserver":            "127.0.0.6",
	}
	for name, ip := range relayClients {
		t.Run(name, func(t *testing.T) {
			c := dialRawFrom(t, "tcp", addr, ip)
			c.hello("x")
			c.expect("MAIL FROM:<a@example.test>", "250")
			c.expect("RCPT TO:<user@evil.test>", "250")
		})
	}
	t.Run("tcprules allow without RELAYCLIENT", func(t *testing.T) {
		c := dialRawFrom(t, "tcp", addr, "127.0.0.5")
		c.hello("x")
		c.expect("MAIL FROM:<a@remote.test>", "250")
		c.expect("RCPT TO:<user@evil.test>", "553 ")
	})
	t.Run("tcprules deny closes before the banner", func(t *testing.T) {
		c := dialRawFrom(t, "tcp", addr, "127.0.0.4")
		if got := c.reply(); got != "EOF" {
			t.Fatalf("denied client got %q", got)
		}
	})
	t.Run("auth grants relay", func(t *testing.T) {
		c := dialRawFrom(t, "tcp", addr, "127.0.0.1")
		c.hello("x")
		c.expect("AUTH PLAIN AGJvYgBwdw==", "235") // \0bob\0pw
		c.expect("MAIL FROM:<bob@example.test>", "250")
		c.expect("RCPT TO:<user@evil.test>", "250")
	})
	t.Run("bad auth does not", func(t *testing.T) {
		c := dialRawFrom(t, "tcp", addr, "127.0.0.1")
		c.hello("x")
		c.expect("AUTH PLAIN AGJvYgB4eA==", "535 5.7.8") // \0bob\0xx
		c.expect("MAIL FROM:<bob@example.test>", "250")
		c.expect("RCPT TO:<user@evil.test>", "553 ")
	})
	t.Run("auth error text stays inside", func(t *testing.T) {
		c := dialRawFrom(t, "tcp", addr, "127.0.0.1")
		c.hello("x")
		got := c.cmd("AUTH PLAIN AHRlbXBmYWlsAHg=") // \0tempfail\0x
		if !strings.HasPrefix(got, "454 4.7.0") || strings.Contains(got, "secret") {
			t.Fatalf("got %q", got)
		}
	})
}

func TestBadMailFrom(t *testing.T) {
	s := testServer(t, testConfig(), Deps{}, func(st *settings) {
		st.badMailFrom = func(sender string) bool { return strings.HasSuffix(strings.ToLower(sender), "@spam.test") }
	})
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	c.expect("MAIL FROM:<x@SPAM.test>", "250")
	for range 2 {
		if got := c.cmd("RCPT TO:<user@example.test>"); got != "553 5.7.1 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n" {
			t.Fatalf("got %q", got)
		}
	}
}

func TestSubmissionRequiresAuth(t *testing.T) {
	cfg := testConfig(config.Listener{Addr: "127.0.0.1:0", Mode: config.ModeSubmission})
	cfg.Auth.RequireTLS = false
	h := &fakeHandoff{}
	s := testServer(t, cfg, Deps{Auth: fakeAuth{"bob", "pw"}, Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	if got := c.cmd("MAIL FROM:<bob@example.test>"); got != "530 5.7.0 authentication required (#5.7.0)\r\n" {
		t.Fatalf("got %q", got)
	}
	c.expect("AUTH PLAIN AGJvYgBwdw==", "235")
	if got := c.mail("bob@example.test", []string{"x@far.test"}, "Subject: s\r\n\r\nhi\r\n.\r\n"); got != "250 ok 1795833709 qp 4242\r\n" {
		t.Fatalf("got %q", got)
	}
	d := h.deliveries()
	if len(d) != 1 {
		t.Fatal(len(d))
	}
	want := "Received: from unknown (HELO x) (bob@127.0.0.1)\n  by mail.example.test with ESMTPA; 28 Nov 2026 02:41:53 -0000\nSubject: s\n\nhi\n"
	if string(d[0].msg) != want {
		t.Fatalf("stored\n%q\nwant\n%q", d[0].msg, want)
	}
}

func TestStoredFormAndReplies(t *testing.T) {
	h := &fakeHandoff{}
	cfg := testConfig()
	cfg.Relay.MaxMessageBytes = 40
	cfg.Relay.MaxRecipients = 2
	s := testServer(t, cfg, Deps{Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("client.test")

	// Dot-unstuffing and CRLF -> LF, byte for byte; Received on top.
	got := c.mail("a@remote.test", []string{"u@example.test"}, "Subject: x\r\n\r\n..dot\r\n.\r\n")
	if got != "250 ok 1795833709 qp 4242\r\n" {
		t.Fatalf("DATA reply %q", got)
	}
	want := "Received: from unknown (HELO client.test) (127.0.0.1)\n  by mail.example.test with SMTP; 28 Nov 2026 02:41:53 -0000\nSubject: x\n\n.dot\n"
	if d := h.deliveries(); len(d) != 1 || string(d[0].msg) != want || d[0].env.From != "a@remote.test" || strings.Join(d[0].env.To, ",") != "u@example.test" {
		t.Fatalf("delivered %+v\nwant msg %q", d, want)
	}

	// max_recipients.
	c.expect("MAIL FROM:<a@remote.test>", "250")
	c.expect("RCPT TO:<u1@example.test>", "250")
	c.expect("RCPT TO:<u2@example.test>", "250")
	if got := c.cmd("RCPT TO:<u3@example.test>"); got != "452 4.5.3 too many recipients\r\n" {
		t.Fatalf("third rcpt: %q", got)
	}
	c.expect("RSET", "250")

	// databytes is counted as SIZE counts (RFC 1870: CRLF line ends, dots
	// unstuffed): exactly 40 bytes pass, 41 do not (40 once stored),
	// nothing handed off; with qmail's text.
	body40 := strings.Repeat("x", 38) + "\r\n.\r\n"
	if got := c.mail("a@remote.test", []string{"u@example.test"}, body40); !strings.HasPrefix(got, "250 ") {
		t.Fatalf("40 bytes: %q", got)
	}
	body41 := strings.Repeat("x", 39) + "\r\n.\r\n"
	if got := c.mail("a@remote.test", []string{"u@example.test"}, body41); got != "552 5.3.4 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n" {
		t.Fatalf("41 bytes: %q", got)
	}
	bodyBig := strings.Repeat("x", 40) + "\r\n" + strings.Repeat("y", 5000) + "\r\n.\r\n"
	if got := c.mail("a@remote.test", []string{"u@example.test"}, bodyBig); got != "552 5.3.4 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n" {
		t.Fatalf("5000 bytes: %q", got)
	}
	if got := c.cmd("MAIL FROM:<a@remote.test> SIZE=41"); !strings.HasPrefix(got, "552 5.3.4 ") {
		t.Fatalf("SIZE=41: %q", got)
	}
	// The session goes on after the 552.
	c.expect("NOOP", "250")
	if n := len(h.deliveries()); n != 2 {
		t.Fatalf("%d deliveries, want 2", n)
	}
}

func TestHopCount(t *testing.T) {
	h := &fakeHandoff{}
	s := testServer(t, testConfig(), Deps{Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	data := strings.Repeat("Received: x\r\n", 60) + strings.Repeat("Delivered-To: y\r\n", 40) + "\r\nbody\r\n.\r\n"
	if got := c.mail("a@remote.test", []string{"u@example.test"}, data); got != "554 5.4.6 too many hops, this message is looping (#5.4.6)\r\n" {
		t.Fatalf("got %q", got)
	}
	data = strings.Repeat("Received: x\r\n", 99) + "\r\nbody\r\n.\r\n"
	if got := c.mail("a@remote.test", []string{"u@example.test"}, data); !strings.HasPrefix(got, "250 ok") {
		t.Fatalf("99 hops: %q", got)
	}
	if n := len(h.deliveries()); n != 1 {
		t.Fatalf("%d deliveries", n)
	}
}

// SMTP smuggling: no bare-LF or bare-CR dot line may end the data or split
// one message into two, and no bare CR or LF is ever handed off. (go-smtp's
// DATA reader drops a ".\r" at the start of a line, so "\r\n.\rX" reaches
// relay as "\r\nX": that message is delivered, whole and without the CR.)
func TestSmuggling(t *testing.T) {
	h := &fakeHandoff{}
	s := testServer(t, testConfig(), Deps{Handoff: h}, nil)
	const smuggled = "MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n"
	for _, sep := range []string{"\n.\n", "\r.\r", "\r\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r"} {
		before := len(h.deliveries())
		c := dialRaw(t, "tcp", tcpAddr(s, 0))
		c.hello("x")
		c.expect("MAIL FROM:<a@remote.test>", "250")
		c.expect("RCPT TO:<u@example.test>", "250")
		c.expect("DATA", "354")
		c.send("Subject: one\r\n\r\nbody" + sep + smuggled + ".\r\n")
		got := c.reply()
		// Nothing after the real end may be taken as commands: the next
		// reply is NOOP's, not a 354 of a smuggled DATA.
		if extra := c.cmd("NOOP"); !strings.HasPrefix(extra, "250 ") {
			t.Fatalf("sep %q: after data %q", sep, extra)
		}
		d := h.deliveries()[before:]
		switch {
		case strings.HasPrefix(got, "451 4.5.2 "):
			if len(d) != 0 {
				t.Fatalf("sep %q: refused but handed off %q", sep, d)
			}
		case strings.HasPrefix(got, "250 "):
			if len(d) != 1 || strings.ContainsRune(string(d[0].msg), '\r') ||
				!strings.Contains(string(d[0].msg), "Subject: one") || !strings.Contains(string(d[0].msg), "smuggled") {
				t.Fatalf("sep %q: delivered %q", sep, d)
			}
		default:
			t.Fatalf("sep %q: reply %q", sep, got)
		}
	}
}

func TestBareLFReply(t *testing.T) {
	s := testServer(t, testConfig(), Deps{}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	if got := c.mail("a@remote.test", []string{"u@example.test"}, "line one\nline two\r\n.\r\n"); got != "451 4.5.2 See https://cr.yp.to/docs/smtplf.html.\r\n" {
		t.Fatalf("got %q", got)
	}
}

func TestHandoffErrors(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&queue.Error{Code: 451, Text: "qq write error or disk full (#4.3.0)"}, "451 4.3.0 qq write error or disk full (#4.3.0)\r\n"},
		{&queue.Error{Code: 554, Enhanced: [3]int{5, 3, 0}, Text: "mail server permanently rejected message (#5.3.0)"}, "554 5.3.0 mail server permanently rejected message (#5.3.0)\r\n"},
		{&queue.Error{Code: 554, Text: "custom permanent reject from fake qq (#5.7.0)"}, "554 5.7.0 custom permanent reject from fake qq (#5.7.0)\r\n"},
		{errors.New("fork /var/qmail/bin/qmail-queue: secret internal detail"), "451 4.3.0 temporary local problem, try again later (#4.3.0)\r\n"},
	} {
		h := &fakeHandoff{err: tc.err}
		s := testServer(t, testConfig(), Deps{Handoff: h}, nil)
		c := dialRaw(t, "tcp", tcpAddr(s, 0))
		c.hello("x")
		if got := c.mail("a@remote.test", []string{"u@example.test"}, "Subject: s\r\n\r\nb\r\n.\r\n"); got != tc.want {
			t.Errorf("%v: got %q, want %q", tc.err, got, tc.want)
		}
	}
}

func TestConnectionLimits(t *testing.T) {
	cfg := testConfig()
	cfg.Relay.MaxConnectionsPerIP = 1
	cfg.Relay.MaxConnections = 2
	s := testServer(t, cfg, Deps{}, nil)
	addr := tcpAddr(s, 0)
	a := dialRawFrom(t, "tcp", addr, "127.0.0.1")
	if b := a.reply(); !strings.HasPrefix(b, "220 ") {
		t.Fatal(b)
	}
	// A second connection from the same IP: per-IP limit.
	if got := dialRawFrom(t, "tcp", addr, "127.0.0.1").reply(); got != "421 4.7.0 too many connections\r\n" {
		t.Fatalf("per-IP: %q", got)
	}
	b := dialRawFrom(t, "tcp", addr, "127.0.0.2")
	if got := b.reply(); !strings.HasPrefix(got, "220 ") {
		t.Fatal(got)
	}
	// A third IP: the total limit.
	if got := dialRawFrom(t, "tcp", addr, "127.0.0.3").reply(); got != "421 4.7.0 too many connections\r\n" {
		t.Fatalf("total: %q", got)
	}
	// A closed connection gives its slot back.
	a.expect("QUIT", "221")
	a.conn.Close()
	for i := 0; ; i++ {
		got := dialRawFrom(t, "tcp", addr, "127.0.0.1").reply()
		if strings.HasPrefix(got, "220 ") {
			break
		}
		if i == 50 {
			t.Fatalf("slot not released: %q", got)
		}
		waitABit()
	}
}

func TestLocalSocketPeerUID(t *testing.T) {
	path := sockPath(t)
	h := &fakeHandoff{}
	ck := &fakeChecker{}
	s := testServer(t, testConfig(config.Listener{Addr: path, Mode: config.ModeLocal}), Deps{Handoff: h, Policy: ck}, nil)
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o666 {
		t.Fatalf("socket mode: %v %v", fi, err)
	}
	_ = s
	c := dialRaw(t, "unix", path)
	c.hello("localhost")
	got := c.mail("www@example.test", []string{"x@far.test"}, "X-PHP-Originating-Script: "+uidString()+":form.php\r\nSubject: s\r\n\r\nb\r\n.\r\n")
	if !strings.HasPrefix(got, "250 ok") {
		t.Fatalf("got %q", got)
	}
	want := "begin uid:local:" + uidString() + ",sender:www@example.test,domain:example.test"
	if !strings.HasPrefix(ck.log(), want) {
		t.Fatalf("policy calls %q, want prefix %q", ck.log(), want)
	}
	if !strings.Contains(ck.log(), "ids uid:local:"+uidString()+"[") || !strings.Contains(ck.log(), "|form.php]") {
		t.Fatalf("script not recorded: %q", ck.log())
	}
	d := h.deliveries()
	if len(d) != 1 || !strings.HasPrefix(string(d[0].msg), "Received: (relay invoked by uid "+uidString()+"); 28 Nov 2026 02:41:53 -0000\n") {
		t.Fatalf("delivered %q", d)
	}
}

func uidString() string { return strconv.Itoa(os.Getuid()) }

func waitABit() { time.Sleep(20 * time.Millisecond) }

// ehloLine reports whether the EHLO reply has exactly the keyword line kw.
func ehloLine(ehlo, kw string) bool {
	for _, l := range strings.Split(strings.TrimRight(ehlo, "\r\n"), "\r\n") {
		if len(l) > 4 && l[4:] == kw {
			return true
		}
	}
	return false
}

// TestEHLOSizeAndGreetingFollowReload: EHLO shows SIZE <databytes> when
// there is a limit (max_message_bytes, control/databytes, a tcprules
// DATABYTES), and a reload changes the greeting and SIZE of the next
// connection, as qmail-smtpd reads its control files per connection; a
// connection keeps what it started with.
func TestEHLOSizeAndGreetingFollowReload(t *testing.T) {
	cfg := testConfig()
	cfg.Relay.MaxMessageBytes = 40960
	rules, err := config.ParseTCPRules("tcp.smtp", strings.NewReader("127.0.0.9:allow,DATABYTES=\"777\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.TCPRules = rules
	s := testServer(t, cfg, Deps{}, nil)

	old := dialRaw(t, "tcp", tcpAddr(s, 0))
	if b := old.reply(); b != "220 mail.example.test ESMTP Service Ready\r\n" {
		t.Fatalf("greeting %q", b)
	}
	if ehlo := old.cmd("EHLO a"); !ehloLine(ehlo, "SIZE 40960") {
		t.Fatalf("EHLO without SIZE 40960: %q", ehlo)
	}
	ruled := dialRawFrom(t, "tcp", tcpAddr(s, 0), "127.0.0.9")
	if ehlo := ruled.hello("b"); !ehloLine(ehlo, "SIZE 777") {
		t.Fatalf("tcprules DATABYTES=777: EHLO %q", ehlo)
	}

	// control/smtpgreeting and control/databytes, re-read by a reload.
	cfg2 := testConfig()
	cfg2.Relay.MaxMessageBytes = 40960
	cfg2.Control = config.NewControl(cfg2)
	cfg2.Control.Greeting = "mx.example.test NO UCE"
	cfg2.Control.Databytes = 1234
	if err := s.Reload(cfg2); err != nil {
		t.Fatal(err)
	}
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	if b := c.reply(); b != "220 mx.example.test NO UCE ESMTP Service Ready\r\n" {
		t.Fatalf("greeting after reload %q", b)
	}
	if ehlo := c.cmd("EHLO a"); !ehloLine(ehlo, "SIZE 1234") {
		t.Fatalf("EHLO after reload: %q", ehlo)
	}
	if ehlo := old.cmd("EHLO a"); !ehloLine(ehlo, "SIZE 40960") {
		t.Fatalf("EHLO on the older connection: %q", ehlo)
	}

	// No limit: SIZE without a number (RFC 1870 §4).
	cfg3 := testConfig()
	if err := s.Reload(cfg3); err != nil {
		t.Fatal(err)
	}
	c = dialRaw(t, "tcp", tcpAddr(s, 0))
	if ehlo := c.hello("a"); !ehloLine(ehlo, "SIZE") {
		t.Fatalf("EHLO without a limit: %q", ehlo)
	}
}
