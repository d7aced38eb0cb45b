package policy

import (
	"sync"
	"time"
)

// reserve_timeout (docs/design.md §10). A transaction reserves recipients at
// RCPT so that parallel sessions cannot together pass a cap; a session
// that reserves and then idles would hold them against everyone sharing
// the identity (one customer squatting a domain's or a web server's
// room). So reservations older than reserve_timeout lapse: they are given
// back, the transaction is marked lapsed, and its next check (another
// RCPT, DATA, or Recheck at the end of DATA) takes them again under the
// caps as they are then. A transaction finds its own lapse at each call;
// the engine's sweep, once a flush interval, releases those of sessions
// that send nothing at all.
//
// Transactions holding reservations sit on one of numLapseLists lists in
// the order they reserved, so the sweep only looks at the front of each.

// numLapseLists spreads transactions over that many lists (and locks).
const numLapseLists = 16

// lapseList is a list of transactions holding reservations, oldest first.
type lapseList struct {
	mu         sync.Mutex
	head, tail *tx
}

// lapseLink is a transaction's place on a lapseList, guarded by that
// list's mu.
type lapseLink struct {
	prev, next *tx
	at         int64 // reservedAt when it was put on the list
	on         bool
}

// push puts t at the back of l, reserved at at; nothing when it is on a
// list already.
func (l *lapseList) push(t *tx, at int64) {
	l.mu.Lock()
	if !t.link.on {
		t.link = lapseLink{prev: l.tail, at: at, on: true}
		if l.tail != nil {
			l.tail.link.next = t
		} else {
			l.head = t
		}
		l.tail = t
	}
	l.mu.Unlock()
}

// remove takes t off l if it is there.
func (l *lapseList) remove(t *tx) {
	l.mu.Lock()
	if t.link.on {
		l.unlink(t)
	}
	l.mu.Unlock()
}

func (l *lapseList) unlink(t *tx) {
	if t.link.prev != nil {
		t.link.prev.link.next = t.link.next
	} else {
		l.head = t.link.next
	}
	if t.link.next != nil {
		t.link.next.link.prev = t.link.prev
	} else {
		l.tail = t.link.prev
	}
	t.link = lapseLink{}
}

// popDue takes off the front of l the transactions that reserved at or
// before cutoff and appends them to out.
func (l *lapseList) popDue(cutoff int64, out []*tx) []*tx {
	l.mu.Lock()
	for l.head != nil && l.head.link.at <= cutoff {
		t := l.head
		l.unlink(t)
		out = append(out, t)
	}
	l.mu.Unlock()
	return out
}

// sweepLapsed releases the reservations of every transaction that has held
// them for reserve_timeout (the flush loop calls it).
func (e *Engine) sweepLapsed() {
	timeout := e.conf.Load().reserveTimeout
	if timeout <= 0 {
		return
	}
	now := e.now()
	cutoff := now.UnixNano() - int64(timeout)
	var due []*tx
	for i := range e.lapses {
		due = e.lapses[i].popDue(cutoff, due)
	}
	for _, t := range due {
		t.lapseIfDue(now)
	}
}

// lapseIfDue is the sweep's work on one transaction.
func (t *tx) lapseIfDue(now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done || t.reservedAt == 0 {
		return
	}
	locked := t.lock()
	if !t.expire(now.UnixNano()) {
		// Not due after all (the clock or reserve_timeout moved): back
		// on its list.
		t.lapseOn.push(t, t.reservedAt)
	}
	t.e.unlockShards(locked)
}

// expire releases the reservations when they are reserve_timeout old and
// reports whether it did. Shard locks are held.
func (t *tx) expire(ns int64) bool {
	timeout := t.e.conf.Load().reserveTimeout
	if t.reservedAt == 0 || timeout <= 0 || ns-t.reservedAt < int64(timeout) {
		return false
	}
	t.unreserve()
	t.lapsed = true
	return true
}

// unreserve gives back every reservation of the transaction, which stays
// open. Shard locks are held.
func (t *tx) unreserve() {
	for i := range t.ents {
		ent := &t.ents[i]
		if ent.rcpts > 0 {
			for _, r := range ent.lim.rcpts {
				ent.st.window(metricRcpts, r.Window).reserved -= ent.rcpts
			}
		}
		if ent.msgs > 0 {
			for _, r := range ent.lim.msgs {
				ent.st.window(metricMsgs, r.Window).reserved -= ent.msgs
			}
		}
		ent.rcpts, ent.msgs = 0, 0
	}
	if t.reservedAt != 0 {
		t.reservedAt = 0
		t.lapseOn.remove(t)
	}
}

// noteReserved puts the transaction on a lapse list when it has just
// taken its first reservations at ns. Shard locks are held.
func (t *tx) noteReserved(ns int64) {
	if t.reservedAt != 0 {
		return
	}
	t.reservedAt = ns
	if t.lapseOn == nil {
		t.lapseOn = &t.e.lapses[t.ents[0].shard%numLapseLists]
	}
	t.lapseOn.push(t, ns)
}
