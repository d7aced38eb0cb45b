package relay

import (
	"container/heap"
	"context"
	"errors"
	"log/slog"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"relay/policy"
	"relay/queue"
)

// The release queue of over_limit = "queue" and of pace (docs/design.md
// §12): the session keeps such a message in the hold spool, marked with
// the identity whose queue it joins (HeldMeta.Queue), and answers 250; the
// Releaser hands it off later, through the daemon's own hand-off with its
// envelope unchanged, when policy's windows and pace let it out.
//
// Each identity's queue goes out in the order its messages were spooled,
// one at a time; identities are released side by side, a few hand-offs at
// once. A release is policy.BeginRelease (checks and reserves the windows,
// the pace, the suspensions of every identity of the message), then the
// spool's ReleaseWith: the hand-off, the unlink of the message file, and
// one relay.db transaction that charges policy and removes the record.
// Exactly once: a message is handed off again only if relay dies between
// the hand-off's success (qmail-queue's exit 0) and that unlink, one
// system call later (see queue.HoldSpool). A failed hand-off leaves the
// message first in its queue and is tried again after a growing wait; a
// suspended identity of the message stops its queue until unsuspended.

// Enqueuer takes messages the session put into a release queue.
type Enqueuer interface {
	// Enqueued is called once the message is in the spool (meta.Queue set).
	Enqueued(meta queue.HeldMeta)
}

// ReleasePolicy is what the Releaser needs from policy (*policy.Engine).
type ReleasePolicy interface {
	BeginRelease(queueID string, ids []policy.Identity, rcpts int) (policy.Release, policy.Decision)
	AdjustQueued(id string, delta int64) error
	DrainEstimate(id string, msgs, rcpts int64) time.Duration
}

// ReleaseSpool is what the Releaser needs from the hold spool
// (*queue.HoldSpool).
type ReleaseSpool interface {
	List() ([]queue.HeldMeta, error)
	Get(id string) (queue.HeldMeta, error)
	ReleaseWith(ctx context.Context, id string, h queue.Handoff, commit func(remove func(*bolt.Tx) error) error) (queue.Receipt, error)
	Release(ctx context.Context, id string, h queue.Handoff) (queue.Receipt, error)
	Delete(id string) error
}

// ReleaserOptions are a Releaser's collaborators and timings.
type ReleaserOptions struct {
	Policy     ReleasePolicy // required
	Spool      ReleaseSpool  // required
	Handoff    queue.Handoff // required: the daemon's own, uncounted
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Now        func() time.Time
	// Workers is how many hand-offs run at once, for different
	// identities (4 when 0).
	Workers int
	// RetryMin and RetryMax bound the wait after a failed hand-off, which
	// doubles from RetryMin (5s and 5m when 0).
	RetryMin, RetryMax time.Duration
	// SuspendedPoll is how often a queue whose identity is suspended asks
	// again (1s when 0): an unsuspend resumes it within that.
	SuspendedPoll time.Duration
}

// Releaser empties the release queues. Build it with NewReleaser, Start it
// before the SMTP front end (it gives policy the count of what waits), and
// Stop it after.
type Releaser struct {
	opts    ReleaserOptions
	log     *slog.Logger
	now     func() time.Time
	metrics releaserMetrics

	ctx    context.Context // cancelled when Stop gives up waiting
	cancel context.CancelFunc

	mu       sync.Mutex
	queues   map[string]*idQueue
	ready    queueHeap // queues with mail, not being worked on, by next try
	waiting  int       // messages in all queues
	inflight int
	started  bool
	stopping bool
	wake     chan struct{}
	done     chan struct{}
	workers  sync.WaitGroup
}

// idQueue is one identity's release queue.
type idQueue struct {
	id       string
	msgs     []*queuedMsg // oldest first
	next     time.Time    // not tried before
	busy     bool         // a worker has it
	failures int          // hand-offs failed in a row
	state    string       // what it waits for (queue.ReleaseQueue.State)
	lastErr  string
	index    int // in Releaser.ready; -1 when not there
}

