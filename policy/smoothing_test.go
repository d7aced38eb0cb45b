package policy

import (
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"relay/config"
)

// queueConfig: over_limit = "queue", senders capped at msgs 3/10s.
func queueConfig(t *testing.T) *config.Config {
	cfg := baseConfig()
	cfg.Policy.OverLimit = config.OverLimitQueue
	cfg.Policy.Limits.Sender = &config.Limits{Msgs: rates(t, "3/10s")}
	return cfg
}

// offer runs one message of n recipients as the SMTP front end does and
// ends it the way the decision says: committed, spooled (Held) under
// holdID, or aborted. It returns the deciding decision.
func offer(e *Engine, ids []Identity, n int, holdID string) Decision {
	tx := e.Begin(ids)
	held := Decision{Action: Accept}
	if d := tx.Check(); d.Action != Accept {
		tx.Abort()
		return d
	}
	for range n {
		d := tx.AddRcpt()
		switch d.Action {
		case Accept:
		case Queue, Hold:
			held = d
		default:
			tx.Abort()
			return d
		}
	}
	d := tx.Message()
	switch {
	case held.Action != Accept:
		tx.Held(holdID)
		return held
	case d.Action == Queue || d.Action == Hold:
		tx.Held(holdID)
		return d
	case d.Action != Accept:
		tx.Abort()
		return d
	}
	tx.Commit()
	return d
}

func queuedOf(t *testing.T, e *Engine, id string) int64 {
	t.Helper()
	s, ok := e.Sender(id)
	if !ok {
		t.Fatalf("%s unknown", id)
	}
	return s.Queued
}

// TestQueueOverCap: over the cap the message is queued under the identity
// whose cap fired, every later message of that identity queues behind it
// (in order) even under the cap, and BeginRelease lets them out only as
// the window frees up, charging them; the releases never exceed the cap.
func TestQueueOverCap(t *testing.T) {
	clk := newClock()
	e := openTest(t, t.TempDir(), queueConfig(t), clk, Options{})
	ids := []Identity{SenderID("news@example.com")}
	for i := range 3 {
		if d := offer(e.Engine, ids, 1, ""); d.Action != Accept {
			t.Fatalf("message %d: %+v", i, d)
		}
	}
	d := offer(e.Engine, ids, 1, "q4")
	if d.Action != Queue || d.Identity != "sender:news@example.com" || !strings.HasPrefix(d.Text(), "sender:news@example.com is over 3 messages/10s; try again in 1") {
		t.Fatalf("4th: %+v %q", d, d.Text())
	}
	if n := queuedOf(t, e.Engine, "sender:news@example.com"); n != 1 {
		t.Fatalf("queued %d, want 1", n)
	}
	// The window frees up: a new message still queues behind the waiting one.
	clk.Add(11 * time.Second)
	d = offer(e.Engine, ids, 1, "q5")
	if d.Action != Queue || d.Behind != 1 || d.Text() != "sender:news@example.com has 1 messages waiting in its release queue" {
		t.Fatalf("5th: %+v %q", d, d.Text())
	}
	if n := queuedOf(t, e.Engine, "sender:news@example.com"); n != 2 {
		t.Fatalf("queued %d, want 2", n)
	}
	// Releases: three fit the freed window, then not until it frees again.
	for i := range 2 {
		r, d := e.BeginRelease("sender:news@example.com", ids, 1)
		if d.Action != Accept {
			t.Fatalf("release %d: %+v", i, d)
		}
		if err := r.Commit(nil); err != nil {
			t.Fatal(err)
		}
	}
	if n := queuedOf(t, e.Engine, "sender:news@example.com"); n != 0 {
		t.Fatalf("queued %d after releases, want 0", n)
	}
	if d := offer(e.Engine, ids, 1, ""); d.Action != Accept {
		t.Fatalf("with an empty queue and room: %+v", d)
	}
	r, d := e.BeginRelease("sender:news@example.com", ids, 1)
	if r != nil || d.Action != Defer || d.RetryIn <= 0 || d.RetryIn > 10*time.Second+time.Second {
		t.Fatalf("release over the cap: %v %+v", r, d)
	}
	if got := usage(t, e.Engine, "sender:news@example.com", "msgs", "10s"); got != 3 {
		t.Fatalf("charged %d in the window, want 3", got)
	}
}

