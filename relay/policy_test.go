package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"relay/config"
	"relay/internal/testcert"
	"relay/policy"
)

func TestPolicyDecisions(t *testing.T) {
	over := policy.Decision{Identity: "ip:127.0.0.2", Limit: "100 recipients/1m", RetryIn: 90 * time.Second}
	for _, tc := range []struct {
		name string
		ck   *fakeChecker
		mail string // reply prefix to MAIL
		rcpt string // reply to the first RCPT
	}{
		{"suspended", &fakeChecker{check: policy.Decision{Action: policy.Reject, Identity: "sender:a@example.test", Suspended: true}},
			"550 5.7.1 sender:a@example.test is suspended\r\n", ""},
		{"defer", &fakeChecker{rcpt: []policy.Decision{withAction(over, policy.Defer)}},
			"250", "451 4.7.1 ip:127.0.0.2 is over 100 recipients/1m; try again in 1m30s\r\n"},
		{"reject", &fakeChecker{rcpt: []policy.Decision{withAction(over, policy.Reject)}},
			"250", "550 5.7.1 ip:127.0.0.2 is over 100 recipients/1m; try again in 1m30s\r\n"},
		{"per message", &fakeChecker{rcpt: []policy.Decision{{Action: policy.TooManyRcpts, Identity: "ip:127.0.0.2", Limit: "5 recipients per message"}}},
			"250", "452 4.5.3 ip:127.0.0.2 is over 5 recipients per message\r\n"},
		// Policy could not read its counters (a damaged relay.db): a
		// temporary local problem, not a cap, and no internal text.
		{"store failed at MAIL", &fakeChecker{check: policy.Decision{Action: policy.Defer, Limit: "counters unavailable", Err: errors.New("database file damaged: page 7")}},
			"451 4.3.0 temporary local problem, try again later (#4.3.0)\r\n", ""},
		{"store failed at RCPT", &fakeChecker{rcpt: []policy.Decision{{Action: policy.Defer, Limit: "counters unavailable", Err: errors.New("database file damaged: page 7")}}},
			"250", "451 4.3.0 temporary local problem, try again later (#4.3.0)\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.Relay.RelayNetworks = []string{"127.0.0.2"}
			ck := tc.ck
			s := testServer(t, cfg, Deps{Policy: ck}, nil)
			c := dialRawFrom(t, "tcp", tcpAddr(s, 0), "127.0.0.2")
			c.hello("x")
			got := c.cmd("MAIL FROM:<a@example.test>")
			if !strings.HasPrefix(got, tc.mail) {
				t.Fatalf("MAIL: %q", got)
			}
			if tc.rcpt != "" {
				if got := c.cmd("RCPT TO:<x@far.test>"); got != tc.rcpt {
					t.Fatalf("RCPT: %q", got)
				}
			}
			c.cmd("QUIT")
			c.conn.Close()
			waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "abort") })
		})
	}
}

func withAction(d policy.Decision, a policy.Action) policy.Decision { d.Action = a; return d }

