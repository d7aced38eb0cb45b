package policy

import (
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"relay/config"
)

// txEnt is one identity of a transaction with what it holds reserved.
type txEnt struct {
	id    Identity
	st    *idState
	shard int
	lim   *limitSet // caps under the config the transaction began with
	rcpts int64     // recipients reserved on its rcpts windows
	msgs  int64     // messages reserved on its msgs windows
	over  bool      // an over-limit event was recorded for it in this transaction
	// counted: an over-limit attempt of this transaction counted towards
	// its suspension (once per transaction).
	counted bool
	// paceRes is the token its pace gave this message (pace.go): kept on
	// Commit and across a lapse, given back otherwise.
	paceRes *rate.Reservation
}

// overHit is one cap that a check found exceeded.
type overHit struct {
	ent    int
	metric uint8
	rate   config.Rate
	used   int64
	retry  time.Duration
}

// suspendRec is an automatic suspension to make durable after the locks
// are released.
type suspendRec struct {
	id    string
	susp  Suspension
	event Event
}

// tx implements Tx. It is used by one SMTP session at a time; mu is there
// because the engine's reserve_timeout sweep may release its reservations
// from another goroutine (lapse.go).
type tx struct {
	mu       sync.Mutex
	e        *Engine
	conf     *policyConf
	ents     []txEnt
	buf      [6]txEnt
	shardBuf [8]int
	hitBuf   [4]overHit
	tookBuf  [6]int // takePace's tokens of one call
	rcpts    int64  // recipients accepted so far (reserved, or bound for hold)
	msg      bool   // Message reserved one message
	holding  bool   // a Hold or Queue decision was given: the rest of the message goes to the hold spool
	holdDec  Decision
	done     bool
	// slot is the state whose release queue this message has a place in
	// since its Queue decision (slotShard its shard); Held keeps the place
	// for the spooled message, Abort gives it back.
	slot      *idState
	slotShard int
	// releasing marks a queued message's way out (release.go): it checks
	// windows, pace and suspensions, records nothing and is never queued.
	releasing bool
	// acting is the action of the decision settle is recording, for the
	// events and notifications it makes.
	acting Action
	// err: the counters of an identity could not be read (a damaged
	// file); every check then answers storeFailure.
	err error

	// reservedAt is when the reservations now held were taken (unix ns),
	// 0 while none are; lapsed says reserve_timeout released them, so the
	// next check takes them again (lapse.go).
	reservedAt int64
	lapsed     bool
	link       lapseLink
	lapseOn    *lapseList // the list t was last put on

	sampleID, sampleSubject string

	// Work for after the shard locks are released.
	postEvents   []Event
	postSuspends []suspendRec
	postNotes    []notification
}

// finished answers calls on a transaction that already ended.
var finished = Decision{Action: Defer, Limit: "policy transaction already finished"}

// storeFailure is the decision while an identity's counters cannot be
// read: defer, with the error for the front end (451 4.3.0, not a cap).
func (t *tx) storeFailure() Decision {
	d := Decision{Action: Defer, Limit: "counters unavailable", Err: t.err}
	t.e.metrics.decision(d, "")
	return d
}

// add resolves and references new identities, appending them to ents.
func (t *tx) add(ids []Identity) {
	for _, id := range ids {
		if id.ID == "" {
			continue
		}
		if id.Kind == "" {
			id.Kind = KindOf(id.ID)
		}
		if i := t.index(id.ID); i >= 0 {
			// Known already (e.g. uid:local from the socket, now with the
			// script from X-PHP-Originating-Script): keep one entry, learn
			// the script.
			if id.Script != "" && t.ents[i].id.Script != id.Script {
				t.ents[i].id.Script = id.Script
				t.e.noteScript(t.ents[i].st, t.ents[i].shard, id.Script)
			}
			continue
		}
		lim := t.conf.limitsFor(id.ID, id.Kind)
		st, si, err := t.e.acquire(id, lim)
		if err != nil {
			if t.err == nil {
				t.err = err
			}
			continue
		}
		t.ents = append(t.ents, txEnt{id: id, st: st, shard: si, lim: lim})
	}
}