// queuedMsg is one message waiting.
type queuedMsg struct {
	id    string
	ids   []policy.Identity
	rcpts int
	paced bool
	at    time.Time
	// handedOff: it went out but its record stayed (queue.ErrNotRemoved);
	// only the removal is tried again, never the hand-off.
	handedOff bool
}

// States of a release queue, for the page.
const (
	queueReady     = "ready"
	queueWindow    = "waiting for a window"
	queuePaced     = "paced"
	queueSuspended = "suspended"
	queueRetrying  = "retrying after a failed hand-off"
	queueReleasing = "releasing"
)

// Defaults of ReleaserOptions.
const (
	defaultReleaseWorkers = 4
	defaultRetryMin       = 5 * time.Second
	defaultRetryMax       = 5 * time.Minute
	defaultSuspendedPoll  = time.Second
	busyRetry             = time.Second // an admin is acting on the message
	minWait               = 5 * time.Millisecond
)

type releaserMetrics struct {
	released prometheus.Counter
	failed   prometheus.Counter
	byAdmin  *prometheus.CounterVec
}

// NewReleaser checks opts and registers the releaser's metrics.
func NewReleaser(opts ReleaserOptions) (*Releaser, error) {
	if opts.Policy == nil || opts.Spool == nil || opts.Handoff == nil {
		return nil, errors.New("relay: a releaser needs policy, the hold spool and a hand-off")
	}
	r := &Releaser{opts: opts, log: opts.Logger, now: opts.Now, queues: map[string]*idQueue{},
		wake: make(chan struct{}, 1), done: make(chan struct{})}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.opts.Workers <= 0 {
		r.opts.Workers = defaultReleaseWorkers
	}
	if r.opts.RetryMin <= 0 {
		r.opts.RetryMin = defaultRetryMin
	}
	if r.opts.RetryMax < r.opts.RetryMin {
		r.opts.RetryMax = max(defaultRetryMax, r.opts.RetryMin)
	}
	if r.opts.SuspendedPoll <= 0 {
		r.opts.SuspendedPoll = defaultSuspendedPoll
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.metrics = releaserMetrics{
		released: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_queue_released_total",
			Help: "Messages the releaser handed off from the release queues.",
		}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_queue_release_failures_total",
			Help: "Hand-offs of queued messages that failed (the message stays and is tried again).",
		}),
		byAdmin: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_queue_admin_total",
			Help: "Queued messages an admin released or deleted by hand, by action.",
		}, []string{"action"}),
	}
	waiting := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "relay_queued_messages",
		Help: "Messages waiting in the release queues now.",
	}, func() float64 {
		r.mu.Lock()
		defer r.mu.Unlock()
		return float64(r.waiting)
	})
	for _, a := range []string{"release", "delete"} {
		r.metrics.byAdmin.WithLabelValues(a)
	}
	if opts.Registerer != nil {
		for _, c := range []prometheus.Collector{r.metrics.released, r.metrics.failed, r.metrics.byAdmin, waiting} {
			if err := opts.Registerer.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return r, nil
}

// Start reads what waits in the spool (after a restart: every queued
// message not released before it), gives policy its counts so that new
// mail of those identities queues behind, and starts releasing.
func (r *Releaser) Start() error {
	list, err := r.opts.Spool.List()
	if err != nil {
		return err
	}
	sort.Slice(list, func(i, j int) bool { return list[i].ID < list[j].ID }) // oldest first
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started {
		return errors.New("relay: releaser already started")
	}
	for _, m := range list {
		if m.Queue != "" {
			r.add(m)
		}
	}
	for id, q := range r.queues {
		if err := r.opts.Policy.AdjustQueued(id, int64(len(q.msgs))); err != nil {
			return err
		}
	}
	r.started = true
	go r.schedule()
	return nil
}

// Enqueued adds a message the session spooled into a release queue. Its
// place in policy's count was taken with the Queue decision.
func (r *Releaser) Enqueued(meta queue.HeldMeta) {
	r.mu.Lock()
	r.add(meta)
	r.mu.Unlock()
	r.poke()
}

// add appends meta to its identity's queue. r.mu is held.
func (r *Releaser) add(meta queue.HeldMeta) {
	q := r.queues[meta.Queue]
	if q == nil {
		q = &idQueue{id: meta.Queue, index: -1, state: queueReady}
		r.queues[meta.Queue] = q
	}
	m := &queuedMsg{id: meta.ID, rcpts: len(meta.To), paced: meta.Paced, at: meta.Time}
	for _, id := range meta.Identities {
		m.ids = append(m.ids, policy.Identity{ID: id})
	}
	q.msgs = append(q.msgs, m)
	r.waiting++
	if !q.busy && q.index < 0 {
		q.next = r.now()
		heap.Push(&r.ready, q)
	}
}

// poke wakes the scheduler.
func (r *Releaser) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// schedule hands ready queues to workers, at most Workers at once.
func (r *Releaser) schedule() {
	defer close(r.done)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		r.mu.Lock()
		if r.stopping {
			r.mu.Unlock()
			return
		}
		now := r.now()
		for r.inflight < r.opts.Workers && len(r.ready) > 0 && !r.ready[0].next.After(now) {
			q := heap.Pop(&r.ready).(*idQueue)
			q.busy = true
			r.inflight++
			r.workers.Add(1)
			go r.work(q)
		}
		wait := time.Hour
		if r.inflight < r.opts.Workers && len(r.ready) > 0 {
			wait = max(r.ready[0].next.Sub(now), minWait)
		}
		r.mu.Unlock()
		timer.Reset(wait)
		select {
		case <-r.wake:
		case <-timer.C:
		}
	}
}

