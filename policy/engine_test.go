package policy

import (
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"relay/config"
)

func userLimits(t *testing.T, cfg *config.Config, maxRcpts int, rcpts ...string) {
	cfg.Policy.Limits.User = &config.Limits{MaxRcptsPerMsg: maxRcpts, Rcpts: rates(t, rcpts...)}
}

func TestDeferTextAndRetry(t *testing.T) {
	cfg := baseConfig()
	userLimits(t, cfg, 0, "3/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	bob := []Identity{UserID("bob"), SenderID("bob@example.com")}

	tx := e.Begin(bob)
	for i := range 3 {
		if d := tx.AddRcpt("rcpt@example.net"); d.Action != Accept {
			t.Fatalf("rcpt %d: %+v", i, d)
		}
	}
	d := tx.AddRcpt("rcpt@example.net")
	if d.Action != Defer || d.Identity != "user:bob" || d.Limit != "3 recipients/1h" {
		t.Fatalf("4th rcpt: %+v", d)
	}
	// Only this transaction's reservations block: retry in one bucket.
	if d.RetryIn != time.Minute {
		t.Fatalf("RetryIn with reservations only %v, want 1m", d.RetryIn)
	}
	tx.Commit()
	tx.Abort() // after Commit: a no-op

	clk.Add(10 * time.Minute)
	d = send(e.Engine, bob, 1)
	// Charged at 10:00:00.5, bucket 10:00; frees when the clock reaches 11:01.
	if want := "user:bob is over 3 recipients/1h; try again in 51m"; d.Text() != want || d.Action != Defer {
		t.Fatalf("got %v %q, want %q", d.Action, d.Text(), want)
	}
	clk.Add(d.RetryIn - time.Second)
	if d := send(e.Engine, bob, 1); d.Action != Defer {
		t.Fatalf("accepted before RetryIn: %+v", d)
	}
	clk.Add(time.Second)
	if d := send(e.Engine, bob, 3); d.Action != Accept {
		t.Fatalf("refused at RetryIn: %+v", d)
	}
}

func TestOverLimitActions(t *testing.T) {
	for _, c := range []struct {
		overLimit string
		action    Action
	}{{"defer", Defer}, {"reject", Reject}, {"hold", Hold}} {
		t.Run(c.overLimit, func(t *testing.T) {
			cfg := baseConfig()
			cfg.Policy.OverLimit = c.overLimit
			userLimits(t, cfg, 0, "2/1h")
			clk := newClock()
			e := openTest(t, t.TempDir(), cfg, clk, Options{})
			ids := []Identity{UserID("bob")}
			if d := send(e.Engine, ids, 2); d.Action != Accept {
				t.Fatal(d)
			}
			tx := e.Begin(ids)
			d := tx.AddRcpt("rcpt@example.net")
			if d.Action != c.action || !strings.HasPrefix(d.Text(), "user:bob is over 2 recipients/1h; try again in ") {
				t.Fatalf("got %v %q", d.Action, d.Text())
			}
			if c.action != Hold {
				tx.Abort()
				return
			}
			// Hold is sticky for the rest of the message and charges nothing.
			if d2 := tx.AddRcpt("rcpt@example.net"); d2.Action != Hold {
				t.Fatalf("2nd rcpt after hold: %+v", d2)
			}
			if d2 := tx.Message(); d2.Action != Hold {
				t.Fatalf("Message after hold: %+v", d2)
			}
			tx.Held("h123")
			if got := usage(t, e.Engine, "user:bob", "rcpts", "1h"); got != 2 {
				t.Fatalf("used %d after hold, want 2", got)
			}
			evs := e.Events(EventFilter{Kind: EventHeld})
			if len(evs) != 1 || !strings.Contains(evs[0].Detail, "h123") || evs[0].Identity != "user:bob" {
				t.Fatalf("held events: %+v", evs)
			}
		})
	}
}

func TestTooManyRcpts(t *testing.T) {
	cfg := baseConfig()
	userLimits(t, cfg, 2, "100/1h")
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	tx := e.Begin([]Identity{UserID("bob")})
	tx.AddRcpt("rcpt@example.net")
	tx.AddRcpt("rcpt@example.net")
	d := tx.AddRcpt("rcpt@example.net")
	if d.Action != TooManyRcpts || d.Text() != "user:bob is over 2 recipients per message" {
		t.Fatalf("got %v %q", d.Action, d.Text())
	}
	if d := tx.Message(); d.Action != Accept {
		t.Fatal(d)
	}
	tx.Commit()
	if got := usage(t, e.Engine, "user:bob", "rcpts", "1h"); got != 2 {
		t.Fatalf("charged %d, want 2", got)
	}
	if evs := e.Events(EventFilter{}); len(evs) != 0 {
		t.Fatalf("per-message cap recorded events: %+v", evs)
	}
}

func TestAbortReleasesAndRefusedNeverCharged(t *testing.T) {
	cfg := baseConfig()
	userLimits(t, cfg, 0, "5/1h")
	cfg.Policy.Limits.Sender = &config.Limits{Msgs: rates(t, "1/1h")}
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	ids := []Identity{UserID("bob"), SenderID("bob@example.com")}
	tx := e.Begin(ids)
	for range 5 {
		tx.AddRcpt("rcpt@example.net")
	}
	tx.Abort()
	tx.Abort()
	if d := send(e.Engine, ids, 5); d.Action != Accept {
		t.Fatalf("after abort: %+v", d)
	}
	// The msgs cap of the sender refuses the next message at Message():
	// its recipients are released, not charged.
	d := send(e.Engine, ids, 0)
	if d.Action != Defer || d.Identity != "sender:bob@example.com" || d.Limit != "1 message/1h" {
		t.Fatalf("got %+v", d)
	}
	if got := usage(t, e.Engine, "user:bob", "rcpts", "1h"); got != 5 {
		t.Fatalf("used %d, want 5", got)
	}
}

func TestAddIdentities(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.UID = &config.Limits{MaxRcptsPerMsg: 10, Rcpts: rates(t, "4/1h"), Msgs: rates(t, "1/1h")}
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	ip := IPID(mustAddr("10.0.0.11"))
	web := WebUID("web1", 1001, "bob", "contact.php")

	tx := e.Begin([]Identity{ip, SenderID("www@example.com")})
	for range 3 {
		tx.AddRcpt("rcpt@example.net")
	}
	tx.Message()
	if d := tx.AddIdentities(web); d.Action != Accept {
		t.Fatalf("3 rcpts for 4/1h: %+v", d)
	}
	if got := tx.Identities(); got[0].ID != "uid:web1:1001" || got[0].Script != "contact.php" {
		t.Fatalf("identities not strongest first: %+v", got)
	}
	tx.Commit()
	if got := usage(t, e.Engine, "uid:web1:1001", "rcpts", "1h"); got != 3 {
		t.Fatalf("uid charged %d rcpts, want 3", got)
	}
	s, _ := e.Sender("uid:web1:1001")
	if s.Account != "bob" || len(s.Scripts) != 1 || s.Scripts[0] != "contact.php" || s.Rule != "default uid" {
		t.Fatalf("sender view: %+v", s)
	}

	// The next message: 2 recipients would make 5 > 4.
	tx = e.Begin([]Identity{ip})
	tx.AddRcpt("rcpt@example.net")
	tx.AddRcpt("rcpt@example.net")
	d := tx.AddIdentities(web)
	if d.Action != Defer || d.Identity != "uid:web1:1001" || d.Limit != "4 recipients/1h" {
		t.Fatalf("got %+v", d)
	}
	tx.Abort()

	// A forged header cannot help: a suspended uid is refused at DATA.
	if err := e.Suspend("uid:web1:1001", "stolen"); err != nil {
		t.Fatal(err)
	}
	tx = e.Begin([]Identity{ip})
	tx.AddRcpt("rcpt@example.net")
	if d := tx.AddIdentities(web); d.Action != Reject || !d.Suspended || d.Text() != "uid:web1:1001 is suspended" {
		t.Fatalf("suspended at DATA: %+v", d)
	}
	tx.Abort()
}

func TestAllowlist(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.Sender = &config.Limits{MaxRcptsPerMsg: 50, Rcpts: rates(t, "100/1h", "500/24h")}
	cfg.Policy.Limits.UID = &config.Limits{Rcpts: rates(t, "100/1h")}
	cfg.Policy.Allow = []config.AllowRule{
		{Match: "sender:*@Lists.Example.com", MaxRcptsPerMsg: 5000, Rcpts: rates(t, "50000/24h")},
		{Match: "sender:news@lists.example.com", Unlimited: true}, // shadowed: first match wins
		{Match: "uid:web1:*", Unlimited: true},
	}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	list := []Identity{SenderID("news@lists.example.com")}
	thief := []Identity{SenderID("bob@example.com")}

	// 20,000 recipients over a day, 500 per message: the list passes.
	for i := range 40 {
		if d := send(e.Engine, list, 500); d.Action != Accept {
			t.Fatalf("list message %d: %+v", i, d)
		}
		clk.Add(30 * time.Minute)
	}
	s, _ := e.Sender("sender:news@lists.example.com")
	if s.Rule != "allow sender:*@Lists.Example.com" {
		t.Fatalf("rule %q: first match should win", s.Rule)
	}
	// Its 50000/24h cap is still a cap.
	if d := send(e.Engine, list, 5000); d.Action != Accept {
		t.Fatalf("list 5000: %+v", d)
	}
	if d := send(e.Engine, list, 5001); d.Action != TooManyRcpts {
		t.Fatalf("list over its per-message cap: %+v", d)
	}
	// The stolen login next to it is stopped at the default cap.
	if d := send(e.Engine, thief, 50); d.Action != Accept {
		t.Fatal(d)
	}
	if d := send(e.Engine, thief, 50); d.Action != Accept {
		t.Fatal(d)
	}
	if d := send(e.Engine, thief, 1); d.Action != Defer || d.Limit != "100 recipients/1h" {
		t.Fatalf("thief: %+v", d)
	}
	// unlimited = true.
	for range 5 {
		if d := send(e.Engine, []Identity{WebUID("web1", 33, "", "")}, 100); d.Action != Accept {
			t.Fatalf("unlimited uid: %+v", d)
		}
	}
	if d := send(e.Engine, []Identity{WebUID("web2", 33, "", "")}, 101); d.Action != Defer {
		t.Fatalf("web2 is not allowlisted: %+v", d)
	}
}

// TestLastSlotRace lets many sessions of one identity race for the last
// slots: exactly the cap gets through.
func TestLastSlotRace(t *testing.T) {
	cfg := baseConfig()
	userLimits(t, cfg, 0, "20/1h")
	cfg.Policy.Limits.IP = &config.Limits{Rcpts: rates(t, "1000/1h")}
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	for round := range 20 {
		id := UserID("race" + string(rune('a'+round)))
		if d := send(e.Engine, []Identity{id}, 19); d.Action != Accept {
			t.Fatal(d)
		}
		var won atomic.Int64
		var start, wg sync.WaitGroup
		start.Add(1)
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ids := []Identity{IPID(mustAddr("192.0.2.1")), id, SenderID("x" + string(rune('a'+g)) + "@example.com")}
				start.Wait()
				if send(e.Engine, ids, 1).Action == Accept {
					won.Add(1)
				}
			}()
		}
		start.Done()
		wg.Wait()
		if won.Load() != 1 {
			t.Fatalf("round %d: %d sessions got the last slot", round, won.Load())
		}
	}
	// Many sessions sending until refused never pass the cap together.
	id := UserID("flood")
	var accepted atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 50 {
				tx := e.Begin([]Identity{id})
				n := int64(0)
				for range 3 {
					if tx.AddRcpt("rcpt@example.net").Action == Accept {
						n++
					}
				}
				if n%2 == 0 {
					tx.Abort() // some sessions give up: released, not charged
					continue
				}
				tx.Commit()
				accepted.Add(n)
			}
		}()
	}
	wg.Wait()
	if got := usage(t, e.Engine, "user:flood", "rcpts", "1h"); got != accepted.Load() || got > 20 {
		t.Fatalf("charged %d, committed %d, cap 20", got, accepted.Load())
	}
}

