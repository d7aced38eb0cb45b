package policy

import (
	"math"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"

	"relay/config"
)

// Bounces and deferrals (DESIGN.md §12).
//
// Package signals follows qmail-send's log, joins each delivery of a
// message relay handed off to the message's identities, and hands the
// outcome here (RecordDelivery). Every identity counts its deliveries by
// outcome on its delivery windows: the windows of its bounces caps and its
// ratio window, the longest window its limits section writes (24h when it
// writes none). bounces = ["N/W"] is over when the identity had more than
// N failures in the last W; max_bounce_ratio when failures / (successes +
// failures) in the ratio window is above it, once that window holds
// min_bounce_sample deliveries. Deferrals are counted and shown, never as
// failures. Over either, the identity's next recipient gets the over_limit
// action like any cap, and the over-limit event says which signal tripped.

// Delivery outcomes, as qmail-send writes them ("delivery D: failure: ...").
const (
	DeliverySuccess  = "success"
	DeliveryFailure  = "failure"
	DeliveryDeferral = "deferral"
)

// defaultDeliveryWindow is the ratio window of a section that writes no
// window, and of identities without caps.
const defaultDeliveryWindow = 24 * time.Hour

// More metrics counted per identity (window.go has rcpts and msgs).
const (
	metricNewRcpts  uint8 = iota + metricMsgs + 1 // first-time recipients
	metricBounces                                 // failed deliveries
	metricSuccesses                               // successful deliveries
	metricDeferrals                               // deferred delivery attempts
	numMetrics
	// metricRatio names the max_bounce_ratio cap in an overHit; it has no
	// window of its own.
	metricRatio = numMetrics
)

// setSignals adds the signals caps of one section to ls.
func (ls *limitSet) setSignals(newRcpts, bounces []config.Rate, ratio float64, sample int) error {
	for _, r := range append(append([]config.Rate(nil), newRcpts...), bounces...) {
		if r.N <= 0 || r.Window <= 0 {
			return errBadRate(r)
		}
	}
	if ratio < 0 || ratio > 1 || math.IsNaN(ratio) {
		return errBadRatio(ratio)
	}
	ls.newRcpts, ls.bounces, ls.maxRatio = newRcpts, bounces, ratio
	ls.minSample = int64(sample)
	if ls.minSample <= 0 {
		ls.minSample = config.DefaultMinBounceSample
	}
	ls.ratioWindow = 0
	for _, set := range [][]config.Rate{ls.rcpts, ls.msgs, newRcpts, bounces} {
		for _, r := range set {
			ls.ratioWindow = max(ls.ratioWindow, r.Window)
		}
	}
	if ls.ratioWindow == 0 {
		ls.ratioWindow = defaultDeliveryWindow
	}
	return nil
}

type errBadRate config.Rate

func (e errBadRate) Error() string {
	return "limit " + strconv.Quote(config.Rate(e).String()) + ": N and W must be positive"
}

type errBadRatio float64

func (e errBadRatio) Error() string {
	return "max_bounce_ratio " + strconv.FormatFloat(float64(e), 'g', -1, 64) + ": want 0 to 1"
}

// deliveryWindows calls f with each window length deliveries are counted
// on: the bounces caps' and the ratio window.
func (ls *limitSet) deliveryWindows(f func(time.Duration)) {
	w := ls.ratioWindow
	if w == 0 {
		w = defaultDeliveryWindow
	}
	f(w)
	for _, r := range ls.bounces {
		if r.Window != w {
			f(r.Window)
		}
	}
}

