package policy

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"relay/internal/boltsafe"
)

// DBFile is the name of the bbolt file in data_dir.
const DBFile = "relay.db"

// Buckets of package policy; the database is shared with the hold spool.
var (
	bucketCounters    = []byte("policy.counters")    // identity id -> encoded idState
	bucketSuspensions = []byte("policy.suspensions") // identity id -> JSON Suspension
	bucketEvents      = []byte("policy.events")      // big-endian seq -> JSON Event
)

// OpenDB opens (creating if needed) dataDir/relay.db, creating dataDir with
// mode 0711 (others may reach qq.settings there by name, as relay-qq must,
// but not list the directory; everything else in it is 0600 or 0700), and
// checks the whole file before anything uses it. It never
// writes to or replaces an existing file that is not a sound bbolt
// database: one that is empty (bbolt would make a fresh database of it,
// dropping every suspension), cut short, damaged anywhere (tx.Check reads
// every page) or locked by another process is an error of one line that
// names the file and says what to do.
func OpenDB(dataDir string) (*bolt.DB, error) {
	if err := os.MkdirAll(dataDir, 0o711); err != nil {
		return nil, fmt.Errorf("creating data_dir: %w", err)
	}
	path := filepath.Join(dataDir, DBFile)
	damaged := func(why any) error {
		return fmt.Errorf("database %s is damaged (%s); relay did not start and left the file untouched: "+
			"restore it from a backup, or move it aside (relay then starts with no counters and no suspensions)", path, damageText(why))
	}
	fi, err := os.Stat(path)
	switch {
	case err == nil && fi.Size() == 0:
		return nil, damaged("it is empty, 0 bytes")
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("opening database %s: %w", path, err)
	}
	var db *bolt.DB
	err = boltsafe.Do(func() (err error) {
		db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
		return err
	})
	switch {
	case err == nil:
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("database %s is locked by another relay process", path)
	case errors.Is(err, boltsafe.ErrDamaged), errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrVersionMismatch),
		errors.Is(err, berrors.ErrChecksum), errors.Is(err, berrors.ErrInvalidMapping):
		return nil, damaged(err)
	default:
		return nil, fmt.Errorf("opening database %s: %w", path, err)
	}
	if err := checkDB(db, path); err != nil {
		db.Close()
		return nil, damaged(err)
	}
	return db, nil
}

// damageText is why, on one line, without the words of a Go panic (bbolt
// reports many kinds of damage as panics; they are not relay's).
func damageText(why any) string {
	s := fmt.Sprint(why)
	s = strings.TrimPrefix(s, boltsafe.ErrDamaged.Error()+": ")
	s = strings.ReplaceAll(s, "panic: ", "")
	return strings.Join(strings.Fields(s), " ")
}

// checkDB reads every page of db: the file must hold all the pages its
// meta page counts (a shorter one would fault), and bbolt's consistency
// check must find nothing. Only the first problem is returned.
func checkDB(db *bolt.DB, path string) error {
	return boltsafe.View(db, func(btx *bolt.Tx) error {
		defer dropMapped(btx)
		fi, err := os.Stat(path)
		if err != nil {
			return err
		}
		if fi.Size() < btx.Size() {
			return fmt.Errorf("the file has %d bytes, its pages need %d: it was cut short", fi.Size(), btx.Size())
		}
		var first error
		for err := range btx.Check() { // drained: the checker goroutine uses btx
			if first == nil {
				first = err
			}
		}
		return first
	})
}

