package signals

import (
	"math"
	"time"
)

// The join: relay's hand-offs (qp, identities) meet qmail-send's lines.
//
//	HandedOff(qp Q)            -> handoffs[Q]
//	info msg N: ... qp Q       -> msgs[N] gets the identities of handoffs[Q]
//	starting delivery D: msg N -> deliveries[D] = N
//	delivery D: outcome        -> the sink counts outcome for msgs[N]'s identities
//	end msg N                  -> msgs[N] is gone (N is an inode number, reused)
//
// Only qp values relay handed off join; a line for any other qp is
// ignored, whatever its sender. A hand-off joins the first info line with
// its qp that is not older than the hand-off and names the same envelope
// sender (as logsafe writes it): pids are reused, and this keeps a
// hand-off whose line never came from joining a later message of another
// program with the same pid.
//
// qmail-send may log the info line before the hand-off is recorded (it
// reads the queue as soon as qmail-queue has written it, and relay learns
// the pid only when qmail-queue has exited), so an info line with an
// unknown qp is kept for tentativeSpan as a tentative message, outcomes
// and all, for a hand-off arriving late to claim.

// Spans and bounds of the join state (part of the behaviour).
const (
	// handoffSpan is how long a hand-off waits for its info line: longer
	// than qmail-send is ever stopped for maintenance.
	handoffSpan = 24 * time.Hour
	// messageSpan is how long a joined message is kept without "end msg":
	// qmail's queuelifetime (7 days) and a day.
	messageSpan = 8 * 24 * time.Hour
	// tentativeSpan is how long an info line with an unknown qp waits for
	// its hand-off.
	tentativeSpan = 2 * time.Minute
	// stampSlack is how much earlier than the hand-off its info line's
	// stamp may be (clock granularity).
	stampSlack = 2 * time.Second
	// Bounds of the state: the oldest entries go first.
	maxHandoffs   = 200000
	maxMessages   = 200000
	maxTentatives = 20000
	maxPending    = 64 // outcomes kept per tentative message
)

// handoff is one message relay handed off: to whom it counts.
type handoff struct {
	Seq  uint64 // numbers the follower's hand-offs, from 1 (persist.go)
	QP   int
	From string
	IDs  []string
	At   int64 // unix ns, when the hand-off began
}

// message is one message in qmail's queue that the join follows.
type message struct {
	N   uint64
	IDs []string // nil while tentative
	// Seen is when the info line was read (unix ns): the age of a
	// joined message, and the deadline of a tentative one.
	Seen int64
	// Tentative messages: what a late hand-off must match, and the
	// outcomes seen meanwhile.
	QP      int
	From    string
	Stamp   int64
	Pending []outcome
	// Ended: a tentative message whose "end msg" came before its
	// hand-off; it goes once joined (or expired).
	Ended bool
	// Deliveries under way (D numbers).
	Open []uint64
}

// outcome is one delivery result.
type outcome struct {
	What  string
	Stamp int64
}

// joinState is everything the join remembers; the follower writes it
// with its place in the log (persist.go): what changed since the last
// write is in dirtyH and dirtyM.
type joinState struct {
	handoffs   map[int][]handoff   // by qp
	msgs       map[uint64]*message // by qmail msg number
	tentative  map[int]uint64      // qp -> msg number of a tentative message
	deliveries map[uint64]uint64   // D -> msg number
	nHandoffs  int

	dirtyH map[uint64]*handoff // hand-offs (by Seq) added (a copy) or gone (nil) since the last write
	dirtyM map[uint64]struct{} // messages (by N) changed, added or gone
	m      *metrics
}

func newJoinState(m *metrics) *joinState {
	return &joinState{
		handoffs:   make(map[int][]handoff),
		msgs:       make(map[uint64]*message),
		tentative:  make(map[int]uint64),
		deliveries: make(map[uint64]uint64),
		dirtyH:     make(map[uint64]*handoff),
		dirtyM:     make(map[uint64]struct{}),
		m:          m,
	}
}

// record is a delivery outcome for the sink, collected under the lock and
// handed over after it.
type record struct {
	ids     []string
	outcome string
	at      time.Time
}

// handedOff records one hand-off, or joins it to a tentative message whose
// info line came first. It returns the outcomes that became known.
func (j *joinState) handedOff(h handoff, now int64) []record {
	if n, ok := j.tentative[h.QP]; ok {
		if m := j.msgs[n]; m != nil && m.IDs == nil && m.QP == h.QP && logsafeEqual(h.From, []byte(m.From)) &&
			(m.Stamp == 0 || m.Stamp >= h.At-int64(stampSlack)) && now-m.Seen <= int64(tentativeSpan) {
			delete(j.tentative, h.QP)
			j.dirtyM[n] = struct{}{}
			j.m.joined.Inc()
			m.IDs, m.QP, m.From, m.Stamp = h.IDs, 0, "", 0
			var out []record
			for _, o := range m.Pending {
				out = append(out, record{m.IDs, o.What, stampTime(o.Stamp)})
			}
			m.Pending = nil
			if m.Ended {
				delete(j.msgs, n)
			}
			return out
		}
	}
	if j.nHandoffs >= maxHandoffs {
		j.dropOldestHandoff()
	}
	j.handoffs[h.QP] = append(j.handoffs[h.QP], h)
	j.nHandoffs++
	j.dirtyH[h.Seq] = &h
	return nil
}

// dropOldestHandoff makes room (a log that is not qmail-send's, or none).
func (j *joinState) dropOldestHandoff() {
	oldQP, oldAt := 0, int64(0)
	first := true
	for qp, hs := range j.handoffs {
		if first || hs[0].At < oldAt {
			oldQP, oldAt, first = qp, hs[0].At, false
		}
	}
	j.takeHandoff(oldQP, 0)
	j.m.handoffsUnjoined.Inc()
}

