package relay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"relay/config"
	"relay/policy"
	"relay/queue"
)

// fixedNow is the clock of every test server.
var fixedNow = time.Date(2026, 11, 28, 2, 41, 53, 0, time.UTC)

// delivery is one message a fakeHandoff received.
type delivery struct {
	env queue.Envelope
	msg []byte
}

// fakeHandoff records what it is given. err is returned after reading the
// whole message; block, when set, holds Deliver until it is closed.
type fakeHandoff struct {
	mu       sync.Mutex
	got      []delivery
	err      error
	block    chan struct{}
	entered  chan struct{} // receives once per Deliver call when non-nil
	readErrs []error
}

func (h *fakeHandoff) Deliver(ctx context.Context, env queue.Envelope, msg io.Reader) (queue.Receipt, error) {
	if h.entered != nil {
		h.entered <- struct{}{}
	}
	if h.block != nil {
		select {
		case <-h.block:
		case <-ctx.Done():
			return queue.Receipt{}, ctx.Err()
		}
	}
	b, err := io.ReadAll(msg)
	h.mu.Lock()
	defer h.mu.Unlock()
	if err != nil {
		h.readErrs = append(h.readErrs, err)
		return queue.Receipt{}, fmt.Errorf("reading message: %w", err)
	}
	if h.err != nil {
		return queue.Receipt{}, h.err
	}
	h.got = append(h.got, delivery{env: env, msg: b})
	return queue.Receipt{QP: 4242, Reply: "ok 1795833709 qp 4242"}, nil
}

func (h *fakeHandoff) deliveries() []delivery {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]delivery(nil), h.got...)
}

// fakeHold is an in-memory hold spool.
type fakeHold struct {
	mu   sync.Mutex
	held []queue.HeldMeta
	msgs [][]byte
}

func (h *fakeHold) Put(meta queue.HeldMeta, msg io.Reader) (queue.HeldMeta, error) {
	b, err := io.ReadAll(msg)
	if err != nil {
		return meta, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	meta.ID = fmt.Sprintf("h%d", len(h.held)+1)
	meta.Size = int64(len(b))
	h.held = append(h.held, meta)
	h.msgs = append(h.msgs, b)
	return meta, nil
}

// fakeChecker scripts policy decisions and records every call as text.
type fakeChecker struct {
	mu    sync.Mutex
	calls []string
	// decisions by call name ("check", "rcpt", "ids", "msg"); a missing
	// entry is Accept. rcpt decisions are used in order, the last repeats.
	check   policy.Decision
	rcpt    []policy.Decision
	ids     policy.Decision
	msg     policy.Decision
	recheck policy.Decision
	// logRecheck puts the calls of Recheck in the log (the end-of-DATA
	// check); other tests' logs leave them out.
	logRecheck bool
	events     []policy.Event
}

func (c *fakeChecker) NoteEvent(ev policy.Event) {
	c.record("event " + ev.Kind + " " + ev.Identity)
	c.mu.Lock()
	c.events = append(c.events, ev)
	c.mu.Unlock()
}

func (c *fakeChecker) record(s string) {
	c.mu.Lock()
	c.calls = append(c.calls, s)
	c.mu.Unlock()
}

func (c *fakeChecker) log() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return strings.Join(c.calls, "; ")
}

func (c *fakeChecker) Begin(ids []policy.Identity) policy.Tx {
	var names []string
	for _, id := range ids {
		names = append(names, id.ID)
	}
	c.record("begin " + strings.Join(names, ","))
	return &fakeTx{c: c, ids: append([]policy.Identity(nil), ids...)}
}

type fakeTx struct {
	c     *fakeChecker
	ids   []policy.Identity
	nrcpt int
}

func (t *fakeTx) Check() policy.Decision { t.c.record("check"); return t.c.check }
func (t *fakeTx) AddRcpt() policy.Decision {
	t.c.record("rcpt")
	t.nrcpt++
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	if len(t.c.rcpt) == 0 {
		return policy.Decision{}
	}
	return t.c.rcpt[min(t.nrcpt, len(t.c.rcpt))-1]
}
func (t *fakeTx) AddIdentities(ids ...policy.Identity) policy.Decision {
	var names []string
	for _, id := range ids {
		names = append(names, id.ID+"["+id.Account+"|"+id.Script+"]")
	}
	t.c.record("ids " + strings.Join(names, ","))
	t.ids = append(ids, t.ids...)
	return t.c.ids
}
func (t *fakeTx) Message() policy.Decision { t.c.record("msg"); return t.c.msg }
func (t *fakeTx) Recheck() policy.Decision {
	if t.c.logRecheck {
		t.c.record("recheck")
	}
	return t.c.recheck
}
func (t *fakeTx) Commit()                       { t.c.record("commit") }
func (t *fakeTx) Held(id string)                { t.c.record("held " + id) }
func (t *fakeTx) Abort()                        { t.c.record("abort") }
func (t *fakeTx) Identities() []policy.Identity { return t.ids }
func (t *fakeTx) SetSample(messageID, subject string) {
	t.c.record("sample " + messageID + " " + subject)
}