// index returns the position of identity id in the transaction, or -1.
func (t *tx) index(id string) int {
	for i := range t.ents {
		if t.ents[i].id.ID == id {
			return i
		}
	}
	return -1
}

// sortEnts puts the identities strongest first.
func (t *tx) sortEnts() {
	// Insertion sort by strength: a handful of entries, stable.
	for i := 1; i < len(t.ents); i++ {
		for j := i; j > 0 && kindRank(t.ents[j].id.Kind) < kindRank(t.ents[j-1].id.Kind); j-- {
			t.ents[j], t.ents[j-1] = t.ents[j-1], t.ents[j]
		}
	}
}

func (t *tx) lock() []int {
	idx := t.shardBuf[:0]
	for i := range t.ents {
		idx = append(idx, t.ents[i].shard)
	}
	return t.e.lockShards(idx)
}

// evaluate checks the identities from ents[from:] for needR more recipients
// (the message then having total) and needM more messages. perMsg is the
// action for a message over max_rcpts_per_msg. It returns the enforce-mode
// decision and the caps found exceeded. Shard locks are held.
func (t *tx) evaluate(from int, now int64, needR, needM, total int64, perMsg Action) (Decision, []overHit) {
	hits := t.hitBuf[:0]
	var suspended, tooMany *txEnt
	var tooManyN int64
	for i := from; i < len(t.ents); i++ {
		ent := &t.ents[i]
		if ent.st.suspension != nil {
			if suspended == nil {
				suspended = ent
			}
			continue
		}
		lim := ent.lim
		if needR > 0 && lim.maxRcpts > 0 && total > lim.maxRcpts && tooMany == nil {
			tooMany, tooManyN = ent, lim.maxRcpts
		}
		for _, m := range [2]uint8{metricRcpts, metricMsgs} {
			need := needR
			if m == metricMsgs {
				need = needM
			}
			if need == 0 {
				continue
			}
			for _, r := range lim.rates(m) {
				w := ent.st.window(m, r.Window)
				if used := w.used(now); used+need > r.N {
					hits = append(hits, overHit{ent: i, metric: m, rate: r, used: used, retry: w.retryIn(now, r.N, need)})
				}
			}
		}
	}
	switch {
	case suspended != nil:
		return Decision{Action: Reject, Identity: suspended.id.ID, Limit: "suspended", Suspended: true}, hits
	case len(hits) > 0:
		// The cap that frees up last decides: its retry time is the true one.
		best := hits[0]
		for _, h := range hits[1:] {
			if h.retry > best.retry {
				best = h
			}
		}
		dec := Decision{
			Action:   t.ents[best.ent].lim.action,
			Identity: t.ents[best.ent].id.ID,
			Limit:    limitText(best.metric, best.rate.N, best.rate.Window),
			RetryIn:  best.retry,
		}
		switch {
		case t.releasing:
			dec.Action = Defer // not yet
		case dec.Action == Queue:
			dec = t.queueOrFull(best.ent, dec)
		case dec.Action == Accept: // noLimits has no caps to hit
			dec.Action = t.conf.overAction
		}
		return dec, hits
	case tooMany != nil:
		return Decision{Action: perMsg, Identity: tooMany.id.ID, Limit: perMsgText(tooManyN)}, hits
	}
	return t.smooth(from, now, needR, needM), hits
}

// settle applies what a refused check means to the identities: the last
// decision, over-limit events, throttle start, automatic suspension. It
// returns the decision to give, converted for observe mode. Shard locks
// are held.
func (t *tx) settle(dec Decision, hits []overHit, now time.Time) Decision {
	if dec.Action == Accept {
		return dec
	}
	ns := now.UnixNano()
	c := t.conf
	t.acting = dec.Action
	var deciding *txEnt
	for i := range t.ents {
		if t.ents[i].id.ID == dec.Identity {
			deciding = &t.ents[i]
			break
		}
	}
	if deciding != nil {
		st := deciding.st
		st.lastDecision = dec.Action.String() + ": " + dec.Text() + " (" + deciding.lim.rule + ")"
		if c.observe {
			st.lastDecision = "observe, would " + st.lastDecision
		}
		t.e.shards[deciding.shard].markDirty(st)
	}
	for _, h := range hits {
		ent := &t.ents[h.ent]
		if ent.over {
			continue
		}
		ent.over = true
		detail := t.overEvent(ent, h, now, ns)
		// Queued mail is smoothed, not refused: it is no offence towards
		// suspend_after, so a list over its caps keeps flowing.
		if target := t.suspendTarget(ent); target != nil && !target.counted && dec.Action != Queue {
			target.counted = true
			t.countOver(target, ent, h, detail, now, ns)
		}
	}
	if dec.Suspended && c.observe && deciding != nil && ns-deciding.st.lastLogged >= int64(eventLogSpacing) {
		deciding.st.lastLogged = ns
		t.postEvents = append(t.postEvents, t.event(deciding, EventObserve, now, "would reject: "+dec.Text()))
	}
	if !c.observe {
		return dec
	}
	obs := dec
	obs.Action, obs.Observed, obs.WouldBe = Accept, true, dec.Action
	return obs
}

