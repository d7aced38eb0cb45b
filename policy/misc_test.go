package policy

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestFormatRetry(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                                 "0s",
		300 * time.Millisecond:            "1s",
		59 * time.Second:                  "59s",
		59*time.Second + time.Millisecond: "1m",
		61 * time.Second:                  "1m1s",
		9*time.Minute + 59*time.Second:    "9m59s",
		10 * time.Minute:                  "10m",
		11*time.Minute + time.Second:      "12m",
		time.Hour:                         "1h",
		89*time.Minute + time.Second:      "1h30m",
		23*time.Hour + 59*time.Minute + 1: "24h",
		2*time.Hour + 30*time.Second:      "2h1m",
	} {
		if got := FormatRetry(d); got != want {
			t.Errorf("FormatRetry(%v) = %q, want %q", d, got, want)
		}
	}
	d := Decision{Action: Defer, Identity: "uid:web1:1001", Limit: "500 recipients/1h", RetryIn: 11*time.Minute + 5*time.Second}
	if got := d.Text(); got != "uid:web1:1001 is over 500 recipients/1h; try again in 12m" {
		t.Errorf("Text() = %q", got)
	}
	if got := (Decision{Action: Accept}).Text(); got != "" {
		t.Errorf("accept text %q", got)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	cfg := baseConfig()
	userLimits(t, cfg, 0, "1/1h")
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{Registerer: reg})
	send(e.Engine, []Identity{UserID("bob")}, 1)
	send(e.Engine, []Identity{UserID("bob")}, 1)
	if err := e.Suspend("sender:x@example.com", "test"); err != nil {
		t.Fatal(err)
	}
	want := `
# HELP relay_suspended_identities Identities currently suspended.
# TYPE relay_suspended_identities gauge
relay_suspended_identities 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "relay_suspended_identities"); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(e.metrics.decisions.WithLabelValues("defer", "user")); got != 1 {
		t.Fatalf("defer/user = %v", got)
	}
	if got := testutil.ToFloat64(e.metrics.decisions.WithLabelValues("accept", "none")); got < 3 {
		t.Fatalf("accept/none = %v", got)
	}
	// A second engine on the same registry is an error, not a panic.
	if _, err := New(e.db, cfg, Options{Registerer: reg}); err == nil {
		t.Fatal("double registration accepted")
	}
}

func TestSweepDropsIdleState(t *testing.T) {
	dir := t.TempDir()
	cfg := baseConfig()
	userLimits(t, cfg, 0, "5/1h")
	clk := newClock()
	e := openTest(t, dir, cfg, clk, Options{})
	send(e.Engine, []Identity{UserID("idle"), SenderID("idle@example.com")}, 1)
	send(e.Engine, []Identity{UserID("kept")}, 1)
	if err := e.Suspend("user:kept", "x"); err != nil {
		t.Fatal(err)
	}
	if err := e.flush(); err != nil {
		t.Fatal(err)
	}
	clk.Add(25 * time.Hour)
	e.sweep()
	if got := e.Senders(StateAll); len(got) != 1 || got[0].ID != "user:kept" {
		t.Fatalf("after sweep: %+v", got)
	}
	e.close()
	e2 := openTest(t, dir, cfg, clk, Options{})
	if got := e2.Senders(StateAll); len(got) != 1 || got[0].ID != "user:kept" {
		t.Fatalf("after sweep and reopen: %+v", got)
	}
}