func TestSuspensionDurable(t *testing.T) {
	dir := t.TempDir()
	cfg := baseConfig()
	cfg.Policy.SuspendAfter = 3
	userLimits(t, cfg, 0, "1/1h")
	clk := newClock()
	e := openTest(t, dir, cfg, clk, Options{})
	bob := []Identity{UserID("bob")}
	send(e.Engine, bob, 1)
	for i := range 3 {
		clk.Add(time.Minute)
		if d := send(e.Engine, bob, 1); d.Action != Defer {
			t.Fatalf("attempt %d: %+v", i, d)
		}
	}
	d := send(e.Engine, bob, 1)
	if d.Action != Reject || !d.Suspended || d.Text() != "user:bob is suspended" {
		t.Fatalf("after 3 over-limit events: %+v", d)
	}
	// A message that carries bob among other identities is refused too.
	if d := send(e.Engine, []Identity{SenderID("x@y"), UserID("bob")}, 1); d.Action != Reject {
		t.Fatalf("%+v", d)
	}
	kinds := map[string]int{}
	for _, ev := range e.Events(EventFilter{Identity: "user:bob"}) {
		kinds[ev.Kind]++
	}
	if kinds[EventThrottleStart] != 1 || kinds[EventSuspended] != 1 || kinds[EventOverLimit] != 3 {
		t.Fatalf("events %v", kinds)
	}
	// Durable: no Close, just the file as it is (suspensions are written
	// before the decision returns). Snapshot the db like a crash would.
	snap := snapshotDB(t, e)
	e.close()
	e2 := openTest(t, snap, cfg, clk, Options{})
	s, ok := e2.Sender("user:bob")
	if !ok || s.State != StateSuspended || s.Suspension == nil || !s.Suspension.Auto || !strings.Contains(s.Suspension.Reason, "3 over-limit events") {
		t.Fatalf("after crash: %+v", s)
	}
	if got := e2.Senders(StateSuspended); len(got) != 1 || got[0].ID != "user:bob" {
		t.Fatalf("Senders(suspended): %+v", got)
	}
	if err := e2.Unsuspend("user:bob"); err != nil {
		t.Fatal(err)
	}
	e2.close()
	e3 := openTest(t, snap, cfg, clk, Options{})
	// The snapshot was taken before any flush: counts were lost, the
	// suspension was not. Unsuspended, bob is back under his rate cap.
	if d := send(e3.Engine, bob, 1); d.Action != Accept {
		t.Fatalf("after unsuspend and reopen: %+v", d)
	}
	if d := send(e3.Engine, bob, 1); d.Action != Defer {
		t.Fatalf("rate cap after unsuspend: %+v", d)
	}
	if err := e3.Unsuspend("user:bob"); err == nil {
		t.Fatal("unsuspending twice: no error")
	}
	if err := e3.Suspend("nokind", "x"); err == nil {
		t.Fatal("suspending a non-id: no error")
	}
}

