package policy

import (
	"math/rand/v2"
	"sort"
	"testing"
	"time"

	"relay/config"
)

func TestWindowArithmetic(t *testing.T) {
	w := newWindow(metricRcpts, time.Hour)
	if w.width != int64(time.Minute) {
		t.Fatalf("width %v, want 1m", time.Duration(w.width))
	}
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	at := func(d time.Duration) int64 { return base + int64(d) }

	w.add(at(10*time.Second), 2) // bucket 0
	w.add(at(50*time.Second), 1) // bucket 0 again
	w.add(at(30*time.Minute), 4) // bucket 30
	if got := w.used(at(30 * time.Minute)); got != 7 {
		t.Fatalf("used %d, want 7", got)
	}
	if len(w.buckets) != 2 {
		t.Fatalf("%d buckets, want 2 (sparse)", len(w.buckets))
	}
	// Still counted 60 minutes later: [now-W, now] reaches into bucket 0.
	if got := w.used(at(60*time.Minute + 30*time.Second)); got != 7 {
		t.Fatalf("used at 60m30s %d, want 7", got)
	}
	// Bucket 0 is gone once the clock is in bucket 61.
	if got := w.used(at(61 * time.Minute)); got != 4 {
		t.Fatalf("used at 61m %d, want 4", got)
	}
	w.reserved = 1
	// Limit 5 at 61m: 4 + 1 reserved + 1 needed = 6 > 5; the 4 of bucket 30 free at 91m.
	if got := w.retryIn(at(61*time.Minute), 5, 1); got != 30*time.Minute {
		t.Fatalf("retryIn %v, want 30m", got)
	}
	if got := w.retryIn(at(61*time.Minute), 6, 1); got != 0 {
		t.Fatalf("retryIn with room %v, want 0", got)
	}
	// Reservations alone over the limit: one bucket width.
	if got := w.retryIn(at(61*time.Minute), 1, 1); got != time.Minute {
		t.Fatalf("retryIn blocked by reservations %v, want 1m", got)
	}
	w.reserved = 0
	if !w.empty(at(91 * time.Minute)) {
		t.Fatalf("window not empty after W+W/60: %+v", w)
	}
	// A clock that steps back adds to the newest bucket.
	w.add(at(100*time.Minute), 1)
	w.add(at(99*time.Minute), 1)
	if len(w.buckets) != 1 || w.sum != 2 {
		t.Fatalf("after clock step back: %+v", w)
	}
}

// TestWindowProperty admits random arrivals through the engine and checks
// that no interval of length W ever holds more than N accepted, that
// capacity comes back once W + W/60 passed without arrivals, and that a
// deferral's RetryIn is exact.
func TestWindowProperty(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 30 {
		n := int64(1 + rng.IntN(20))
		wins := []string{"10s", "1m", "1h", "24h"}
		win := wins[rng.IntN(len(wins))]
		r := mustRate(t, "1/"+win)
		r.N = n
		cfg := baseConfig()
		cfg.Policy.Limits.User = &config.Limits{Rcpts: []config.Rate{r}}
		clk := newClock()
		e := openTest(t, t.TempDir(), cfg, clk, Options{})
		ids := []Identity{UserID("p")}
		var accepted []time.Time
		for range 400 {
			// Mostly bursts, sometimes long gaps.
			switch rng.IntN(10) {
			case 0:
				clk.Add(time.Duration(rng.Int64N(int64(2 * r.Window))))
			default:
				clk.Add(time.Duration(rng.Int64N(int64(r.Window / 20))))
			}
			d := send(e.Engine, ids, 1)
			switch d.Action {
			case Accept:
				accepted = append(accepted, clk.Now())
			case Defer:
				if d.RetryIn <= 0 {
					t.Fatalf("round %d: defer without RetryIn: %+v", round, d)
				}
				// Exactness of RetryIn: refused just before, accepted at it.
				clk.Add(d.RetryIn - time.Nanosecond)
				if d2 := send(e.Engine, ids, 1); d2.Action != Defer {
					t.Fatalf("round %d: accepted 1ns before RetryIn %v", round, d.RetryIn)
				}
				clk.Add(time.Nanosecond)
				if d2 := send(e.Engine, ids, 1); d2.Action != Accept {
					t.Fatalf("round %d: refused at RetryIn %v: %+v", round, d.RetryIn, d2)
				}
				accepted = append(accepted, clk.Now())
			default:
				t.Fatalf("round %d: unexpected %+v", round, d)
			}
		}
		// Never more than N in any closed interval of length W.
		sort.Slice(accepted, func(i, j int) bool { return accepted[i].Before(accepted[j]) })
		for i, a := range accepted {
			j := sort.Search(len(accepted), func(k int) bool { return accepted[k].After(a.Add(r.Window)) })
			if int64(j-i) > n {
				t.Fatalf("round %d: %d accepted in [%v, +%v], cap %d", round, j-i, a, r.Window, n)
			}
		}
		// Capacity comes back after W + W/60 of silence.
		width := (int64(r.Window) + 59) / 60
		clk.Add(time.Duration(61 * width))
		for k := int64(0); k < n; k++ {
			if d := send(e.Engine, ids, 1); d.Action != Accept {
				t.Fatalf("round %d: capacity not back after %v: %d of %d, %+v", round, time.Duration(61*width), k, n, d)
			}
		}
		if d := send(e.Engine, ids, 1); d.Action != Defer {
			t.Fatalf("round %d: N+1 accepted after refill: %+v", round, d)
		}
		e.close()
	}
}
