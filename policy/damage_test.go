package policy

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"relay/internal/boltsafe"
)

// zeroPagesWith overwrites with zeros, in place, every page of the file at
// path (after the two meta pages) that holds needle, as a disk error or a
// stray write would; a running bbolt sees it through its shared mapping.
// It returns how many pages it zeroed.
func zeroPagesWith(t *testing.T, path string, needle []byte) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size := os.Getpagesize() // bbolt's page size
	n := 0
	for off := 2 * size; off+size <= len(b); off += size {
		if bytes.Contains(b[off:off+size], needle) {
			if _, err := f.WriteAt(make([]byte, size), int64(off)); err != nil {
				t.Fatal(err)
			}
			n++
		}
	}
	if n == 0 {
		t.Fatalf("no page of %s holds %q", path, needle)
	}
	return n
}

// filledDB makes a data dir whose relay.db holds counters of many
// identities and one suspension, written and closed.
func filledDB(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cfg := baseConfig()
	userLimits(t, cfg, 0, "1000/1h")
	te := openTest(t, dir, cfg, newClock(), Options{})
	for i := range 300 {
		send(te.Engine, []Identity{UserID("user" + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + "@example.com"), SenderID("s" + string(rune('a'+i%26)) + "@example.com")}, 1)
	}
	send(te.Engine, []Identity{UserID("victim@example.com")}, 1)
	if err := te.Suspend("user:bad@example.com", "spam"); err != nil {
		t.Fatal(err)
	}
	te.close()
	return dir
}

// TestOpenDBRefusesDamage: an empty, damaged or cut-short relay.db stops
// OpenDB with one line that names the file and says what to do; the file is
// left exactly as it was, and nothing panics.
func TestOpenDBRefusesDamage(t *testing.T) {
	for name, damage := range map[string]func(t *testing.T, path string){
		"empty": func(t *testing.T, path string) {
			if err := os.Truncate(path, 0); err != nil {
				t.Fatal(err)
			}
		},
		"zeroed page": func(t *testing.T, path string) { zeroPagesWith(t, path, []byte("user:victim@example.com")) },
		"zeroed suspension page": func(t *testing.T, path string) {
			zeroPagesWith(t, path, []byte("policy.suspensions"))
		},
		"cut short": func(t *testing.T, path string) {
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(path, fi.Size()/2); err != nil {
				t.Fatal(err)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			dir := filledDB(t)
			path := filepath.Join(dir, DBFile)
			damage(t, path)
			before, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			db, err := OpenDB(dir)
			if err == nil {
				db.Close()
				t.Fatal("a damaged relay.db opened")
			}
			msg := err.Error()
			if !strings.Contains(msg, path) || !strings.Contains(msg, "damaged") || !strings.Contains(msg, "move it aside") ||
				strings.Contains(msg, "\n") || strings.Contains(msg, "panic") {
				t.Errorf("error %q: want one line naming %s and what to do", msg, path)
			}
			if after, _ := os.ReadFile(path); !bytes.Equal(after, before) {
				t.Error("the damaged file was changed")
			}
		})
	}
	// The undamaged file opens.
	db, err := OpenDB(filledDB(t))
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
}

// TestDamagedPageAtRuntime: a page that was sound at start and is damaged
// later costs the transactions that read it an error decision (the front
// end answers 451), logged; no panic; Health says so and the metric counts.
func TestDamagedPageAtRuntime(t *testing.T) {
	dir := filledDB(t)
	cfg := baseConfig()
	userLimits(t, cfg, 0, "1000/1h")
	te := openTest(t, dir, cfg, newClock(), Options{})
	if err := te.Health(); err != nil {
		t.Fatalf("Health before the damage: %v", err)
	}
	zeroPagesWith(t, filepath.Join(dir, DBFile), []byte("user:victim@example.com"))

	tx := te.Begin([]Identity{UserID("victim@example.com")}) // not resident: read from the file
	d := tx.Check()
	tx.Abort()
	if d.Action != Defer || !errors.Is(d.Err, boltsafe.ErrDamaged) {
		t.Fatalf("decision on a damaged page: %+v", d)
	}
	if err := te.Health(); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Errorf("Health after the damage: %v", err)
	}
	if n := testutil.ToFloat64(te.metrics.storeErrors.WithLabelValues("read")); n < 1 {
		t.Errorf("relay_store_errors_total{op=read} = %v", n)
	}
	// Admin actions on it fail the same way.
	if err := te.Suspend("user:victim@example.com", "x"); !errors.Is(err, boltsafe.ErrDamaged) {
		t.Errorf("Suspend on a damaged page: %v", err)
	}
}

// dbFD finds the descriptor of path among this process's open files.
func dbFD(t *testing.T, path string) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && target == path {
			return fd
		}
	}
	t.Fatalf("%s is not open", path)
	return -1
}

// TestCountersWriteFailure: while writes to relay.db fail (injected: the
// database's descriptor is swapped for a read-only one, as a full disk
// would refuse them), counting goes on in memory, Health says the counters
// cannot be written and the metric counts each failure; once writes work
// again the counts reach the file and Health is clear.
func TestCountersWriteFailure(t *testing.T) {
	dir := t.TempDir()
	cfg := baseConfig()
	userLimits(t, cfg, 0, "1000/1h")
	te := openTest(t, dir, cfg, newClock(), Options{})
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
	if d := send(te.Engine, []Identity{UserID("alice@example.com")}, 3); d.Action != Accept {
		t.Fatalf("send while the disk refuses writes: %+v", d)
	}
	if err := te.flush(); err == nil {
		t.Fatal("flush succeeded on a read-only descriptor: the injection did not work")
	}
	if err := te.Health(); err == nil || !strings.Contains(err.Error(), "cannot be written") {
		t.Errorf("Health while writes fail: %v", err)
	}
	if n := testutil.ToFloat64(te.metrics.storeErrors.WithLabelValues("write")); n < 1 {
		t.Errorf("relay_store_errors_total{op=write} = %v", n)
	}
	if got := usage(t, te.Engine, "user:alice@example.com", "rcpts", "1h"); got != 3 {
		t.Errorf("counted in memory: %d, want 3", got)
	}

	swap(os.O_RDWR)
	if err := te.flush(); err != nil {
		t.Fatalf("flush once writes work: %v", err)
	}
	if err := te.Health(); err != nil {
		t.Errorf("Health once writes work: %v", err)
	}
	// The counts kept in memory reached the file.
	te.close()
	te2 := openTest(t, dir, cfg, newClock(), Options{})
	if got := usage(t, te2.Engine, "user:alice@example.com", "rcpts", "1h"); got != 3 {
		t.Errorf("after the failure, stored: %d, want 3", got)
	}
}
