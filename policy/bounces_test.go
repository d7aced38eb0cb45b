package policy

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"relay/config"
)

func bounceConfig(t testing.TB, l config.Limits) *config.Config {
	cfg := baseConfig()
	cfg.Policy.Limits.User = &l
	return cfg
}

func deliveries(e *Engine, id, outcome string, n int, at time.Time) {
	for range n {
		e.RecordDelivery([]string{id}, outcome, at)
	}
}

func TestBouncesCap(t *testing.T) {
	cfg := bounceConfig(t, config.Limits{Bounces: rates(t, "2/1h")})
	cfg.Policy.SuspendAfter = 3
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	deliveries(e.Engine, "user:bob", DeliveryFailure, 2, clk.Now())
	deliveries(e.Engine, "user:bob", DeliveryDeferral, 10, clk.Now())
	if d := sendTo(e.Engine, bobIDs, "a@x.org"); d.Action != Accept {
		t.Fatalf("at the cap (2 failures, deferrals never count): %+v", d)
	}
	clk.Add(10 * time.Minute)
	deliveries(e.Engine, "user:bob", DeliveryFailure, 1, clk.Now())
	d := sendTo(e.Engine, bobIDs, "a@x.org")
	if d.Action != Defer || d.Identity != "user:bob" || d.Limit != "2 bounces/1h" {
		t.Fatalf("over the cap: %+v", d)
	}
	// The first two failures leave the window at 11:01 (bucket 10:00).
	if want := "user:bob is over 2 bounces/1h; try again in 51m"; d.Text() != want {
		t.Fatalf("text %q, want %q", d.Text(), want)
	}
	evs := e.Events(EventFilter{Identity: "user:bob", Kind: EventOverLimit})
	if len(evs) == 0 || !strings.Contains(evs[0].Detail, "over 2 bounces/1h (used 3, default user)") {
		t.Fatalf("event does not name the signal: %+v", evs)
	}
	// suspend_after counts refusals over a signal like any other.
	for range 2 {
		clk.Add(2 * time.Minute)
		sendTo(e.Engine, bobIDs, "a@x.org")
	}
	if s, _ := e.Sender("user:bob"); s.State != StateSuspended {
		t.Fatalf("not suspended after 3 refusals over bounces: %+v", s)
	}
}

func TestBounceRatio(t *testing.T) {
	cfg := bounceConfig(t, config.Limits{Rcpts: rates(t, "1000/1h", "5000/6h"), MaxBounceRatio: 0.3, MinBounceSample: 10})
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	// 4 of 9 failed: over 0.3 but under the sample.
	deliveries(e.Engine, "user:bob", DeliveryFailure, 4, clk.Now())
	deliveries(e.Engine, "user:bob", DeliverySuccess, 5, clk.Now())
	deliveries(e.Engine, "user:bob", DeliveryDeferral, 50, clk.Now())
	if d := sendTo(e.Engine, bobIDs, "a@x.org"); d.Action != Accept {
		t.Fatalf("under min_bounce_sample: %+v", d)
	}
	clk.Add(time.Hour)
	deliveries(e.Engine, "user:bob", DeliverySuccess, 1, clk.Now()) // 4 of 10
	d := sendTo(e.Engine, bobIDs, "a@x.org")
	if d.Action != Defer || d.Limit != "30% bounces/6h" {
		t.Fatalf("4 of 10 failed: %+v", d)
	}
	// The first ones (bucket 10:00 of 6m) leave the 6h window at 16:06.
	if d.RetryIn != 5*time.Hour+6*time.Minute-500*time.Millisecond {
		t.Fatalf("retry in %v", d.RetryIn)
	}
	evs := e.Events(EventFilter{Identity: "user:bob", Kind: EventOverLimit})
	if len(evs) == 0 || !strings.Contains(evs[0].Detail, "over 30% bounces/6h (4 of 10 deliveries failed") {
		t.Fatalf("event: %+v", evs)
	}
	s, _ := e.Sender("user:bob")
	dl := s.Deliveries
	if dl == nil || dl.Window != "6h" || dl.Successes != 6 || dl.Failures != 4 || dl.Deferrals != 50 ||
		dl.BounceRate != 0.4 || dl.MaxBounceRatio != 0.3 || dl.MinBounceSample != 10 || s.State != StateThrottled {
		t.Fatalf("sender view: %+v %+v", s, dl)
	}
	// Successes bring the ratio down: 4 of 14 is under 0.3.
	deliveries(e.Engine, "user:bob", DeliverySuccess, 4, clk.Now())
	if d := sendTo(e.Engine, bobIDs, "a@x.org"); d.Action != Accept {
		t.Fatalf("4 of 14: %+v", d)
	}
}