// RecordDelivery counts one delivery of a message handed off for ids, as
// qmail-send logged it at `at`: outcome is DeliverySuccess,
// DeliveryFailure or DeliveryDeferral (anything else is ignored). It is
// the sink of package signals; the counts are flushed like the others
// (with the follower's place in the log: AttachFlushPart).
func (e *Engine) RecordDelivery(ids []string, outcome string, at time.Time) {
	var metric uint8
	switch outcome {
	case DeliverySuccess:
		metric = metricSuccesses
	case DeliveryFailure:
		metric = metricBounces
	case DeliveryDeferral:
		metric = metricDeferrals
	default:
		return
	}
	c := e.conf.Load()
	now := e.now().UnixNano()
	ns := at.UnixNano()
	if at.IsZero() || ns > now {
		ns = now
	}
	for _, id := range ids {
		kind := KindOf(id)
		if kind == "" {
			continue
		}
		st, si, err := e.lockState(id, kind, true)
		if err != nil {
			e.log.Error("policy: counting a delivery", "identity", id, "outcome", outcome, "err", err)
			continue
		}
		sh := &e.shards[si]
		c.limitsFor(id, kind).deliveryWindows(func(w time.Duration) {
			st.window(metric, w).addAt(now, ns, 1)
		})
		st.lastUsed = now
		sh.markDirty(st)
		sh.mu.Unlock()
	}
}

// FlushPart is state of another package that must become durable in the
// same relay.db transaction as the counts it produced, so that a crash
// keeps both or neither: package signals' place in qmail-send's log and
// its join, with the deliveries counted from the lines before that place.
// It is an alias of an unnamed interface so that such a package can
// implement and name it without importing policy.
type FlushPart = interface {
	// Lock and Unlock: the part holds the lock while it counts
	// (RecordDelivery); a flush holds it from TakeChanges until it has
	// taken the changed counters, so the changes it writes are exactly
	// those of the counts it writes.
	Lock()
	Unlock()
	// TakeChanges is called with the lock held at the start of every
	// flush. It may count (RecordDelivery) first, then hands put each
	// record changed since the last call (a nil val deletes it; put keeps
	// the slices). done says whether the transaction with them committed;
	// when not, the part must hand them again at the next flush.
	TakeChanges(put func(key, val []byte)) (done func(committed bool))
}

// flushPart is an attached FlushPart and its bucket.
type flushPart struct {
	bucket []byte
	part   FlushPart
}

// partWrite is what one part hands a flush.
type partWrite struct {
	bucket []byte
	keys   [][]byte
	vals   [][]byte // nil: delete
	done   func(committed bool)
}

// AttachFlushPart makes part's records, kept in relay.db's bucket
// `bucket` (created if missing), part of every flush of the counters from
// now on. load is called first with each record stored there, in key
// order; its error is returned.
func (e *Engine) AttachFlushPart(bucket string, part FlushPart, load func(key, val []byte) error) error {
	e.flushMu.Lock()
	defer e.flushMu.Unlock()
	name := []byte(bucket)
	err := e.update(func(btx *bolt.Tx) error {
		_, err := btx.CreateBucketIfNotExists(name)
		return err
	})
	if err == nil {
		err = e.view(func(btx *bolt.Tx) error { return btx.Bucket(name).ForEach(load) })
	}
	if err != nil {
		return err
	}
	e.parts = append(e.parts, flushPart{bucket: name, part: part})
	return nil
}

// lockParts locks the attached parts and has each count what it owes
// and hand its changes; the caller takes the changed counters, then
// unlockParts. flushMu is held.
func (e *Engine) lockParts() []partWrite {
	if len(e.parts) == 0 {
		return nil
	}
	ws := make([]partWrite, len(e.parts))
	for i, p := range e.parts {
		p.part.Lock()
		w := &ws[i]
		w.bucket = p.bucket
		w.done = p.part.TakeChanges(func(k, v []byte) {
			w.keys = append(w.keys, k)
			w.vals = append(w.vals, v)
		})
	}
	return ws
}

func (e *Engine) unlockParts() {
	for _, p := range e.parts {
		p.part.Unlock()
	}
}

