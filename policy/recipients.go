package policy

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
)

// First-time recipients (DESIGN.md §12).
//
// An identity whose caps include new_rcpts keeps a memory of the
// recipients it sent to: per recipient a 32-bit keyed hash of the address
// and the day (UTC) it was last handed off to. new_rcpts windows count
// the recipients that are not in it, or were last sent to more than
// policy.recipient_memory ago. A recipient becomes known only when a
// message to it was handed off for that identity (Commit): refused, held
// and aborted attempts teach nothing.
//
// Exact under concurrency like the other caps: a transaction that adds a
// recipient unknown to the identity holds it as pending in the memory,
// and the first hold of a key reserves one slot on the new_rcpts windows.
// A second transaction racing to the same address shares that
// reservation instead of taking another, so the address counts once; the
// first commit makes it known and charges it, the last release of an
// uncommitted key frees the slot.
//
// The memory lives with the identity's state in memory (loaded with it,
// evicted with it) and in its own bbolt bucket, written by the flush like
// the counters; it outlives the counters, which go after a day idle, and
// is deleted once its newest entry is older than recipient_memory. At
// most maxRemembered recipients are kept per identity; beyond, the one
// sent to longest ago is forgotten (and would count as new again).

// Memory bounds and record format.
const (
	// maxRemembered bounds one identity's memory: 60 KB on disk, 128 KB
	// in RAM while the identity is resident.
	maxRemembered = 10000
	dayNanos      = int64(24 * time.Hour)
	// memVersion is the first byte of a memory record:
	//	version(1) newestDay(uint16 BE) count(uvarint) {key(uint32 BE) day(uint16 BE)}
	// entries in ascending key order, each key once and never 0.
	memVersion = 1
	memEntry   = 6
	// defaultMemoryDays is recipient_memory when a config leaves it zero.
	defaultMemoryDays = 30
)

// Buckets of the recipient memory.
var (
	bucketRecipients = []byte("policy.recipients") // identity id -> memory record
	bucketMeta       = []byte("policy.meta")       // metaRcptKey -> the hash key
	metaRcptKey      = []byte("recipient-hash-key")
)

// rcptKeyLen is the length of the secret that keys recipient hashes: a
// sender who does not know it cannot make a new address collide with one
// it has written to before.
const rcptKeyLen = 16

// rcptMemory is one identity's memory. The shard lock of its identity
// guards it.
//
// The recipients are an open-addressing table with linear probing: slots
// hold key<<32 | day, 0 is an empty slot (key 0 is stored as 1: a hash
// collision more, one in 2^32). A lookup reads one or two cache lines of
// one identity's table, where a binary search over a sorted array would
// miss the cache about ten times: the check runs for every identity of
// every recipient.
type rcptMemory struct {
	slots     []uint64         // len a power of two, at most 3/4 used; nil when empty
	n         int              // entries in slots
	pending   []pendingRcpt    // recipients open transactions hold
	pendIdx   map[uint32]int32 // key -> index in pending, once it is long
	reservedN int64            // pending keys holding a slot on the new_rcpts windows
	dirty     bool             // changed since the last flush
}

// pendingRcpt is a recipient held by open transactions, not yet known.
type pendingRcpt struct {
	key      uint32
	refs     int32 // holds by open transactions
	reserved bool  // holds a slot on the new_rcpts windows
}

// pendIndexAt is how many pending recipients a memory searches in order
// before it keeps an index of them (a message to thousands).
const pendIndexAt = 32

// findPending returns the index of key in pending, or -1.
func (m *rcptMemory) findPending(key uint32) int {
	if m.pendIdx != nil {
		if i, ok := m.pendIdx[key]; ok {
			return int(i)
		}
		return -1
	}
	for i := range m.pending {
		if m.pending[i].key == key {
			return i
		}
	}
	return -1
}

// addPending appends a pending recipient and returns its index.
func (m *rcptMemory) addPending(key uint32) int {
	m.pending = append(m.pending, pendingRcpt{key: key})
	i := len(m.pending) - 1
	switch {
	case m.pendIdx != nil:
		m.pendIdx[key] = int32(i)
	case len(m.pending) > pendIndexAt:
		m.pendIdx = make(map[uint32]int32, 2*len(m.pending))
		for j, p := range m.pending {
			m.pendIdx[p.key] = int32(j)
		}
	}
	return i
}