// overEvent records that ent's identity was over a cap: its last
// over-limit time, the throttle_start and over_limit events and their
// notification. It returns the event's detail. Whether the attempt counts
// towards a suspension, and whose, is countOver's.
func (t *tx) overEvent(ent *txEnt, h overHit, now time.Time, ns int64) string {
	c := t.conf
	st := ent.st
	prev := st.lastOver
	st.lastOver = ns
	t.e.shards[ent.shard].markDirty(st)

	limit := limitText(h.metric, h.rate.N, h.rate.Window)
	detail := "over " + limit + " (used " + strconv.FormatInt(h.used, 10) + ", " + ent.lim.rule + ")"
	logSpaced := ns-st.lastLogged >= int64(eventLogSpacing)
	if logSpaced {
		st.lastLogged = ns
	}
	if c.observe {
		if logSpaced {
			t.postEvents = append(t.postEvents, t.event(ent, EventObserve, now, "would "+t.acting.String()+": "+detail))
		}
		return detail
	}
	if prev == 0 || ns-prev >= int64(quietSpan) {
		t.postEvents = append(t.postEvents, t.event(ent, EventThrottleStart, now, detail))
		t.postNotes = append(t.postNotes, t.note(EventThrottleStart, ent, h, now))
	}
	if logSpaced {
		t.postEvents = append(t.postEvents, t.event(ent, EventOverLimit, now, t.acting.String()+": "+detail))
	}
	return detail
}

// suspendTarget is the identity of the transaction towards whose
// suspension an over-limit attempt on hit counts (docs/design.md §10), or nil.
// An identity of a kind in suspend_kinds counts for itself. One of a weak
// kind (sender, domain: anyone can write them in MAIL FROM) that is not
// in suspend_kinds counts for the most specific strong identity of the
// message in suspend_kinds: the forger, never the address's real owner.
// A strong identity not in suspend_kinds counts for no one else: its cap
// is shared (a web server's or a NAT's address), and whoever tripped it
// last is not the one to stop.
func (t *tx) suspendTarget(hit *txEnt) *txEnt {
	c := t.conf
	kind := hit.id.Kind
	if c.suspendable[kindRank(kind)] {
		return hit
	}
	if config.StrongKind(kind) {
		return nil
	}
	// The most specific first: one script of an account, the login, the
	// account, the client address.
	for _, k := range [...]string{config.KindScript, config.KindUser, config.KindUID, config.KindIP} {
		if !c.suspendable[kindRank(k)] {
			continue
		}
		for i := range t.ents {
			if t.ents[i].id.Kind == k {
				return &t.ents[i]
			}
		}
	}
	return nil
}

