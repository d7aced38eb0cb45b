package relay

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"relay/config"
	"relay/policy"
)

// checkClient is relay qq's side of the check protocol, frame by frame.
type checkClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dialCheck(t *testing.T, path string) *checkClient {
	t.Helper()
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &checkClient{t: t, conn: c, r: bufio.NewReader(c)}
}

// request sends the magic and a whole request: F, T..., S, H, E.
func (c *checkClient) request(from string, rcpts []string, msg string) {
	c.t.Helper()
	b := []byte(checkMagic)
	b = appendFrame(b, frameFrom, from)
	for _, to := range rcpts {
		b = appendFrame(b, frameTo, to)
	}
	b = appendFrame(b, frameSize, strconv.Itoa(len(msg)))
	head := msg
	if i := strings.Index(msg, "\n\n"); i >= 0 {
		head = msg[:i+2]
	}
	b = appendFrame(b, frameHeader, head[:min(len(head), maxCheckHeader)])
	b = appendFrame(b, frameEnd, "")
	c.write(b)
}

// message sends msg as M frames and an E, after G or Q.
func (c *checkClient) message(msg string) {
	c.t.Helper()
	var b []byte
	for rest := msg; len(rest) > 0; {
		n := min(len(rest), maxMessageFrame)
		b = appendFrame(b, frameMessage, rest[:n])
		rest = rest[n:]
	}
	c.write(appendFrame(b, frameEnd, ""))
}

func (c *checkClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// verdict reads the greeting, the magic and the first frame.
func (c *checkClient) verdict() (byte, string) {
	c.t.Helper()
	line, err := c.r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "220 ") {
		c.t.Fatalf("greeting %q, %v", line, err)
	}
	magic := make([]byte, len(checkMagic))
	if _, err := io.ReadFull(c.r, magic); err != nil || string(magic) != checkMagic {
		c.t.Fatalf("magic %q, %v", magic, err)
	}
	return c.frame()
}

// frame reads one frame; typ 0 when the daemon closed instead.
func (c *checkClient) frame() (byte, string) {
	c.t.Helper()
	var h [frameHeaderLen]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return 0, err.Error()
	}
	p := make([]byte, binary.BigEndian.Uint32(h[1:]))
	if _, err := io.ReadFull(c.r, p); err != nil {
		c.t.Fatalf("frame %q payload: %v", h[0], err)
	}
	return h[0], string(p)
}

