package policy

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

type recorder struct {
	mu    sync.Mutex
	hooks []notification
	mails []string
	got   chan struct{}
}

func newRecorder() *recorder { return &recorder{got: make(chan struct{}, 100)} }

func (r *recorder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	var n notification
	if err := json.NewDecoder(req.Body).Decode(&n); err != nil || req.Header.Get("Content-Type") != "application/json" {
		http.Error(w, "bad", 400)
		return
	}
	r.mu.Lock()
	r.hooks = append(r.hooks, n)
	r.mu.Unlock()
	r.got <- struct{}{}
}

func (r *recorder) sendMail(_ context.Context, from string, to []string, msg []byte) error {
	r.mu.Lock()
	r.mails = append(r.mails, from+"|"+strings.Join(to, ",")+"|"+string(msg))
	r.mu.Unlock()
	r.got <- struct{}{}
	return nil
}

func (r *recorder) wait(t *testing.T, n int) {
	t.Helper()
	for range n {
		select {
		case <-r.got:
		case <-time.After(10 * time.Second):
			t.Fatal("notification not delivered")
		}
	}
}

func TestNotifications(t *testing.T) {
	rec := newRecorder()
	srv := httptest.NewServer(rec)
	defer srv.Close()
	cfg := baseConfig()
	cfg.Notify.Webhook = srv.URL
	cfg.Notify.Email = "abuse@example.com"
	cfg.Policy.SuspendAfter = 3
	userLimits(t, cfg, 0, "1/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{SendMail: rec.sendMail})
	ids := []Identity{WebUID("web1", 1001, "bob", "contact.php")}
	cfg.Policy.Limits.UID = cfg.Policy.Limits.User
	if err := e.Reload(cfg); err != nil {
		t.Fatal(err)
	}

	tx := e.Begin(ids)
	tx.AddRcpt("rcpt@example.net")
	tx.SetSample("<1@web1>", "Cheap pills")
	tx.Commit()
	send(e.Engine, ids, 1) // throttle start: webhook + email
	rec.wait(t, 2)
	clk.Add(10 * time.Minute)
	send(e.Engine, ids, 1) // within the hour: no second throttle_start
	send(e.Engine, ids, 1) // third event: suspended: webhook + email
	rec.wait(t, 2)

	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.hooks) != 2 || len(rec.mails) != 2 {
		t.Fatalf("%d webhooks, %d mails", len(rec.hooks), len(rec.mails))
	}
	h := rec.hooks[0]
	if h.Event != EventThrottleStart || h.Identity != "uid:web1:1001" || h.Account != "bob" || h.Script != "contact.php" ||
		h.Limit != "1 recipient/1h" || h.Used != 1 || h.MessageID != "<1@web1>" || h.Subject != "Cheap pills" {
		t.Fatalf("webhook: %+v", h)
	}
	if rec.hooks[1].Event != EventSuspended {
		t.Fatalf("second webhook: %+v", rec.hooks[1])
	}
	m := rec.mails[0]
	if !strings.HasPrefix(m, "|abuse@example.com|") || !strings.Contains(m, "Subject: relay: uid:web1:1001 is throttled\n") ||
		!strings.Contains(m, "Script: contact.php\n") || strings.Contains(m, "\r") {
		t.Fatalf("mail: %q", m)
	}
}

func TestNotificationSpacing(t *testing.T) {
	rec := newRecorder()
	srv := httptest.NewServer(rec)
	defer srv.Close()
	cfg := baseConfig()
	cfg.Notify.Webhook = srv.URL
	userLimits(t, cfg, 0, "1/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	bob := []Identity{UserID("bob")}
	send(e.Engine, bob, 1)
	send(e.Engine, bob, 1) // throttle start 1
	rec.wait(t, 1)
	clk.Add(59 * time.Minute)
	send(e.Engine, bob, 1) // not quiet for an hour: no throttle start
	clk.Add(61 * time.Minute)
	send(e.Engine, bob, 1) // charged: capacity is back
	send(e.Engine, bob, 1) // over again after a quiet hour: throttle start 2
	rec.wait(t, 1)
	e.close()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.hooks) != 2 {
		t.Fatalf("%d webhooks, want 2: %+v", len(rec.hooks), rec.hooks)
	}
	if got := len(e.Events(EventFilter{Kind: EventThrottleStart})); got != 2 {
		t.Fatalf("%d throttle_start events", got)
	}
}

// TestSlowWebhookNeverDelaysMail: while the webhook hangs, decisions keep
// coming and notifications beyond the queue are dropped.
func TestSlowWebhookNeverDelaysMail(t *testing.T) {
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case entered <- struct{}{}:
		default:
		}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	cfg := baseConfig()
	cfg.Notify.Webhook = srv.URL
	userLimits(t, cfg, 0, "1/1h")
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	send(e.Engine, []Identity{UserID("u0")}, 2)
	<-entered // the worker is stuck in the first POST
	for i := range 3 * notifyQueue {
		id := []Identity{UserID("u" + string(rune('a'+i%26)) + string(rune('a'+i/26)))}
		if d := send(e.Engine, id, 2); d.Action != Defer {
			t.Fatalf("%d: %+v", i, d)
		}
	}
	// Close does not wait for the hung webhook either.
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}