// writeParts puts the parts' changes into the flush's transaction.
func writeParts(btx *bolt.Tx, ws []partWrite) error {
	for _, w := range ws {
		b := btx.Bucket(w.bucket)
		for i, k := range w.keys {
			var err error
			if w.vals[i] == nil {
				err = b.Delete(k)
			} else {
				err = b.Put(k, w.vals[i])
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// partsDone tells the parts whether their changes committed.
func partsDone(ws []partWrite, committed bool) {
	for _, w := range ws {
		if w.done != nil {
			w.done(committed)
		}
	}
}

func partsChanged(ws []partWrite) bool {
	for _, w := range ws {
		if len(w.keys) > 0 {
			return true
		}
	}
	return false
}

// addAt records n arrivals that happened at `at` (<= now): into the bucket
// of their time, or not at all when they are older than the window.
func (w *window) addAt(now, at, n int64) {
	w.prune(now)
	if n <= 0 || at < now-int64(w.length) {
		return
	}
	idx := at / w.width
	i := len(w.buckets)
	for i > 0 && w.buckets[i-1].idx > idx {
		i--
	}
	switch {
	case i > 0 && w.buckets[i-1].idx == idx:
		w.buckets[i-1].n += n
	default:
		w.buckets = append(w.buckets, bucket{})
		copy(w.buckets[i+1:], w.buckets[i:])
		w.buckets[i] = bucket{idx: idx, n: n}
	}
	w.sum += n
}

// find returns st's window for (metric, length), nil when it has none.
func (st *idState) find(metric uint8, length time.Duration) *window {
	for i := range st.windows {
		if w := &st.windows[i]; w.metric == metric && w.length == length {
			return w
		}
	}
	return nil
}

// usedOn is what st's window (metric, length) holds at now (0 without one).
func (st *idState) usedOn(metric uint8, length time.Duration, now int64) int64 {
	if w := st.find(metric, length); w != nil {
		return w.used(now)
	}
	return 0
}

// signalHits adds to hits the signals caps of ents[i] that a check for more
// recipients or a message finds exceeded. The shard locks are held.
func (t *tx) signalHits(i int, now int64, hits []overHit) []overHit {
	ent := &t.ents[i]
	lim, st := ent.lim, ent.st
	if len(lim.newRcpts) > 0 && len(t.adding) > 0 {
		if need := t.needNewRcpts(ent, now/dayNanos, t.conf.memoryKeepDays()); need > 0 {
			pend := st.mem.reserved()
			for _, r := range lim.newRcpts {
				w := st.window(metricNewRcpts, r.Window)
				if used := w.used(now) + pend; used+need > r.N {
					hits = append(hits, overHit{ent: i, metric: metricNewRcpts, rate: r, used: used, retry: w.retryIn(now, r.N-pend, need)})
				}
			}
		}
	}
	for _, r := range lim.bounces {
		w := st.window(metricBounces, r.Window)
		if used := w.used(now); used > r.N {
			hits = append(hits, overHit{ent: i, metric: metricBounces, rate: r, used: used, retry: w.retryIn(now, r.N, 0)})
		}
	}
	if lim.maxRatio > 0 {
		fail := st.window(metricBounces, lim.ratioWindow)
		succ := st.window(metricSuccesses, lim.ratioWindow)
		f, s := fail.used(now), succ.used(now)
		if f+s >= lim.minSample && float64(f) > lim.maxRatio*float64(f+s) {
			hits = append(hits, overHit{ent: i, metric: metricRatio, used: f, of: f + s,
				rate:  config.Rate{N: int64(math.Round(lim.maxRatio * 1000)), Window: lim.ratioWindow},
				retry: ratioRetry(fail, succ, now, lim.maxRatio, lim.minSample)})
		}
	}
	return hits
}

// ratioRetry is how long until the ratio window is no longer over: fewer
// deliveries than the sample, or the ratio at or under the cap, as the
// oldest buckets leave it. fail and succ have the same length.
func ratioRetry(fail, succ *window, now int64, maxRatio float64, minSample int64) time.Duration {
	f, s := fail.sum, succ.sum
	i, j := 0, 0
	for i < len(fail.buckets) || j < len(succ.buckets) {
		var idx int64
		switch {
		case j == len(succ.buckets) || (i < len(fail.buckets) && fail.buckets[i].idx <= succ.buckets[j].idx):
			idx = fail.buckets[i].idx
		default:
			idx = succ.buckets[j].idx
		}
		for ; i < len(fail.buckets) && fail.buckets[i].idx == idx; i++ {
			f -= fail.buckets[i].n
		}
		for ; j < len(succ.buckets) && succ.buckets[j].idx == idx; j++ {
			s -= succ.buckets[j].n
		}
		if f+s < minSample || float64(f) <= maxRatio*float64(f+s) {
			return time.Duration((idx+bucketsPerWindow+1)*fail.width - now)
		}
	}
	return time.Duration(fail.width)
}

// ratioText writes a ratio cap kept in permille: "30%", "33.3%".
func ratioText(permille int64) string {
	if permille%10 == 0 {
		return strconv.FormatInt(permille/10, 10) + "%"
	}
	return strconv.FormatFloat(float64(permille)/10, 'f', 1, 64) + "%"
}

// hitUsage is the "used ..." part of an over-limit event's detail.
func hitUsage(h overHit) string {
	if h.metric == metricRatio {
		return strconv.FormatInt(h.used, 10) + " of " + strconv.FormatInt(h.of, 10) + " deliveries failed"
	}
	return "used " + strconv.FormatInt(h.used, 10)
}

// Deliveries is what became of an identity's handed-off mail in its ratio
// window, as qmail-send logged it.
type Deliveries struct {
	Window     string  `json:"window"`
	Successes  int64   `json:"successes"`
	Failures   int64   `json:"failures"`  // bounces
	Deferrals  int64   `json:"deferrals"` // temporary failures; never bounces
	BounceRate float64 `json:"bounce_ratio"`
	// MaxBounceRatio and MinBounceSample are the ratio cap (0: none).
	MaxBounceRatio  float64 `json:"max_bounce_ratio,omitempty"`
	MinBounceSample int64   `json:"min_bounce_sample,omitempty"`
}

// signalUsage adds to s the usage of st's signals caps and its
// deliveries, and reports whether one is over. The shard lock is held
// (or st is a private copy).
func signalUsage(s *Sender, st *idState, lim *limitSet, ns int64) bool {
	over := false
	for _, r := range lim.newRcpts {
		used := st.usedOn(metricNewRcpts, r.Window, ns) + st.mem.reserved()
		over = over || used >= r.N
		s.Usage = append(s.Usage, Usage{Metric: metricName(metricNewRcpts), Window: config.FormatWindow(r.Window), Limit: r.N, Used: used})
	}
	for _, r := range lim.bounces {
		used := st.usedOn(metricBounces, r.Window, ns)
		over = over || used > r.N
		s.Usage = append(s.Usage, Usage{Metric: metricName(metricBounces), Window: config.FormatWindow(r.Window), Limit: r.N, Used: used})
	}
	w := lim.ratioWindow
	if w == 0 {
		w = defaultDeliveryWindow
	}
	d := Deliveries{
		Window:    config.FormatWindow(w),
		Successes: st.usedOn(metricSuccesses, w, ns),
		Failures:  st.usedOn(metricBounces, w, ns),
		Deferrals: st.usedOn(metricDeferrals, w, ns),
	}
	if d.Successes+d.Failures > 0 {
		d.BounceRate = float64(d.Failures) / float64(d.Successes+d.Failures)
	}
	if lim.maxRatio > 0 {
		d.MaxBounceRatio, d.MinBounceSample = lim.maxRatio, lim.minSample
		over = over || (d.Successes+d.Failures >= lim.minSample && d.BounceRate > lim.maxRatio)
	}
	if d.Successes+d.Failures+d.Deferrals > 0 || lim.maxRatio > 0 || len(lim.bounces) > 0 {
		s.Deliveries = &d
	}
	return over
}
