package admin

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"relay/config"
	"relay/internal/fakeqq"
	"relay/policy"
	"relay/queue"
)

// The real types fit the admin's interfaces without adapters.
var _ Policy = (*policy.Engine)(nil)

// spoolHeld binds a hand-off to queue.HoldSpool.Release, as the daemon does.
type spoolHeld struct {
	*queue.HoldSpool
	handoff queue.Handoff
}

func (s spoolHeld) Release(ctx context.Context, id string) (queue.Receipt, error) {
	return s.HoldSpool.Release(ctx, id, s.handoff)
}

// TestWithRealEngineAndSpool: suspend/unsuspend/reset through the API change
// what policy answers a new transaction, and a release hands the held
// message to (fake) qmail-queue with its original envelope.
func TestWithRealEngineAndSpool(t *testing.T) {
	dir := t.TempDir()
	db, err := policy.OpenDB(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rcpts, _ := config.ParseRate("2/1h")
	cfg := &config.Config{Hostname: "mail.example.com", Policy: config.Policy{
		Mode: config.PolicyEnforce, OverLimit: config.OverLimitDefer,
		Limits: config.KindLimits{User: &config.Limits{Rcpts: []config.Rate{rcpts}}}}}
	engine, err := policy.New(db, cfg, policy.Options{FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	spool, err := queue.OpenHold(filepath.Join(dir, "hold"), db)
	if err != nil {
		t.Fatal(err)
	}
	qqDir := t.TempDir()
	t.Setenv("FAKEQQ_DIR", qqDir)
	qq := &queue.QmailQueue{Path: fakeqq.Build(t), Timeout: 30 * time.Second}

	srv, err := New(Options{Token: testToken, Policy: engine, Held: spoolHeld{spool, qq}})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{srv: srv}
	f.ts = newTestHTTP(t, srv)

	alice := []policy.Identity{{ID: "user:alice", Kind: "user"}}
	send := func() policy.Decision {
		tx := engine.Begin(alice)
		defer tx.Abort()
		if d := tx.Check(); d.Action != policy.Accept {
			return d
		}
		return tx.AddRcpt("rcpt@example.net")
	}
	// Three recipients against 2/1h: the third is deferred, alice is throttled.
	for range 2 {
		tx := engine.Begin(alice)
		if d := tx.AddRcpt("rcpt@example.net"); d.Action != policy.Accept {
			t.Fatalf("rcpt: %+v", d)
		}
		tx.Commit()
	}
	if d := send(); d.Action != policy.Defer {
		t.Fatalf("third recipient: %+v, want Defer", d)
	}
	code, body := f.api(t, "GET", "/api/senders?state=throttled", nil)
	if list := decode[[]Sender](t, body); code != 200 || len(list) != 1 || list[0].ID != "user:alice" || list[0].Usage[0].Used != 2 {
		t.Fatalf("throttled: %d %s", code, body)
	}
	if code, body := f.api(t, "POST", "/api/senders/user%3Aalice/reset", nil); code != 200 {
		t.Fatalf("reset: %d %s", code, body)
	}
	if d := send(); d.Action != policy.Accept {
		t.Fatalf("after reset: %+v, want Accept", d)
	}
	if code, body := f.api(t, "POST", "/api/senders/user%3Aalice/suspend", url.Values{"reason": {"ticket 7"}}); code != 200 {
		t.Fatalf("suspend: %d %s", code, body)
	}
	if d := send(); d.Action != policy.Reject || !d.Suspended {
		t.Fatalf("after suspend: %+v, want Reject", d)
	}
	_, body = f.api(t, "GET", "/api/senders/user%3Aalice", nil)
	if s := decode[Sender](t, body); s.State != StateSuspended || s.Suspension.Reason != "ticket 7" || len(s.Events) == 0 {
		t.Errorf("suspended sender: %s", body)
	}
	if code, _ := f.api(t, "POST", "/api/senders/user%3Aalice/unsuspend", nil); code != 200 {
		t.Fatalf("unsuspend: %d", code)
	}
	if d := send(); d.Action == policy.Reject {
		t.Fatalf("after unsuspend: %+v", d)
	}

	msg := "Received: (qmail 1 invoked by uid 1001); 1 Jan 2026 00:00:00 -0000\nSubject: held one\n\nbody\n"
	meta, err := spool.Put(queue.HeldMeta{From: "alice@example.com", To: []string{"a@example.net", "b@example.org"},
		Identities: []string{"user:alice"}, Reason: "over 2 recipients/1h"}, strings.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	_, body = f.api(t, "GET", "/api/held", nil)
	if list := decode[[]HeldSummary](t, body); len(list) != 1 || list[0].Subject != "held one" || list[0].Rcpts != 2 {
		t.Fatalf("held list: %s", body)
	}
	if code, body := f.api(t, "POST", "/api/held/"+meta.ID+"/release", nil); code != 200 {
		t.Fatalf("release: %d %s", code, body)
	}
	calls := fakeqq.Calls(t, qqDir)
	if len(calls) != 1 || calls[0].From() != "alice@example.com" ||
		strings.Join(calls[0].To(), ",") != "a@example.net,b@example.org" || string(calls[0].Message) != msg {
		t.Fatalf("qmail-queue got %+v", calls)
	}
	if code, _ := f.api(t, "GET", "/api/held/"+meta.ID, nil); code != 404 {
		t.Errorf("released message still held: %d", code)
	}
	evs := engine.Events(policy.EventFilter{Kind: "released"})
	if len(evs) != 1 || evs[0].Identity != "user:alice" {
		t.Errorf("released event: %+v", evs)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "hold")); len(entries) != 0 {
		t.Errorf("hold dir not empty: %v", entries)
	}
}