// TestQueueIsNoOffence: queued mail does not count towards suspend_after
// (a list over its caps keeps flowing), but is an over-limit event for the
// page and the throttle notice.
func TestQueueIsNoOffence(t *testing.T) {
	cfg := queueConfig(t)
	cfg.Policy.SuspendAfter = 2
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	ids := []Identity{SenderID("news@example.com")}
	for i := range 10 {
		d := offer(e.Engine, ids, 1, "q")
		if d.Action != Accept && d.Action != Queue {
			t.Fatalf("message %d: %+v", i, d)
		}
	}
	s, _ := e.Sender("sender:news@example.com")
	if s.State != StateThrottled || s.Suspension != nil || s.Queued != 7 {
		t.Fatalf("sender %+v", s)
	}
	if evs := e.Events(EventFilter{Kind: EventOverLimit}); len(evs) != 1 || !strings.HasPrefix(evs[0].Detail, "queue: over 3 messages/10s") {
		t.Fatalf("over_limit events %+v", evs)
	}
}

// TestQueueMax: beyond queue_max the over_limit reply, defer for queue.
func TestQueueMax(t *testing.T) {
	cfg := queueConfig(t)
	cfg.Policy.QueueMax = 2
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	ids := []Identity{SenderID("news@example.com")}
	var got []string
	for range 7 {
		got = append(got, offer(e.Engine, ids, 1, "q").Action.String())
	}
	if strings.Join(got, " ") != "accept accept accept queue queue defer defer" {
		t.Fatalf("actions %v", got)
	}
	clk.Add(time.Minute) // the window is free; the queue is still full
	d := offer(e.Engine, ids, 1, "q")
	if d.Action != Defer || d.Text() != "sender:news@example.com is over 2 queued messages" {
		t.Fatalf("behind a full queue: %+v %q", d, d.Text())
	}
	// over_limit = "hold": a full queue of a paced identity holds.
	cfg.Policy.OverLimit = config.OverLimitHold
	cfg.Policy.Allow = []config.AllowRule{{Match: "sender:news@example.com", Msgs: rates(t, "3/10s"), Action: "queue"}}
	if err := e.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if d := offer(e.Engine, ids, 1, "q"); d.Action != Hold {
		t.Fatalf("full queue under over_limit hold: %+v", d)
	}
}

// TestQueueSlotGivenBack: a Queue decision takes a place at once (so the
// next message queues behind it), and a transaction that ends without
// spooling the message gives it back.
func TestQueueSlotGivenBack(t *testing.T) {
	clk := newClock()
	e := openTest(t, t.TempDir(), queueConfig(t), clk, Options{})
	ids := []Identity{SenderID("news@example.com")}
	for range 3 {
		offer(e.Engine, ids, 1, "")
	}
	tx := e.Begin(ids)
	tx.AddRcpt()
	if d := tx.Message(); d.Action != Queue {
		t.Fatalf("%+v", d)
	}
	if n := queuedOf(t, e.Engine, "sender:news@example.com"); n != 1 {
		t.Fatalf("place not taken at the decision: %d", n)
	}
	tx.Abort()
	if n := queuedOf(t, e.Engine, "sender:news@example.com"); n != 0 {
		t.Fatalf("place not given back: %d", n)
	}
}

// TestAllowActionQueue: an allow entry's action = "queue" queues its
// identity while over_limit says defer for everyone else.
func TestAllowActionQueue(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.Sender = &config.Limits{Msgs: rates(t, "1/1h")}
	cfg.Policy.Allow = []config.AllowRule{{Match: "sender:*@lists.example.com", Msgs: rates(t, "1/1h"), Action: "queue"}}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	list := []Identity{SenderID("news@lists.example.com")}
	other := []Identity{SenderID("bob@example.com")}
	offer(e.Engine, list, 1, "")
	offer(e.Engine, other, 1, "")
	if d := offer(e.Engine, list, 1, "q"); d.Action != Queue {
		t.Fatalf("list: %+v", d)
	}
	if d := offer(e.Engine, other, 1, "q"); d.Action != Defer {
		t.Fatalf("other: %+v", d)
	}
}

