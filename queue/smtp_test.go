package queue

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"relay/internal/testcert"
)

// upstream is an in-process go-smtp server on loopback that records what
// it receives.
type upstream struct {
	mu       sync.Mutex
	msgs     []upstreamMsg
	rcptErr  map[string]error // RCPT replies by address
	dataErr  error
	sawHelo  string
	sawTLS   bool
	addr     string
	server   *smtp.Server
	dataRead chan struct{}
}

type upstreamMsg struct {
	from string
	to   []string
	data string
	tls  bool
}

func startUpstream(t *testing.T, tlsConfig *tls.Config) *upstream {
	t.Helper()
	u := &upstream{rcptErr: map[string]error{}, dataRead: make(chan struct{}, 16)}
	s := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		_, isTLS := c.TLSConnectionState()
		u.mu.Lock()
		u.sawHelo = c.Hostname()
		u.sawTLS = isTLS
		u.mu.Unlock()
		return &upstreamSession{u: u, tls: isTLS}, nil
	}))
	s.Domain = "upstream.test"
	s.TLSConfig = tlsConfig
	s.ReadTimeout = 10 * time.Second
	s.WriteTimeout = 10 * time.Second
	s.ErrorLog = nopLogger{}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	t.Cleanup(func() { s.Close() })
	u.addr = l.Addr().String()
	u.server = s
	return u
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...interface{}) {}
func (nopLogger) Println(...interface{})        {}

func (u *upstream) messages() []upstreamMsg {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]upstreamMsg(nil), u.msgs...)
}

type upstreamSession struct {
	u   *upstream
	tls bool
	m   upstreamMsg
}

func (s *upstreamSession) Mail(from string, _ *smtp.MailOptions) error {
	s.m = upstreamMsg{from: from, tls: s.tls}
	return nil
}

func (s *upstreamSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.u.mu.Lock()
	err := s.u.rcptErr[to]
	s.u.mu.Unlock()
	if err != nil {
		return err
	}
	s.m.to = append(s.m.to, to)
	return nil
}

func (s *upstreamSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	s.u.dataRead <- struct{}{}
	if err != nil {
		return err
	}
	s.u.mu.Lock()
	defer s.u.mu.Unlock()
	if s.u.dataErr != nil {
		return s.u.dataErr
	}
	s.m.data = string(b)
	s.u.msgs = append(s.u.msgs, s.m)
	return nil
}

func (s *upstreamSession) Reset()        { s.m = upstreamMsg{} }
func (s *upstreamSession) Logout() error { return nil }

func TestSMTPForwards(t *testing.T) {
	u := startUpstream(t, nil)
	s, err := NewSMTP(u.addr, "relay.example.test", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if s.TLS != nil {
		t.Error("loopback upstream should be plain text")
	}
	msg := "Subject: dots\n\n.leading dot\n.\n..two\nbare\rCR\nend"
	r, err := s.Deliver(context.Background(), Envelope{From: "s@example.test", To: []string{"a@x", "b@y"}}, strings.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	if r.Reply == "" || r.QP != 0 {
		t.Errorf("receipt %+v", r)
	}
	msgs := u.messages()
	if len(msgs) != 1 {
		t.Fatalf("%d messages upstream", len(msgs))
	}
	m := msgs[0]
	if m.from != "s@example.test" || strings.Join(m.to, ",") != "a@x,b@y" {
		t.Errorf("envelope %q %q", m.from, m.to)
	}
	// LF became CRLF, dot-stuffing survived the round trip, a final line
	// without LF was ended.
	if want := "Subject: dots\r\n\r\n.leading dot\r\n.\r\n..two\r\nbare\rCR\r\nend\r\n"; m.data != want {
		t.Errorf("upstream got %q, want %q", m.data, want)
	}
	if u.sawHelo != "relay.example.test" {
		t.Errorf("EHLO %q", u.sawHelo)
	}
}

func TestSMTPNullSender(t *testing.T) {
	u := startUpstream(t, nil)
	s, _ := NewSMTP(u.addr, "relay.example.test", 10*time.Second)
	if _, err := s.Deliver(context.Background(), Envelope{From: "", To: []string{"a@x"}}, strings.NewReader("x\n")); err != nil {
		t.Fatal(err)
	}
	if m := u.messages(); len(m) != 1 || m[0].from != "" {
		t.Fatalf("messages %+v", m)
	}
}

func TestSMTPUpstreamReplies(t *testing.T) {
	env := Envelope{From: "s@example.test", To: []string{"ok@x", "bad@x"}}
	t.Run("rcpt 550", func(t *testing.T) {
		u := startUpstream(t, nil)
		u.rcptErr["bad@x"] = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no mailbox here by that name"}
		s, _ := NewSMTP(u.addr, "relay.example.test", 10*time.Second)
		_, err := s.Deliver(context.Background(), env, strings.NewReader("x\n"))
		wantError(t, err, 550, [3]int{5, 1, 1}, "no mailbox here by that name")
		if len(u.messages()) != 0 {
			t.Error("message delivered although a recipient was refused")
		}
	})
	t.Run("data 451", func(t *testing.T) {
		u := startUpstream(t, nil)
		u.dataErr = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again later"}
		s, _ := NewSMTP(u.addr, "relay.example.test", 10*time.Second)
		_, err := s.Deliver(context.Background(), env, strings.NewReader("x\n"))
		wantError(t, err, 451, [3]int{4, 3, 0}, "try again later")
	})
	t.Run("refused", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		s, _ := NewSMTP(addr, "relay.example.test", 10*time.Second)
		_, err = s.Deliver(context.Background(), env, strings.NewReader("x\n"))
		wantError(t, err, 451, [3]int{4, 4, 1}, "connection to mail server failed (#4.4.1)")
	})
	t.Run("silent", func(t *testing.T) {
		// Accepts the connection, never greets.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			c, err := l.Accept()
			if err == nil {
				defer c.Close()
				io.Copy(io.Discard, c)
			}
		}()
		s, _ := NewSMTP(l.Addr().String(), "relay.example.test", 300*time.Millisecond)
		_, err = s.Deliver(context.Background(), env, strings.NewReader("x\n"))
		wantError(t, err, 451, [3]int{4, 4, 1}, "connection to mail server timed out (#4.4.1)")
	})
}