// load reads into memory the suspensions with their identities' counters,
// and the events. Other counters stay in bbolt until their identity's next
// message (see cache.go): New reads no page of them.
func (e *Engine) load() error {
	now := e.now().UnixNano()
	return e.update(func(btx *bolt.Tx) error {
		for _, name := range [][]byte{bucketCounters, bucketSuspensions, bucketEvents} {
			if _, err := btx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		var err error
		if e.rcptSecret, err = loadRcptKey(btx); err != nil {
			return err
		}
		counters := btx.Bucket(bucketCounters)
		err = btx.Bucket(bucketSuspensions).ForEach(func(k, v []byte) error {
			var s Suspension
			if err := json.Unmarshal(v, &s); err != nil {
				return fmt.Errorf("policy suspension of %q: %v", k, err)
			}
			if v := counters.Get(k); v != nil {
				st, err := decodeState(string(k), v, now)
				if err != nil {
					return fmt.Errorf("policy counters of %q: %v", k, err)
				}
				st.lastUsed = now
				e.shards[e.shardOf(st.id)].states[st.id] = st
			}
			st := e.stateLocked(string(k))
			st.suspension = &s
			if m := e.readMemory(btx, st.id); m != nil {
				st.mem = *m
			}
			return nil
		})
		if err != nil {
			return err
		}
		return btx.Bucket(bucketEvents).ForEach(func(k, v []byte) error {
			var ev Event
			if len(k) != 8 || json.Unmarshal(v, &ev) != nil {
				return fmt.Errorf("policy event %x: not a valid record", k)
			}
			ev.Seq = binary.BigEndian.Uint64(k)
			e.events.load(ev)
			return nil
		})
	})
}

// stateLocked returns the state of id, creating it; used at load, before
// any concurrency.
func (e *Engine) stateLocked(id string) *idState {
	sh := &e.shards[e.shardOf(id)]
	st := sh.states[id]
	if st == nil {
		st = &idState{id: id, kind: KindOf(id), lastUsed: e.now().UnixNano()}
		sh.states[id] = st
	}
	return st
}

// flush writes changed identities, new events and the attached parts'
// changes (AttachFlushPart) in one transaction. It is the only writer of
// counters, so counting never waits for a disk sync.
func (e *Engine) flush() error {
	e.flushMu.Lock()
	defer e.flushMu.Unlock()
	type put struct {
		key string
		val []byte
	}
	var puts []put
	var dels []string
	var mems []putMemory
	now := e.now().UnixNano()
	keepDays := e.conf.Load().memoryKeepDays()
	parts := e.lockParts() // until the counters they produced are taken
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		dels = append(dels, sh.deleted...)
		sh.deleted = sh.deleted[:0]
		for _, st := range sh.dirty {
			st.dirty = false
			if sh.states[st.id] != st {
				continue // dropped (and maybe recreated) since
			}
			puts = append(puts, put{st.id, encodeState(st, now)})
			if m, ok := takeMemory(st, now, keepDays); ok {
				mems = append(mems, m)
			}
		}
		sh.dirty = sh.dirty[:0]
		sh.mu.Unlock()
	}
	e.unlockParts()
	evs := e.events.takePending()
	if len(puts) == 0 && len(dels) == 0 && len(evs) == 0 && !partsChanged(parts) {
		partsDone(parts, true)
		return nil
	}
	slices.SortFunc(mems, func(a, b putMemory) int { return strings.Compare(a.key, b.key) })
	// In key order: bbolt inserts into a leaf with a copy of its tail, so
	// random order costs quadratic time on a flush of many identities.
	slices.SortFunc(puts, func(a, b put) int { return strings.Compare(a.key, b.key) })
	slices.Sort(dels)
	err := e.update(func(btx *bolt.Tx) error {
		b := btx.Bucket(bucketCounters)
		for _, id := range dels {
			if err := b.Delete([]byte(id)); err != nil {
				return err
			}
		}
		for _, p := range puts {
			if err := b.Put([]byte(p.key), p.val); err != nil {
				return err
			}
		}
		rb := btx.Bucket(bucketRecipients)
		for _, m := range mems {
			if err := rb.Put([]byte(m.key), m.val); err != nil {
				return err
			}
		}
		if err := writeParts(btx, parts); err != nil {
			return err
		}
		return putEvents(btx, evs)
	})
	partsDone(parts, err == nil)
	if err != nil {
		// Keep the work for the next flush: mark the states dirty again.
		for _, p := range puts {
			sh := &e.shards[e.shardOf(p.key)]
			sh.mu.Lock()
			if st := sh.states[p.key]; st != nil {
				sh.markDirty(st)
				if st.mem.slots != nil {
					st.mem.dirty = true // write it again too
				}
			}
			sh.mu.Unlock()
		}
		e.events.mu.Lock()
		e.events.pending = append(evs, e.events.pending...)
		e.events.mu.Unlock()
		return err
	}
	return nil
}