// countOver counts one over-limit attempt (hit's cap h, described by
// detail) towards target's suspension, and suspends target once
// suspend_after attempts fall within 24h.
func (t *tx) countOver(target, hit *txEnt, h overHit, detail string, now time.Time, ns int64) {
	c := t.conf
	st := target.st
	keep := st.overTimes[:0]
	for _, ot := range st.overTimes {
		if ns-ot < int64(suspendSpan) {
			keep = append(keep, ot)
		}
	}
	if len(keep) == maxOverTimes {
		keep = keep[:copy(keep, keep[1:])]
	}
	st.overTimes = append(keep, ns)
	t.e.shards[target.shard].markDirty(st)
	if c.suspendAfter <= 0 || len(st.overTimes) < c.suspendAfter || st.suspension != nil {
		return
	}
	last := detail
	if target != hit {
		last = hit.id.ID + " " + detail
	}
	if c.observe {
		t.postEvents = append(t.postEvents, t.event(target, EventObserve, now,
			"would suspend: "+strconv.Itoa(len(st.overTimes))+" over-limit events in 24h, the last "+last))
		st.overTimes = st.overTimes[:0]
		return
	}
	reason := strconv.Itoa(len(st.overTimes)) + " over-limit events in 24h, the last " + last
	st.suspension = &Suspension{Reason: reason, At: now, Auto: true}
	t.postSuspends = append(t.postSuspends, suspendRec{id: st.id, susp: *st.suspension, event: t.event(target, EventSuspended, now, reason)})
	n := t.note(EventSuspended, target, h, now)
	t.postNotes = append(t.postNotes, n)
}

// note is the notification of kind about ent, over the cap of h.
func (t *tx) note(kind string, ent *txEnt, h overHit, now time.Time) notification {
	st := ent.st
	n := notification{
		Event: kind, Identity: ent.id.ID, Kind: ent.id.Kind, Account: st.account, Script: ent.id.Script,
		Limit: limitText(h.metric, h.rate.N, h.rate.Window), Used: h.used, OverLimitEvents: len(st.overTimes),
		Action: t.acting.String(), MessageID: t.sampleID, Subject: t.sampleSubject, Time: now,
	}
	if n.MessageID == "" && n.Subject == "" {
		n.MessageID, n.Subject = st.sampleID, st.sampleSubject
	}
	return n
}

func (t *tx) event(ent *txEnt, kind string, now time.Time, detail string) Event {
	acct := ent.st.account
	if ent.id.Account != "" {
		acct = ent.id.Account
	}
	return Event{Time: now, Kind: kind, Identity: ent.id.ID, Account: acct, Script: ent.id.Script, Detail: detail}
}

// afterUnlock does the work that must not run under shard locks: durable
// suspensions, events, notifications, logging and metrics.
func (t *tx) afterUnlock(dec Decision) Decision {
	e := t.e
	for _, s := range t.postSuspends {
		if err := e.storeSuspension(s.id, s.event); err != nil {
			e.log.Error("policy: storing suspension", "identity", s.id, "err", err)
		}
		e.metrics.suspended.Inc()
		e.log.Warn("policy: identity suspended", "identity", s.id, "reason", s.susp.Reason)
	}
	for _, ev := range t.postEvents {
		e.events.add(ev, true)
	}
	for _, n := range t.postNotes {
		e.notify.send(n, t.conf, e.now())
	}
	t.postSuspends, t.postEvents, t.postNotes = t.postSuspends[:0], t.postEvents[:0], t.postNotes[:0]
	if dec.Action != Accept || dec.Observed {
		action := dec.Action
		if dec.Observed {
			action = dec.WouldBe
		}
		msg := "policy: over a limit"
		if action == Queue {
			msg = "policy: queued" // over a cap, over a pace, or behind mail waiting
		}
		e.log.Info(msg, "identity", dec.Identity, "limit", dec.Limit, "action", action.String(),
			"observe", dec.Observed, "retry_in", dec.RetryIn, "reason", dec.Text())
	}
	e.metrics.decision(dec, t.kindOf(dec.Identity))
	return dec
}

func (t *tx) kindOf(id string) string {
	for i := range t.ents {
		if t.ents[i].id.ID == id {
			return t.ents[i].id.Kind
		}
	}
	return ""
}

// reserve adds needR recipients and needM messages to the reservations of
// ents[from:], taken at ns. Shard locks are held.
func (t *tx) reserve(from int, needR, needM, ns int64) {
	took := false
	for i := from; i < len(t.ents); i++ {
		ent := &t.ents[i]
		if needR > 0 && len(ent.lim.rcpts) > 0 {
			for _, r := range ent.lim.rcpts {
				ent.st.window(metricRcpts, r.Window).reserved += needR
			}
			ent.rcpts += needR
			took = true
		}
		if needM > 0 && len(ent.lim.msgs) > 0 {
			for _, r := range ent.lim.msgs {
				ent.st.window(metricMsgs, r.Window).reserved += needM
			}
			ent.msgs += needM
			took = true
		}
	}
	if took {
		t.noteReserved(ns)
	}
}

