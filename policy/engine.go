package policy

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/time/rate"

	"relay/config"
	"relay/internal/boltsafe"
)

// Options are an Engine's dependencies. Every field is optional.
type Options struct {
	// Now is the clock (time.Now when nil); tests inject their own.
	Now func() time.Time
	// Logger receives decisions over a limit and background errors.
	Logger *slog.Logger
	// SendMail hands a notification email to the delivery path, bypassing
	// policy. msg is in qmail's stored form (LF line ends).
	SendMail func(ctx context.Context, from string, to []string, msg []byte) error
	// HTTPClient posts webhooks; a client with a 10 s timeout when nil.
	HTTPClient *http.Client
	// Registerer gets the engine's metrics; none are registered when nil.
	Registerer prometheus.Registerer
	// FlushInterval is how often counters are written to bbolt (1 s when 0):
	// at most this much counting is lost on a crash.
	FlushInterval time.Duration
}

// numShards is how many independently locked parts the identity table has.
const numShards = 64

// Time spans that are part of the behaviour.
const (
	suspendSpan     = 24 * time.Hour // suspend_after counts over-limit events in this span
	quietSpan       = time.Hour      // throttle_start: no over-limit event for this long before
	eventLogSpacing = time.Minute    // over_limit/observe entries per identity in the event log
	idleSpan        = 24 * time.Hour // unused, unsuspended state is dropped after this
	sweepEvery      = 60             // flushes between sweeps of idle state
	maxOverTimes    = 256            // over-limit times kept per identity
	maxScripts      = 8              // script names kept per identity
	notifySpacing   = time.Hour      // per identity and event kind
	maxSubject      = 200            // bytes of a sample Subject kept
	defaultFlush    = time.Second
	webhookTimeout  = 10 * time.Second
)

// Engine is the policy of one relay process: the identity table with its
// windows, suspensions and events, backed by bbolt. It implements Checker.
type Engine struct {
	db   *bolt.DB
	now  func() time.Time
	log  *slog.Logger
	conf atomic.Pointer[policyConf]
	seed maphash.Seed
	// rcptSecret keys the recipient hashes of first-time-recipient memories.
	rcptSecret [rcptKeyLen]byte
	shards     [numShards]shard
	lapses     [numLapseLists]lapseList // transactions holding reservations (lapse.go)
	events     eventLog
	notify     *notifier
	metrics    *metrics

	// writeFault is set while writes to relay.db fail (the disk is full,
	// say), nil once one succeeds; damaged is the first damaged page met
	// since start. Health reports both.
	writeFault atomic.Pointer[storeFault]
	damaged    atomic.Pointer[storeFault]

	flushEvery time.Duration
	flushMu    sync.Mutex  // one flush (or Reset) at a time
	parts      []flushPart // written by every flush (AttachFlushPart); flushMu
	suspMu     sync.Mutex  // one suspension write at a time
	stop       chan struct{}
	stopped    chan struct{}
	closeOnce  sync.Once
	closeErr   error
}

// shard is one part of the identity table.
type shard struct {
	mu      sync.Mutex
	states  map[string]*idState
	dirty   []*idState // changed since the last flush
	deleted []string   // dropped since the last flush
	dropped uint64     // states that left memory (evicted or deleted), ever
}

// idState is everything policy knows about one identity.
type idState struct {
	id       string
	kind     string
	account  string
	scripts  []string
	windows  []window
	refs     int   // open transactions
	lastSeen int64 // unix ns of the last charged message
	lastUsed int64 // unix ns of the last load or release; memory only
	// Over-limit history.
	overTimes  []int64 // within suspendSpan, oldest first
	lastOver   int64
	lastLogged int64 // last over_limit/observe entry in the event log
	suspension *Suspension
	// For the admin view and notifications.
	lastDecision  string
	sampleID      string
	sampleSubject string
	dirty         bool
	// The release queue and pace (memory only; see release.go, pace.go).
	queued   int64         // messages waiting in its release queue, with slots taken by open transactions
	pace     *rate.Limiter // its pace's token bucket, made at first use
	paceRate config.Rate   // the pace pace was made for
	// mem is the first-time-recipient memory (recipients.go), empty when
	// none is stored. Read with the state, flushed with it when dirty.
	// Kept in the state, not behind a pointer: one cache miss less on
	// every recipient.
	mem rcptMemory
}

// window returns the state's window for (metric, length), adding it when
// missing. The pointer is valid until the next call that may add one.
func (st *idState) window(metric uint8, length time.Duration) *window {
	for i := range st.windows {
		if w := &st.windows[i]; w.metric == metric && w.length == length {
			return w
		}
	}
	st.windows = append(st.windows, newWindow(metric, length))
	return &st.windows[len(st.windows)-1]
}