// removePending drops pending[i] (the last one takes its place).
func (m *rcptMemory) removePending(i int) {
	last := len(m.pending) - 1
	key := m.pending[i].key
	m.pending[i] = m.pending[last]
	m.pending = m.pending[:last]
	if m.pendIdx == nil {
		return
	}
	delete(m.pendIdx, key)
	if i < last {
		m.pendIdx[m.pending[i].key] = int32(i)
	}
	if len(m.pending) == 0 {
		m.pendIdx = nil
	}
}

// rcptHold is one first-time recipient a transaction holds in one of its
// identities' memories.
type rcptHold struct {
	st  *idState
	key uint32
}

// loadRcptKey reads the hash key from bbolt, making it on first use.
func loadRcptKey(btx *bolt.Tx) ([rcptKeyLen]byte, error) {
	var key [rcptKeyLen]byte
	b, err := btx.CreateBucketIfNotExists(bucketMeta)
	if err != nil {
		return key, err
	}
	if _, err := btx.CreateBucketIfNotExists(bucketRecipients); err != nil {
		return key, err
	}
	if v := b.Get(metaRcptKey); v != nil {
		if len(v) != rcptKeyLen {
			return key, fmt.Errorf("policy: the recipient hash key in %s is %d bytes, not %d", bucketMeta, len(v), rcptKeyLen)
		}
		copy(key[:], v)
		return key, nil
	}
	if _, err := rand.Read(key[:]); err != nil {
		return key, err
	}
	return key, b.Put(metaRcptKey, key[:])
}