// closed reports whether the daemon closes the connection with nothing
// more to say (an EOF, or a reset when it left part of the request
// unread).
func (c *checkClient) closed() bool {
	_, err := c.r.ReadByte()
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

func checkServer(t *testing.T, deps Deps, edit func(*config.Config)) (string, *Server) {
	t.Helper()
	path := sockPath(t)
	cfg := testConfig(config.Listener{Addr: "127.0.0.1:0", Mode: config.ModeSMTP}, config.Listener{Addr: path, Mode: config.ModeLocal})
	if edit != nil {
		edit(cfg)
	}
	return path, testServer(t, cfg, deps, nil)
}

func TestCheck(t *testing.T) {
	ck := &fakeChecker{}
	h := &fakeHandoff{}
	hold := &fakeHold{}
	path, _ := checkServer(t, Deps{Policy: ck, Handoff: h, Hold: hold}, nil)
	msg := "X-PHP-Originating-Script: " + uidString() + ":f.php\nSubject: s\n\nbare\rcr kept\r\n.\n"
	reset := func() { ck.mu.Lock(); ck.calls = nil; ck.mu.Unlock() }
	me := "uid:local:" + uidString()

	t.Run("commit", func(t *testing.T) {
		reset()
		c := dialCheck(t, path)
		c.request("www@example.test", []string{"x@far.test", "y@far.test"}, msg)
		if typ, text := c.verdict(); typ != frameAccepted || text != "" {
			t.Fatalf("verdict %q %q", typ, text)
		}
		c.write(appendFrame(nil, frameCommit, ""))
		if typ, text := c.frame(); typ != frameOK || text != "committed" {
			t.Fatalf("commit answered %q %q", typ, text)
		}
		if !c.closed() {
			t.Fatal("the daemon did not close after K")
		}
		want := "begin " + me + ",sender:www@example.test,domain:example.test; check; rcpt; rcpt; ids " + me
		waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "; msg; commit") })
		if !strings.HasPrefix(ck.log(), want) || strings.Contains(ck.log(), "abort") || !strings.Contains(ck.log(), "|f.php]") {
			t.Fatalf("calls %q", ck.log())
		}
		if len(h.deliveries()) != 0 {
			t.Fatal("a check handed the message off")
		}
	})
	t.Run("CRLF header", func(t *testing.T) {
		reset()
		c := dialCheck(t, path)
		c.request("www@example.test", []string{"x@far.test"}, strings.ReplaceAll(msg, "\n", "\r\n"))
		if typ, _ := c.verdict(); typ != frameAccepted {
			t.Fatalf("verdict %q", typ)
		}
		c.conn.Close()
		waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "msg; abort") })
		if !strings.Contains(ck.log(), "ids "+me+"[") || !strings.Contains(ck.log(), "|f.php]; sample  s; msg") {
			t.Fatalf("calls %q", ck.log())
		}
	})
	t.Run("closed without commit", func(t *testing.T) {
		reset()
		c := dialCheck(t, path)
		c.request("www@example.test", []string{"x@far.test"}, msg)
		if typ, _ := c.verdict(); typ != frameAccepted {
			t.Fatalf("verdict %q", typ)
		}
		c.conn.Close()
		waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "msg; abort") })
	})
	t.Run("another frame instead of the commit", func(t *testing.T) {
		reset()
		c := dialCheck(t, path)
		c.request("www@example.test", []string{"x@far.test"}, msg)
		c.verdict()
		c.write(appendFrame(nil, frameEnd, ""))
		if !c.closed() {
			t.Fatal("the daemon answered a frame that is not a commit")
		}
		waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "msg; abort") })
	})
	t.Run("recipient deferred", func(t *testing.T) {
		reset()
		ck.rcpt = []policy.Decision{{}, {Action: policy.Defer, Identity: "uid:local:1", Limit: "1 recipient/1h"}}
		defer func() { ck.rcpt = nil }()
		c := dialCheck(t, path)
		c.request("", []string{"x@far.test", "y@far.test", "z@far.test"}, msg)
		typ, text := c.verdict()
		if typ != frameDefer || !strings.HasPrefix(text, "451 4.7.1 uid:local:1 is over 1 recipient/1h") {
			t.Fatalf("verdict %q %q", typ, text)
		}
		if !c.closed() {
			t.Fatal("the daemon did not close after D")
		}
		// The first refusal ends the check: z is never asked about.
		waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "rcpt; rcpt; abort") })
	})
	t.Run("suspended sender", func(t *testing.T) {
		reset()
		ck.check = policy.Decision{Action: policy.Reject, Identity: me, Suspended: true}
		defer func() { ck.check = policy.Decision{} }()
		c := dialCheck(t, path)
		c.request("www@example.test", []string{"x@far.test"}, msg)
		if typ, text := c.verdict(); typ != frameReject || !strings.HasPrefix(text, "550 5.7.1 "+me) {
			t.Fatalf("verdict %q %q", typ, text)
		}
	})
	t.Run("address rules", func(t *testing.T) {
		for _, tc := range []struct{ from, to, want string }{
			{"a\r@x.test", "x@far.test", "501 5.1.7"},
			{"www@example.test", "b\x00@far.test", "501 5.1.3"},
			{"www@example.test", strings.Repeat("b", 1100) + "@far.test", "501 5.1.3"},
		} {
			c := dialCheck(t, path)
			c.request(tc.from, []string{tc.to}, msg)
			if typ, text := c.verdict(); typ != frameReject || !strings.HasPrefix(text, tc.want) {
				t.Errorf("%q -> %q: verdict %q %q, want R %s", tc.from, tc.to, typ, text, tc.want)
			}
		}
	})
	t.Run("held", func(t *testing.T) {
		reset()
		ck.msg = policy.Decision{Action: policy.Hold, Identity: "uid:local:1", Limit: "1 message/1h"}
		defer func() { ck.msg = policy.Decision{} }()
		big := msg + strings.Repeat("a body line, sent in several M frames\n", 5000)
		c := dialCheck(t, path)
		c.request("www@example.test", []string{"x@far.test"}, big)
		if typ, _ := c.verdict(); typ != frameHold {
			t.Fatalf("verdict %q", typ)
		}
		var b []byte
		for rest := big; rest != ""; {
			n := min(len(rest), maxMessageFrame)
			b = appendFrame(b, frameMessage, rest[:n])
			rest = rest[n:]
		}
		c.write(appendFrame(b, frameEnd, ""))
		if typ, text := c.frame(); typ != frameOK || text != "held h1" {
			t.Fatalf("after the message: %q %q", typ, text)
		}
		if !strings.HasSuffix(ck.log(), "msg; held h1") {
			t.Fatalf("calls %q", ck.log())
		}
		// Held exactly as qmail-queue would have got it, under relay's
		// Received line.
		want := formatReceived(receivedInfo{Local: true, UID: uint32(os.Getuid()), Received: fixedNow}) + big
		if got := string(hold.msgs[0]); got != want {
			t.Fatalf("held %q...", got[:min(len(got), 200)])
		}
		if m := hold.held[0]; m.From != "www@example.test" || len(m.To) != 1 || m.Subject != "s" {
			t.Fatalf("held meta %+v", m)
		}
	})
	t.Run("held message shorter than announced", func(t *testing.T) {
		reset()
		ck.msg = policy.Decision{Action: policy.Hold, Identity: "uid:local:1", Limit: "1 message/1h"}
		defer func() { ck.msg = policy.Decision{} }()
		c := dialCheck(t, path)
		c.request("www@example.test", []string{"x@far.test"}, msg)
		c.verdict()
		c.write(appendFrame(appendFrame(nil, frameMessage, msg[:10]), frameEnd, ""))
		if !c.closed() {
			t.Fatal("a short message was answered")
		}
		waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "msg; abort") })
		if len(hold.held) != 1 {
			t.Fatal("a short message was held")
		}
	})
}

