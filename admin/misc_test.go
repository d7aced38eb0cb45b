package admin

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"relay/queue"
)

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newFakeHeld(nil)
	h.put(queue.HeldMeta{ID: "1.a", To: []string{"a@b"}}, "x\n")
	if err := RegisterHeldGauge(reg, h); err != nil {
		t.Fatal(err)
	}
	srv, err := New(Options{Token: testToken, Policy: newFakePolicy(time.Now), Gatherer: reg})
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	r := httptest.NewRequest("GET", "/metrics", nil)
	r.Header.Set("Authorization", "Bearer "+testToken)
	srv.Handler().ServeHTTP(rec, r)
	if out := rec.Body.String(); !strings.Contains(out, "relay_held_messages 1") {
		t.Errorf("/metrics lacks relay_held_messages 1:\n%s", out)
	}
	if n := testutil.CollectAndCount(reg, "relay_held_messages"); n != 1 {
		t.Errorf("held gauge: %d series", n)
	}
	if err := RegisterHeldGauge(reg, h); err == nil {
		t.Error("registering twice succeeded")
	}
}

// brokenHeld fails to list.
type brokenHeld struct{ fakeHeld }

func (*brokenHeld) List() ([]queue.HeldMeta, error) { return nil, errors.New("disk on fire") }

func TestHeldGaugeReportsErrors(t *testing.T) {
	reg := prometheus.NewRegistry()
	if err := RegisterHeldGauge(reg, &brokenHeld{}); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Gather(); err == nil || !strings.Contains(err.Error(), "disk on fire") {
		t.Errorf("gather: %v, want the spool's error", err)
	}
}