// work tries the first message of q once, then gives q back.
func (r *Releaser) work(q *idQueue) {
	defer r.workers.Done()
	r.mu.Lock()
	m := q.msgs[0]
	q.state = queueReleasing
	r.mu.Unlock()

	res := r.attempt(q.id, m)
	if res.gone {
		if err := r.opts.Policy.AdjustQueued(q.id, -1); err != nil {
			r.log.Error("release queue: policy count", "queue", q.id, "err", err)
		}
	}

	r.mu.Lock()
	if (res.done || res.gone) && len(q.msgs) > 0 && q.msgs[0] == m {
		q.msgs = q.msgs[1:]
		r.waiting--
	}
	switch {
	case res.state == queueRetrying:
		q.failures++
		res.wait = r.backoff(q.failures)
	case res.done:
		q.failures = 0
	}
	q.state, q.lastErr = res.state, res.errText
	q.busy = false
	q.next = r.now().Add(res.wait)
	r.inflight--
	if len(q.msgs) > 0 {
		heap.Push(&r.ready, q)
	} else {
		delete(r.queues, q.id)
	}
	r.mu.Unlock()
	r.poke()
}

// attempt is what one try to release a message did.
type attempt struct {
	wait    time.Duration // before the next try (replaced by the backoff when retrying)
	state   string        // what the queue waits for now
	errText string        // the failure to show, if any
	done    bool          // the message went out: it leaves the queue (policy counted it)
	gone    bool          // it left the spool otherwise: it leaves the queue and policy's count
}

