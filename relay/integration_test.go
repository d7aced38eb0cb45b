package relay

import (
	"bufio"
	"crypto/tls"
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"relay/config"
	"relay/internal/fakeqq"
	"relay/internal/testcert"
	"relay/queue"
)

// Through the real qmail-queue hand-off into the fake qmail-queue: the
// stored message and envelope byte for byte, each failure's reply, and a
// 552 that never reaches qmail-queue's envelope.
func TestQmailQueueHandoff(t *testing.T) {
	bin := fakeqq.Build(t)
	dir := t.TempDir()
	t.Setenv("FAKEQQ_DIR", dir)
	cfg := testConfig()
	cfg.Relay.MaxMessageBytes = 100
	h := &queue.QmailQueue{Path: bin, Timeout: 10 * time.Second}
	s := testServer(t, cfg, Deps{Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("client.test")

	got := c.mail("a@remote.test", []string{"u@example.test", "v@example.test"}, "Subject: x\r\n\r\n..dot\r\nend\r\n.\r\n")
	if !strings.HasPrefix(got, "250 ok ") || !strings.Contains(got, " qp ") {
		t.Fatalf("reply %q", got)
	}
	calls := fakeqq.Calls(t, dir)
	if len(calls) != 1 {
		t.Fatalf("%d calls", len(calls))
	}
	want := "Received: from unknown (HELO client.test) (127.0.0.1)\n  by mail.example.test with SMTP; 28 Nov 2026 02:41:53 -0000\nSubject: x\n\n.dot\nend\n"
	if string(calls[0].Message) != want {
		t.Fatalf("message %q\nwant %q", calls[0].Message, want)
	}
	if string(calls[0].Envelope) != "Fa@remote.test\x00Tu@example.test\x00Tv@example.test\x00\x00" {
		t.Fatalf("envelope %q", calls[0].Envelope)
	}

	// Too big: the whole body is read, qmail-queue never gets an envelope.
	got = c.mail("a@remote.test", []string{"u@example.test"}, strings.Repeat("x", 200)+"\r\n.\r\n")
	if got != "552 5.3.4 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n" {
		t.Fatalf("too big: %q", got)
	}
	for _, call := range fakeqq.Calls(t, dir)[1:] {
		if len(call.Envelope) > 0 {
			t.Fatalf("qmail-queue got an envelope for a refused message: %q", call.Envelope)
		}
	}

	// qmail-queue's exit codes reach the client as qmail-smtpd words them.
	for code, want := range map[string]string{
		"31": "554 5.3.0 mail server permanently rejected message (#5.3.0)\r\n",
		"71": "451 4.3.0 mail server temporarily rejected message (#4.3.0)\r\n",
	} {
		t.Setenv("FAKEQQ_EXIT", code)
		if got := c.mail("a@remote.test", []string{"u@example.test"}, "Subject: x\r\n\r\nb\r\n.\r\n"); got != want {
			t.Errorf("exit %s: %q, want %q", code, got, want)
		}
	}
}

// AUTH LOGIN with the real Authenticator and a users_file entry.
func TestAuthLoginRealAuthenticator(t *testing.T) {
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.Auth = config.Auth{RequireTLS: false, Users: map[string][]byte{"carol": hash}}
	auth := NewAuthenticator(cfg.Auth, AuthOptions{FailDelay: func(int) time.Duration { return 0 }})
	s := testServer(t, cfg, Deps{Auth: auth}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	b64 := base64.StdEncoding.EncodeToString
	c.expect("AUTH LOGIN", "334 VXNlcm5hbWU6")
	c.expect(b64([]byte("carol")), "334 UGFzc3dvcmQ6")
	c.expect(b64([]byte("s3cret")), "235")
	c.expect("MAIL FROM:<carol@example.test>", "250")
	c.expect("RCPT TO:<x@far.test>", "250")
}

// Implicit TLS on an smtps listener: the session sees TLS and the client
// address under the TLS layer.
func TestSMTPS(t *testing.T) {
	certFile, keyFile := testcert.Write(t, t.TempDir(), "mail.example.test")
	cfg := testConfig(config.Listener{Addr: "127.0.0.1:0", Mode: config.ModeSMTPS})
	cfg.TLS = config.TLS{Cert: certFile, Key: keyFile}
	h := &fakeHandoff{}
	s := testServer(t, cfg, Deps{Handoff: h}, nil)
	conn, err := tls.Dial("tcp", tcpAddr(s, 0), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	c := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	t.Cleanup(func() { conn.Close() })
	c.hello("x")
	if got := c.mail("a@remote.test", []string{"u@example.test"}, "Subject: s\r\n\r\nb\r\n.\r\n"); !strings.HasPrefix(got, "250 ok") {
		t.Fatal(got)
	}
	if d := h.deliveries(); len(d) != 1 || !strings.Contains(string(d[0].msg), "(127.0.0.1)\n  by mail.example.test with ESMTPS; ") {
		t.Fatalf("delivered %q", d)
	}
}

// Reload changes relay control for new sessions; a bad config keeps the
// running one.
func TestReload(t *testing.T) {
	s := testServer(t, testConfig(), Deps{}, nil)
	rcpt := func() string {
		c := dialRaw(t, "tcp", tcpAddr(s, 0))
		c.hello("x")
		c.expect("MAIL FROM:<a@remote.test>", "250")
		return c.cmd("RCPT TO:<u@other.test>")
	}
	if got := rcpt(); !strings.HasPrefix(got, "553 ") {
		t.Fatal(got)
	}
	cfg := testConfig()
	cfg.Relay.LocalDomains = []string{"other.test"}
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if got := rcpt(); !strings.HasPrefix(got, "250 ") {
		t.Fatal(got)
	}
	bad := testConfig()
	bad.Relay.RelayNetworks = []string{"not a network"}
	if err := s.Reload(bad); err == nil {
		t.Fatal("bad config accepted")
	}
	if got := rcpt(); !strings.HasPrefix(got, "250 ") {
		t.Fatalf("running config lost: %q", got)
	}
}
