package policy

import (
	"errors"
	"sort"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"relay/config"
)

// Sender states.
const (
	StateOK        = "ok"
	StateThrottled = "throttled" // at a cap now, or refused over one within the last hour
	StateSuspended = "suspended"
	StateAll       = "all" // a Senders filter only
	// StateActive lists the identities in memory, those that sent or were
	// acted on in the last few minutes, without reading the store: the
	// dashboard's "busiest now". A Senders filter only.
	StateActive = "active"
)

// Suspension is why and since when an identity is suspended.
type Suspension struct {
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
	Auto   bool      `json:"auto"` // by suspend_after, not by an admin
}

// Usage is one cap of a sender and how much of it is used.
type Usage struct {
	Metric string `json:"metric"` // "rcpts" | "msgs"
	Window string `json:"window"` // "1h"
	Limit  int64  `json:"limit"`
	Used   int64  `json:"used"` // accepted in the window plus open reservations
}

// Sender is one identity as the admin API shows it.
type Sender struct {
	ID             string      `json:"id"`
	Kind           string      `json:"kind"`
	State          string      `json:"state"`
	Account        string      `json:"account,omitempty"`
	Scripts        []string    `json:"scripts,omitempty"`
	Rule           string      `json:"rule"` // "default user", "allow sender:*@lists.example.com", "none"
	MaxRcptsPerMsg int64       `json:"max_rcpts_per_msg,omitempty"`
	Usage          []Usage     `json:"usage,omitempty"`
	LastSeen       time.Time   `json:"last_seen,omitzero"`
	Suspension     *Suspension `json:"suspension,omitempty"`
	LastDecision   string      `json:"last_decision,omitempty"`
	Events         []Event     `json:"events,omitempty"` // Sender only
	// Queued is how many of its messages wait in the release queue; Pace
	// is its pace ("20/1s"), if any.
	Queued int64  `json:"queued,omitempty"`
	Pace   string `json:"pace,omitempty"`
}

// senderEvents is how many recent events Sender returns.
const senderEvents = 50

var errBadID = errors.New("not an identity id (want " + strings.Join(config.IdentityKinds(), ":, ") + ": and an address)")

// snapshot builds the admin view of st. The shard lock is held.
func (e *Engine) snapshot(st *idState, c *policyConf, now time.Time) Sender {
	ns := now.UnixNano()
	lim := c.limitsFor(st.id, st.kind)
	s := Sender{
		ID: st.id, Kind: st.kind, Account: st.account, Rule: lim.rule, MaxRcptsPerMsg: lim.maxRcpts,
		Scripts: append([]string(nil), st.scripts...), LastDecision: st.lastDecision, State: StateOK,
		Queued: st.queued, Pace: lim.pace.String(),
	}
	if st.lastSeen != 0 {
		s.LastSeen = time.Unix(0, st.lastSeen)
	}
	atCap := false
	for _, m := range [2]uint8{metricRcpts, metricMsgs} {
		for _, r := range lim.rates(m) {
			var used int64
			for i := range st.windows {
				if w := &st.windows[i]; w.metric == m && w.length == r.Window {
					used = w.used(ns)
				}
			}
			atCap = atCap || used >= r.N
			s.Usage = append(s.Usage, Usage{Metric: metricName(m), Window: config.FormatWindow(r.Window), Limit: r.N, Used: used})
		}
	}
	switch {
	case st.suspension != nil:
		s.State = StateSuspended
		cp := *st.suspension
		s.Suspension = &cp
	case atCap || st.queued > 0 || (st.lastOver != 0 && ns-st.lastOver < int64(quietSpan)):
		s.State = StateThrottled
	}
	return s
}