// Every identity of a message counts its deliveries, capped or not, on a
// 24h window by default; they survive a restart.
func TestDeliveriesShownAndDurable(t *testing.T) {
	cfg := bounceConfig(t, config.Limits{Bounces: rates(t, "20/1h")})
	clk := newClock()
	dir := t.TempDir()
	e := openTest(t, dir, cfg, clk, Options{})
	ids := []string{"user:bob", "sender:bob@example.com", "ip:10.0.0.1"}
	e.RecordDelivery(ids, DeliveryFailure, clk.Now())
	e.RecordDelivery(ids, DeliverySuccess, clk.Now())
	e.RecordDelivery(ids, DeliveryDeferral, clk.Now())
	e.RecordDelivery(ids, "mangled", clk.Now())
	e.RecordDelivery([]string{"nokind"}, DeliveryFailure, clk.Now())
	e.Close()
	e.db.Close()
	e2 := openTest(t, dir, cfg, clk, Options{})
	s, ok := e2.Sender("user:bob")
	if !ok || usage(t, e2.Engine, "user:bob", "bounces", "1h") != 1 {
		t.Fatalf("user:bob %+v", s)
	}
	if d := s.Deliveries; d == nil || d.Window != "1h" || d.Failures != 1 || d.Successes != 1 || d.Deferrals != 1 || d.BounceRate != 0.5 {
		t.Fatalf("user:bob deliveries %+v", s.Deliveries)
	}
	s, ok = e2.Sender("sender:bob@example.com")
	if d := s.Deliveries; !ok || d == nil || d.Window != "24h" || d.Failures != 1 || d.Deferrals != 1 || len(s.Usage) != 0 {
		t.Fatalf("uncapped sender: %+v", s)
	}
}

// Lines read late (a follower catching up) count at the time they were
// logged: older than a window, not at all.
func TestDeliveryAtLogTime(t *testing.T) {
	cfg := bounceConfig(t, config.Limits{Bounces: rates(t, "5/1h", "100/24h")})
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	now := clk.Now()
	deliveries(e.Engine, "user:bob", DeliveryFailure, 3, now.Add(-2*time.Hour))
	deliveries(e.Engine, "user:bob", DeliveryFailure, 2, now.Add(-30*time.Minute))
	deliveries(e.Engine, "user:bob", DeliveryFailure, 1, now.Add(time.Hour)) // a clock ahead: now
	if u1, u24 := usage(t, e.Engine, "user:bob", "bounces", "1h"), usage(t, e.Engine, "user:bob", "bounces", "24h"); u1 != 3 || u24 != 6 {
		t.Fatalf("1h %d, 24h %d; want 3, 6", u1, u24)
	}
	// The two of 9:30 leave the 1h window at 10:31.
	clk.Add(30 * time.Minute)
	if u1 := usage(t, e.Engine, "user:bob", "bounces", "1h"); u1 != 3 {
		t.Fatalf("1h %d at 10:30, want 3", u1)
	}
	clk.Add(time.Minute)
	if u1 := usage(t, e.Engine, "user:bob", "bounces", "1h"); u1 != 1 {
		t.Fatalf("1h %d at 10:31, want 1", u1)
	}
}

func TestAddAtKeepsBucketsOrdered(t *testing.T) {
	w := newWindow(metricBounces, time.Hour)
	now := int64(100 * time.Hour)
	for _, ago := range []time.Duration{5, 50, 20, 20, 59, 0, 61} {
		w.addAt(now, now-int64(ago*time.Minute), 1)
	}
	if w.sum != 6 || len(w.buckets) != 5 {
		t.Fatalf("sum %d buckets %+v", w.sum, w.buckets)
	}
	for i := 1; i < len(w.buckets); i++ {
		if w.buckets[i].idx <= w.buckets[i-1].idx {
			t.Fatalf("buckets out of order: %+v", w.buckets)
		}
	}
}

