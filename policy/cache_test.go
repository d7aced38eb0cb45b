package policy

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"relay/config"
)

// evictAll flushes, lets residentSpan pass and sweeps.
func evictAll(t testing.TB, e *Engine, clk *fakeClock) {
	t.Helper()
	if err := e.flush(); err != nil {
		t.Fatal(err)
	}
	clk.Add(residentSpan + time.Second)
	e.sweep()
}

func stored(t testing.TB, e *Engine, id string) bool {
	t.Helper()
	var ok bool
	if err := e.db.View(func(btx *bolt.Tx) error {
		ok = btx.Bucket(bucketCounters).Get([]byte(id)) != nil
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return ok
}

// TestEvictedComesBackExact: an identity that left memory is read back
// from bbolt with every window exact, and caps hold across the round trip.
func TestEvictedComesBackExact(t *testing.T) {
	dir := t.TempDir()
	cfg := baseConfig()
	userLimits(t, cfg, 0, "10/1h", "15/24h")
	clk := newClock()
	e := openTest(t, dir, cfg, clk, Options{FlushInterval: time.Hour})
	bob := []Identity{UserID("bob")}
	if d := send(e.Engine, bob, 4); d.Action != Accept {
		t.Fatal(d)
	}
	// Neither an open transaction nor unflushed counts leave memory.
	open := e.Begin([]Identity{UserID("open")})
	open.AddRcpt("rcpt@example.net")
	send(e.Engine, []Identity{UserID("dirty")}, 1)
	clk.Add(residentSpan + time.Second)
	e.sweep()
	for _, id := range []string{"user:bob", "user:open", "user:dirty"} {
		if !e.resident(id) {
			t.Fatalf("%s evicted before its flush or while in use", id)
		}
	}
	open.Commit()
	evictAll(t, e.Engine, clk)
	if n := e.residentCount(); n != 0 {
		t.Fatalf("%d states resident after eviction", n)
	}
	if got := usage(t, e.Engine, "user:bob", "rcpts", "1h"); got != 4 {
		t.Fatalf("evicted bob reads %d, want 4", got)
	}
	if e.resident("user:bob") {
		t.Fatal("Sender made bob resident")
	}
	if d := send(e.Engine, bob, 6); d.Action != Accept {
		t.Fatalf("back from bbolt, within the cap: %+v", d)
	}
	if d := send(e.Engine, bob, 1); d.Action != Defer || d.Limit != "10 recipients/1h" {
		t.Fatalf("11th after the round trip: %+v", d)
	}
	// Again, past the 1h window: only the 24h window still counts.
	evictAll(t, e.Engine, clk)
	clk.Add(time.Hour)
	if d := send(e.Engine, bob, 5); d.Action != Accept {
		t.Fatalf("%+v", d)
	}
	if got := usage(t, e.Engine, "user:bob", "rcpts", "24h"); got != 15 {
		t.Fatalf("24h window %d, want 15", got)
	}
	if d := send(e.Engine, bob, 1); d.Action != Defer || d.Limit != "15 recipients/24h" {
		t.Fatalf("16th in 24h: %+v", d)
	}
	// Reopened: nothing unsuspended is loaded, everything is counted.
	e.close()
	e2 := openTest(t, dir, cfg, clk, Options{})
	if n := e2.residentCount(); n != 0 {
		t.Fatalf("%d resident after New", n)
	}
	if d := send(e2.Engine, bob, 1); d.Action != Defer || d.Limit != "15 recipients/24h" {
		t.Fatalf("bob after reopen: %+v", d)
	}
	if got := usage(t, e2.Engine, "user:open", "rcpts", "24h"); got != 1 {
		t.Fatalf("open after reopen: %d", got)
	}
}

// TestMissUnderConcurrency: transactions racing to read the same
// non-resident identity end up sharing one state, and every charge lands.
func TestMissUnderConcurrency(t *testing.T) {
	cfg := baseConfig()
	userLimits(t, cfg, 0, "1000/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{FlushInterval: time.Hour})
	const racers = 8
	for round := range 20 {
		storedID := UserID("stored" + strconv.Itoa(round))
		send(e.Engine, []Identity{storedID}, 3)
		evictAll(t, e.Engine, clk)
		newID := UserID("new" + strconv.Itoa(round))
		for _, c := range []struct {
			id   Identity
			want int64
		}{{storedID, 3 + racers}, {newID, racers}} {
			states := make([]*idState, racers)
			var start, wg sync.WaitGroup
			start.Add(1)
			for g := range racers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					start.Wait()
					mtx := e.Begin([]Identity{c.id})
					states[g] = mtx.(*tx).ents[0].st
					mtx.AddRcpt("rcpt@example.net")
					mtx.Commit()
				}()
			}
			start.Done()
			wg.Wait()
			for g := range states {
				if states[g] != states[0] {
					t.Fatalf("round %d, %s: two states for one identity", round, c.id.ID)
				}
			}
			if got := usage(t, e.Engine, c.id.ID, "rcpts", "1h"); got != c.want {
				t.Fatalf("round %d, %s: %d counted, want %d", round, c.id.ID, got, c.want)
			}
		}
	}
}

// TestAdminSeesStoredIdentities: the admin view and admin actions cover
// identities that are only in bbolt; idle ones are neither listed nor
// kept.
func TestAdminSeesStoredIdentities(t *testing.T) {
	dir := t.TempDir()
	cfg := baseConfig()
	userLimits(t, cfg, 0, "2/1h")
	clk := newClock()
	e := openTest(t, dir, cfg, clk, Options{FlushInterval: time.Hour})
	send(e.Engine, []Identity{UserID("old")}, 1)
	e.close()
	clk.Add(25 * time.Hour)
	e = openTest(t, dir, cfg, clk, Options{FlushInterval: time.Hour})
	if n := e.residentCount(); n != 0 {
		t.Fatalf("%d resident after New on an idle store", n)
	}
	if got := e.Senders(StateAll); len(got) != 0 {
		t.Fatalf("idle stored identity listed: %+v", got)
	}
	if _, ok := e.Sender("user:old"); ok {
		t.Fatal("idle stored identity shown")
	}
	send(e.Engine, []Identity{UserID("a")}, 2) // at its cap
	send(e.Engine, []Identity{UserID("b")}, 1)
	evictAll(t, e.Engine, clk)
	send(e.Engine, []Identity{UserID("c")}, 1)
	var ids []string
	for _, s := range e.Senders(StateAll) {
		ids = append(ids, s.ID+"="+s.State)
	}
	if fmt.Sprint(ids) != "[user:c=ok user:a=throttled user:b=ok]" {
		t.Fatalf("Senders(all): %v", ids)
	}
	if got := e.Senders(StateThrottled); len(got) != 1 || got[0].ID != "user:a" || got[0].Usage[0].Used != 2 {
		t.Fatalf("Senders(throttled): %+v", got)
	}
	if s, ok := e.Sender("user:a"); !ok || s.State != StateThrottled || s.LastSeen.IsZero() {
		t.Fatalf("Sender(a): %+v", s)
	}

	// The hourly expiry drops idle stored records only.
	if err := e.expireStored(); err != nil {
		t.Fatal(err)
	}
	if stored(t, e.Engine, "user:old") || !stored(t, e.Engine, "user:a") || !stored(t, e.Engine, "user:b") {
		t.Fatal("expiry deleted the wrong records")
	}

	// Admin actions on non-resident identities.
	if err := e.Reset("user:a"); err != nil {
		t.Fatal(err)
	}
	if err := e.Suspend("user:b", "test"); err != nil {
		t.Fatal(err)
	}
	if err := e.Reset("user:nobody"); err == nil {
		t.Fatal("reset of an unknown identity: no error")
	}
	if got := e.Senders(StateSuspended); len(got) != 1 || got[0].ID != "user:b" || got[0].Usage[0].Used != 1 {
		t.Fatalf("Senders(suspended): %+v", got)
	}
	evictAll(t, e.Engine, clk) // a suspended identity stays resident
	if !e.resident("user:b") || e.resident("user:a") {
		t.Fatal("suspended identity evicted, or reset one kept")
	}
	e.close()
	e = openTest(t, dir, cfg, clk, Options{})
	if d := send(e.Engine, []Identity{UserID("b")}, 1); d.Action != Reject || !d.Suspended {
		t.Fatalf("suspension of a non-resident identity not durable: %+v", d)
	}
	if d := send(e.Engine, []Identity{UserID("a")}, 2); d.Action != Accept {
		t.Fatalf("reset of a non-resident identity not durable: %+v", d)
	}
	if err := e.Unsuspend("user:b"); err != nil {
		t.Fatal(err)
	}
	if got := usage(t, e.Engine, "user:b", "rcpts", "1h"); got != 1 {
		t.Fatalf("b's counts after suspend, restart and unsuspend: %d", got)
	}
}

// TestIdleStoreStaysOnDisk: New on a store of 100,000 identities without
// recent over-limit events keeps none of them in memory. The heap figures
// are logged (-v), not asserted.
func TestIdleStoreStaysOnDisk(t *testing.T) {
	if testing.Short() {
		t.Skip("seeds 100,000 identities")
	}
	dir := t.TempDir()
	cfg := baseConfig()
	big := &config.Limits{Rcpts: rates(t, "1000/1m", "1000/1h", "1000/24h"), Msgs: rates(t, "1000/1h")}
	cfg.Policy.Limits = config.KindLimits{User: big, Sender: big, Domain: big, IP: big}
	clk := newClock()
	seedStore(t, dir, cfg, clk, manyIdentities(100000))
	clk.Add(time.Hour)
	before := heapInuse()
	e := openTest(t, dir, cfg, clk, Options{})
	after := heapInuse()
	if n := e.residentCount(); n != 0 {
		t.Fatalf("%d identities resident after New on an idle store", n)
	}
	t.Logf("heap in use: %.1f MB before New, %.1f MB after (100,000 stored identities)", mb(before), mb(after))
	fileBefore := procStatus(t, "RssFile")
	start := time.Now()
	throttled := e.Senders(StateThrottled) // what the dashboard asks for
	t.Logf("Senders(throttled) over 100,000 stored identities: %d in %v", len(throttled), time.Since(start))
	start = time.Now()
	if got := len(e.Senders(StateAll)); got != 100000 {
		t.Fatalf("Senders(all) lists %d of 100,000 stored identities", got)
	}
	t.Logf("Senders(all): %v", time.Since(start))
	fileAfter := procStatus(t, "RssFile")
	t.Logf("RssFile %d kB before Senders(all), %d kB after", fileBefore, fileAfter)
	// The scan read all of the file (tens of MB); its pages leave the mapping.
	if fileAfter > fileBefore+8<<10 {
		t.Fatalf("Senders(all) left %d kB of bbolt's file mapped", fileAfter-fileBefore)
	}
	if n := e.residentCount(); n != 0 {
		t.Fatalf("Senders(all) made %d identities resident", n)
	}
	// Touching them all brings them in, as a busy hour would.
	for _, ids := range manyIdentities(100000) {
		send(e.Engine, ids, 1)
	}
	full := heapInuse()
	t.Logf("heap in use with all 100,000 resident: %.1f MB", mb(full))
	runtime.KeepAlive(e)
}

// seedStore charges one recipient to each message's identities in dir's
// store, with an engine that is gone when it returns.
func seedStore(t testing.TB, dir string, cfg *config.Config, clk *fakeClock, msgs [][]Identity) {
	t.Helper()
	db, err := OpenDB(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	e, err := New(db, cfg, Options{Now: clk.Now, FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for _, ids := range msgs {
		if d := send(e, ids, 1); d.Action != Accept {
			t.Fatal(d)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// manyIdentities returns n identities as n/4 messages of four.
func manyIdentities(n int) [][]Identity {
	msgs := make([][]Identity, n/4)
	for i := range msgs {
		s := strconv.Itoa(i)
		msgs[i] = []Identity{UserID("user" + s), IPID(mustAddr(fmt.Sprintf("10.%d.%d.%d", byte(i>>16), byte(i>>8), byte(i)))),
			SenderID("s" + s + "@example.com"), {ID: "domain:d" + s + ".example", Kind: "domain"}}
	}
	return msgs
}

func heapInuse() uint64 {
	runtime.GC()
	runtime.GC() // the first may leave spans of the previous cycle unswept
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// procStatus returns a "NNN kB" field of /proc/self/status in kB.
func procStatus(t testing.TB, field string) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip(err)
	}
	for line := range strings.Lines(string(b)) {
		if name, v, ok := strings.Cut(line, ":"); ok && name == field {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("%s: %q", field, v)
			}
			return n
		}
	}
	t.Skipf("no %s in /proc/self/status", field)
	return 0
}

func mb(n uint64) float64 { return float64(n) / (1 << 20) }

// Senders(active) lists only identities in memory and reads nothing from
// the store: the dashboard's "busiest now" stays cheap with a big store.
func TestSendersActiveIsMemoryOnly(t *testing.T) {
	dir := t.TempDir()
	cfg := baseConfig()
	cfg.Policy.Limits.User = &config.Limits{Rcpts: rates(t, "100/1h")}
	clk := newClock()
	seedStore(t, dir, cfg, clk, manyIdentities(50))
	e := openTest(t, dir, cfg, clk, Options{})
	if got := e.Senders(StateActive); len(got) != 0 {
		t.Fatalf("active after New on an idle store: %d", len(got))
	}
	if got := len(e.Senders(StateAll)); got == 0 {
		t.Fatal("the seeded identities are not listed under all")
	}
	send(e.Engine, []Identity{UserID("fresh")}, 1)
	got := e.Senders(StateActive)
	if len(got) != 1 || got[0].ID != "user:fresh" {
		t.Fatalf("active: %+v", got)
	}
}