// idle reports whether the state carries nothing worth keeping at now.
func (st *idState) idle(now int64) bool {
	if st.keepResident(now) {
		return false
	}
	if st.refs > 0 || st.suspension != nil || now-st.lastSeen < int64(idleSpan) || now-st.lastOver < int64(suspendSpan) {
		return false
	}
	// Over-limit attempts of others' caps counted towards its suspension.
	if n := len(st.overTimes); n > 0 && now-st.overTimes[n-1] < int64(suspendSpan) {
		return false
	}
	for i := range st.windows {
		if !st.windows[i].empty(now) {
			return false
		}
	}
	return true
}

// New starts the policy engine on db (see OpenDB): it loads suspensions,
// the counters of suspended identities and of those over a limit within
// the last 10 minutes, and events, and starts the background flusher and
// notifier. Other identities are read from db on their next message.
func New(db *bolt.DB, cfg *config.Config, opts Options) (*Engine, error) {
	pc, err := compileConf(cfg)
	if err != nil {
		return nil, err
	}
	e := &Engine{
		db:         db,
		now:        opts.Now,
		log:        opts.Logger,
		seed:       maphash.MakeSeed(),
		flushEvery: opts.FlushInterval,
		stop:       make(chan struct{}),
		stopped:    make(chan struct{}),
	}
	if e.now == nil {
		e.now = time.Now
	}
	if e.log == nil {
		e.log = slog.New(slog.DiscardHandler)
	}
	if e.flushEvery <= 0 {
		e.flushEvery = defaultFlush
	}
	e.conf.Store(pc)
	for i := range e.shards {
		e.shards[i].states = make(map[string]*idState)
	}
	if e.metrics, err = newMetrics(opts.Registerer); err != nil {
		return nil, err
	}
	if err := e.load(); err != nil {
		return nil, err
	}
	e.metrics.suspended.Set(float64(e.countSuspended()))
	client := opts.HTTPClient
	if client == nil {
		client = &http.Client{Timeout: webhookTimeout}
	}
	e.notify = newNotifier(client, opts.SendMail, e.log)
	go e.flushLoop()
	return e, nil
}

// Reload swaps in the caps, allowlist, mode and notification targets of
// cfg. Counters, suspensions and events are kept: stored state is keyed by
// identity, metric and window length, never by a limit's N. Transactions
// already begun finish under the old caps. On error the old policy stays.
func (e *Engine) Reload(cfg *config.Config) error {
	pc, err := compileConf(cfg)
	if err != nil {
		return err
	}
	e.conf.Store(pc)
	return nil
}

// Close writes the counters to bbolt and stops the background work. It does
// not close the database, which the caller opened.
func (e *Engine) Close() error {
	e.closeOnce.Do(func() {
		close(e.stop)
		<-e.stopped
		e.notify.close()
		e.closeErr = e.flush()
	})
	return e.closeErr
}

func (e *Engine) flushLoop() {
	defer close(e.stopped)
	t := time.NewTicker(e.flushEvery)
	defer t.Stop()
	var failingSince, lastLogged time.Time // writing counters fails since; last said so
	for n := 1; ; n++ {
		select {
		case <-e.stop:
			return
		case <-t.C:
		}
		if n%sweepEvery == 0 {
			e.sweep()
		}
		if n%(sweepEvery*expireEvery) == 0 {
			e.flushMu.Lock()
			err := e.expireStored()
			if err == nil {
				err = e.expireMemories()
			}
			e.flushMu.Unlock()
			if err != nil {
				e.log.Error("policy: expiring idle counters", "err", err)
			}
		}
		e.sweepLapsed()
		err := e.flush()
		switch {
		case err != nil && (failingSince.IsZero() || time.Since(lastLogged) >= time.Minute):
			if failingSince.IsZero() {
				failingSince = time.Now()
			}
			lastLogged = time.Now()
			e.log.Error("policy: writing counters failed; counting goes on in memory and is written once the disk takes it",
				"err", err, "failing_for", time.Since(failingSince).Round(time.Second).String())
		case err == nil && !failingSince.IsZero():
			e.log.Info("policy: writing counters works again", "failed_for", time.Since(failingSince).Round(time.Second).String())
			failingSince = time.Time{}
		}
	}
}

// sweep drops identities from memory: idle ones for good (the next flush
// deletes them from bbolt), and unused flushed ones that bbolt holds as
// they are (see cache.go). It holds flushMu so no flush is between taking
// a state's record and committing it.
func (e *Engine) sweep() {
	e.flushMu.Lock()
	defer e.flushMu.Unlock()
	now := e.now().UnixNano()
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		for id, st := range sh.states {
			switch {
			case st.idle(now):
				sh.deleted = append(sh.deleted, id)
			case st.evictable(now):
			default:
				continue
			}
			delete(sh.states, id)
			sh.dropped++
		}
		sh.mu.Unlock()
	}
}

// storeFault is a failure of relay.db and when it began.
type storeFault struct {
	err   error
	since time.Time
}