func (j *joinState) takeHandoff(qp, i int) handoff {
	hs := j.handoffs[qp]
	h := hs[i]
	if len(hs) == 1 {
		delete(j.handoffs, qp)
	} else {
		j.handoffs[qp] = append(hs[:i:i], hs[i+1:]...)
	}
	j.nHandoffs--
	j.dirtyH[h.Seq] = nil
	return h
}

// line applies one parsed log line; now is when it was read. It returns
// the outcome to count, if any.
func (j *joinState) line(l *line, now int64) (record, bool) {
	switch l.kind {
	case lineNew:
		j.forget(l.msg)
	case lineEnd:
		// A tentative message still waits for its hand-off (a local
		// delivery can end before relay has learnt qmail-queue's pid).
		if m := j.msgs[l.msg]; m != nil && m.IDs == nil && j.tentative[m.QP] == l.msg {
			m.Ended = true
			j.dirtyM[l.msg] = struct{}{}
			break
		}
		j.forget(l.msg)
	case lineInfo:
		j.info(l, now)
	case lineStarting:
		// A number of a delivery under way may be reused (qmail-send
		// restarted): this line ends what it meant.
		if old, ok := j.deliveries[l.delivery]; ok && old != l.msg {
			j.closeDelivery(old, l.delivery)
		}
		if m := j.msgs[l.msg]; m != nil {
			j.deliveries[l.delivery] = l.msg
			m.Open = append(m.Open, l.delivery)
			j.dirtyM[l.msg] = struct{}{}
		}
	case lineDelivery:
		n, ok := j.deliveries[l.delivery]
		if !ok {
			return record{}, false
		}
		j.closeDelivery(n, l.delivery)
		m := j.msgs[n]
		if m == nil {
			return record{}, false
		}
		if m.IDs != nil {
			return record{m.IDs, l.outcome, stampTime(l.stamp)}, true
		}
		if len(m.Pending) < maxPending {
			m.Pending = append(m.Pending, outcome{l.outcome, l.stamp})
			j.dirtyM[n] = struct{}{}
		}
	}
	return record{}, false
}

// info joins an info line to a hand-off, or keeps it tentative.
func (j *joinState) info(l *line, now int64) {
	j.forget(l.msg)
	if l.qp > math.MaxInt64 {
		j.m.unjoined.Inc()
		return
	}
	qp := int(l.qp)
	for i, h := range j.handoffs[qp] {
		if logsafeEqual(h.From, l.sender) && (l.stamp == 0 || l.stamp >= h.At-int64(stampSlack)) {
			h = j.takeHandoff(qp, i)
			j.addMessage(&message{N: l.msg, IDs: h.IDs, Seen: now})
			j.m.joined.Inc()
			return
		}
	}
	if len(j.tentative) >= maxTentatives {
		j.expire(now, true)
	}
	if len(j.tentative) >= maxTentatives {
		j.m.unjoined.Inc()
		return
	}
	if old, ok := j.tentative[qp]; ok {
		j.forget(old)
	}
	j.tentative[qp] = l.msg
	j.addMessage(&message{N: l.msg, Seen: now, QP: qp, From: string(l.sender), Stamp: l.stamp})
}

func (j *joinState) addMessage(m *message) {
	if len(j.msgs) >= maxMessages {
		j.dropOldestMessage()
	}
	j.msgs[m.N] = m
	j.dirtyM[m.N] = struct{}{}
}

func (j *joinState) dropOldestMessage() {
	var old *message
	for _, m := range j.msgs {
		if old == nil || m.Seen < old.Seen {
			old = m
		}
	}
	if old != nil {
		j.forget(old.N)
	}
}

// forget drops message n and its deliveries under way.
func (j *joinState) forget(n uint64) {
	m := j.msgs[n]
	if m == nil {
		return
	}
	for _, d := range m.Open {
		if j.deliveries[d] == n {
			delete(j.deliveries, d)
		}
	}
	if m.IDs == nil && j.tentative[m.QP] == n {
		delete(j.tentative, m.QP)
	}
	if m.IDs == nil {
		j.m.unjoined.Inc() // no hand-off of relay's claimed it
	}
	delete(j.msgs, n)
	j.dirtyM[n] = struct{}{}
}

// closeDelivery ends delivery d of message n.
func (j *joinState) closeDelivery(n, d uint64) {
	if j.deliveries[d] == n {
		delete(j.deliveries, d)
	}
	if m := j.msgs[n]; m != nil {
		for i, x := range m.Open {
			if x == d {
				m.Open = append(m.Open[:i], m.Open[i+1:]...)
				j.dirtyM[n] = struct{}{}
				break
			}
		}
	}
}

// expire drops hand-offs, tentative and joined messages past their span.
// With tentativeOnly, only tentative messages.
func (j *joinState) expire(now int64, tentativeOnly bool) {
	for _, n := range j.tentative {
		if m := j.msgs[n]; m == nil || now-m.Seen > int64(tentativeSpan) {
			j.forget(n)
		}
	}
	if tentativeOnly {
		return
	}
	for n, m := range j.msgs {
		if now-m.Seen > int64(messageSpan) {
			j.forget(n)
		}
	}
	for qp, hs := range j.handoffs {
		keep := hs[:0]
		for _, h := range hs {
			if now-h.At <= int64(handoffSpan) {
				keep = append(keep, h)
			} else {
				j.nHandoffs--
				j.dirtyH[h.Seq] = nil
				j.m.handoffsUnjoined.Inc()
			}
		}
		if len(keep) == 0 {
			delete(j.handoffs, qp)
		} else {
			j.handoffs[qp] = keep
		}
	}
}

func stampTime(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}