func TestLoadOrCreateToken(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	tok, path, created, err := LoadOrCreateToken("", dir)
	if err != nil || !created || path != filepath.Join(dir, "admin.token") {
		t.Fatalf("first: %q %q %v %v", tok, path, created, err)
	}
	if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(tok) {
		t.Errorf("token %q is not 32 random bytes in hex", tok)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	again, _, created, err := LoadOrCreateToken("", dir)
	if err != nil || created || again != tok {
		t.Errorf("second: %q %v %v, want the same token", again, created, err)
	}
	other, _, _, _ := LoadOrCreateToken("", t.TempDir())
	if other == tok {
		t.Error("two data dirs got the same token")
	}
	if rt, err := ReadToken("", dir); err != nil || rt != tok {
		t.Errorf("ReadToken: %q %v", rt, err)
	}

	tf := filepath.Join(t.TempDir(), "token")
	if _, _, _, err := LoadOrCreateToken(tf, dir); err == nil {
		t.Error("a missing token_file was accepted")
	}
	os.WriteFile(tf, []byte("short\n"), 0o600)
	if _, _, _, err := LoadOrCreateToken(tf, dir); err == nil {
		t.Error("a short token was accepted")
	}
	os.WriteFile(tf, []byte("  chosen-by-the-admin-1234  \n"), 0o600)
	if tok, path, created, err := LoadOrCreateToken(tf, dir); err != nil || tok != "chosen-by-the-admin-1234" || path != tf || created {
		t.Errorf("token_file: %q %q %v %v", tok, path, created, err)
	}
	if _, _, _, err := LoadOrCreateToken("", ""); err == nil {
		t.Error("no data_dir and no token_file was accepted")
	}
}

func TestClient(t *testing.T) {
	f := newFixture(t)
	c := &Client{BaseURL: f.ts.URL, Token: testToken, HTTP: http.DefaultClient}
	ctx := context.Background()
	ss, err := c.Senders(ctx, StateThrottled)
	if err != nil || len(ss) != 1 || ss[0].ID != webID {
		t.Fatalf("Senders: %v %v", ss, err)
	}
	s, err := c.Sender(ctx, ip6ID)
	if err != nil || s.ID != ip6ID {
		t.Fatalf("Sender(%s): %v %v", ip6ID, s, err)
	}
	if r, err := c.Suspend(ctx, ip6ID, "why not"); err != nil || r.Action != "suspend" {
		t.Fatalf("Suspend: %v %v", r, err)
	}
	if s, _ := f.policy.Sender(ip6ID); s.Suspension == nil || s.Suspension.Reason != "why not" {
		t.Errorf("suspension: %+v", s.Suspension)
	}
	if _, err := c.Unsuspend(ctx, ip6ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Reset(ctx, webID); err != nil {
		t.Fatal(err)
	}
	held, err := c.Held(ctx)
	if err != nil || len(held) != 1 || held[0].Rcpts != 2 {
		t.Fatalf("Held: %v %v", held, err)
	}
	m, err := c.HeldMessage(ctx, heldID)
	if err != nil || !strings.Contains(m.Headers, "Subject: Buy now") {
		t.Fatalf("HeldMessage: %v %v", m, err)
	}
	var raw bytes.Buffer
	if err := c.HeldRaw(ctx, heldID, &raw); err != nil || raw.String() != heldBody {
		t.Fatalf("HeldRaw: %q %v", raw.String(), err)
	}
	if r, err := c.Release(ctx, heldID); err != nil || r.Reply != "ok 1 qp 2" {
		t.Fatalf("Release: %v %v", r, err)
	}
	evs, err := c.Events(ctx, EventFilter{Identity: webID, Kind: "released", Limit: 5})
	if err != nil || len(evs) != 1 {
		t.Fatalf("Events: %v %v", evs, err)
	}
	f.reload = func() error { return errors.New("relay.toml:1:1: broken") }
	_, err = c.Reload(ctx)
	var se *StatusError
	if !errors.As(err, &se) || se.Code != 422 || se.Message != "relay.toml:1:1: broken" {
		t.Errorf("Reload: %v", err)
	}
	if _, err := c.Delete(ctx, heldID); !errors.As(err, &se) || se.Code != 404 {
		t.Errorf("Delete of a released message: %v", err)
	}
	bad := &Client{BaseURL: f.ts.URL, Token: "wrong-token-wrong-token", HTTP: http.DefaultClient}
	if _, err := bad.Senders(ctx, StateAll); !errors.As(err, &se) || se.Code != 401 {
		t.Errorf("wrong token: %v", err)
	}
}

func TestNewClientAddress(t *testing.T) {
	for listen, want := range map[string]string{
		"127.0.0.1:8025": "http://127.0.0.1:8025",
		"0.0.0.0:8025":   "http://127.0.0.1:8025",
		":8025":          "http://127.0.0.1:8025",
		"[::]:8025":      "http://[::1]:8025",
		"[::1]:9":        "http://[::1]:9",
	} {
		c, err := NewClient(listen, "t", "")
		if err != nil || c.BaseURL != want {
			t.Errorf("NewClient(%q): %v %v, want %s", listen, c, err, want)
		}
	}
	if _, err := NewClient("8025", "t", ""); err == nil {
		t.Error("a listen without a port was accepted")
	}
}

func TestTables(t *testing.T) {
	var b bytes.Buffer
	ss := []Sender{
		{ID: webID, State: StateThrottled, Account: "alice", Scripts: []string{"contact.php"}, Rule: "default uid",
			Usage: []Usage{{Metric: "rcpts", Window: "1h", Limit: 500, Used: 512}}},
		{ID: "sender:x\x1b[31m@evil\tfoo", State: StateOK, Rule: "none"},
	}
	if err := WriteSenders(&b, ss); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(b.String(), "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("table:\n%s", b.String())
	}
	col := strings.Index(lines[0], "STATE")
	if col <= 0 || strings.Index(lines[1], "throttled") != col || strings.Index(lines[2], "ok") != col {
		t.Errorf("STATE column not aligned:\n%s", b.String())
	}
	if !strings.Contains(lines[1], "rcpts 512/500 per 1h") || !strings.Contains(lines[1], "contact.php") {
		t.Errorf("row: %q", lines[1])
	}
	if strings.ContainsAny(b.String(), "\x1b\t") || !strings.Contains(lines[2], "sender:x?[31m@evil?foo") {
		t.Errorf("control characters reached the terminal: %q", lines[2])
	}

	b.Reset()
	WriteHeldMessage(&b, HeldMessage{HeldMeta: queue.HeldMeta{ID: "1.a", To: []string{"a@b"}},
		Headers: "Subject: hi\x07\nX-Long: a\n\tb\n"})
	if out := b.String(); !strings.Contains(out, "Subject: hi?\n") || !strings.Contains(out, "X-Long: a\n    b\n") || !strings.Contains(out, "<>") {
		t.Errorf("held message:\n%s", out)
	}
	b.Reset()
	WriteEvents(&b, []Event{{Kind: "released", Identity: webID, Detail: "held message 1.a"}})
	if !strings.Contains(b.String(), "released") || !strings.HasPrefix(b.String(), "TIME") {
		t.Errorf("events:\n%s", b.String())
	}
	b.Reset()
	WriteSender(&b, Sender{ID: webID, State: StateSuspended, Suspension: &Suspension{Reason: "spam run"},
		Events: []Event{{Kind: "suspended"}}})
	if !strings.Contains(b.String(), "spam run") || !strings.Contains(b.String(), "recent events:") {
		t.Errorf("sender:\n%s", b.String())
	}
}

// TestHealthzSaysWhatFails: /healthz is 200 "ok" until Health reports a
// problem, then 503 with its text (no token needed either way).
func TestHealthzSaysWhatFails(t *testing.T) {
	var problem error
	srv, err := New(Options{Token: testToken, Policy: newFakePolicy(time.Now), Health: func() error { return problem }})
	if err != nil {
		t.Fatal(err)
	}
	get := func() (int, string) {
		rec := httptest.NewRecorder()
		srv.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := get(); code != 200 || body != "ok\n" {
		t.Errorf("healthy: %d %q", code, body)
	}
	problem = errors.New("counters cannot be written to relay.db since 2026-03-02T10:00:00Z: file too large")
	if code, body := get(); code != 503 || !strings.Contains(body, "counters cannot be written") {
		t.Errorf("while writes fail: %d %q", code, body)
	}
}