// max_recipients and databytes are SMTP's limits, not qmail-queue's: a
// check is not held to them (policy's caps still apply).
func TestCheckWithoutSMTPLimits(t *testing.T) {
	ck := &fakeChecker{}
	path, _ := checkServer(t, Deps{Policy: ck}, func(cfg *config.Config) {
		cfg.Relay.MaxRecipients = 1
		cfg.Relay.MaxMessageBytes = 10
	})
	c := dialCheck(t, path)
	c.request("www@example.test", []string{"x@far.test", "y@far.test", "z@far.test"}, "Subject: s\n\n"+strings.Repeat("b", 100))
	if typ, text := c.verdict(); typ != frameAccepted {
		t.Fatalf("verdict %q %q", typ, text)
	}
	if got := strings.Count(ck.log(), "rcpt"); got != 3 {
		t.Fatalf("policy saw %d recipients: %q", got, ck.log())
	}
}

// A reservation that lapsed before the commit (reserve_timeout) is checked
// again, as at the end of an SMTP DATA: no room now, and the commit is
// answered with the refusal, nothing charged.
func TestCheckCommitRechecks(t *testing.T) {
	ck := &fakeChecker{logRecheck: true, recheck: policy.Decision{Action: policy.Defer, Identity: "uid:local:1", Limit: "1 recipient/1h"}}
	path, _ := checkServer(t, Deps{Policy: ck}, nil)
	c := dialCheck(t, path)
	c.request("www@example.test", []string{"x@far.test"}, "Subject: s\n\nb\n")
	if typ, _ := c.verdict(); typ != frameAccepted {
		t.Fatalf("verdict %q", typ)
	}
	c.write(appendFrame(nil, frameCommit, ""))
	if typ, text := c.frame(); typ != frameDefer || !strings.HasPrefix(text, "451 4.7.1 uid:local:1 is over") {
		t.Fatalf("commit answered %q %q", typ, text)
	}
	waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "msg; recheck; abort") })
}