// TestReleaseWaitsForSuspension: a suspended identity of the message (the
// queue's own or another) stops the release; unsuspending lets it go.
func TestReleaseWaitsForSuspension(t *testing.T) {
	clk := newClock()
	e := openTest(t, t.TempDir(), queueConfig(t), clk, Options{})
	ids := []Identity{UserID("alice"), SenderID("news@example.com")}
	for range 4 {
		offer(e.Engine, ids, 1, "q")
	}
	clk.Add(11 * time.Second)
	for _, id := range []string{"sender:news@example.com", "user:alice"} {
		if err := e.Suspend(id, "test"); err != nil {
			t.Fatal(err)
		}
		if r, d := e.BeginRelease("sender:news@example.com", ids, 1); r != nil || d.Action != Reject || !d.Suspended || d.Identity != id {
			t.Fatalf("suspended %s: %v %+v", id, r, d)
		}
		if err := e.Unsuspend(id); err != nil {
			t.Fatal(err)
		}
	}
	r, d := e.BeginRelease("sender:news@example.com", ids, 1)
	if d.Action != Accept {
		t.Fatalf("after unsuspend: %+v", d)
	}
	r.Abort() // the hand-off failed: nothing charged, still queued
	if n := queuedOf(t, e.Engine, "sender:news@example.com"); n != 1 {
		t.Fatalf("queued %d after an aborted release", n)
	}
	if got := usage(t, e.Engine, "sender:news@example.com", "msgs", "10s"); got != 0 {
		t.Fatalf("aborted release charged: %d", got)
	}
}

// TestPace: a pace N/D lets N out at once, then one per D/N; faster
// messages are queued (never refused), and the tokens of a message that
// was not handed off come back.
func TestPace(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.OverLimit = config.OverLimitReject // pace never refuses
	cfg.Policy.Limits.Sender = &config.Limits{Pace: config.OptRate{Rate: mustRate(t, "2/1s")}}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	ids := []Identity{SenderID("list@example.com")}
	for i := range 2 {
		if d := offer(e.Engine, ids, 1, ""); d.Action != Accept {
			t.Fatalf("burst %d: %+v", i, d)
		}
	}
	d := offer(e.Engine, ids, 1, "q")
	if d.Action != Queue || !d.Paced || d.RetryIn != 500*time.Millisecond || d.Text() != "sender:list@example.com is over its pace of 2 messages/1s; try again in 1s" {
		t.Fatalf("over the pace: %+v %q", d, d.Text())
	}
	// Released at the pace, whatever else queues meanwhile.
	if r, d := e.BeginRelease("sender:list@example.com", ids, 1); r != nil || d.Action != Defer || d.RetryIn != 500*time.Millisecond {
		t.Fatalf("release early: %+v", d)
	}
	clk.Add(500 * time.Millisecond)
	r, d := e.BeginRelease("sender:list@example.com", ids, 1)
	if d.Action != Accept {
		t.Fatalf("release on time: %+v", d)
	}
	r.Abort() // token back
	r, d = e.BeginRelease("sender:list@example.com", ids, 1)
	if d.Action != Accept {
		t.Fatalf("release after a failed hand-off: %+v", d)
	}
	if err := r.Commit(nil); err != nil {
		t.Fatal(err)
	}
	// An aborted live message gives its token back too.
	clk.Add(time.Second)
	tx := e.Begin(ids)
	tx.AddRcpt()
	if d := tx.Message(); d.Action != Accept {
		t.Fatalf("%+v", d)
	}
	tx.Abort()
	if d := offer(e.Engine, ids, 1, ""); d.Action != Accept {
		t.Fatalf("after an abort: %+v", d)
	}
	if d := offer(e.Engine, ids, 1, ""); d.Action != Accept {
		t.Fatalf("second of the burst: %+v", d)
	}
	if d := offer(e.Engine, ids, 1, "q"); d.Action != Queue {
		t.Fatalf("beyond the burst: %+v", d)
	}
}

// TestPaceBound drives a pace with a stream of offers and releases at
// random moments and checks the token bucket's promise on the hand-offs:
// in any interval of length T, at most N + T*N/D.
func TestPaceBound(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.Sender = &config.Limits{Pace: config.OptRate{Rate: mustRate(t, "5/1s")}}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	ids := []Identity{SenderID("list@example.com")}
	var out []time.Time
	for step := range 4000 {
		clk.Add(time.Duration(step%7+1) * 3 * time.Millisecond)
		if step%2 == 0 {
			if d := offer(e.Engine, ids, 1, "q"); d.Action == Accept {
				out = append(out, clk.Now())
			}
			continue
		}
		if r, d := e.BeginRelease("sender:list@example.com", ids, 1); d.Action == Accept {
			r.Commit(nil)
			out = append(out, clk.Now())
		}
	}
	for i := range out {
		n := 0
		for j := i; j < len(out) && out[j].Sub(out[i]) < time.Second; j++ {
			n++
		}
		if n > 10 {
			t.Fatalf("%d hand-offs within a second from %v", n, out[i])
		}
	}
	if len(out) < 40 {
		t.Fatalf("only %d hand-offs", len(out))
	}
}