// fakeAuth accepts one login.
type fakeAuth struct{ login, password string }

func (a fakeAuth) Authenticate(ctx context.Context, login, password string, remote netip.Addr) error {
	if login == a.login && password == a.password {
		return nil
	}
	if login == "tempfail" {
		return errors.New("checkpassword: /secret/internal/path exploded")
	}
	return ErrAuthBad
}
func (a fakeAuth) Enabled() bool { return true }

// testConfig is a minimal config: one smtp listener on 127.0.0.1:0 for
// example.test.
func testConfig(listen ...config.Listener) *config.Config {
	if len(listen) == 0 {
		listen = []config.Listener{{Addr: "127.0.0.1:0", Mode: config.ModeSMTP}}
	}
	return &config.Config{
		Hostname: "mail.example.test",
		Listen:   listen,
		Relay: config.Relay{
			LocalDomains: []string{"example.test"},
			Timeout:      config.Duration{Duration: 30 * time.Second},
		},
		Auth: config.Auth{RequireTLS: true},
	}
}

// testServer starts a Server on cfg; edit may adjust its settings before
// the start (for fakes of control files).
func testServer(t *testing.T, cfg *config.Config, deps Deps, edit func(*settings)) *Server {
	t.Helper()
	if deps.Handoff == nil {
		deps.Handoff = &fakeHandoff{}
	}
	if deps.Logger == nil {
		deps.Logger = slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if deps.Now == nil {
		deps.Now = func() time.Time { return fixedNow }
	}
	st, err := newSettings(cfg, deps.Logger)
	if err != nil {
		t.Fatal(err)
	}
	if edit != nil {
		edit(st)
	}
	s, err := newServer(st, deps)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	return s
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// rawClient speaks SMTP as raw text.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dialRaw(t *testing.T, network, addr string) *rawClient {
	t.Helper()
	return dialRawFrom(t, network, addr, "")
}

// dialRawFrom dials from a chosen loopback source address (any 127/8
// address works on Linux), so tests can be different clients.
func dialRawFrom(t *testing.T, network, addr, from string) *rawClient {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &rawClient{t: t, conn: c, r: bufio.NewReader(c)}
}

// reply reads one (possibly multi-line) reply and returns it with CRLFs.
func (c *rawClient) reply() string {
	c.t.Helper()
	var b strings.Builder
	for {
		line, err := c.r.ReadString('\n')
		b.WriteString(line)
		if err != nil {
			if b.Len() == 0 {
				return "EOF"
			}
			return b.String()
		}
		if len(line) < 4 || line[3] != '-' {
			return b.String()
		}
	}
}

func (c *rawClient) send(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.conn, s); err != nil {
		c.t.Fatalf("write %q: %v", s, err)
	}
}

// cmd sends one line and returns the reply.
func (c *rawClient) cmd(line string) string {
	c.t.Helper()
	c.send(line + "\r\n")
	return c.reply()
}

// expect sends line and fails unless the reply starts with want.
func (c *rawClient) expect(line, want string) string {
	c.t.Helper()
	got := c.cmd(line)
	if !strings.HasPrefix(got, want) {
		c.t.Fatalf("%q: got %q, want prefix %q", line, got, want)
	}
	return got
}

// hello reads the banner and sends EHLO.
func (c *rawClient) hello(name string) string {
	c.t.Helper()
	if b := c.reply(); !strings.HasPrefix(b, "220 ") {
		c.t.Fatalf("banner %q", b)
	}
	return c.expect("EHLO "+name, "250")
}

// mail runs MAIL, RCPTs, DATA and returns the final reply.
func (c *rawClient) mail(from string, to []string, data string) string {
	c.t.Helper()
	c.expect("MAIL FROM:<"+from+">", "250")
	for _, r := range to {
		c.expect("RCPT TO:<"+r+">", "250")
	}
	c.expect("DATA", "354")
	c.send(data)
	return c.reply()
}

func tcpAddr(s *Server, i int) string { return s.Addrs()[i].String() }

func sockPath(t *testing.T) string { return filepath.Join(t.TempDir(), "relay.sock") }