// A hold without a hold spool defers, before any message is sent.
func TestCheckHoldWithoutSpool(t *testing.T) {
	ck := &fakeChecker{msg: policy.Decision{Action: policy.Hold, Identity: "uid:local:1", Limit: "1 message/1h"}}
	path, _ := checkServer(t, Deps{Policy: ck}, nil)
	c := dialCheck(t, path)
	c.request("www@example.test", []string{"x@far.test"}, "Subject: s\n\nb\n")
	if typ, text := c.verdict(); typ != frameDefer || text != "451 4.7.1 uid:local:1 is over 1 message/1h" {
		t.Fatalf("verdict %q %q", typ, text)
	}
	waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "msg; abort") })
}

func TestCheckExempt(t *testing.T) {
	name := accountName(t, uint32(os.Getuid()))
	ck := &fakeChecker{}
	path, _ := checkServer(t, Deps{Policy: ck}, func(cfg *config.Config) { cfg.Local.ExemptUsers = []string{name} })
	c := dialCheck(t, path)
	c.request("www@example.test", []string{"x@far.test"}, "Subject: s\n\nb\n")
	if typ, _ := c.verdict(); typ != frameExempt {
		t.Fatalf("verdict %q", typ)
	}
	if !c.closed() {
		t.Fatal("the daemon did not close after X")
	}
	if ck.log() != "" {
		t.Fatalf("exempt user counted: %q", ck.log())
	}
}

// A reservation waits for its commit no longer than relay.timeout (or a
// minute).
func TestCheckCommitWaitsBounded(t *testing.T) {
	ck := &fakeChecker{}
	path, _ := checkServer(t, Deps{Policy: ck}, func(cfg *config.Config) {
		cfg.Relay.Timeout = config.Duration{Duration: 300 * time.Millisecond}
	})
	c := dialCheck(t, path)
	c.request("www@example.test", []string{"x@far.test"}, "Subject: s\n\nb\n")
	if typ, _ := c.verdict(); typ != frameAccepted {
		t.Fatalf("verdict %q", typ)
	}
	if !c.closed() {
		t.Fatal("still open")
	}
	waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "msg; abort") })
}

// Shutdown waits for a reservation to be committed, and a check during the
// drain is deferred.
func TestCheckShutdown(t *testing.T) {
	ck := &fakeChecker{}
	path, s := checkServer(t, Deps{Policy: ck}, nil)
	c := dialCheck(t, path)
	c.request("www@example.test", []string{"x@far.test"}, "Subject: s\n\nb\n")
	if typ, _ := c.verdict(); typ != frameAccepted {
		t.Fatalf("verdict %q", typ)
	}
	late := dialCheck(t, path) // accepted before the drain starts
	late.r.ReadString('\n')    // greeted: go-smtp holds the connection
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	waitFor(t, s.draining.Load)
	late.request("www@example.test", []string{"x@far.test"}, "Subject: s\n\nb\n")
	magic := make([]byte, len(checkMagic))
	io.ReadFull(late.r, magic)
	if typ, text := late.frame(); typ != frameDefer || !strings.HasPrefix(text, "421 4.3.2") {
		t.Fatalf("check during the drain: %q %q", typ, text)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) with a reservation waiting for its commit", err)
	case <-time.After(200 * time.Millisecond):
	}
	c.write(appendFrame(nil, frameCommit, ""))
	if typ, _ := c.frame(); typ != frameOK {
		t.Fatalf("commit during the drain: %q", typ)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if !strings.Contains(ck.log(), "msg; commit") {
		t.Fatalf("calls %q", ck.log())
	}
}