// TestObserveQueues: observe mode says what it would queue, hands the
// message on, and takes no place in the queue.
func TestObserveQueues(t *testing.T) {
	cfg := queueConfig(t)
	cfg.Policy.Mode = config.PolicyObserve
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	ids := []Identity{SenderID("news@example.com")}
	for range 5 {
		if d := offer(e.Engine, ids, 1, ""); d.Action != Accept {
			t.Fatalf("%+v", d)
		}
	}
	if n := queuedOf(t, e.Engine, "sender:news@example.com"); n != 0 {
		t.Fatalf("observe queued %d", n)
	}
	if evs := e.Events(EventFilter{Kind: EventObserve}); len(evs) == 0 || !strings.HasPrefix(evs[0].Detail, "would queue") {
		t.Fatalf("observe events %+v", evs)
	}
}

// TestReleaseCommitDurable: a release's charge and what the caller writes
// with it (the spool's removal) are in relay.db together when Commit
// returns: a kill -9 right after loses neither.
func TestReleaseCommitDurable(t *testing.T) {
	clk := newClock()
	e := openTest(t, t.TempDir(), queueConfig(t), clk, Options{FlushInterval: time.Hour})
	ids := []Identity{SenderID("news@example.com")}
	for range 4 {
		offer(e.Engine, ids, 1, "q")
	}
	clk.Add(11 * time.Second)
	r, d := e.BeginRelease("sender:news@example.com", ids, 1)
	if d.Action != Accept {
		t.Fatal(d)
	}
	err := r.Commit(func(btx *bolt.Tx) error {
		b, err := btx.CreateBucketIfNotExists([]byte("test.removed"))
		if err != nil {
			return err
		}
		return b.Put([]byte("q4"), []byte("x"))
	})
	if err != nil {
		t.Fatal(err)
	}
	dir := snapshotDB(t, e)
	e2 := openTest(t, dir, queueConfig(t), clk, Options{})
	if got := usage(t, e2.Engine, "sender:news@example.com", "msgs", "10s"); got != 1 {
		t.Fatalf("after the crash the release's charge is %d, want 1", got)
	}
	e2.db.View(func(btx *bolt.Tx) error {
		if b := btx.Bucket([]byte("test.removed")); b == nil || b.Get([]byte("q4")) == nil {
			t.Error("the caller's write is not in the same commit")
		}
		return nil
	})
}

// TestAdjustQueuedAndDrain: the releaser's counts at start keep an
// identity queuing behind, and the drain estimate follows the caps.
func TestAdjustQueuedAndDrain(t *testing.T) {
	cfg := queueConfig(t)
	cfg.Policy.Limits.Sender.Pace = config.OptRate{Rate: mustRate(t, "1/1s")}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	if err := e.AdjustQueued("sender:news@example.com", 7); err != nil {
		t.Fatal(err)
	}
	ids := []Identity{SenderID("news@example.com")}
	if d := offer(e.Engine, ids, 1, "q"); d.Action != Queue || d.Behind != 7 {
		t.Fatalf("%+v", d)
	}
	// 8 messages at 3/10s: 3 now, 3 after ~10s, 2 after ~20s.
	got := e.DrainEstimate("sender:news@example.com", 8, 8)
	if got < 20*time.Second || got > 21*time.Second {
		t.Fatalf("drain estimate %v, want about 20s", got)
	}
	if err := e.AdjustQueued("sender:news@example.com", -100); err != nil {
		t.Fatal(err)
	}
	if n := queuedOf(t, e.Engine, "sender:news@example.com"); n != 0 {
		t.Fatalf("queued %d", n)
	}
}

// BenchmarkDecisionPaced is BenchmarkDecision with a pace on every kind
// (never reached): the cost of a token per identity per message.
func BenchmarkDecisionPaced(b *testing.B) {
	db, err := OpenDB(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	cfg := benchConfig(b)
	for _, k := range []*config.Limits{cfg.Policy.Limits.User, cfg.Policy.Limits.UID, cfg.Policy.Limits.Sender, cfg.Policy.Limits.Domain, cfg.Policy.Limits.IP} {
		k.Pace = config.OptRate{Rate: mustRate(b, "1000000/1s")}
	}
	e, err := New(db, cfg, Options{FlushInterval: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	msgs := manyIdentities(100000)
	for _, ids := range msgs {
		send(e, ids, 1)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		tx := e.Begin(msgs[i%len(msgs)])
		if tx.AddRcpt().Action != Accept || tx.Message().Action != Accept {
			b.Fatal("refused")
		}
		tx.Commit()
	}
}
