package policy

import (
	"encoding/binary"
	"time"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// The identity table in memory is a read-through cache of bbolt's
// counters bucket. Resident are the identities in use: those with an open
// transaction, those changed since the last flush, suspended ones (loaded
// by New, never evicted), and those used within residentSpan. Everything
// else lives in bbolt only and is read back, exactly, on its next message:
// bbolt holds every window's buckets, so an evicted identity loses nothing.
// A miss costs one point read of bbolt (a few µs), so New loads nothing
// else: loading recently active identities would scan the whole file,
// mapping all of it into relay's RSS, to save that read.
//
// Invariants:
//   - memory is authoritative for a resident identity; bbolt has its
//     state as of the last flush;
//   - only a flushed (not dirty), unreferenced, unsuspended state is
//     evicted, and never while a flush is writing (sweep holds flushMu),
//     so bbolt always holds what an evicted state had;
//   - a miss reads bbolt without a shard lock, then inserts under it; if
//     the identity became resident meanwhile, that state wins; if the shard
//     dropped any state meanwhile (the read may predate a flush of it), the
//     read is retried.

// Residency spans (part of the behaviour, see docs/performance.md).
const (
	// residentSpan is how long an identity stays in memory after its last
	// use (its last transaction ended, or an admin action).
	residentSpan = 10 * time.Minute
	// expireEvery is how many sweeps pass between scans of bbolt for
	// identities idle for idleSpan that are not resident.
	expireEvery = 60
)

// lockState returns the state of id with its shard locked (the caller
// unlocks sh.mu), reading it from bbolt into memory when it is stored but
// not resident. When id is neither, it is created if create is set, else
// the state is nil. kind is set on a state read or created here. An error
// (the file is damaged where id's record is) comes with no lock held and
// no state.
func (e *Engine) lockState(id, kind string, create bool) (*idState, int, error) {
	si := e.shardOf(id)
	sh := &e.shards[si]
	sh.mu.Lock()
	for {
		if st := sh.states[id]; st != nil {
			return st, si, nil
		}
		gen := sh.dropped
		sh.mu.Unlock()
		now := e.now().UnixNano()
		st, err := e.readStored(id, now)
		if err != nil {
			return nil, si, err
		}
		sh.mu.Lock()
		if cur := sh.states[id]; cur != nil {
			return cur, si, nil // a racing miss inserted it first
		}
		if sh.dropped != gen {
			continue // a state left memory while we read: ours may be stale
		}
		if st == nil {
			if !create {
				return nil, si, nil
			}
			st = &idState{id: id}
		}
		st.kind = kind
		st.lastUsed = now
		sh.states[id] = st
		return st, si, nil
	}
}

// readStored decodes id's stored state, or returns nil when none is
// stored. It runs in its own read transaction: callers hold no shard lock
// and no bbolt transaction (a read transaction open in a goroutine that
// then waits on an Update can deadlock on mmap growth). A record it cannot
// decode is logged and taken as none (the next flush replaces it); a
// damaged file is an error.
func (e *Engine) readStored(id string, now int64) (*idState, error) {
	var st *idState
	var decodeErr error
	err := e.view(func(btx *bolt.Tx) error {
		v := btx.Bucket(bucketCounters).Get([]byte(id))
		if v == nil {
			return nil
		}
		st, decodeErr = decodeState(id, v, now) // copies out of the mmap
		return nil
	})
	if err != nil {
		e.log.Error("policy: reading counters", "identity", id, "err", err)
		return nil, err
	}
	if decodeErr != nil {
		// Unreadable: start afresh; the next flush overwrites the record.
		e.log.Error("policy: reading counters", "identity", id, "err", decodeErr)
		return nil, nil
	}
	return st, nil
}

// storedTimes reads lastSeen and lastOver from the head of a state record
// without decoding the rest; ok is false for a record decodeState would
// refuse outright.
func storedTimes(v []byte) (lastSeen, lastOver int64, ok bool) {
	if len(v) == 0 || v[0] != stateVersion {
		return 0, 0, false
	}
	lastSeen, n := binary.Varint(v[1:])
	if n <= 0 {
		return 0, 0, false
	}
	lastOver, m := binary.Varint(v[1+n:])
	return lastSeen, lastOver, m > 0
}

// resident reports whether id is in memory now.
func (e *Engine) resident(id string) bool {
	sh := &e.shards[e.shardOf(id)]
	sh.mu.Lock()
	_, ok := sh.states[id]
	sh.mu.Unlock()
	return ok
}

// evictable reports whether st may leave memory at now: bbolt holds all
// of it and nothing needs it resident. The shard lock is held.
func (st *idState) evictable(now int64) bool {
	return st.refs == 0 && !st.dirty && st.suspension == nil && now-st.lastUsed >= int64(residentSpan) && !st.keepResident(now)
}

// expireStored deletes from bbolt the identities that are not resident and
// have been idle for idleSpan (the resident ones are sweep's). flushMu is
// held, so no flush writes meanwhile; a state read back by a racing miss
// is idle, and written again by the flush after it is charged.
func (e *Engine) expireStored() error {
	now := e.now().UnixNano()
	var idle [][]byte
	err := e.view(func(btx *bolt.Tx) error {
		defer dropMapped(btx)
		return btx.Bucket(bucketCounters).ForEach(func(k, v []byte) error {
			lastSeen, lastOver, ok := storedTimes(v)
			if ok && (now-lastSeen < int64(idleSpan) || now-lastOver < int64(suspendSpan)) {
				return nil // recent: not idle whatever its windows hold
			}
			if e.resident(string(k)) {
				return nil
			}
			// An unreadable record stays for the admin to see; a miss
			// logs it and the next flush of that identity replaces it.
			if st, err := decodeState(string(k), v, now); err == nil && st.idle(now) {
				idle = append(idle, append([]byte(nil), k...))
			}
			return nil
		})
	})
	if err != nil || len(idle) == 0 {
		return err
	}
	return e.update(func(btx *bolt.Tx) error {
		b := btx.Bucket(bucketCounters)
		for _, k := range idle {
			if e.resident(string(k)) {
				continue // read back since the scan: memory decides
			}
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
}

// storedSenders adds to out the admin view of every identity stored in
// bbolt that is not resident and not idle, filtered by state. Identities
// that become resident during the scan are listed once: either from
// memory (resident before) or from here.
func (e *Engine) storedSenders(out []Sender, state string, listed map[string]struct{}) []Sender {
	c := e.conf.Load()
	now := e.now()
	ns := now.UnixNano()
	err := e.view(func(btx *bolt.Tx) error {
		defer dropMapped(btx)
		return btx.Bucket(bucketCounters).ForEach(func(k, v []byte) error {
			if _, ok := listed[string(k)]; ok {
				return nil
			}
			st, err := decodeState(string(k), v, ns)
			if err != nil || st.idle(ns) {
				return nil
			}
			if s := e.snapshot(st, c, now); state == "" || state == StateAll || state == s.State {
				out = append(out, s)
			}
			return nil
		})
	})
	if err != nil {
		e.log.Error("policy: listing stored counters", "err", err)
	}
	return out
}

// dropMapped takes the pages of bbolt's file out of relay's resident set
// after a scan of the whole counters bucket, which would otherwise leave
// all of the file mapped (53 MB at 100,000 identities). bbolt maps the file
// read-only and shared, so madvise(2) MADV_DONTNEED loses nothing: the
// pages stay in the page cache and a later read faults them back in. It
// runs inside the scan's read transaction, which keeps bbolt from
// remapping meanwhile. Best effort: an error only leaves the pages mapped.
func dropMapped(btx *bolt.Tx) {
	_, _, _ = unix.Syscall(unix.SYS_MADVISE, btx.DB().Info().Data, uintptr(btx.Size()), unix.MADV_DONTNEED)
}

// storedSender is the admin view of id from bbolt when it is stored and
// not idle.
func (e *Engine) storedSender(id string) (Sender, bool) {
	now := e.now()
	st, _ := e.readStored(id, now.UnixNano()) // an error is logged there
	if st == nil || st.idle(now.UnixNano()) {
		return Sender{}, false
	}
	return e.snapshot(st, e.conf.Load(), now), true
}

// residentCount is how many identities are in memory.
func (e *Engine) residentCount() int {
	n := 0
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		n += len(sh.states)
		sh.mu.Unlock()
	}
	return n
}
