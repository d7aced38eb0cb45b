package policy

import (
	"time"

	"golang.org/x/time/rate"

	"relay/config"
)

// Smoothing: the release queue and pace.
//
// An identity whose caps say "queue" (over_limit or its allow entry's
// action), or whose pace ("N/D", a token bucket of golang.org/x/time/rate
// with bursts of N) has no token for a message, gets the decision Queue:
// the front end answers 250, keeps the message in the hold spool marked
// with the identity, and its releaser hands it off later through
// BeginRelease (release.go), which checks the same windows, pace and
// suspensions and charges them as the live path does. These decisions are
// part of evaluate, so whatever replays the live path sees them.
//
// Order: while an identity has mail waiting (idState.queued > 0, counting
// the places open transactions took with their Queue decision), every new
// message of it is queued behind, even under its caps, so that its mail
// goes out in the order it came. Beyond [policy] queue_max waiting
// messages the decision is the over_limit reply instead, defer standing
// for queue (policyConf.fullAction).

// smooth is evaluate's last step, once no cap, suspension or per-message
// limit refused: a message of an identity with mail waiting joins it; at
// the message (needM > 0) every pace must have a token for it. Release
// transactions only take the tokens. Shard locks are held.
func (t *tx) smooth(from int, now int64, needR, needM int64) Decision {
	if !t.releasing && (needR > 0 || needM > 0) {
		for i := from; i < len(t.ents); i++ {
			if q := t.ents[i].st.queued; q > 0 {
				return t.queueOrFull(i, Decision{Action: Queue, Identity: t.ents[i].id.ID, Behind: q})
			}
		}
	}
	if needM == 0 {
		return Decision{Action: Accept}
	}
	dec := t.takePace(from, time.Unix(0, now))
	switch {
	case dec.Action == Accept:
	case t.releasing:
		dec.Action = Defer // not yet
	default:
		dec = t.queueOrFull(t.index(dec.Identity), dec)
	}
	return dec
}

// takePace takes one token of every pace of ents[from:] for the message;
// if one has none now, it gives back those taken and answers Queue with
// the wait. Shard locks are held.
func (t *tx) takePace(from int, now time.Time) Decision {
	took := t.tookBuf[:0]
	for i := from; i < len(t.ents); i++ {
		ent := &t.ents[i]
		if !ent.lim.pace.On() || ent.paceRes != nil {
			continue // no pace, or its token was taken before (a check after a lapse)
		}
		r := ent.st.paceLimiter(ent.lim.pace.Rate, now).ReserveN(now, 1)
		if wait := r.DelayFrom(now); !r.OK() || wait > 0 {
			r.CancelAt(now)
			for _, j := range took {
				t.ents[j].paceRes.CancelAt(now)
				t.ents[j].paceRes = nil
			}
			return Decision{Action: Queue, Identity: ent.id.ID, Limit: paceText(ent.lim.pace.Rate), RetryIn: wait, Paced: true}
		}
		ent.paceRes = r
		took = append(took, i)
	}
	return Decision{Action: Accept}
}

// paceLimiter returns st's token bucket for the pace r, made (full) at
// first use and retuned when a reload changed r. The shard lock is held.
func (st *idState) paceLimiter(r config.Rate, now time.Time) *rate.Limiter {
	limit := rate.Limit(float64(r.N) / r.Window.Seconds())
	switch {
	case st.pace == nil:
		st.pace = rate.NewLimiter(limit, int(r.N))
	case st.paceRate != r:
		st.pace.SetLimitAt(now, limit)
		st.pace.SetBurstAt(now, int(r.N))
	}
	st.paceRate = r
	return st.pace
}

// queueOrFull gives a Queue decision for ents[i]'s release queue, or the
// over_limit reply (defer for queue) when that queue is full. Shard locks
// are held.
func (t *tx) queueOrFull(i int, dec Decision) Decision {
	st := t.ents[i].st
	if st.queued < t.conf.queueMax {
		return dec
	}
	dec.Action = t.conf.fullAction
	if dec.Limit == "" {
		dec.Limit = queueFullText(st.queued)
	}
	return dec
}

// takeSlot gives the transaction a place in the release queue of the
// identity id (a Queue decision). Shard locks are held.
func (t *tx) takeSlot(id string) {
	i := t.index(id)
	if i < 0 || t.slot != nil {
		return
	}
	t.slot, t.slotShard = t.ents[i].st, t.ents[i].shard
	t.slot.queued++
}

// giveSlotBack returns a place taken by takeSlot that no spooled message
// took over (the transaction ended otherwise). No lock is held.
func (t *tx) giveSlotBack() {
	if t.slot == nil {
		return
	}
	sh := &t.e.shards[t.slotShard]
	sh.mu.Lock()
	if t.slot.queued > 0 {
		t.slot.queued--
	}
	sh.mu.Unlock()
	t.slot = nil
}

// keepResident reports whether st holds smoothing state that bbolt does
// not: mail waiting in its release queue, or a pace bucket not yet full
// again (dropping it would give the identity a fresh burst early). The
// shard lock is held.
func (st *idState) keepResident(now int64) bool {
	if st.queued > 0 {
		return true
	}
	return st.pace != nil && st.pace.TokensAt(time.Unix(0, now)) < float64(st.pace.Burst())
}
