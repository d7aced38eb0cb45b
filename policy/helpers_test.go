package policy

import (
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"relay/config"
)

// fakeClock is an injectable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 3, 2, 10, 0, 0, 500_000_000, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func mustRate(t testing.TB, s string) config.Rate {
	t.Helper()
	r, err := config.ParseRate(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func rates(t testing.TB, ss ...string) []config.Rate {
	var out []config.Rate
	for _, s := range ss {
		out = append(out, mustRate(t, s))
	}
	return out
}

func baseConfig() *config.Config {
	return &config.Config{
		Hostname: "mail.example.com",
		Policy: config.Policy{Mode: config.PolicyEnforce, OverLimit: config.OverLimitDefer,
			SuspendKinds: config.DefaultSuspendKinds(), ReserveTimeout: config.Duration{Duration: time.Minute}},
	}
}

// testEngine opens dir's database and an engine on it; both are closed at
// the end of the test unless closed before.
type testEngine struct {
	*Engine
	db  *bolt.DB
	dir string
}

func openTest(t testing.TB, dir string, cfg *config.Config, clk *fakeClock, opts Options) *testEngine {
	t.Helper()
	db, err := OpenDB(dir)
	if err != nil {
		t.Fatal(err)
	}
	if opts.Now == nil {
		opts.Now = clk.Now
	}
	e, err := New(db, cfg, opts)
	if err != nil {
		db.Close()
		t.Fatal(err)
	}
	te := &testEngine{Engine: e, db: db, dir: dir}
	t.Cleanup(te.close)
	return te
}

func (te *testEngine) close() {
	te.Engine.Close()
	te.db.Close()
}

// send passes one message of n recipients through a fresh transaction and
// commits it when every step accepts. It returns the first refusal.
func send(e *Engine, ids []Identity, n int) Decision {
	tx := e.Begin(ids)
	if d := tx.Check(); d.Action != Accept {
		tx.Abort()
		return d
	}
	for range n {
		if d := tx.AddRcpt(); d.Action != Accept {
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

func usage(t testing.TB, e *Engine, id, metric, window string) int64 {
	t.Helper()
	s, ok := e.Sender(id)
	if !ok {
		t.Fatalf("sender %s unknown", id)
	}
	for _, u := range s.Usage {
		if u.Metric == metric && u.Window == window {
			return u.Used
		}
	}
	t.Fatalf("sender %s has no %s/%s usage: %+v", id, metric, window, s.Usage)
	return 0
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

// snapshotDB copies the committed state of te's database into a new data
// dir, as a kill -9 would leave the file, and returns that dir.
func snapshotDB(t testing.TB, te *testEngine) string {
	t.Helper()
	dir := t.TempDir()
	err := te.db.View(func(btx *bolt.Tx) error {
		return btx.CopyFile(filepath.Join(dir, DBFile), 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dir
}