func TestObserveMode(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Mode = config.PolicyObserve
	cfg.Policy.SuspendAfter = 2
	userLimits(t, cfg, 0, "1/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	bob := []Identity{UserID("bob")}
	for i := range 4 {
		tx := e.Begin(bob)
		d := tx.AddRcpt("rcpt@example.net")
		if d.Action != Accept {
			t.Fatalf("observe blocked message %d: %+v", i, d)
		}
		if i > 0 && (!d.Observed || d.WouldBe != Defer || d.Text() == "") {
			t.Fatalf("message %d: %+v", i, d)
		}
		tx.Commit()
		clk.Add(2 * time.Minute)
	}
	if got := usage(t, e.Engine, "user:bob", "rcpts", "1h"); got != 4 {
		t.Fatalf("observe mode counted %d, want 4", got)
	}
	var would []string
	for _, ev := range e.Events(EventFilter{Kind: EventObserve}) {
		would = append(would, ev.Detail)
	}
	if len(would) < 2 || !strings.Contains(strings.Join(would, "|"), "would suspend") || !strings.Contains(strings.Join(would, "|"), "would defer") {
		t.Fatalf("observe events: %q", would)
	}
	if s, _ := e.Sender("user:bob"); s.Suspension != nil {
		t.Fatal("observe mode suspended")
	}
	if err := e.Suspend("user:bob", "admin"); err != nil {
		t.Fatal(err)
	}
	d := e.Begin(bob).Check()
	if d.Action != Accept || !d.Observed || d.WouldBe != Reject || !d.Suspended {
		t.Fatalf("observe, suspended: %+v", d)
	}
}

func TestRestartKeepsCounters(t *testing.T) {
	dir := t.TempDir()
	cfg := baseConfig()
	userLimits(t, cfg, 0, "10/1h", "12/24h")
	clk := newClock()
	e := openTest(t, dir, cfg, clk, Options{})
	send(e.Engine, []Identity{UserID("bob")}, 7)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e.db.Close()
	clk.Add(time.Minute)
	e2 := openTest(t, dir, cfg, clk, Options{})
	if got := usage(t, e2.Engine, "user:bob", "rcpts", "1h"); got != 7 {
		t.Fatalf("after restart %d, want 7", got)
	}
	if d := send(e2.Engine, []Identity{UserID("bob")}, 3); d.Action != Accept {
		t.Fatal(d)
	}
	if d := send(e2.Engine, []Identity{UserID("bob")}, 1); d.Action != Defer {
		t.Fatalf("11th: %+v", d)
	}
}

func TestCrashLosesAtMostOneFlush(t *testing.T) {
	cfg := baseConfig()
	userLimits(t, cfg, 0, "100/1h")
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{FlushInterval: 20 * time.Millisecond})
	send(e.Engine, []Identity{UserID("bob")}, 5)
	// The flusher writes without Close; wait (bounded) until it has.
	deadline := time.Now().Add(10 * time.Second)
	for {
		e2 := openTest(t, snapshotDB(t, e), cfg, clk, Options{})
		s, ok := e2.Sender("user:bob")
		e2.close()
		if ok && s.Usage[0].Used == 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("counts never flushed: %+v", s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestReloadKeepsCounters(t *testing.T) {
	cfg := baseConfig()
	userLimits(t, cfg, 0, "10/1h")
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	bob := []Identity{UserID("bob")}
	send(e.Engine, bob, 5)
	cfg2 := baseConfig()
	cfg2.Policy.OverLimit = config.OverLimitReject
	userLimits(t, cfg2, 0, "6/1h")
	if err := e.Reload(cfg2); err != nil {
		t.Fatal(err)
	}
	if d := send(e.Engine, bob, 1); d.Action != Accept {
		t.Fatal(d)
	}
	if d := send(e.Engine, bob, 1); d.Action != Reject || d.Limit != "6 recipients/1h" {
		t.Fatalf("after reload: %+v", d)
	}
	bad := baseConfig()
	bad.Policy.Allow = []config.AllowRule{{Match: "*", Unlimited: true}}
	if err := e.Reload(bad); err == nil {
		t.Fatal("bad allow rule accepted")
	}
	if d := send(e.Engine, bob, 1); d.Action != Reject {
		t.Fatalf("failed reload changed policy: %+v", d)
	}
}

func TestAdminOps(t *testing.T) {
	dir := t.TempDir()
	cfg := baseConfig()
	userLimits(t, cfg, 0, "2/1h")
	clk := newClock()
	e := openTest(t, dir, cfg, clk, Options{})
	bob, amy := []Identity{UserID("bob")}, []Identity{UserID("amy")}
	send(e.Engine, amy, 1)
	send(e.Engine, bob, 2)
	send(e.Engine, bob, 1)
	if got := e.Senders(StateThrottled); len(got) != 1 || got[0].ID != "user:bob" {
		t.Fatalf("throttled: %+v", got)
	}
	if got := e.Senders(StateAll); len(got) != 2 {
		t.Fatalf("all: %+v", got)
	}
	s, _ := e.Sender("user:bob")
	if !strings.Contains(s.LastDecision, "defer: user:bob is over 2 recipients/1h") || !strings.Contains(s.LastDecision, "default user") {
		t.Fatalf("last decision %q", s.LastDecision)
	}
	if len(s.Events) == 0 || s.Events[0].Identity != "user:bob" {
		t.Fatalf("sender events: %+v", s.Events)
	}
	if err := e.Reset("user:bob"); err != nil {
		t.Fatal(err)
	}
	if d := send(e.Engine, bob, 2); d.Action != Accept {
		t.Fatalf("after reset: %+v", d)
	}
	if err := e.RecordEvent(Event{Kind: EventReload, Detail: "by admin"}); err != nil {
		t.Fatal(err)
	}
	evs := e.Events(EventFilter{Limit: 2})
	if len(evs) != 2 || evs[0].Kind != EventReload || evs[0].Seq <= evs[1].Seq {
		t.Fatalf("newest first: %+v", evs)
	}
	e.close()
	e2 := openTest(t, dir, cfg, clk, Options{})
	if got := e2.Events(EventFilter{Kind: EventReset}); len(got) != 1 {
		t.Fatalf("reset event not durable: %+v", got)
	}
	if got := e2.Events(EventFilter{}); got[0].Kind != EventReload {
		t.Fatalf("events after reopen: %+v", got)
	}
	if err := e2.RecordEvent(Event{Kind: EventReleased}); err != nil {
		t.Fatal(err)
	}
	if got := e2.Events(EventFilter{Limit: 1}); got[0].Seq != evs[0].Seq+1 {
		t.Fatalf("seq not continued: %+v after %+v", got, evs[0])
	}
}

func TestEventsBounded(t *testing.T) {
	dir := t.TempDir()
	e := openTest(t, dir, baseConfig(), newClock(), Options{})
	for i := range maxEvents + 30 {
		e.events.add(Event{Kind: EventReload, Detail: string(rune('a' + i%26))}, true)
	}
	if err := e.flush(); err != nil {
		t.Fatal(err)
	}
	if got := len(e.Events(EventFilter{})); got != maxEvents {
		t.Fatalf("%d events in memory", got)
	}
	e.close()
	e2 := openTest(t, dir, baseConfig(), newClock(), Options{})
	evs := e2.Events(EventFilter{})
	if len(evs) != maxEvents || evs[0].Seq != maxEvents+30 || evs[len(evs)-1].Seq != 31 {
		t.Fatalf("%d events after reopen, newest %d oldest %d", len(evs), evs[0].Seq, evs[len(evs)-1].Seq)
	}
}

// TestAddIdentitiesKnownIDLearnsScript: the local socket gives uid:local at
// MAIL, the header gives its script at DATA; one identity, counted once.
func TestAddIdentitiesKnownIDLearnsScript(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.UID = &config.Limits{Rcpts: rates(t, "10/1h")}
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	tx := e.Begin([]Identity{LocalUID(1001, "bob"), SenderID("bob@example.com")})
	tx.AddRcpt("rcpt@example.net")
	tx.AddRcpt("rcpt@example.net")
	if d := tx.AddIdentities(LocalUID(1001, "bob")); d.Action != Accept {
		t.Fatalf("same identity again: %+v", d)
	}
	withScript := LocalUID(1001, "bob")
	withScript.Script = "form.php"
	if d := tx.AddIdentities(withScript); d.Action != Accept {
		t.Fatalf("script added: %+v", d)
	}
	if got := tx.Identities(); len(got) != 2 || got[0].Script != "form.php" {
		t.Fatalf("identities: %+v", got)
	}
	tx.Commit()
	if got := usage(t, e.Engine, "uid:local:1001", "rcpts", "1h"); got != 2 {
		t.Fatalf("uid charged %d rcpts, want 2", got)
	}
	if s, _ := e.Sender("uid:local:1001"); len(s.Scripts) != 1 || s.Scripts[0] != "form.php" {
		t.Fatalf("scripts %v", s.Scripts)
	}
}

// TestNullSenderNotCappedAsASender: bounces share sender:<>; it is capped
// only by an allow rule that names it, and still counts for its IP.
func TestNullSenderNotCappedAsASender(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.Sender = &config.Limits{Rcpts: rates(t, "2/1h")}
	cfg.Policy.Limits.IP = &config.Limits{Rcpts: rates(t, "5/1h")}
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	ip := IPID(mustAddr("10.0.0.1"))
	for i := range 5 {
		tx := e.Begin([]Identity{SenderID(""), ip})
		if d := tx.AddRcpt("rcpt@example.net"); d.Action != Accept {
			t.Fatalf("bounce %d: %+v", i, d)
		}
		tx.Commit()
	}
	tx := e.Begin([]Identity{SenderID(""), ip})
	if d := tx.AddRcpt("rcpt@example.net"); d.Action != Defer || d.Identity != ip.ID {
		t.Fatalf("6th bounce from one IP: %+v, want the IP's cap", d)
	}
	tx.Abort()

	cfg.Policy.Allow = []config.AllowRule{{Match: "sender:<>", Rcpts: rates(t, "1/1h")}}
	if err := e.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	tx = e.Begin([]Identity{SenderID("")})
	if d := tx.AddRcpt("rcpt@example.net"); d.Action != Accept {
		t.Fatalf("first bounce under the allow rule: %+v", d)
	}
	tx.Commit()
	tx = e.Begin([]Identity{SenderID("")})
	if d := tx.AddRcpt("rcpt@example.net"); d.Action != Defer || d.Identity != "sender:<>" {
		t.Fatalf("an allow rule naming sender:<> caps it: %+v", d)
	}
	tx.Abort()
}