// attempt tries to release m, the first message of the queue of id.
func (r *Releaser) attempt(id string, m *queuedMsg) attempt {
	spool := r.opts.Spool
	if m.handedOff {
		err := spool.Delete(m.id)
		if err != nil && !errors.Is(err, queue.ErrHeldNotFound) {
			r.log.Error("release queue: removing a handed-off message", "id", m.id, "queue", id, "err", err)
			return attempt{state: queueRetrying, errText: "handed off, not yet removed from the spool: " + err.Error()}
		}
		return attempt{state: queueReady, done: true}
	}
	rel, dec := r.opts.Policy.BeginRelease(id, m.ids, m.rcpts)
	switch {
	case dec.Err != nil:
		r.log.Error("release queue: policy cannot decide", "queue", id, "err", dec.Err)
		return attempt{state: queueRetrying, errText: "policy: counters unavailable"}
	case dec.Suspended:
		return attempt{wait: r.opts.SuspendedPoll, state: queueSuspended, errText: dec.Identity + " is suspended"}
	case dec.Action != policy.Accept:
		state := queueWindow
		if dec.Paced {
			state = queuePaced
		}
		return attempt{wait: dec.RetryIn, state: state, errText: dec.Text()}
	}
	committed := false
	receipt, err := spool.ReleaseWith(r.ctx, m.id, r.opts.Handoff, func(remove func(*bolt.Tx) error) error {
		committed = true
		return rel.Commit(remove)
	})
	if !committed {
		rel.Abort()
	}
	switch {
	case err == nil:
		r.metrics.released.Inc()
		r.log.Info("released", "id", m.id, "queue", id, "rcpts", m.rcpts, "qp", receipt.QP,
			"waited", r.now().Sub(m.at).Round(time.Millisecond).String())
		return attempt{state: queueReady, done: true}
	case committed:
		// Handed off; the record stays until a Delete removes it.
		r.metrics.released.Inc()
		m.handedOff = true
		r.log.Error("release queue: handed off but not removed from the spool; it is never handed off again", "id", m.id, "queue", id, "qp", receipt.QP, "err", err)
		return attempt{state: queueRetrying, errText: "handed off, not yet removed from the spool"}
	case errors.Is(err, queue.ErrHeldNotFound):
		// Released or deleted by an admin meanwhile, while this queue
		// was being worked on (else the admin's forget took it out).
		return attempt{state: queueReady, gone: true}
	case errors.Is(err, queue.ErrHeldBusy):
		return attempt{wait: busyRetry, state: queueReady}
	}
	r.metrics.failed.Inc()
	r.log.Warn("release queue: hand-off failed; trying again later", "id", m.id, "queue", id, "err", err)
	return attempt{state: queueRetrying, errText: handoffErrorText(err)}
}

// handoffErrorText is a failed hand-off as the page shows it: the reply
// the client would have had ("451 mail server temporarily rejected
// message (#4.3.0)").
func handoffErrorText(err error) string {
	rep := replyFor(err)
	return strconv.Itoa(rep.Code) + " " + rep.Message
}

// backoff is the wait after the n-th failed hand-off in a row.
func (r *Releaser) backoff(n int) time.Duration {
	d := r.opts.RetryMin
	for i := 1; i < n && d < r.opts.RetryMax; i++ {
		d *= 2
	}
	return min(d, r.opts.RetryMax)
}

// forget takes the message id out of the queue of queueID, if it is
// there, and off policy's count; a queue being worked on keeps its first
// message (its worker decides).
func (r *Releaser) forget(queueID, id string) {
	r.mu.Lock()
	q := r.queues[queueID]
	found := false
	if q != nil {
		for i, m := range q.msgs {
			if m.id == id && !(i == 0 && q.busy) {
				q.msgs = append(q.msgs[:i], q.msgs[i+1:]...)
				r.waiting--
				found = true
				break
			}
		}
		if len(q.msgs) == 0 && !q.busy {
			if q.index >= 0 {
				heap.Remove(&r.ready, q.index)
			}
			delete(r.queues, queueID)
		}
	}
	r.mu.Unlock()
	if found {
		if err := r.opts.Policy.AdjustQueued(queueID, -1); err != nil {
			r.log.Error("release queue: policy count", "queue", queueID, "err", err)
		}
	}
}

// Release hands a held or queued message off by hand (an admin): at once,
// uncounted, with its envelope, like held mail; a queued one leaves its
// queue.
func (r *Releaser) Release(ctx context.Context, id string) (queue.Receipt, error) {
	meta, err := r.opts.Spool.Get(id)
	if err != nil {
		return queue.Receipt{}, err
	}
	rec, err := r.opts.Spool.Release(ctx, id, r.opts.Handoff)
	if meta.Queue != "" && (err == nil || errors.Is(err, queue.ErrNotRemoved)) {
		r.metrics.byAdmin.WithLabelValues("release").Inc()
		r.forget(meta.Queue, id)
	}
	return rec, err
}