// rcptKey is the memory's key of a recipient address: a keyed hash of its
// normal form (ASCII letters lowercased, a trailing dot of the domain
// dropped, as identity ids are). The key is SipHash-2-4 under the secret.
func (e *Engine) rcptKey(addr string) uint32 {
	var buf [256]byte
	n := len(addr)
	if n > 0 && addr[n-1] == '.' {
		n--
	}
	var b []byte
	if n <= len(buf) {
		b = buf[:n]
	} else {
		b = make([]byte, n)
	}
	for i := range b {
		c := addr[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		b[i] = c
	}
	k0 := binary.LittleEndian.Uint64(e.rcptSecret[:8])
	k1 := binary.LittleEndian.Uint64(e.rcptSecret[8:])
	return uint32(sipHash24(k0, k1, b))
}

// sipHash24 is SipHash-2-4 (Aumasson and Bernstein, 2012), a keyed hash
// made for short inputs: a sender that does not know the key cannot find
// addresses that collide. About ten times cheaper than SHA-256 here.
func sipHash24(k0, k1 uint64, b []byte) uint64 {
	v0 := k0 ^ 0x736f6d6570736575
	v1 := k1 ^ 0x646f72616e646f6d
	v2 := k0 ^ 0x6c7967656e657261
	v3 := k1 ^ 0x7465646279746573
	n := len(b)
	for ; len(b) >= 8; b = b[8:] {
		m := binary.LittleEndian.Uint64(b)
		v3 ^= m
		v0, v1, v2, v3 = sipRound(v0, v1, v2, v3)
		v0, v1, v2, v3 = sipRound(v0, v1, v2, v3)
		v0 ^= m
	}
	m := uint64(n) << 56
	for i, c := range b {
		m |= uint64(c) << (8 * i)
	}
	v3 ^= m
	v0, v1, v2, v3 = sipRound(v0, v1, v2, v3)
	v0, v1, v2, v3 = sipRound(v0, v1, v2, v3)
	v0 ^= m
	v2 ^= 0xff
	for range 4 {
		v0, v1, v2, v3 = sipRound(v0, v1, v2, v3)
	}
	return v0 ^ v1 ^ v2 ^ v3
}

func sipRound(v0, v1, v2, v3 uint64) (uint64, uint64, uint64, uint64) {
	v0 += v1
	v1 = bits.RotateLeft64(v1, 13) ^ v0
	v0 = bits.RotateLeft64(v0, 32)
	v2 += v3
	v3 = bits.RotateLeft64(v3, 16) ^ v2
	v0 += v3
	v3 = bits.RotateLeft64(v3, 21) ^ v0
	v2 += v1
	v1 = bits.RotateLeft64(v1, 17) ^ v2
	v2 = bits.RotateLeft64(v2, 32)
	return v0, v1, v2, v3
}

// memoryDays is recipient_memory in whole days.
func (c *policyConf) memoryKeepDays() int64 {
	if c.memoryDays <= 0 {
		return defaultMemoryDays
	}
	return c.memoryDays
}

// slotKey maps a recipient key to the one stored: 0 marks empty slots.
func slotKey(key uint32) uint32 {
	if key == 0 {
		return 1
	}
	return key
}

// find returns the slot of key, or the empty slot where it would go, and
// whether it is there. slots must not be nil.
func (m *rcptMemory) find(key uint32) (int, bool) {
	mask := len(m.slots) - 1
	for i := int(key) & mask; ; i = (i + 1) & mask {
		switch v := m.slots[i]; {
		case v == 0:
			return i, false
		case uint32(v>>32) == key:
			return i, true
		}
	}
}

// day returns the day key was last sent to, and whether it is there.
func (m *rcptMemory) day(key uint32) (int64, bool) {
	if m.n == 0 {
		return 0, false
	}
	i, ok := m.find(slotKey(key))
	return int64(uint32(m.slots[i])), ok
}

// known reports whether key was sent to on one of the last keepDays days
// (or today).
func (m *rcptMemory) known(key uint32, today, keepDays int64) bool {
	d, ok := m.day(key)
	return ok && today-d <= keepDays
}

// reservedFor reports whether key already holds a new_rcpts slot.
func (m *rcptMemory) reservedFor(key uint32) bool {
	if len(m.pending) == 0 {
		return false
	}
	i := m.findPending(key)
	return i >= 0 && m.pending[i].reserved
}

// reserved is how many slots pending keys hold on every new_rcpts window.
func (m *rcptMemory) reserved() int64 {
	return m.reservedN
}

// touch records key as sent to on today, without charging anything.
func (m *rcptMemory) touch(key uint32, today, keepDays int64) {
	key = slotKey(key)
	v := uint64(key)<<32 | uint64(uint32(today))
	if m.n > 0 {
		if i, ok := m.find(key); ok {
			if m.slots[i] != v {
				m.slots[i] = v
				m.dirty = true
			}
			return
		}
	}
	if m.n >= maxRemembered {
		m.forgetOldest(today, keepDays)
	}
	m.insert(v)
	m.dirty = true
}

// insert adds an entry whose key is not in the table, growing it first
// when it would be more than 3/4 full.
func (m *rcptMemory) insert(v uint64) {
	if (m.n+1)*4 > len(m.slots)*3 {
		m.resize(max(8, 2*len(m.slots)))
	}
	i, _ := m.find(uint32(v >> 32))
	m.slots[i] = v
	m.n++
}

// resize moves the entries into a table of size slots.
func (m *rcptMemory) resize(size int) {
	old := m.slots
	m.slots, m.n = make([]uint64, size), 0
	for _, v := range old {
		if v != 0 {
			i, _ := m.find(uint32(v >> 32))
			m.slots[i] = v
			m.n++
		}
	}
}

// forgetOldest makes room: it drops the entries older than keepDays, or
// else the one sent to longest ago. It rebuilds the table (a full memory
// only).
func (m *rcptMemory) forgetOldest(today, keepDays int64) {
	oldest, n := -1, 0
	for i, v := range m.slots {
		switch {
		case v == 0:
		case today-int64(uint32(v)) > keepDays:
			m.slots[i] = 0
		default:
			n++
			if oldest < 0 || uint32(v) < uint32(m.slots[oldest]) {
				oldest = i
			}
		}
	}
	if n >= maxRemembered {
		m.slots[oldest] = 0
	}
	m.resize(len(m.slots))
}

// hold takes a transaction's hold on key, unknown to the identity; the
// first hold reserves a slot.
func (m *rcptMemory) hold(key uint32) {
	i := m.findPending(key)
	if i < 0 {
		i = m.addPending(key)
	}
	p := &m.pending[i]
	p.refs++
	if !p.reserved {
		p.reserved = true
		m.reservedN++
	}
}

// dropHold ends a hold of a handed-off message: the recipient is about to
// be known, so its slot (however many hold it) is charged instead.
func (m *rcptMemory) dropHold(key uint32) {
	i := m.findPending(key)
	if i < 0 {
		return
	}
	p := &m.pending[i]
	if p.reserved {
		p.reserved = false
		m.reservedN--
	}
	if p.refs--; p.refs <= 0 {
		m.removePending(i)
	}
}

// releaseHold ends a hold without a hand-off; the last one frees the slot.
func (m *rcptMemory) releaseHold(key uint32) {
	i := m.findPending(key)
	if i < 0 {
		return
	}
	p := &m.pending[i]
	if p.refs--; p.refs > 0 {
		return
	}
	if p.reserved {
		m.reservedN--
	}
	m.removePending(i)
}

// newestDay is the newest last-seen day in the memory (0 when empty).
func (m *rcptMemory) newestDay() uint32 {
	var d uint32
	for _, v := range m.slots {
		d = max(d, uint32(v))
	}
	return d
}

// encode writes the memory record, leaving out entries older than keepDays,
// in ascending key order.
func (m *rcptMemory) encode(today, keepDays int64) []byte {
	keep := make([]uint64, 0, m.n)
	for _, v := range m.slots {
		if v != 0 && today-int64(uint32(v)) <= keepDays {
			keep = append(keep, v)
		}
	}
	slices.Sort(keep)
	b := make([]byte, 3, 3+binary.MaxVarintLen64+memEntry*len(keep))
	b[0] = memVersion
	binary.BigEndian.PutUint16(b[1:], uint16(m.newestDay()))
	b = binary.AppendUvarint(b, uint64(len(keep)))
	for _, v := range keep {
		b = binary.BigEndian.AppendUint32(b, uint32(v>>32))
		b = binary.BigEndian.AppendUint16(b, uint16(v))
	}
	return b
}

// memoryNewestDay reads the newest day from the head of a record.
func memoryNewestDay(v []byte) (int64, bool) {
	if len(v) < 3 || v[0] != memVersion {
		return 0, false
	}
	return int64(binary.BigEndian.Uint16(v[1:])), true
}

// decodeMemory reads a memory record (copying it out of bbolt's map).
func decodeMemory(v []byte) (*rcptMemory, error) {
	newest, ok := memoryNewestDay(v)
	if !ok {
		return nil, errors.New("unknown memory record version")
	}
	n, k := binary.Uvarint(v[3:])
	if k <= 0 || n > maxRemembered || uint64(len(v)-3-k) != n*memEntry {
		return nil, errors.New("bad memory record length")
	}
	m := &rcptMemory{}
	size := 8
	for size*3 < int(n)*4 {
		size *= 2
	}
	m.slots = make([]uint64, size)
	p := v[3+k:]
	prev := uint32(0)
	for range n {
		key := binary.BigEndian.Uint32(p)
		day := binary.BigEndian.Uint16(p[4:])
		p = p[memEntry:]
		if key <= prev || int64(day) > newest {
			return nil, errors.New("bad memory record entry")
		}
		prev = key
		i, _ := m.find(key)
		m.slots[i] = uint64(key)<<32 | uint64(day)
		m.n++
	}
	return m, nil
}

// readMemory decodes id's stored memory, nil when none is stored or it is
// unreadable (logged; the next flush of the identity replaces it).
func (e *Engine) readMemory(btx *bolt.Tx, id string) *rcptMemory {
	b := btx.Bucket(bucketRecipients)
	if b == nil {
		return nil
	}
	v := b.Get([]byte(id))
	if v == nil {
		return nil
	}
	m, err := decodeMemory(v)
	if err != nil {
		e.log.Error("policy: reading the recipient memory; starting it afresh", "identity", id, "err", err)
		return nil
	}
	return m
}

// putMemory is a memory record to write at the next flush.
type putMemory struct {
	key string
	val []byte
}

// takeMemory returns st's memory record when it changed since the last
// flush. The shard lock is held.
func takeMemory(st *idState, now int64, keepDays int64) (putMemory, bool) {
	m := &st.mem
	if !m.dirty {
		return putMemory{}, false
	}
	m.dirty = false
	return putMemory{st.id, m.encode(now/dayNanos, keepDays)}, true
}

// expireMemories deletes the stored memories whose newest entry is older
// than recipient_memory, unless the identity is resident (memory decides
// then). flushMu is held.
func (e *Engine) expireMemories() error {
	now := e.now().UnixNano()
	today, keep := now/dayNanos, e.conf.Load().memoryKeepDays()
	var old [][]byte
	err := e.view(func(btx *bolt.Tx) error {
		defer dropMapped(btx)
		return btx.Bucket(bucketRecipients).ForEach(func(k, v []byte) error {
			if d, ok := memoryNewestDay(v); ok && today-d <= keep {
				return nil
			}
			if !e.resident(string(k)) {
				old = append(old, append([]byte(nil), k...))
			}
			return nil
		})
	})
	if err != nil || len(old) == 0 {
		return err
	}
	return e.update(func(btx *bolt.Tx) error {
		b := btx.Bucket(bucketRecipients)
		for _, k := range old {
			if e.resident(string(k)) {
				continue
			}
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
}

// Transaction side.

// needNewRcpts is how many more slots ent's new_rcpts windows need for the
// recipients t.adding: the distinct ones unknown to the identity that do
// not already hold a slot. The shard locks are held.
func (t *tx) needNewRcpts(ent *txEnt, today, keepDays int64) int64 {
	m := &ent.st.mem
	var n int64
	for i, k := range t.adding {
		if m.known(k, today, keepDays) || m.reservedFor(k) || repeats(t.adding[:i], k) {
			continue
		}
		n++
	}
	return n
}

// warm loads, for each identity that keeps a memory, the slot where key
// would be, one after the other without waiting for any: the cache misses
// of the identities' memories overlap instead of following each other.
// The shard locks are held.
func (t *tx) warm(key uint32) {
	key = slotKey(key)
	var sum uint64
	for i := range t.ents {
		if s := t.ents[i].st.mem.slots; len(s) > 0 {
			sum += s[int(key)&(len(s)-1)]
		}
	}
	t.warmed = sum
}

// repeats reports whether k is in ks.
func repeats(ks []uint32, k uint32) bool {
	for _, x := range ks {
		if x == k {
			return true
		}
	}
	return false
}

// addingWith is what a check for one more recipient, key, adds to the
// identities' memories: key, or, when reserve_timeout released the
// transaction's holds (lapse.go), every recipient so far and key.
func (t *tx) addingWith(key uint32) []uint32 {
	if !t.lapsed {
		t.addBuf[0] = key
		return t.addBuf[:]
	}
	t.scratch = append(append(t.scratch[:0], t.keys...), key)
	return t.scratch
}

// holdNewRcpts takes, for every identity of ents[from:] with new_rcpts
// caps, a hold on each recipient of t.adding it does not know, at ns: a
// reservation like the others, which reserve_timeout releases. The shard
// locks are held.
func (t *tx) holdNewRcpts(from int, today, keepDays, ns int64) {
	held := len(t.holds)
	for i := from; i < len(t.ents); i++ {
		ent := &t.ents[i]
		if len(ent.lim.newRcpts) == 0 {
			continue
		}
		for _, k := range t.adding {
			if ent.st.mem.known(k, today, keepDays) {
				continue
			}
			if t.holds == nil {
				t.holds = t.holdBuf[:0]
			}
			ent.st.mem.hold(k)
			t.holds = append(t.holds, rcptHold{st: ent.st, key: k})
		}
	}
	if len(t.holds) > held {
		t.noteReserved(ns)
	}
}

// releaseNewRcpts gives back the transaction's holds (its reservations
// lapsed, or it ends without a hand-off). The shard locks are held.
func (t *tx) releaseNewRcpts() {
	for _, h := range t.holds {
		h.st.mem.releaseHold(h.key)
	}
	t.holds = t.holds[:0]
}

// settleNewRcpts ends the transaction's holds. With charge (the message
// was handed off) every recipient becomes known, as of today, to each
// identity with new_rcpts caps, and those it did not know count on its
// new_rcpts windows. The shard locks are held.
func (t *tx) settleNewRcpts(charge bool, ns int64) {
	if !charge {
		t.releaseNewRcpts()
		return
	}
	for _, h := range t.holds {
		h.st.mem.dropHold(h.key)
	}
	t.holds = t.holds[:0]
	today, keep := ns/dayNanos, t.conf.memoryKeepDays()
	for i := range t.ents {
		ent := &t.ents[i]
		if len(ent.lim.newRcpts) == 0 {
			continue
		}
		m := &ent.st.mem
		var fresh int64
		for _, k := range t.keys {
			if !m.known(k, today, keep) {
				fresh++
			}
			m.touch(k, today, keep)
		}
		if fresh == 0 {
			continue
		}
		for _, r := range ent.lim.newRcpts {
			ent.st.window(metricNewRcpts, r.Window).add(ns, fresh)
		}
		t.e.metrics.newRcpts[min(kindRank(ent.st.kind), numKinds)].Add(float64(fresh))
	}
}