// release gives back every reservation and, when charge is set, records
// the message as sent at ns. It ends the transaction. Shard locks are held.
func (t *tx) release(charge bool, ns int64) {
	t.unreserve()
	for i := range t.ents {
		ent := &t.ents[i]
		st := ent.st
		if ent.paceRes != nil {
			if !charge {
				ent.paceRes.CancelAt(time.Unix(0, ns))
			}
			ent.paceRes = nil
		}
		if charge {
			for _, r := range ent.lim.rcpts {
				st.window(metricRcpts, r.Window).add(ns, t.rcpts)
			}
			for _, r := range ent.lim.msgs {
				st.window(metricMsgs, r.Window).add(ns, 1)
			}
		}
		st.refs--
		st.lastUsed = ns
		if charge {
			st.lastSeen = ns
			if t.sampleID != "" || t.sampleSubject != "" {
				st.sampleID, st.sampleSubject = t.sampleID, t.sampleSubject
			}
			t.e.shards[ent.shard].markDirty(st)
		}
	}
	t.done = true
}

// Check tells whether any identity is suspended.
func (t *tx) Check() Decision {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return finished
	}
	if t.err != nil {
		return t.storeFailure()
	}
	now := t.e.now()
	locked := t.lock()
	dec, hits := t.evaluate(0, now.UnixNano(), 0, 0, 0, Accept)
	dec = t.settle(dec, hits, now)
	t.e.unlockShards(locked)
	return t.afterUnlock(dec)
}

// revival is what a lapsed transaction must take again besides what a
// call adds: every recipient accepted so far and its message once
// Message reserved it. Zero while its reservations hold.
func (t *tx) revival() (needR, needM int64) {
	if !t.lapsed {
		return 0, 0
	}
	if t.msg {
		needM = 1
	}
	return t.rcpts, needM
}

// AddRcpt checks one more recipient against every identity and reserves it.
func (t *tx) AddRcpt() Decision {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return finished
	}
	if t.err != nil {
		return t.storeFailure()
	}
	if t.holding {
		t.rcpts++
		return t.afterUnlock(t.holdDec)
	}
	now := t.e.now()
	ns := now.UnixNano()
	locked := t.lock()
	t.expire(ns)
	needR, needM := t.revival()
	needR++
	dec, hits := t.evaluate(0, ns, needR, needM, t.rcpts+1, TooManyRcpts)
	dec = t.settle(dec, hits, now)
	t.accept(dec, 0, needR, needM, 1, 0, ns)
	t.e.unlockShards(locked)
	return t.afterUnlock(dec)
}

// accept updates the transaction for a decision that checked needR
// recipients and needM messages on ents[from:], of which addR recipients
// and addM messages are new to the transaction. Shard locks are held.
func (t *tx) accept(dec Decision, from int, needR, needM, addR, addM, ns int64) {
	switch dec.Action {
	case Accept:
		t.reserve(from, needR, needM, ns)
		t.rcpts += addR
		if addM > 0 {
			t.msg = true
		}
		if from == 0 {
			t.lapsed = false
		}
	case Hold:
		t.holding, t.holdDec = true, dec
		t.rcpts += addR
	case Queue:
		t.holding, t.holdDec = true, dec
		t.rcpts += addR
		t.takeSlot(dec.Identity)
	}
}

// AddIdentities adds identities learned from the headers and checks them
// for all recipients so far (and the message, once Message has reserved it).
func (t *tx) AddIdentities(ids ...Identity) Decision {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return finished
	}
	from := len(t.ents)
	t.add(ids)
	defer t.sortEnts() // after the new ones, at ents[from:], are settled
	if t.err != nil {
		return t.storeFailure()
	}
	if len(t.ents) == from {
		return Decision{Action: Accept}
	}
	if t.holding {
		return t.afterUnlock(t.holdDec)
	}
	var needM int64
	if t.msg {
		needM = 1
	}
	now := t.e.now()
	ns := now.UnixNano()
	locked := t.lock()
	if t.expire(ns) || t.lapsed {
		from = 0 // every identity takes its reservations again
	}
	dec, hits := t.evaluate(from, ns, t.rcpts, needM, t.rcpts, t.conf.fullAction)
	dec = t.settle(dec, hits, now)
	t.accept(dec, from, t.rcpts, needM, 0, 0, ns)
	t.e.unlockShards(locked)
	return t.afterUnlock(dec)
}