// Delete removes a held or queued message without handing it off.
func (r *Releaser) Delete(id string) error {
	meta, err := r.opts.Spool.Get(id)
	if err != nil {
		return err
	}
	if err := r.opts.Spool.Delete(id); err != nil {
		return err
	}
	if meta.Queue != "" {
		r.metrics.byAdmin.WithLabelValues("delete").Inc()
		r.forget(meta.Queue, id)
	}
	return nil
}

// Queues describes every release queue with mail waiting, the longest
// first.
func (r *Releaser) Queues() []queue.ReleaseQueue {
	r.mu.Lock()
	out := make([]queue.ReleaseQueue, 0, len(r.queues))
	now := r.now()
	for _, q := range r.queues {
		s := queue.ReleaseQueue{Identity: q.id, Messages: len(q.msgs), State: q.state, Detail: q.lastErr, NextTry: q.next}
		if q.busy || q.next.Before(now) {
			s.NextTry = now
		}
		for _, m := range q.msgs {
			s.Recipients += m.rcpts
			if m.paced {
				s.Paced++
			}
		}
		if len(q.msgs) > 0 {
			s.Oldest = q.msgs[0].at
		}
		out = append(out, s)
	}
	r.mu.Unlock()
	for i := range out {
		d := r.opts.Policy.DrainEstimate(out[i].Identity, int64(out[i].Messages), int64(out[i].Recipients))
		out[i].DrainsBy = now.Add(max(d, out[i].NextTry.Sub(now)))
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Messages != out[j].Messages {
			return out[i].Messages > out[j].Messages
		}
		return out[i].Identity < out[j].Identity
	})
	return out
}

// Stop ends releasing: no new hand-off starts, those running may finish
// until ctx ends, when they are cut short (a cut hand-off is a failed
// one: the message stays for the next start).
func (r *Releaser) Stop(ctx context.Context) error {
	r.mu.Lock()
	started := r.started
	r.stopping = true
	r.mu.Unlock()
	if !started {
		return nil
	}
	r.poke()
	<-r.done
	finished := make(chan struct{})
	go func() { r.workers.Wait(); close(finished) }()
	select {
	case <-finished:
		return nil
	case <-ctx.Done():
		r.cancel()
		<-finished
		return ctx.Err()
	}
}

// queued answers a message the session put into a release queue: 250
// with its spool id (a `relay qq` check gets it as a held message: the
// daemon keeps it).
func (s *session) queued(tx *transaction, meta queue.HeldMeta) *smtp.SMTPError {
	s.srv.deps.Queue.Enqueued(meta)
	tx.result = txQueued
	s.srv.metrics.queued.WithLabelValues(tx.queueWhy).Inc()
	s.log.Info("queued", "id", meta.ID, "queue", meta.Queue, "why", tx.queueWhy, "reason", tx.holdReason)
	return okReply("ok queued " + safeHeaderValue(meta.ID))
}

// holdFor marks the transaction for the hold spool after a Hold or Queue
// decision (the first one decides).
func (tx *transaction) holdFor(d policy.Decision) {
	if tx.hold || (d.Action != policy.Hold && d.Action != policy.Queue) {
		return
	}
	tx.hold, tx.holdReason = true, d.Text()
	if d.Action == policy.Queue {
		tx.queue, tx.queueWhy = d.Identity, queuedOverLimit
		switch {
		case d.Paced:
			tx.queueWhy = queuedPace
		case d.Behind > 0:
			tx.queueWhy = queuedBehind
		}
	}
}

// queueHeap orders ready queues by their next try.
type queueHeap []*idQueue

func (h queueHeap) Len() int           { return len(h) }
func (h queueHeap) Less(i, j int) bool { return h[i].next.Before(h[j].next) }
func (h queueHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *queueHeap) Push(x any) {
	q := x.(*idQueue)
	q.index = len(*h)
	*h = append(*h, q)
}
func (h *queueHeap) Pop() any {
	old := *h
	q := old[len(old)-1]
	old[len(old)-1] = nil
	q.index = -1
	*h = old[:len(old)-1]
	return q
}
