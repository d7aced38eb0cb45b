package policy

import (
	"errors"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Release is a queued message's way out of the release queue, reserved
// against every identity's windows and pace by BeginRelease.
type Release interface {
	// Commit charges the message to its identities, as a hand-off in the
	// live path is charged, takes it out of the release queue's count, and
	// writes those counters to relay.db at once, in one transaction with
	// also (the hold spool's removal of the message): a release that is
	// done stays done across a crash, and its charge with it. The charge
	// in memory is made even when the write fails (the message went out);
	// the error says the write failed.
	Commit(also func(*bolt.Tx) error) error
	// Abort gives the reservation back: the hand-off failed.
	Abort()
}

// BeginRelease checks whether a message waiting in the release queue of
// queueID, with the identities ids and rcpts recipients, may go out now.
// Accept comes with a Release holding the reservation; otherwise the
// Release is nil and the decision says why not: Reject with Suspended
// (some identity of the message is suspended: it waits for unsuspend),
// or Defer with RetryIn (a window or pace is full until then; Err when
// relay.db could not be read). Nothing is recorded: no over-limit event,
// no decision metric, no throttling.
func (e *Engine) BeginRelease(queueID string, ids []Identity, rcpts int) (Release, Decision) {
	t := &tx{e: e, conf: e.conf.Load(), releasing: true}
	t.ents = t.buf[:0]
	t.add(ids)
	t.add([]Identity{{ID: queueID}})
	t.sortEnts()
	if t.err != nil {
		t.Abort()
		return nil, Decision{Action: Defer, Limit: "counters unavailable", Err: t.err}
	}
	now := e.now()
	ns := now.UnixNano()
	need := int64(max(rcpts, 0))
	locked := t.lock()
	dec, _ := t.evaluate(0, ns, need, 1, 0, Accept)
	if dec.Action == Accept {
		t.reserve(0, need, 1, ns)
		t.rcpts, t.msg = need, true
		// evaluate took the pace tokens (ents' paceRes).
	} else {
		t.release(false, ns)
	}
	t.e.unlockShards(locked)
	if dec.Action != Accept {
		return nil, dec
	}
	return &releaseTx{t: t, queueID: queueID}, dec
}

// releaseTx implements Release.
type releaseTx struct {
	t       *tx
	queueID string
}

func (r *releaseTx) Commit(also func(*bolt.Tx) error) error {
	t := r.t
	e := t.e
	// flushMu: no flush writes an older copy of these states over the
	// ones written here.
	e.flushMu.Lock()
	defer e.flushMu.Unlock()
	t.mu.Lock() // the reserve_timeout sweep may touch t meanwhile
	defer t.mu.Unlock()
	if t.done {
		return errors.New("policy: release already finished")
	}
	ns := e.now().UnixNano()
	locked := t.lock()
	t.release(true, ns)
	type put struct {
		key string
		val []byte
	}
	puts := make([]put, 0, len(t.ents))
	for i := range t.ents {
		st := t.ents[i].st
		if st.id == r.queueID && st.queued > 0 {
			st.queued--
		}
		puts = append(puts, put{st.id, encodeState(st, ns)})
	}
	e.unlockShards(locked)
	return e.update(func(btx *bolt.Tx) error {
		b := btx.Bucket(bucketCounters)
		for _, p := range puts {
			if err := b.Put([]byte(p.key), p.val); err != nil {
				return err
			}
		}
		if also != nil {
			return also(btx)
		}
		return nil
	})
}

func (r *releaseTx) Abort() { r.t.Abort() }

// AdjustQueued changes by delta the count of messages waiting in the
// release queue of id: the releaser adds what the spool holds at start,
// and takes off a message an admin released or deleted by hand.
func (e *Engine) AdjustQueued(id string, delta int64) error {
	st, si, err := e.lockState(id, KindOf(id), true)
	if err != nil {
		return err
	}
	st.queued = max(st.queued+delta, 0)
	st.lastUsed = e.now().UnixNano()
	e.shards[si].mu.Unlock()
	return nil
}

// DrainEstimate is about how long the release queue of id takes to empty
// when msgs messages with rcpts recipients in all wait in it, counting its
// own caps and pace only (other identities of the messages may slow it
// further): each window lets out what it has room for now, then N per W
// (plus W/60 for its granularity), and a pace N per D lets out one
// message per D/N after its bucket's tokens.
func (e *Engine) DrainEstimate(id string, msgs, rcpts int64) time.Duration {
	if msgs <= 0 {
		return 0
	}
	c := e.conf.Load()
	now := e.now()
	ns := now.UnixNano()
	st, si, err := e.lockState(id, KindOf(id), false)
	if err != nil || st == nil {
		if err == nil {
			e.shards[si].mu.Unlock()
		}
		return 0
	}
	defer e.shards[si].mu.Unlock()
	lim := c.limitsFor(id, st.kind)
	var longest time.Duration
	for _, m := range [2]uint8{metricRcpts, metricMsgs} {
		load := rcpts
		if m == metricMsgs {
			load = msgs
		}
		for _, r := range lim.rates(m) {
			w := st.window(m, r.Window)
			room := max(r.N-w.used(ns), 0)
			left := load - room
			if left <= 0 {
				continue
			}
			// What fits now goes now; the rest in batches of N, each a
			// window (and a bucket) after the one before.
			batches := (left + r.N - 1) / r.N
			span := r.Window + r.Window/bucketsPerWindow
			d := time.Duration(batches) * span
			if room == 0 {
				d = w.retryIn(ns, r.N, min(left, r.N)) + time.Duration(batches-1)*span
			}
			longest = max(longest, d)
		}
	}
	if lim.pace.On() {
		tokens := float64(lim.pace.N)
		if st.pace != nil {
			tokens = st.pace.TokensAt(now)
		}
		if left := float64(msgs) - tokens; left > 0 {
			per := float64(lim.pace.Window) / float64(lim.pace.N)
			longest = max(longest, time.Duration(left*per))
		}
	}
	return longest
}
