package relay

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"relay/config"
	"relay/policy"
	"relay/queue"
)

// shiftClock runs at the speed of time.Now from an offset tests move
// forward, so that timers and policy's windows agree.
type shiftClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *shiftClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *shiftClock) Add(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// queueRig is a Server with a real policy engine, hold spool and releaser
// on one relay.db, and a fake hand-off.
type queueRig struct {
	srv     *Server
	policy  *policy.Engine
	spool   *queue.HoldSpool
	rel     *Releaser
	handoff *fakeHandoff
	clock   *shiftClock
	reg     *prometheus.Registry
	sock    string
	close   func() // stops the server, the releaser and policy, closes relay.db; once
}

// newQueueRig starts the rig with over_limit = "queue" and senders capped
// at msgs = [rate]; with a spool dir given, it reopens that one.
func newQueueRig(t *testing.T, rate string, dataDir string) *queueRig {
	t.Helper()
	if dataDir == "" {
		dataDir = t.TempDir()
	}
	r := &queueRig{handoff: &fakeHandoff{}, clock: &shiftClock{}, reg: prometheus.NewRegistry(), sock: sockPath(t)}
	cfg := testConfig(config.Listener{Addr: "127.0.0.1:0", Mode: config.ModeSMTP}, config.Listener{Addr: r.sock, Mode: config.ModeLocal})
	cfg.Relay.RelayNetworks = []string{"127.0.0.0/8"}
	rt, err := config.ParseRate(rate)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Policy = config.Policy{Mode: config.PolicyEnforce, OverLimit: config.OverLimitQueue, QueueMax: 100,
		Limits: config.KindLimits{Sender: &config.Limits{Msgs: []config.Rate{rt}}}}
	db, err := policy.OpenDB(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	r.close = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if r.srv != nil {
				r.srv.Shutdown(ctx)
			}
			if r.rel != nil {
				r.rel.Stop(ctx)
			}
			if r.policy != nil {
				r.policy.Close()
			}
			db.Close()
		})
	}
	t.Cleanup(r.close)
	r.spool, err = queue.OpenHold(filepath.Join(dataDir, "hold"), db)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	r.policy, err = policy.New(db, cfg, policy.Options{Now: r.clock.Now, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	r.rel, err = NewReleaser(ReleaserOptions{Policy: r.policy, Spool: r.spool, Handoff: r.handoff, Logger: log, Now: r.clock.Now,
		Registerer: r.reg, RetryMin: 10 * time.Millisecond, RetryMax: 40 * time.Millisecond, SuspendedPoll: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.rel.Start(); err != nil {
		t.Fatal(err)
	}
	r.srv = testServer(t, cfg, Deps{Policy: r.policy, Handoff: r.handoff, Hold: r.spool, Queue: r.rel, Logger: log, Now: r.clock.Now}, nil)
	return r
}

// send sends one message with subject from news@example.test and returns
// the reply to its DATA.
func (r *queueRig) send(t *testing.T, subject string) string {
	t.Helper()
	c := dialRaw(t, "tcp", tcpAddr(r.srv, 0))
	c.hello("client.example")
	got := c.mail("news@example.test", []string{"x@far.test", "y@far.test"}, "Subject: "+subject+"\r\n\r\nhi\r\n.\r\n")
	c.cmd("QUIT")
	return got
}

// advance moves the clock and wakes the releaser.
func (r *queueRig) advance(d time.Duration) {
	r.clock.Add(d)
	r.rel.poke()
}

func (r *queueRig) subjects() []string {
	var out []string
	for _, d := range r.handoff.deliveries() {
		i := strings.Index(string(d.msg), "Subject: ")
		out = append(out, strings.TrimSpace(strings.SplitN(string(d.msg[i+len("Subject: "):]), "\n", 2)[0]))
	}
	return out
}

func (r *queueRig) queued(t *testing.T, id string) int64 {
	t.Helper()
	s, ok := r.policy.Sender(id)
	if !ok {
		t.Fatalf("%s unknown", id)
	}
	return s.Queued
}

// TestReleaserRetriesFailedHandoff: a failed hand-off keeps the message
// first in its queue and is tried again after a growing wait, the page
// showing the failure; once the hand-off works it goes out once, with its
// envelope unchanged, and leaves spool and count.
func TestReleaserRetriesFailedHandoff(t *testing.T) {
	r := newQueueRig(t, "1/1h", "")
	if got := r.send(t, "m1"); !strings.HasPrefix(got, "250 ok 1795833709") {
		t.Fatal(got)
	}
	if got := r.send(t, "m2"); !strings.HasPrefix(got, "250 ok queued ") {
		t.Fatalf("over the cap: %q", got)
	}
	r.handoff.mu.Lock()
	r.handoff.err = &queue.Error{Code: 451, Text: "qq temporary problem (#4.3.0)"}
	r.handoff.mu.Unlock()
	r.advance(time.Hour + 2*time.Minute)
	waitFor(t, func() bool { return testutil.ToFloat64(r.rel.metrics.failed) >= 3 })
	qs := r.rel.Queues()
	if len(qs) != 1 || qs[0].State != queueRetrying || qs[0].Detail != "451 qq temporary problem (#4.3.0)" || qs[0].Messages != 1 {
		t.Fatalf("queues %+v", qs)
	}
	if l, _ := r.spool.List(); len(l) != 1 {
		t.Fatalf("spool %d after failed hand-offs", len(l))
	}
	if r.rel.backoff(1) != 10*time.Millisecond || r.rel.backoff(2) != 20*time.Millisecond || r.rel.backoff(9) != 40*time.Millisecond {
		t.Fatalf("backoff %v %v %v", r.rel.backoff(1), r.rel.backoff(2), r.rel.backoff(9))
	}
	r.handoff.mu.Lock()
	r.handoff.err = nil
	r.handoff.mu.Unlock()
	waitFor(t, func() bool { return len(r.handoff.deliveries()) == 2 })
	waitFor(t, func() bool { return len(r.rel.Queues()) == 0 })
	if got := strings.Join(r.subjects(), ","); got != "m1,m2" {
		t.Fatalf("delivered %s", got)
	}
	env := r.handoff.deliveries()[1].env
	if env.From != "news@example.test" || strings.Join(env.To, ",") != "x@far.test,y@far.test" {
		t.Fatalf("envelope %+v", env)
	}
	if l, _ := r.spool.List(); len(l) != 0 || r.queued(t, "sender:news@example.test") != 0 {
		t.Fatalf("spool %d, queued %d", len(l), r.queued(t, "sender:news@example.test"))
	}
	time.Sleep(50 * time.Millisecond)
	if n := len(r.handoff.deliveries()); n != 2 {
		t.Fatalf("%d deliveries", n)
	}
}

// TestReleaserAdminActions: an admin releases one queued message by hand
// (at once, uncounted) and deletes another; both leave the queue and
// policy's count, so new mail no longer queues behind them.
func TestReleaserAdminActions(t *testing.T) {
	r := newQueueRig(t, "1/1h", "")
	r.send(t, "m1")
	r.send(t, "m2")
	r.send(t, "m3")
	if n := r.queued(t, "sender:news@example.test"); n != 2 {
		t.Fatalf("queued %d", n)
	}
	list, _ := r.spool.List() // newest first
	if _, err := r.rel.Release(context.Background(), list[1].ID); err != nil {
		t.Fatal(err)
	}
	if err := r.rel.Delete(list[0].ID); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(r.subjects(), ","); got != "m1,m2" {
		t.Fatalf("delivered %s", got)
	}
	if n := r.queued(t, "sender:news@example.test"); n != 0 || len(r.rel.Queues()) != 0 {
		t.Fatalf("queued %d, queues %+v", n, r.rel.Queues())
	}
	if err := r.rel.Delete(list[0].ID); !errors.Is(err, queue.ErrHeldNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	if v := testutil.ToFloat64(r.rel.metrics.byAdmin.WithLabelValues("release")); v != 1 {
		t.Fatalf("admin releases %v", v)
	}
}

// TestReleaserRestart: what waits in the spool when relay starts is
// counted in policy at once (new mail queues behind it) and released in
// order.
func TestReleaserRestart(t *testing.T) {
	dir := t.TempDir()
	r := newQueueRig(t, "1/1h", dir)
	for _, s := range []string{"m1", "m2", "m3"} {
		r.send(t, s)
	}
	r.close()

	r = newQueueRig(t, "1/1h", dir)
	if n := r.queued(t, "sender:news@example.test"); n != 2 {
		t.Fatalf("queued %d after the restart", n)
	}
	if got := r.send(t, "m4"); !strings.HasPrefix(got, "250 ok queued ") {
		t.Fatalf("new mail does not queue behind: %q", got)
	}
	for i := range 3 {
		r.advance(time.Hour + 2*time.Minute)
		waitFor(t, func() bool { return len(r.handoff.deliveries()) == i+1 })
	}
	if got := strings.Join(r.subjects(), ","); got != "m2,m3,m4" {
		t.Fatalf("released %s", got)
	}
}

// TestCheckSessionQueued: a `relay qq` check over the cap gets the hold
// verdict (its caller leaves the message to the daemon), the message is
// queued, and the releaser lets it out later.
func TestCheckSessionQueued(t *testing.T) {
	r := newQueueRig(t, "1/1h", "")
	msg := "Subject: local\n\nhi\n"
	c := dialCheck(t, r.sock)
	c.request("news@example.test", []string{"x@far.test"}, msg)
	if typ, _ := c.verdict(); typ != frameAccepted {
		t.Fatalf("first: %q", typ)
	}
	c.write(appendFrame(nil, frameCommit, ""))
	if typ, text := c.frame(); typ != frameOK || text != "committed" {
		t.Fatalf("commit: %q %q", typ, text)
	}
	c = dialCheck(t, r.sock)
	c.request("news@example.test", []string{"x@far.test"}, msg)
	if typ, _ := c.verdict(); typ != frameHold {
		t.Fatalf("over the cap: %q", typ)
	}
	c.write(appendFrame(appendFrame(nil, frameMessage, msg), frameEnd, ""))
	if typ, text := c.frame(); typ != frameOK || !strings.HasPrefix(text, "queued ") {
		t.Fatalf("after the message: %q %q", typ, text)
	}
	if n := r.queued(t, "sender:news@example.test"); n != 1 {
		t.Fatalf("queued %d", n)
	}
	r.advance(time.Hour + 2*time.Minute)
	waitFor(t, func() bool { return len(r.handoff.deliveries()) == 1 })
}