// Requests that break the protocol end the connection without a verdict
// and leave nothing reserved.
func TestCheckProtocolErrors(t *testing.T) {
	ck := &fakeChecker{}
	path, _ := checkServer(t, Deps{Policy: ck}, nil)
	frames := func(fs ...string) []byte {
		b := []byte(checkMagic)
		for _, f := range fs {
			b = appendFrame(b, f[0], f[1:])
		}
		return b
	}
	for name, in := range map[string][]byte{
		"other version":        append([]byte("\x00RQ2"), frames("Fa@b", "Tc@far.test", "S1", "Hx", "E")[4:]...),
		"recipient first":      frames("Tc@far.test", "Fa@b", "S1", "Hx", "E"),
		"no recipient":         frames("Fa@b", "S1", "Hx", "E"),
		"empty recipient":      frames("Fa@b", "T", "S1", "Hx", "E"),
		"size not a number":    frames("Fa@b", "Tc@far.test", "S-1", "Hx", "E"),
		"size too long":        frames("Fa@b", "Tc@far.test", "S"+strings.Repeat("9", 20), "Hx", "E"),
		"no header frame":      frames("Fa@b", "Tc@far.test", "S1", "E"),
		"end with a payload":   frames("Fa@b", "Tc@far.test", "S1", "Hx", "Ex"),
		"header too long":      frames("Fa@b", "Tc@far.test", "S1", "H"+strings.Repeat("x", maxCheckHeader+1), "E"),
		"header past the size": frames("Fa@b", "Tc@far.test", "S1", "Hxx", "E"),
		"address too long":     frames("F"+strings.Repeat("a", maxCheckAddress+1), "Tc@far.test", "S1", "Hx", "E"),
		"cut short":            frames("Fa@b", "Tc@far.test", "S1")[:20],
		"huge length, no end":  append([]byte(checkMagic), 'F', 0xff, 0xff, 0xff, 0xff),
	} {
		t.Run(name, func(t *testing.T) {
			c := dialCheck(t, path)
			c.write(in)
			if name == "cut short" {
				c.conn.(*net.UnixConn).CloseWrite()
			}
			if line, _ := c.r.ReadString('\n'); !strings.HasPrefix(line, "220 ") {
				t.Fatalf("greeting %q", line)
			}
			if !c.closed() {
				t.Fatal("the daemon answered a request that breaks the protocol")
			}
		})
	}
	if got := ck.log(); got != "" {
		t.Fatalf("policy was asked: %q", got)
	}
}

// Only the local socket speaks the check protocol, and only to a client
// whose first byte is a NUL: on TCP the magic is a bad SMTP command, and
// on the local socket SMTP works as before.
func TestCheckOnlyOnLocalSocket(t *testing.T) {
	ck := &fakeChecker{}
	h := &fakeHandoff{}
	path, s := checkServer(t, Deps{Policy: ck, Handoff: h}, func(cfg *config.Config) {
		cfg.Relay.RelayNetworks = []string{"127.0.0.0/8"}
		cfg.Relay.MaxMessageBytes = 4096
	})
	tcp := dialRaw(t, "tcp", tcpAddr(s, 0))
	tcp.reply()
	req := appendFrame(appendFrame(appendFrame(appendFrame(appendFrame([]byte(checkMagic), frameFrom, "a@example.test"), frameTo, "x@far.test"), frameSize, "1"), frameHeader, "x"), frameEnd, "")
	tcp.send(string(req) + "\r\n")
	if got := tcp.reply(); !strings.HasPrefix(got, "5") {
		t.Fatalf("TCP answered the check magic with %q", got)
	}
	if ck.log() != "" {
		t.Fatalf("TCP check reached policy: %q", ck.log())
	}

	l := dialRaw(t, "unix", path)
	if ehlo := l.hello("localhost"); !strings.Contains(ehlo, "SIZE 4096") {
		t.Fatalf("local EHLO without databytes' SIZE: %q", ehlo)
	}
	if got := l.mail("a@example.test", []string{"x@far.test"}, "Subject: x\r\n\r\nhi\r\n.\r\n"); !strings.HasPrefix(got, "250 ok 1795833709") {
		t.Fatalf("local SMTP: %q", got)
	}
	if n := len(h.deliveries()); n != 1 {
		t.Fatalf("%d deliveries, want 1", n)
	}
	if !strings.HasSuffix(ck.log(), "msg; commit") {
		t.Fatalf("local SMTP not counted: %q", ck.log())
	}
}