// view runs a read transaction of relay.db (damage is an error, see
// boltsafe) and records a failure for Health and the metrics.
func (e *Engine) view(fn func(*bolt.Tx) error) error {
	err := boltsafe.View(e.db, fn)
	if err != nil {
		e.noteFault("read", err)
	}
	return err
}

// update runs a write transaction of relay.db like view; a success ends a
// write failure.
func (e *Engine) update(fn func(*bolt.Tx) error) error {
	err := boltsafe.Update(e.db, fn)
	if err != nil {
		e.noteFault("write", err)
		return err
	}
	if e.writeFault.Load() != nil {
		e.writeFault.Store(nil)
	}
	return nil
}

// noteFault records a failed read or write of relay.db.
func (e *Engine) noteFault(op string, err error) {
	e.metrics.storeErrors.WithLabelValues(op).Inc()
	f := &storeFault{err: err, since: e.now()}
	if errors.Is(err, boltsafe.ErrDamaged) {
		e.damaged.CompareAndSwap(nil, f)
	}
	if op == "write" {
		if old := e.writeFault.Load(); old != nil {
			f.since = old.since
		}
		e.writeFault.Store(f)
	}
}

// Health reports what is wrong with relay.db now: writes failing (since
// when, and why; counting goes on in memory meanwhile), or a damaged page
// met since start (restart relay to have the whole file checked). nil when
// neither.
func (e *Engine) Health() error {
	var errs []error
	if f := e.damaged.Load(); f != nil {
		errs = append(errs, fmt.Errorf("relay.db is damaged (met at %s: %v): restart relay to have the file checked", f.since.UTC().Format(time.RFC3339), f.err))
	}
	if f := e.writeFault.Load(); f != nil {
		errs = append(errs, fmt.Errorf("counters cannot be written to relay.db since %s: %v", f.since.UTC().Format(time.RFC3339), f.err))
	}
	return errors.Join(errs...)
}

func (e *Engine) shardOf(id string) int {
	return int(maphash.String(e.seed, id) % numShards)
}

// markDirty queues st for the next flush; the shard lock is held.
func (sh *shard) markDirty(st *idState) {
	if !st.dirty {
		st.dirty = true
		sh.dirty = append(sh.dirty, st)
	}
}

// acquire finds, reads from bbolt or creates the state of id and takes a
// reference on it; an error (a damaged file) takes none.
func (e *Engine) acquire(id Identity, lim *limitSet) (*idState, int, error) {
	st, si, err := e.lockState(id.ID, id.Kind, true)
	if err != nil {
		return nil, si, err
	}
	sh := &e.shards[si]
	st.refs++
	for _, r := range lim.rcpts {
		st.window(metricRcpts, r.Window)
	}
	for _, r := range lim.msgs {
		st.window(metricMsgs, r.Window)
	}
	for _, r := range lim.newRcpts {
		st.window(metricNewRcpts, r.Window)
	}
	if id.Account != "" && st.account != id.Account {
		st.account = id.Account
		sh.markDirty(st)
	}
	if id.Script != "" && addScript(st, id.Script) {
		sh.markDirty(st)
	}
	sh.mu.Unlock()
	return st, si, nil
}

// noteScript records a script on an identity already held by a transaction.
func (e *Engine) noteScript(st *idState, si int, script string) {
	sh := &e.shards[si]
	sh.mu.Lock()
	if addScript(st, script) {
		sh.markDirty(st)
	}
	sh.mu.Unlock()
}

// addScript records a script name with the identity, newest last.
func addScript(st *idState, script string) bool {
	for i, s := range st.scripts {
		if s == script {
			if i == len(st.scripts)-1 {
				return false
			}
			copy(st.scripts[i:], st.scripts[i+1:])
			st.scripts[len(st.scripts)-1] = script
			return true
		}
	}
	if len(st.scripts) == maxScripts {
		copy(st.scripts, st.scripts[1:])
		st.scripts = st.scripts[:maxScripts-1]
	}
	st.scripts = append(st.scripts, script)
	return true
}

// Begin starts one message's transaction for ids (from the connection and
// MAIL FROM). Duplicates are dropped; a missing Kind is taken from the id.
func (e *Engine) Begin(ids []Identity) Tx {
	t := &tx{e: e, conf: e.conf.Load()}
	t.ents = t.buf[:0]
	t.add(ids)
	t.sortEnts()
	return t
}

// lockShards locks the distinct shards in idx, in ascending order so that
// transactions never deadlock, and returns them for unlockShards.
func (e *Engine) lockShards(idx []int) []int {
	sort.Ints(idx)
	out := idx[:0]
	for i, s := range idx {
		if i > 0 && s == idx[i-1] {
			continue
		}
		out = append(out, s)
	}
	for _, s := range out {
		e.shards[s].mu.Lock()
	}
	return out
}

func (e *Engine) unlockShards(idx []int) {
	for _, s := range idx {
		e.shards[s].mu.Unlock()
	}
}