// Mail from the internet to a local domain is not counted.
func TestPolicyNotConsultedForInboundMail(t *testing.T) {
	ck := &fakeChecker{}
	h := &fakeHandoff{}
	s := testServer(t, testConfig(), Deps{Policy: ck, Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	if got := c.mail("a@remote.test", []string{"u@example.test"}, "Subject: s\r\n\r\nb\r\n.\r\n"); !strings.HasPrefix(got, "250 ok") {
		t.Fatal(got)
	}
	if ck.log() != "" {
		t.Fatalf("policy consulted: %q", ck.log())
	}
}

func TestPolicyFlowCommitHoldObserve(t *testing.T) {
	cfg := testConfig()
	cfg.Relay.RelayNetworks = []string{"127.0.0.0/8"}
	cfg.Relay.SenderIDHeader = true

	t.Run("commit", func(t *testing.T) {
		ck := &fakeChecker{}
		h := &fakeHandoff{}
		s := testServer(t, cfg, Deps{Policy: ck, Handoff: h}, nil)
		c := dialRaw(t, "tcp", tcpAddr(s, 0))
		c.hello("x")
		if got := c.mail("A@Example.test", []string{"x@far.test", "y@far.test"}, "Message-ID: <m1@x>\r\nSubject: hi\r\n\r\nb\r\n.\r\n"); got != "250 ok 1795833709 qp 4242\r\n" {
			t.Fatal(got)
		}
		want := "begin ip:127.0.0.1,sender:a@example.test,domain:example.test; check; rcpt; rcpt; sample <m1@x> hi; msg; commit"
		if ck.log() != want {
			t.Fatalf("calls\n%q\nwant\n%q", ck.log(), want)
		}
		if d := h.deliveries(); len(d) != 1 || !strings.Contains(string(d[0].msg), "\nX-Sender-Id: ip:127.0.0.1\nMessage-ID: <m1@x>\n") {
			t.Fatalf("delivered %q", d)
		}
	})
	t.Run("hand-off failure aborts", func(t *testing.T) {
		ck := &fakeChecker{}
		h := &fakeHandoff{err: context.DeadlineExceeded}
		s := testServer(t, cfg, Deps{Policy: ck, Handoff: h}, nil)
		c := dialRaw(t, "tcp", tcpAddr(s, 0))
		c.hello("x")
		if got := c.mail("a@example.test", []string{"x@far.test"}, "Subject: hi\r\n\r\nb\r\n.\r\n"); !strings.HasPrefix(got, "451 4.3.0") {
			t.Fatal(got)
		}
		if !strings.HasSuffix(ck.log(), "msg; abort") {
			t.Fatalf("calls %q", ck.log())
		}
	})
	t.Run("hold", func(t *testing.T) {
		ck := &fakeChecker{rcpt: []policy.Decision{{}, {Action: policy.Hold, Identity: "ip:127.0.0.1", Limit: "500 recipients/1h"}}}
		h := &fakeHandoff{}
		hold := &fakeHold{}
		s := testServer(t, cfg, Deps{Policy: ck, Handoff: h, Hold: hold}, nil)
		c := dialRaw(t, "tcp", tcpAddr(s, 0))
		c.hello("x")
		if got := c.mail("a@example.test", []string{"x@far.test", "y@far.test"}, "Subject: held one\r\n\r\nb\r\n.\r\n"); got != "250 ok held h1\r\n" {
			t.Fatal(got)
		}
		if len(h.deliveries()) != 0 || len(hold.held) != 1 {
			t.Fatalf("deliveries %d, held %d", len(h.deliveries()), len(hold.held))
		}
		m := hold.held[0]
		if m.Subject != "held one" || strings.Join(m.To, ",") != "x@far.test,y@far.test" || m.Reason != "ip:127.0.0.1 is over 500 recipients/1h" || m.Identities[0] != "ip:127.0.0.1" {
			t.Fatalf("meta %+v", m)
		}
		if !strings.HasSuffix(ck.log(), "msg; held h1") {
			t.Fatalf("calls %q", ck.log())
		}
		if !strings.HasPrefix(string(hold.msgs[0]), "Received: from unknown (HELO x) (127.0.0.1)\n") {
			t.Fatalf("held message %q", hold.msgs[0])
		}
	})
	t.Run("observe", func(t *testing.T) {
		ck := &fakeChecker{rcpt: []policy.Decision{{Action: policy.Accept, Observed: true, WouldBe: policy.Defer, Identity: "ip:127.0.0.1", Limit: "1 recipient/1m"}}}
		h := &fakeHandoff{}
		s := testServer(t, cfg, Deps{Policy: ck, Handoff: h}, nil)
		c := dialRaw(t, "tcp", tcpAddr(s, 0))
		c.hello("x")
		if got := c.mail("a@example.test", []string{"x@far.test", "y@far.test"}, "Subject: s\r\n\r\nb\r\n.\r\n"); !strings.HasPrefix(got, "250 ok") {
			t.Fatal(got)
		}
	})
}

func TestWebserverAttribution(t *testing.T) {
	cfg := testConfig()
	cfg.Webservers = []config.Webserver{{Name: "web1", Addr: "127.0.0.7", Accounts: map[uint32]string{1001: "alice"}}}
	ck := &fakeChecker{}
	h := &fakeHandoff{}
	s := testServer(t, cfg, Deps{Policy: ck, Handoff: h}, nil)
	send := func(from, data string) string {
		ck.mu.Lock()
		ck.calls = nil
		ck.mu.Unlock()
		c := dialRawFrom(t, "tcp", tcpAddr(s, 0), from)
		c.hello("web")
		c.mail("www@example.test", []string{"x@example.test"}, data)
		return ck.log()
	}
	// The first Received, written by the web server's qmail-queue.
	got := send("127.0.0.7", "Received: (qmail 5 invoked by uid 1001); 28 Nov 2026 02:41:53 -0000\r\nX-PHP-Originating-Script: 1001:mailer.php\r\nReceived: (qmail 6 invoked by uid 0); x\r\n\r\nb\r\n.\r\n")
	if !strings.Contains(got, "ids uid:web1:1001[alice|mailer.php]") {
		t.Fatalf("calls %q", got)
	}
	// A forged qmail line below another Received changes nothing; the PHP
	// header is used instead.
	got = send("127.0.0.7", "Received: from somewhere\r\nReceived: (qmail 6 invoked by uid 0); x\r\nX-PHP-Originating-Script: 48:x.php\r\n\r\nb\r\n.\r\n")
	if !strings.Contains(got, "ids uid:web1:48[|x.php]") || strings.Contains(got, "uid:web1:0") {
		t.Fatalf("calls %q", got)
	}
	// The same headers from any other address: no uid identity at all
	// (and internet mail to a local domain is not counted).
	got = send("127.0.0.8", "Received: (qmail 5 invoked by uid 1001); x\r\nX-PHP-Originating-Script: 1001:m.php\r\n\r\nb\r\n.\r\n")
	if strings.Contains(got, "uid:") {
		t.Fatalf("calls %q", got)
	}
}

func accountName(t *testing.T, uid uint32) string {
	f, err := os.Open("/etc/passwd")
	if err != nil {
		t.Skip(err)
	}
	defer f.Close()
	m, err := config.ReadPasswd(f)
	if err != nil || m[uid] == "" {
		t.Skip("no passwd name for our uid")
	}
	return m[uid]
}

func TestSTARTTLSAndAuth(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := testcert.Write(t, dir, "mail.example.test")
	cfg := testConfig()
	cfg.TLS = config.TLS{Cert: certFile, Key: keyFile}
	h := &fakeHandoff{}
	s := testServer(t, cfg, Deps{Auth: fakeAuth{"bob", "pw"}, Handoff: h}, nil)
	raw := dialRaw(t, "tcp", tcpAddr(s, 0))
	if ehlo := raw.hello("client.test"); !strings.Contains(ehlo, "STARTTLS") || strings.Contains(ehlo, "AUTH") {
		t.Fatalf("EHLO before TLS: %q", ehlo)
	}
	conn, err := net.Dial("tcp", tcpAddr(s, 0))
	if err != nil {
		t.Fatal(err)
	}
	c, err := smtp.NewClientStartTLS(conn, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := c.Extension("AUTH"); !ok {
		t.Fatal("no AUTH after TLS")
	}
	if err := c.Auth(sasl.NewPlainClient("", "bob", "pw")); err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail("bob@example.test", []string{"x@far.test"}, strings.NewReader("Subject: tls\r\n\r\nhi\r\n")); err != nil {
		t.Fatal(err)
	}
	d := h.deliveries()
	if len(d) != 1 || !strings.HasPrefix(string(d[0].msg), "Received: from unknown (HELO client.test) (bob@127.0.0.1)\n  by mail.example.test with ESMTPSA; ") {
		t.Fatalf("delivered %q", d)
	}
}

// Shutdown lets a transaction in flight finish: the client gets its 250.
func TestShutdownDrainsInFlightData(t *testing.T) {
	h := &fakeHandoff{block: make(chan struct{}), entered: make(chan struct{}, 1)}
	s := testServer(t, testConfig(), Deps{Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	c.expect("MAIL FROM:<a@remote.test>", "250")
	c.expect("RCPT TO:<u@example.test>", "250")
	c.expect("DATA", "354")
	c.send("Subject: s\r\n\r\nb\r\n.\r\n")
	<-h.entered
	idle := dialRaw(t, "tcp", tcpAddr(s, 0))
	idle.reply()

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	// New connections are refused once Shutdown has begun.
	waitFor(t, func() bool {
		conn, err := net.Dial("tcp", tcpAddr(s, 0))
		if err == nil {
			conn.Close()
		}
		return err != nil
	})
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a transaction in flight", err)
	default:
	}
	close(h.block)
	if got := c.reply(); got != "250 ok 1795833709 qp 4242\r\n" {
		t.Fatalf("in-flight client got %q", got)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if len(h.deliveries()) != 1 {
		t.Fatal("message lost")
	}
	// The idle connection was closed.
	if got := bufio.NewReader(idle.conn); got != nil {
		if _, err := got.ReadString('\n'); err == nil {
			t.Fatal("idle connection still open")
		}
	}
}

// Shutdown past its deadline kills the hand-off: no 250 for that message.
func TestShutdownDeadline(t *testing.T) {
	h := &fakeHandoff{block: make(chan struct{}), entered: make(chan struct{}, 1)}
	s := testServer(t, testConfig(), Deps{Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	c.mailNoWait("a@remote.test", "u@example.test", "Subject: s\r\n\r\nb\r\n.\r\n")
	<-h.entered
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := s.Shutdown(ctx); err != context.DeadlineExceeded {
		t.Fatalf("Shutdown = %v", err)
	}
	if got := c.reply(); strings.HasPrefix(got, "250") {
		t.Fatalf("cut-short transaction got %q", got)
	}
}

func (c *rawClient) mailNoWait(from, to, data string) {
	c.t.Helper()
	c.expect("MAIL FROM:<"+from+">", "250")
	c.expect("RCPT TO:<"+to+">", "250")
	c.expect("DATA", "354")
	c.send(data)
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 250; i++ {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("condition not reached in 5s")
}
