package policy

import (
	"encoding/binary"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"relay/config"
)

// newRcptsConfig caps user identities at new_rcpts only.
func newRcptsConfig(t testing.TB, newRcpts ...string) *config.Config {
	cfg := baseConfig()
	cfg.Policy.Limits.User = &config.Limits{NewRcpts: rates(t, newRcpts...)}
	return cfg
}

// sendTo passes one message to rcpts through a fresh transaction and
// commits it when every step accepts. It returns the first refusal.
func sendTo(e *Engine, ids []Identity, rcpts ...string) Decision {
	tx := e.Begin(ids)
	for _, r := range rcpts {
		if d := tx.AddRcpt(r); d.Action != Accept {
			tx.Abort()
			return d
		}
	}
	if d := tx.Message(); d.Action != Accept {
		tx.Abort()
		return d
	}
	tx.Commit()
	return Decision{Action: Accept}
}

func addrs(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%d@example.net", prefix, i)
	}
	return out
}

var bobIDs = []Identity{UserID("bob"), SenderID("bob@example.com")}

func TestNewRcptsCountsOnlyFirstTime(t *testing.T) {
	cfg := newRcptsConfig(t, "3/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})

	if d := sendTo(e.Engine, bobIDs, "a@x.org", "b@x.org", "c@x.org"); d.Action != Accept {
		t.Fatal(d)
	}
	// Known ones pass however often, in any letter case.
	for range 5 {
		if d := sendTo(e.Engine, bobIDs, "a@x.org", "B@X.ORG", "c@x.org."); d.Action != Accept {
			t.Fatalf("known recipients refused: %+v", d)
		}
	}
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 3 {
		t.Fatalf("new_rcpts used %d, want 3", got)
	}
	d := sendTo(e.Engine, bobIDs, "a@x.org", "d@x.org")
	if d.Action != Defer || d.Identity != "user:bob" || d.Limit != "3 new recipients/1h" {
		t.Fatalf("4th new recipient: %+v", d)
	}
	if !strings.HasPrefix(d.Text(), "user:bob is over 3 new recipients/1h; try again in ") {
		t.Fatalf("text %q", d.Text())
	}
	// The sender identity has no new_rcpts cap: it keeps no memory.
	e.flush()
	if memStored(t, e.Engine, "sender:bob@example.com") || !memStored(t, e.Engine, "user:bob") {
		t.Fatal("memory kept for the wrong identities")
	}
	// An hour later the window is free; the known ones stay known.
	clk.Add(62 * time.Minute)
	if d := sendTo(e.Engine, bobIDs, "d@x.org", "e@x.org", "a@x.org", "b@x.org", "c@x.org"); d.Action != Accept {
		t.Fatal(d)
	}
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 2 {
		t.Fatalf("new_rcpts used %d, want 2", got)
	}
}

func memStored(t testing.TB, e *Engine, id string) bool {
	t.Helper()
	var ok bool
	if err := e.db.View(func(btx *bolt.Tx) error {
		ok = btx.Bucket(bucketRecipients).Get([]byte(id)) != nil
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return ok
}

// A recipient is forgotten recipient_memory after it was last sent to;
// each message to it moves that day on.
func TestNewRcptsMemorySpan(t *testing.T) {
	cfg := newRcptsConfig(t, "100/24h")
	cfg.Policy.RecipientMemory = config.Duration{Duration: 10 * 24 * time.Hour}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	sendTo(e.Engine, bobIDs, "old@x.org", "kept@x.org")
	clk.Add(6 * 24 * time.Hour)
	sendTo(e.Engine, bobIDs, "kept@x.org")
	clk.Add(5 * 24 * time.Hour) // old: 11 days, kept: 5 days
	if d := sendTo(e.Engine, bobIDs, "old@x.org", "kept@x.org"); d.Action != Accept {
		t.Fatal(d)
	}
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "24h"); got != 1 {
		t.Fatalf("new_rcpts %d, want 1 (old@ forgotten, kept@ remembered)", got)
	}
}

// Refused, aborted and held messages teach nothing.
func TestNewRcptsOnlyHandedOffTeaches(t *testing.T) {
	cfg := newRcptsConfig(t, "2/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	tx := e.Begin(bobIDs)
	tx.AddRcpt("a@x.org")
	tx.AddRcpt("b@x.org")
	if d := tx.AddRcpt("c@x.org"); d.Action != Defer {
		t.Fatalf("3rd: %+v", d)
	}
	tx.Abort()
	tx = e.Begin(bobIDs)
	tx.AddRcpt("a@x.org")
	tx.Held("h1")
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 0 {
		t.Fatalf("used %d after abort and hold", got)
	}
	// Nothing was learnt: a and b are still new, and fill the cap.
	if d := sendTo(e.Engine, bobIDs, "a@x.org", "b@x.org"); d.Action != Accept {
		t.Fatal(d)
	}
	if d := sendTo(e.Engine, bobIDs, "c@x.org"); d.Action != Defer {
		t.Fatalf("c after the cap: %+v", d)
	}
}

// Two transactions racing to the same new address count it once, whoever
// commits or aborts first; a slot held by a pending address blocks others.
func TestNewRcptsRaceCountsOnce(t *testing.T) {
	for _, order := range []string{"commit,commit", "abort,commit", "commit,abort", "abort,abort"} {
		t.Run(order, func(t *testing.T) {
			cfg := newRcptsConfig(t, "1/1h")
			e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
			tx1, tx2 := e.Begin(bobIDs), e.Begin(bobIDs)
			if d := tx1.AddRcpt("x@x.org"); d.Action != Accept {
				t.Fatal(d)
			}
			if d := tx2.AddRcpt("X@x.org"); d.Action != Accept {
				t.Fatalf("second hold of the same address refused: %+v", d)
			}
			if d := e.Begin(bobIDs).AddRcpt("y@x.org"); d.Action != Defer {
				t.Fatalf("another new address while x holds the slot: %+v", d)
			}
			want := int64(0)
			for i, step := range strings.Split(order, ",") {
				tx := []Tx{tx1, tx2}[i]
				if step == "commit" {
					tx.Commit()
					want = 1
				} else {
					tx.Abort()
				}
			}
			if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != want {
				t.Fatalf("used %d, want %d", got, want)
			}
			// Everything was released: a fresh address fits exactly when
			// nothing was charged.
			d := sendTo(e.Engine, bobIDs, "z@x.org")
			if (d.Action == Accept) != (want == 0) {
				t.Fatalf("z: %+v", d)
			}
		})
	}
}

// Many sessions at once to the same few new addresses: each counts once,
// and the cap is never passed.
func TestNewRcptsConcurrent(t *testing.T) {
	cfg := newRcptsConfig(t, "5/1h")
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	targets := addrs("t", 8)
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 20 {
				sendTo(e.Engine, bobIDs, targets[(g+i)%len(targets)])
			}
		}()
	}
	wg.Wait()
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 5 {
		t.Fatalf("used %d, want exactly the cap, 5", got)
	}
	sh := &e.shards[e.shardOf("user:bob")]
	sh.mu.Lock()
	m := sh.states["user:bob"].mem
	known, pend, res := m.n, len(m.pending), m.reservedN
	sh.mu.Unlock()
	if known != 5 || pend != 0 || res != 0 {
		t.Fatalf("memory: %d known, %d pending, %d reserved", known, pend, res)
	}
}

// Identities learnt at DATA (a web server's uid) are checked for every
// recipient so far.
func TestNewRcptsAddIdentities(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.UID = &config.Limits{NewRcpts: rates(t, "2/1h")}
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	web := WebUID("web1", 33, "", "")
	tx := e.Begin([]Identity{IPID(mustAddr("10.0.0.11"))})
	for _, r := range []string{"a@x.org", "b@x.org", "a@x.org"} {
		tx.AddRcpt(r)
	}
	if d := tx.AddIdentities(web); d.Action != Accept {
		t.Fatalf("2 distinct new recipients: %+v", d)
	}
	tx.Message()
	tx.Commit()
	tx = e.Begin([]Identity{IPID(mustAddr("10.0.0.11"))})
	tx.AddRcpt("a@x.org")
	tx.AddRcpt("c@x.org")
	if d := tx.AddIdentities(web); d.Action != Defer || d.Limit != "2 new recipients/1h" {
		t.Fatalf("3rd new recipient at DATA: %+v", d)
	}
}

// The memory survives a restart and a kill -9 once flushed.
func TestNewRcptsMemoryDurable(t *testing.T) {
	cfg := newRcptsConfig(t, "3/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{FlushInterval: 20 * time.Millisecond})
	sendTo(e.Engine, bobIDs, "a@x.org", "b@x.org")
	deadline := time.Now().Add(10 * time.Second)
	for {
		// As a kill -9 leaves the file, without Close.
		e2 := openTest(t, snapshotDB(t, e), cfg, clk, Options{})
		clk.Add(2 * time.Hour) // the window is empty: only the memory decides
		d := sendTo(e2.Engine, bobIDs, "a@x.org", "b@x.org", "c@x.org", "d@x.org", "e@x.org")
		used := int64(-1)
		if s, ok := e2.Sender("user:bob"); ok && len(s.Usage) > 0 {
			used = s.Usage[0].Used
		}
		e2.close()
		if d.Action == Accept && used == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("memory never flushed: %+v, used %d", d, used)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A memory read back after eviction is the same memory.
func TestNewRcptsEvictedComesBack(t *testing.T) {
	cfg := newRcptsConfig(t, "3/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	sendTo(e.Engine, bobIDs, "a@x.org", "b@x.org", "c@x.org")
	// Pending holds keep it resident; after the flush and 10 minutes it goes.
	evictAll(t, e.Engine, clk)
	if e.resident("user:bob") {
		t.Fatal("still resident")
	}
	if d := sendTo(e.Engine, bobIDs, "a@x.org", "b@x.org", "c@x.org"); d.Action != Accept {
		t.Fatalf("known recipients after eviction: %+v", d)
	}
	if d := sendTo(e.Engine, bobIDs, "d@x.org"); d.Action != Defer {
		t.Fatalf("4th new after eviction: %+v", d)
	}
	// Idle counters leave bbolt after a day; the memory stays 30 days.
	clk.Add(25 * time.Hour)
	e.sweep()
	e.flush()
	e.expireStored()
	if stored(t, e.Engine, "user:bob") || !memStored(t, e.Engine, "user:bob") {
		t.Fatalf("counters stored %v, memory stored %v", stored(t, e.Engine, "user:bob"), memStored(t, e.Engine, "user:bob"))
	}
	if d := sendTo(e.Engine, bobIDs, "a@x.org", "b@x.org", "c@x.org", "d@x.org"); d.Action != Accept {
		t.Fatalf("memory lost with the counters: %+v", d)
	}
	// 31 days without mail: the memory is deleted too.
	clk.Add(32 * 24 * time.Hour)
	e.sweep()
	e.flush()
	if err := e.expireMemories(); err != nil {
		t.Fatal(err)
	}
	if memStored(t, e.Engine, "user:bob") {
		t.Fatal("an expired memory stayed in bbolt")
	}
}

func TestMemoryRecordRoundTrip(t *testing.T) {
	today := int64(20500)
	m := &rcptMemory{}
	for i := range 100 {
		m.touch(uint32(i*7919), today-int64(i%40), 30)
	}
	got, err := decodeMemory(m.encode(today, 30))
	if err != nil {
		t.Fatal(err)
	}
	kept := 0
	for i := range 100 {
		if i%40 <= 30 { // entries 31 to 39 days old are dropped
			kept++
		}
	}
	if got.n != kept {
		t.Fatalf("%d entries back, want %d", got.n, kept)
	}
	for i := range 100 {
		if want := i%40 <= 30; got.known(uint32(i*7919), today, 30) != want {
			t.Fatalf("entry %d known = %v", i, !want)
		}
	}
	for _, bad := range [][]byte{nil, {2, 0, 0, 0}, {memVersion, 0, 1, 1, 0, 0, 0, 1, 0}, {memVersion, 0, 1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0}} {
		if _, err := decodeMemory(bad); err == nil {
			t.Errorf("decodeMemory(%x) accepted", bad)
		}
	}
}

// The memory is bounded: past maxRemembered the recipient sent to longest
// ago is forgotten.
func TestMemoryBounded(t *testing.T) {
	m := &rcptMemory{}
	today := int64(20500)
	for i := range maxRemembered {
		m.touch(uint32(i+1), today-int64(i%20), 30)
	}
	m.touch(0xffffffff, today, 30)
	if m.n != maxRemembered {
		t.Fatalf("%d entries", m.n)
	}
	if m.known(20, today, 30) { // key 20 was touched 19 days ago: the oldest
		t.Fatal("the oldest entry was kept")
	}
	if !m.known(0xffffffff, today, 30) || !m.known(1, today, 30) {
		t.Fatal("a new or recent entry is missing")
	}
	if n := len(m.encode(today, 30)); n > 3+3+memEntry*maxRemembered {
		t.Fatalf("record of %d bytes", n)
	}
}

// An unreadable stored memory is logged and started afresh, never fatal.
func TestMemoryDamagedStartsAfresh(t *testing.T) {
	cfg := newRcptsConfig(t, "3/1h")
	clk := newClock()
	dir := t.TempDir()
	e := openTest(t, dir, cfg, clk, Options{})
	sendTo(e.Engine, bobIDs, "a@x.org")
	evictAll(t, e.Engine, clk)
	if err := e.db.Update(func(btx *bolt.Tx) error {
		return btx.Bucket(bucketRecipients).Put([]byte("user:bob"), []byte{memVersion, 0xff})
	}); err != nil {
		t.Fatal(err)
	}
	if d := sendTo(e.Engine, bobIDs, "a@x.org", "b@x.org"); d.Action != Accept {
		t.Fatal(d)
	}
	e.flush()
	var v []byte
	e.db.View(func(btx *bolt.Tx) error {
		v = append(v, btx.Bucket(bucketRecipients).Get([]byte("user:bob"))...)
		return nil
	})
	if m, err := decodeMemory(v); err != nil || m.n != 2 {
		t.Fatalf("memory not rewritten: %v %+v", err, m)
	}
}

// FuzzDecodeMemory: the memory decoder never panics, and what it accepts
// encodes back to the same entries.
func FuzzDecodeMemory(f *testing.F) {
	m := &rcptMemory{}
	m.touch(7, 20500, 30)
	m.touch(3, 20490, 30)
	f.Add(m.encode(20500, 30))
	f.Add([]byte{memVersion, 0x50, 0x14, 0})
	f.Add([]byte{memVersion, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, v []byte) {
		got, err := decodeMemory(v)
		if err != nil {
			return
		}
		newest, _ := memoryNewestDay(v)
		again, err := decodeMemory(got.encode(newest, 1<<20))
		if err != nil || again.n != got.n {
			t.Fatalf("re-encoded record: %v, %d entries of %d", err, again.n, got.n)
		}
	})
}

func TestRcptKeyIsKeyed(t *testing.T) {
	cfg := newRcptsConfig(t, "3/1h")
	a := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	b := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	if a.rcptKey("x@y.org") == b.rcptKey("x@y.org") && a.rcptKey("z@y.org") == b.rcptKey("z@y.org") {
		t.Fatal("two databases hash recipients alike: the key is not secret")
	}
	if a.rcptKey("X@Y.Org.") != a.rcptKey("x@y.org") || a.rcptKey("x@y.org") == a.rcptKey("x@y.org2") {
		t.Fatal("normal form")
	}
	long := strings.Repeat("a", 300) + "@x.org"
	if a.rcptKey(long) != a.rcptKey(strings.ToUpper(long)) {
		t.Fatal("long addresses")
	}
}

// A message to many recipients: the pending recipients get an index, and
// it goes again once they are settled.
func TestNewRcptsManyInOneMessage(t *testing.T) {
	cfg := newRcptsConfig(t, "150/1h")
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	many := addrs("m", 100)
	tx1, tx2 := e.Begin(bobIDs), e.Begin(bobIDs)
	for _, r := range append(many, many[:10]...) {
		if d := tx1.AddRcpt(r); d.Action != Accept {
			t.Fatal(d)
		}
	}
	for _, r := range many {
		if d := tx2.AddRcpt(strings.ToUpper(r)); d.Action != Accept {
			t.Fatalf("the same recipients again: %+v", d)
		}
	}
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 100 {
		t.Fatalf("reserved %d, want 100", got)
	}
	tx1.Abort()
	tx2.Message()
	tx2.Commit()
	sh := &e.shards[e.shardOf("user:bob")]
	sh.mu.Lock()
	m := &sh.states["user:bob"].mem
	n, pend, idx, res := m.n, len(m.pending), m.pendIdx, m.reservedN
	sh.mu.Unlock()
	if n != 100 || pend != 0 || idx != nil || res != 0 {
		t.Fatalf("memory: %d known, %d pending, index %v, %d reserved", n, pend, idx, res)
	}
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 100 {
		t.Fatalf("charged %d, want 100", got)
	}
}

// The reference vector of SipHash-2-4 (key 00..0f, message 00..0e), and
// every length to 64 against the paper's table's first and last entries.
func TestSipHash24(t *testing.T) {
	var key [16]byte
	msg := make([]byte, 64)
	for i := range key {
		key[i] = byte(i)
	}
	for i := range msg {
		msg[i] = byte(i)
	}
	k0, k1 := binary.LittleEndian.Uint64(key[:8]), binary.LittleEndian.Uint64(key[8:])
	for _, c := range []struct {
		n    int
		want uint64
	}{{0, 0x726fdb47dd0e0e31}, {15, 0xa129ca6149be45e5}, {63, 0x958a324ceb064572}} {
		if got := sipHash24(k0, k1, msg[:c.n]); got != c.want {
			t.Errorf("SipHash-2-4 of %d bytes = %#x, want %#x", c.n, got, c.want)
		}
	}
}

// reserve_timeout releases a stale transaction's first-time-recipient
// holds like its other reservations; its next check takes them again.
func TestNewRcptsHoldsLapse(t *testing.T) {
	cfg := newRcptsConfig(t, "1/1h")
	cfg.Policy.ReserveTimeout = config.Duration{Duration: time.Minute}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	idle := e.Begin(bobIDs)
	if d := idle.AddRcpt("x@x.org"); d.Action != Accept {
		t.Fatal(d)
	}
	if d := e.Begin(bobIDs).AddRcpt("y@x.org"); d.Action != Defer {
		t.Fatalf("y while x holds the slot: %+v", d)
	}
	clk.Add(61 * time.Second)
	e.sweepLapsed()
	if d := sendTo(e.Engine, bobIDs, "y@x.org"); d.Action != Accept {
		t.Fatalf("y after x's hold lapsed: %+v", d)
	}
	if d := idle.Recheck(); d.Action != Defer || d.Limit != "1 new recipient/1h" {
		t.Fatalf("the lapsed transaction's recheck: %+v", d)
	}
	idle.Abort()
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 1 {
		t.Fatalf("used %d, want 1", got)
	}
	// A lapsed transaction whose recheck fits takes its holds again and
	// charges them at its commit.
	clk.Add(2 * time.Hour)
	tx := e.Begin(bobIDs)
	tx.AddRcpt("z@x.org")
	clk.Add(61 * time.Second)
	e.sweepLapsed()
	if d := tx.Recheck(); d.Action != Accept {
		t.Fatal(d)
	}
	tx.Message()
	tx.Commit()
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 1 {
		t.Fatalf("z charged %d, want 1", got)
	}
}

// Mail over new_rcpts with over_limit = "queue" waits in the release
// queue; its release checks the cap again and, handed off, makes its
// recipients known and counts them.
func TestNewRcptsQueuedRelease(t *testing.T) {
	cfg := newRcptsConfig(t, "2/1h")
	cfg.Policy.OverLimit = config.OverLimitQueue
	cfg.Policy.QueueMax = 10
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	if d := sendTo(e.Engine, bobIDs, "a@x.org", "b@x.org"); d.Action != Accept {
		t.Fatal(d)
	}
	tx := e.Begin(bobIDs)
	if d := tx.AddRcpt("c@x.org"); d.Action != Queue || d.Limit != "2 new recipients/1h" {
		t.Fatalf("c over the cap: %+v", d)
	}
	tx.Held("q1")
	if r, d := e.BeginRelease("user:bob", bobIDs, []string{"c@x.org"}); r != nil || d.Action != Defer || d.RetryIn <= 0 {
		t.Fatalf("released while new_rcpts is full: %v %+v", r, d)
	}
	// Known recipients would pass the same check.
	if r, d := e.BeginRelease("user:bob", bobIDs, []string{"a@x.org"}); d.Action != Accept {
		t.Fatalf("known recipient's release: %+v", d)
	} else {
		r.Abort()
	}
	clk.Add(62 * time.Minute)
	r, d := e.BeginRelease("user:bob", bobIDs, []string{"c@x.org"})
	if d.Action != Accept {
		t.Fatalf("release after the window: %+v", d)
	}
	if err := r.Commit(nil); err != nil {
		t.Fatal(err)
	}
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 1 {
		t.Fatalf("released c counted %d, want 1", got)
	}
	if d := sendTo(e.Engine, bobIDs, "c@x.org", "a@x.org", "b@x.org"); d.Action != Accept {
		t.Fatalf("c not learnt by its release: %+v", d)
	}
	if got := usage(t, e.Engine, "user:bob", "new_rcpts", "1h"); got != 1 {
		t.Fatalf("used %d, want 1", got)
	}
}