// Message checks and reserves one message against every identity's msgs caps.
func (t *tx) Message() Decision {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return finished
	}
	if t.err != nil {
		return t.storeFailure()
	}
	if t.holding {
		return t.afterUnlock(t.holdDec)
	}
	now := t.e.now()
	ns := now.UnixNano()
	locked := t.lock()
	t.expire(ns)
	if t.msg && !t.lapsed {
		t.e.unlockShards(locked)
		return Decision{Action: Accept}
	}
	needR, _ := t.revival()
	dec, hits := t.evaluate(0, ns, needR, 1, t.rcpts, t.conf.overAction)
	dec = t.settle(dec, hits, now)
	t.accept(dec, 0, needR, 1, 0, 1, ns)
	t.e.unlockShards(locked)
	return t.afterUnlock(dec)
}

// Recheck checks a transaction again at the end of its DATA: when its
// reservations lapsed (reserve_timeout) it takes them again under the caps
// as they are now; otherwise there is nothing to check.
func (t *tx) Recheck() Decision {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return finished
	}
	if t.err != nil {
		return t.storeFailure()
	}
	if t.holding {
		return Decision{Action: Accept}
	}
	now := t.e.now()
	ns := now.UnixNano()
	locked := t.lock()
	t.expire(ns)
	if !t.lapsed {
		t.e.unlockShards(locked)
		return Decision{Action: Accept}
	}
	needR, needM := t.revival()
	dec, hits := t.evaluate(0, ns, needR, needM, t.rcpts, t.conf.overAction)
	dec = t.settle(dec, hits, now)
	t.accept(dec, 0, needR, needM, 0, 0, ns)
	t.e.unlockShards(locked)
	return t.afterUnlock(dec)
}

// Commit charges the message to every identity: the hand-off succeeded.
func (t *tx) Commit() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return
	}
	ns := t.e.now().UnixNano()
	locked := t.lock()
	t.release(true, ns)
	t.e.unlockShards(locked)
	t.giveSlotBack() // handed off, not queued: nothing waits
}

// Held releases the reservations without charging them and records that
// the message went to the hold spool under holdID.
func (t *tx) Held(holdID string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return
	}
	now := t.e.now()
	locked := t.lock()
	t.release(false, now.UnixNano())
	var ev Event
	if t.slot != nil {
		// Queued: the spooled message keeps its place. No event per
		// message (a paced list would flood the log); the cap's
		// over_limit events and the page's release queue tell it.
		t.slot = nil
	} else if len(t.ents) > 0 {
		ent := &t.ents[0]
		for i := range t.ents {
			if t.ents[i].id.ID == t.holdDec.Identity {
				ent = &t.ents[i]
			}
		}
		detail := "held as " + holdID
		if txt := t.holdDec.Text(); txt != "" {
			detail += ": " + txt
		}
		ev = t.event(ent, EventHeld, now, detail)
	}
	t.e.unlockShards(locked)
	if ev.Kind != "" {
		t.e.events.add(ev, true)
	}
}

// Abort releases every reservation (RSET, disconnect, failed hand-off),
// and the message's place in a release queue.
func (t *tx) Abort() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return
	}
	ns := t.e.now().UnixNano()
	locked := t.lock()
	t.release(false, ns)
	t.e.unlockShards(locked)
	t.giveSlotBack()
}

// Identities lists the transaction's identities, strongest first.
func (t *tx) Identities() []Identity {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]Identity, len(t.ents))
	for i := range t.ents {
		out[i] = t.ents[i].id
	}
	return out
}

// SetSample gives the Message-ID and Subject of the message, quoted in
// notifications about its identities.
func (t *tx) SetSample(messageID, subject string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(subject) > maxSubject {
		subject = subject[:maxSubject]
	}
	t.sampleID, t.sampleSubject = messageID, subject
}