// Senders lists the identities in state ("throttled", "suspended", or
// "all"; "" means all), most recently seen first. Identities are known
// while they have counts in a window, an over-limit event in the last 24 h,
// a suspension, or a message in the last 24 h. Identities not resident in
// memory are read from bbolt (every one of them, except for "suspended":
// suspended identities are always resident).
func (e *Engine) Senders(state string) []Sender {
	c := e.conf.Load()
	now := e.now()
	var out []Sender
	var listed map[string]struct{}
	scan := state != StateSuspended && state != StateActive
	if scan {
		listed = make(map[string]struct{})
	}
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		for _, st := range sh.states {
			if scan {
				listed[st.id] = struct{}{}
			}
			s := e.snapshot(st, c, now)
			if state == "" || state == StateAll || state == StateActive || state == s.State {
				out = append(out, s)
			}
		}
		sh.mu.Unlock()
	}
	if scan {
		out = e.storedSenders(out, state, listed)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].LastSeen.Equal(out[j].LastSeen) {
			return out[i].LastSeen.After(out[j].LastSeen)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Sender returns one identity with its recent events and last decision.
func (e *Engine) Sender(id string) (Sender, bool) {
	sh := &e.shards[e.shardOf(id)]
	sh.mu.Lock()
	st := sh.states[id]
	var s Sender
	if st != nil {
		s = e.snapshot(st, e.conf.Load(), e.now())
	}
	sh.mu.Unlock()
	if st == nil {
		var ok bool
		if s, ok = e.storedSender(id); !ok {
			return Sender{}, false
		}
	}
	s.Events = e.events.query(EventFilter{Identity: id, Limit: senderEvents})
	return s, true
}

// Suspend suspends id until Unsuspend: every message carrying it gets
// 550 5.7.1. It is durable when it returns.
func (e *Engine) Suspend(id, reason string) error {
	if !ValidID(id) {
		return errBadID
	}
	now := e.now()
	s := &Suspension{Reason: reason, At: now}
	st, si, err := e.lockState(id, KindOf(id), true)
	if err != nil {
		return err
	}
	sh := &e.shards[si]
	st.lastUsed = now.UnixNano()
	was := st.suspension != nil
	st.suspension = s
	acct := st.account
	sh.mu.Unlock()
	if !was {
		e.metrics.suspended.Inc()
	}
	e.log.Warn("policy: identity suspended by admin", "identity", id, "reason", reason)
	e.notify.send(notification{Event: EventSuspended, Identity: id, Kind: KindOf(id), Account: acct, Reason: reason, Time: now}, e.conf.Load(), now)
	return e.storeSuspension(id, Event{Time: now, Kind: EventSuspended, Identity: id, Account: acct, Detail: reason})
}

// Unsuspend lifts a suspension and clears the over-limit history that led
// to it (so the next over-limit event does not suspend again at once). It
// is durable when it returns.
func (e *Engine) Unsuspend(id string) error {
	now := e.now()
	st, si, err := e.lockState(id, KindOf(id), false)
	if err != nil {
		return err
	}
	sh := &e.shards[si]
	if st == nil || st.suspension == nil {
		sh.mu.Unlock()
		return errors.New("identity " + id + " is not suspended")
	}
	st.suspension = nil
	st.overTimes = st.overTimes[:0]
	st.lastUsed = now.UnixNano()
	acct := st.account
	sh.markDirty(st)
	sh.mu.Unlock()
	e.metrics.suspended.Dec()
	e.log.Info("policy: identity unsuspended", "identity", id)
	return e.storeSuspension(id, Event{Time: now, Kind: EventUnsuspended, Identity: id, Account: acct})
}

// Reset clears the counters and over-limit history of id (not a
// suspension: that is Unsuspend). Open transactions keep their
// reservations. It is durable when it returns.
func (e *Engine) Reset(id string) error {
	// flushMu: no flush may write an older copy over this one.
	e.flushMu.Lock()
	defer e.flushMu.Unlock()
	now := e.now()
	st, si, err := e.lockState(id, KindOf(id), false)
	if err != nil {
		return err
	}
	sh := &e.shards[si]
	if st == nil {
		sh.mu.Unlock()
		return errors.New("identity " + id + " is not known")
	}
	st.lastUsed = now.UnixNano()
	for i := range st.windows {
		w := &st.windows[i]
		w.buckets, w.sum = nil, 0
	}
	st.overTimes, st.lastOver, st.lastDecision = nil, 0, ""
	acct := st.account
	val := encodeState(st, now.UnixNano())
	sh.mu.Unlock()
	ev := e.events.add(Event{Time: now, Kind: EventReset, Identity: id, Account: acct}, false)
	// Written at once, not at the next flush: admin actions are durable
	// when they return.
	return e.update(func(btx *bolt.Tx) error {
		if err := btx.Bucket(bucketCounters).Put([]byte(id), val); err != nil {
			return err
		}
		return putEvents(btx, []Event{ev})
	})
}

// NoteEvent keeps an event from the mail path; a zero Time becomes now.
// Unlike RecordEvent it does not wait for the disk: it is written with the
// next flush, as the events of decisions are.
func (e *Engine) NoteEvent(ev Event) {
	if ev.Time.IsZero() {
		ev.Time = e.now()
	}
	e.events.add(ev, true)
}

// Events returns events newest first.
func (e *Engine) Events(f EventFilter) []Event { return e.events.query(f) }

// RecordEvent adds an event from outside policy (reload, released); it is
// durable when it returns. Seq is assigned; a zero Time becomes now.
func (e *Engine) RecordEvent(ev Event) error {
	if ev.Time.IsZero() {
		ev.Time = e.now()
	}
	ev = e.events.add(ev, false)
	return e.update(func(btx *bolt.Tx) error { return putEvents(btx, []Event{ev}) })
}

func (e *Engine) countSuspended() int {
	n := 0
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		for _, st := range sh.states {
			if st.suspension != nil {
				n++
			}
		}
		sh.mu.Unlock()
	}
	return n
}