// A failing message reader drops the connection before the final dot: the
// upstream must not accept a partial message.
func TestSMTPReaderFailure(t *testing.T) {
	u := startUpstream(t, nil)
	s, _ := NewSMTP(u.addr, "relay.example.test", 10*time.Second)
	_, err := s.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}},
		&failingReader{data: []byte("Subject: partial\n\nline\n")})
	if !errors.Is(err, errBadData) {
		t.Fatalf("error = %v, want the reader's", err)
	}
	select {
	case <-u.dataRead:
	case <-time.After(10 * time.Second):
		t.Fatal("upstream never finished reading DATA")
	}
	if m := u.messages(); len(m) != 0 {
		t.Fatalf("upstream accepted a partial message: %q", m[0].data)
	}
}

func TestSMTPStartTLS(t *testing.T) {
	serverTLS, roots := selfSignedTLS(t, "mx.example.test")
	u := startUpstream(t, serverTLS)
	s := &SMTP{Addr: u.addr, Hostname: "relay.example.test", Timeout: 10 * time.Second,
		TLS: &tls.Config{ServerName: "mx.example.test", RootCAs: roots}}
	if _, err := s.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("hi\n")); err != nil {
		t.Fatal(err)
	}
	m := u.messages()
	if len(m) != 1 || !m[0].tls || m[0].data != "hi\r\n" {
		t.Fatalf("messages %+v", m)
	}
	if u.sawHelo != "relay.example.test" {
		t.Errorf("EHLO after TLS = %q", u.sawHelo)
	}

	// A certificate that does not verify fails the hand-off; no plain-text
	// fallback.
	s.TLS = &tls.Config{ServerName: "other.example.test", RootCAs: roots}
	_, err := s.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("hi\n"))
	wantError(t, err, 451, [3]int{4, 7, 0}, "TLS with mail server failed (#4.7.0)")
	if len(u.messages()) != 1 {
		t.Error("message sent without verified TLS")
	}
}

// An upstream without STARTTLS gets the message in plain text even when
// TLS is configured.
func TestSMTPNoStartTLSOffered(t *testing.T) {
	u := startUpstream(t, nil)
	s := &SMTP{Addr: u.addr, Hostname: "relay.example.test", Timeout: 10 * time.Second, TLS: &tls.Config{ServerName: "x"}}
	if _, err := s.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("hi\n")); err != nil {
		t.Fatal(err)
	}
	if m := u.messages(); len(m) != 1 || m[0].tls {
		t.Fatalf("messages %+v", m)
	}
}

func TestNewSMTPTLSDefault(t *testing.T) {
	for addr, wantTLS := range map[string]bool{"127.0.0.1:25": false, "[::1]:25": false, "localhost:25": false, "mx.example.test:25": true, "10.0.0.5:25": true} {
		s, err := NewSMTP(addr, "h", 0)
		if err != nil {
			t.Fatal(err)
		}
		if (s.TLS != nil) != wantTLS {
			t.Errorf("%s: TLS %v, want %v", addr, s.TLS != nil, wantTLS)
		}
	}
	if _, err := NewSMTP("no-port", "h", 0); err == nil {
		t.Error("address without port accepted")
	}
}

func TestHasExtension(t *testing.T) {
	reply := "upstream.test Hello\nPIPELINING\nstarttls\nSIZE 1000"
	if !hasExtension(reply, "STARTTLS") || hasExtension(reply, "upstream.test") || hasExtension(reply, "AUTH") {
		t.Fatal("hasExtension wrong")
	}
}

func FuzzHasExtension(f *testing.F) {
	f.Add("mx Hello\nSTARTTLS\n8BITMIME")
	f.Add("")
	f.Fuzz(func(t *testing.T, reply string) {
		got := hasExtension(reply, "STARTTLS")
		if got && !strings.Contains(strings.ToUpper(reply), "STARTTLS") {
			t.Fatal("found an extension that is not there")
		}
	})
}

// selfSignedTLS makes a server certificate for name and a pool trusting it.
func selfSignedTLS(t *testing.T, name string) (*tls.Config, *x509.CertPool) {
	t.Helper()
	cert, pool := testcert.New(t, name)
	return &tls.Config{Certificates: []tls.Certificate{cert}}, pool
}