// putEvents stores events and trims the bucket to the newest maxEvents.
func putEvents(btx *bolt.Tx, evs []Event) error {
	if len(evs) == 0 {
		return nil
	}
	b := btx.Bucket(bucketEvents)
	var key [8]byte
	for _, ev := range evs {
		v, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		binary.BigEndian.PutUint64(key[:], ev.Seq)
		if err := b.Put(key[:], v); err != nil {
			return err
		}
	}
	last := evs[len(evs)-1].Seq
	if last <= maxEvents {
		return nil
	}
	c := b.Cursor()
	for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k) <= last-maxEvents; k, _ = c.First() {
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

// storeSuspension makes id's suspension as it is in memory now (set or
// lifted), and the event about it, durable before returning. Writers are
// serialised and each writes the current state, so the file always ends
// up agreeing with memory.
func (e *Engine) storeSuspension(id string, ev Event) error {
	ev = e.events.add(ev, false)
	e.suspMu.Lock()
	defer e.suspMu.Unlock()
	sh := &e.shards[e.shardOf(id)]
	sh.mu.Lock()
	var v []byte
	var err error
	if st := sh.states[id]; st != nil && st.suspension != nil {
		v, err = json.Marshal(st.suspension)
	}
	sh.mu.Unlock()
	if err != nil {
		return err
	}
	return e.update(func(btx *bolt.Tx) error {
		b := btx.Bucket(bucketSuspensions)
		if v == nil {
			if err := b.Delete([]byte(id)); err != nil {
				return err
			}
		} else if err := b.Put([]byte(id), v); err != nil {
			return err
		}
		return putEvents(btx, []Event{ev})
	})
}

// State record, version 1, all integers varint-encoded:
//
//	version(1) lastSeen lastOver lastLogged
//	nOver {overTime}
//	account nScripts {script} sampleID sampleSubject lastDecision (length-prefixed strings)
//	nWindows {metric(byte) length width nBuckets {idx n}}
//
// Windows are keyed by metric and length, never by a limit's N.
const stateVersion = 1

func encodeState(st *idState, now int64) []byte {
	b := make([]byte, 0, 64+16*len(st.overTimes))
	b = append(b, stateVersion)
	b = binary.AppendVarint(b, st.lastSeen)
	b = binary.AppendVarint(b, st.lastOver)
	b = binary.AppendVarint(b, st.lastLogged)
	b = binary.AppendUvarint(b, uint64(len(st.overTimes)))
	for _, t := range st.overTimes {
		b = binary.AppendVarint(b, t)
	}
	b = appendString(b, st.account)
	b = binary.AppendUvarint(b, uint64(len(st.scripts)))
	for _, s := range st.scripts {
		b = appendString(b, s)
	}
	b = appendString(b, st.sampleID)
	b = appendString(b, st.sampleSubject)
	b = appendString(b, st.lastDecision)
	n := 0
	for i := range st.windows {
		if st.windows[i].prune(now); len(st.windows[i].buckets) > 0 {
			n++
		}
	}
	b = binary.AppendUvarint(b, uint64(n))
	for i := range st.windows {
		w := &st.windows[i]
		if len(w.buckets) == 0 {
			continue
		}
		b = append(b, w.metric)
		b = binary.AppendVarint(b, int64(w.length))
		b = binary.AppendVarint(b, w.width)
		b = binary.AppendUvarint(b, uint64(len(w.buckets)))
		for _, bk := range w.buckets {
			b = binary.AppendVarint(b, bk.idx)
			b = binary.AppendVarint(b, bk.n)
		}
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// stateReader decodes a state record; the first error sticks.
type stateReader struct {
	b   []byte
	err error
}

func (r *stateReader) varint() int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.err = errors.New("truncated record")
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *stateReader) count(max int) int {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	// Every counted item takes at least one byte of what follows the count.
	if n <= 0 || v > uint64(max) || v > uint64(len(r.b)-n) {
		r.err = errors.New("bad count in record")
		return 0
	}
	r.b = r.b[n:]
	return int(v)
}

func (r *stateReader) string() string {
	n := r.count(len(r.b))
	if r.err != nil {
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}

func (r *stateReader) byte() byte {
	if r.err != nil || len(r.b) == 0 {
		r.err = errors.New("truncated record")
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func decodeState(id string, v []byte, now int64) (*idState, error) {
	if len(v) == 0 || v[0] != stateVersion {
		return nil, errors.New("unknown record version")
	}
	r := &stateReader{b: v[1:]}
	st := &idState{id: id, kind: KindOf(id)}
	st.lastSeen = r.varint()
	st.lastOver = r.varint()
	st.lastLogged = r.varint()
	if n := r.count(maxOverTimes); n > 0 {
		st.overTimes = make([]int64, n)
		for i := range st.overTimes {
			st.overTimes[i] = r.varint()
		}
	}
	st.account = r.string()
	for n := r.count(maxScripts); n > 0; n-- {
		st.scripts = append(st.scripts, r.string())
	}
	st.sampleID = r.string()
	st.sampleSubject = r.string()
	st.lastDecision = r.string()
	if n := r.count(len(r.b)); n > 0 {
		st.windows = make([]window, 0, n) // n <= len(v): bounded by the record
	}
	for n := cap(st.windows); n > 0 && r.err == nil; n-- {
		metric := r.byte()
		length := time.Duration(r.varint())
		width := r.varint()
		if r.err == nil && (metric >= numMetrics || length <= 0 || width != newWindow(metric, length).width) {
			r.err = errors.New("bad window in record")
		}
		w := newWindow(metric, length)
		nb := r.count(len(r.b))
		if nb > 0 {
			w.buckets = make([]bucket, 0, nb)
		}
		for ; nb > 0 && r.err == nil; nb-- {
			idx, cnt := r.varint(), r.varint()
			if k := len(w.buckets); cnt <= 0 || (k > 0 && idx <= w.buckets[k-1].idx) {
				r.err = errors.New("bad bucket in record")
				break
			}
			w.buckets = append(w.buckets, bucket{idx: idx, n: cnt})
			w.sum += cnt
		}
		w.prune(now)
		st.windows = append(st.windows, w)
	}
	if r.err == nil && len(r.b) != 0 {
		r.err = errors.New("trailing bytes in record")
	}
	return st, r.err
}