func TestSignalsConfigCompiles(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.User = &config.Limits{Bounces: []config.Rate{{N: 0, Window: time.Hour}}}
	if _, err := compileConf(cfg); err == nil {
		t.Error("a zero bounces cap compiled")
	}
	cfg.Policy.Limits.User = &config.Limits{MaxBounceRatio: 2}
	if _, err := compileConf(cfg); err == nil {
		t.Error("a ratio of 2 compiled")
	}
	cfg.Policy.Limits.User = &config.Limits{MaxBounceRatio: 0.2, Msgs: rates(t, "10/2h"), NewRcpts: rates(t, "5/3h")}
	c, err := compileConf(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if ls := c.defaults[0]; ls.ratioWindow != 3*time.Hour || ls.minSample != config.DefaultMinBounceSample {
		t.Errorf("ratio window %v, sample %d", ls.ratioWindow, ls.minSample)
	}
	// Recipients are hashed only when some cap asks for first-time ones.
	cfg.Policy.Limits.User = &config.Limits{Rcpts: rates(t, "10/1h")}
	if c, _ := compileConf(cfg); c.anyNewRcpts {
		t.Error("anyNewRcpts without new_rcpts")
	}
	cfg.Policy.Allow = []config.AllowRule{{Match: "sender:*@lists.example.com", NewRcpts: rates(t, "5000/24h")}}
	if c, _ := compileConf(cfg); !c.anyNewRcpts {
		t.Error("new_rcpts in an allow entry not seen")
	}
}

// testPart is a FlushPart as package signals is one: it counts
// deliveries under its lock and hands a record of how many it counted.
type testPart struct {
	sync.Mutex
	e       *Engine
	owed    int // deliveries to count at the next TakeChanges
	counted int
	done    []bool
}

func (p *testPart) TakeChanges(put func(k, v []byte)) func(bool) {
	for ; p.owed > 0; p.owed-- {
		p.e.RecordDelivery([]string{"user:bob"}, DeliveryFailure, time.Time{})
		p.counted++
	}
	put([]byte("counted"), []byte{byte(p.counted)})
	put([]byte("gone"), nil)
	return func(ok bool) {
		p.Lock()
		defer p.Unlock()
		p.done = append(p.done, ok)
	}
}

// An attached part's records are written in the same transaction as the
// counts made under its lock, also those it makes in TakeChanges; a
// failed flush tells it so, and the next one writes them.
func TestFlushPart(t *testing.T) {
	cfg := bounceConfig(t, config.Limits{Bounces: rates(t, "20/1h")})
	clk := newClock()
	dir := t.TempDir()
	te := openTest(t, dir, cfg, clk, Options{})
	p := &testPart{e: te.Engine}
	if err := te.AttachFlushPart("test.part", p, func(k, v []byte) error { t.Errorf("a new bucket holds %q", k); return nil }); err != nil {
		t.Fatal(err)
	}
	p.Lock()
	te.RecordDelivery([]string{"user:bob"}, DeliveryFailure, clk.Now())
	p.counted++
	p.owed = 2
	p.Unlock()

	path := filepath.Join(dir, DBFile)
	fd := dbFD(t, path)
	swap := func(flag int) {
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := unix.Dup3(int(f.Fd()), fd, unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
	}
	swap(os.O_RDONLY)
	if err := te.flush(); err == nil {
		t.Fatal("flush succeeded on a read-only descriptor")
	}
	swap(os.O_RDWR)
	if err := te.flush(); err != nil {
		t.Fatal(err)
	}
	if len(p.done) != 2 || p.done[0] || !p.done[1] {
		t.Fatalf("done %v, want [false true]", p.done)
	}
	te.close()
	te2 := openTest(t, dir, cfg, clk, Options{})
	var stored []string
	p2 := &testPart{e: te2.Engine}
	if err := te2.AttachFlushPart("test.part", p2, func(k, v []byte) error {
		stored = append(stored, string(k)+"="+string(rune('0'+v[0])))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if got := usage(t, te2.Engine, "user:bob", "bounces", "1h"); got != 3 || len(stored) != 1 || stored[0] != "counted=3" {
		t.Fatalf("stored: %d bounces, part %v; want 3 and counted=3", got, stored)
	}
}
