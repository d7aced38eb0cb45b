package policy

import "time"

// Sliding windows.
//
// A limit N/W means: in any interval of length W at most N are accepted.
// Each (identity, metric, W) has one window made of buckets of width
// g = ceil(W/60). An arrival at time t goes into bucket floor(t/g). When the
// clock is in bucket c, the window counts buckets c-60..c: every arrival in
// the closed interval [now-W, now] lies in one of them (60g >= W), so the cap
// is never exceeded for any interval of length W. The price is at most one
// bucket of extra wait: capacity freed by an arrival at t is back at the
// latest at t + 61g, about W + W/60. Only non-empty buckets are stored, so an
// idle identity costs nothing and a quiet one only a few entries.

// bucketsPerWindow is how many bucket widths one window spans.
const bucketsPerWindow = 60

// Metrics counted per identity.
const (
	metricRcpts uint8 = iota
	metricMsgs
)

func metricName(m uint8) string {
	switch m {
	case metricMsgs:
		return "msgs"
	case metricNewRcpts:
		return "new_rcpts"
	case metricBounces:
		return "bounces"
	case metricSuccesses:
		return "successes"
	case metricDeferrals:
		return "deferrals"
	}
	return "rcpts"
}

// bucket is one non-empty bucket: its index (unix nanoseconds / width) and
// how many arrivals it holds.
type bucket struct {
	idx int64
	n   int64
}

// window counts one metric of one identity over one window length.
type window struct {
	metric   uint8
	length   time.Duration // W
	width    int64         // bucket width g in nanoseconds
	buckets  []bucket      // oldest first, all within c-60..c after prune
	sum      int64         // total of buckets
	reserved int64         // held by open transactions, counted as used
}

func newWindow(metric uint8, length time.Duration) window {
	width := (int64(length) + bucketsPerWindow - 1) / bucketsPerWindow
	if width < 1 {
		width = 1
	}
	return window{metric: metric, length: length, width: width}
}

// prune drops buckets that can no longer overlap [now-W, now].
func (w *window) prune(now int64) {
	oldest := now/w.width - bucketsPerWindow
	i := 0
	for i < len(w.buckets) && w.buckets[i].idx < oldest {
		w.sum -= w.buckets[i].n
		i++
	}
	if i == len(w.buckets) {
		w.buckets = w.buckets[:0]
	} else if i > 0 {
		w.buckets = w.buckets[:copy(w.buckets, w.buckets[i:])]
	}
}

// used is what counts against a cap at now: arrivals plus reservations.
func (w *window) used(now int64) int64 {
	w.prune(now)
	return w.sum + w.reserved
}

// add records n arrivals at now. A clock that stepped back adds to the
// newest bucket, so buckets stay ordered.
func (w *window) add(now, n int64) {
	if n <= 0 {
		return
	}
	w.prune(now)
	idx := now / w.width
	if k := len(w.buckets); k > 0 && w.buckets[k-1].idx >= idx {
		w.buckets[k-1].n += n
	} else {
		w.buckets = append(w.buckets, bucket{idx: idx, n: n})
	}
	w.sum += n
}

// retryIn is how long until need more fit under limit, counting only the
// expiry of recorded arrivals; 0 when they fit now. When reservations alone
// block, it answers one bucket width: open transactions end soon.
func (w *window) retryIn(now, limit, need int64) time.Duration {
	w.prune(now)
	excess := w.sum + w.reserved + need - limit
	if excess <= 0 {
		return 0
	}
	if w.reserved+need > limit {
		return time.Duration(w.width)
	}
	var dropped int64
	for _, b := range w.buckets {
		dropped += b.n
		if dropped >= excess {
			return time.Duration((b.idx+bucketsPerWindow+1)*w.width - now)
		}
	}
	return time.Duration(w.width) // unreachable: sum >= excess
}

// empty reports whether the window holds nothing at now.
func (w *window) empty(now int64) bool {
	w.prune(now)
	return len(w.buckets) == 0 && w.reserved == 0
}
