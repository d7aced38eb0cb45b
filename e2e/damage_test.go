package e2e

import (
	"bytes"
	"crypto/sha256"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// dbPath is the daemon's counters file.
func (d *daemon) dbPath() string { return filepath.Join(d.dir, "data", "relay.db") }

// zeroPagesWith overwrites with zeros, in place, every page of the file at
// path (after bbolt's two meta pages) that holds needle, as a disk error
// would. It returns how many it zeroed.
func zeroPagesWith(t *testing.T, path, needle string) int {
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
	size, n := os.Getpagesize(), 0
	for off := 2 * size; off+size <= len(b); off += size {
		if bytes.Contains(b[off:off+size], []byte(needle)) {
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

// noPanic fails the test when out holds a Go panic or goroutine dump.
func noPanic(t *testing.T, what, out string) {
	t.Helper()
	if strings.Contains(out, "panic") || strings.Contains(out, "goroutine ") {
		t.Errorf("%s shows a panic:\n%s", what, out)
	}
}

// TestDamagedDatabaseStopsServe: an empty or damaged relay.db stops relay
// serve within seconds with one line naming relay.db and what to do; no
// panic; the file is left exactly as it was (no fresh empty database that
// would drop every suspension).
func TestDamagedDatabaseStopsServe(t *testing.T) {
	for name, damage := range map[string]func(t *testing.T, d *daemon){
		"empty": func(t *testing.T, d *daemon) {
			if err := os.Truncate(d.dbPath(), 0); err != nil {
				t.Fatal(err)
			}
		},
		"zeroed pages": func(t *testing.T, d *daemon) { zeroPagesWith(t, d.dbPath(), "sender:alice@example.com") },
	} {
		t.Run(name, func(t *testing.T) {
			d := newDaemon(t, daemonOpts{policy: senderPolicy("defer", "100/1h")})
			mustPrefix(t, "a message", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
			if code, body := d.api("POST", "/api/senders/"+pathID("sender:mallory@example.com")+"/suspend"); code != 200 {
				t.Fatalf("suspend: %d %s", code, body)
			}
			d.stop()
			damage(t, d)
			before, err := os.ReadFile(d.dbPath())
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			serveRefuses(t, d, "relay.db", "damaged", "move it aside")
			t.Logf("refused after %v", time.Since(start).Round(time.Millisecond))
			cmd := exec.Command(bins.relay, "serve", "--config", d.config)
			cmd.Env = d.env
			out, _ := cmd.CombinedOutput()
			noPanic(t, "serve's output", string(out))
			if n := strings.Count(string(out), "level=ERROR"); n != 1 || strings.Count(string(out), "relay.db") != 1 {
				t.Errorf("serve said %d error lines, want one naming relay.db:\n%s", n, out)
			}
			after, _ := os.ReadFile(d.dbPath())
			if sha256.Sum256(after) != sha256.Sum256(before) {
				t.Error("relay.db was changed")
			}
		})
	}
}

// TestDamagedPageWhileRunning: a page sound at start and damaged later
// costs the messages that need it a 451 and an ERROR line, not a panic;
// the daemon goes on and /healthz says relay.db is damaged.
func TestDamagedPageWhileRunning(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("defer", "100/1h")})
	mustPrefix(t, "a message", sendOne(t, d, "victim@example.com", "bob@remote.example"), "250 ok ")
	d.stop()
	d.start() // victim's counters are now in the file only
	zeroPagesWith(t, d.dbPath(), "sender:victim@example.com")

	for range 2 {
		mustPrefix(t, "a message needing the damaged page", sendOne(t, d, "victim@example.com", "bob@remote.example"), "451 4.3.0 ")
	}
	logs := d.logs()
	if !strings.Contains(logs, "level=ERROR") || !strings.Contains(logs, "damaged") {
		t.Errorf("no ERROR line about the damage:\n%s", logs)
	}
	noPanic(t, "the log", logs)
	resp, err := http.Get("http://" + d.admin + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	body.ReadFrom(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body.String(), "relay.db is damaged") {
		t.Errorf("/healthz: %d %q", resp.StatusCode, body.String())
	}
	select {
	case <-d.exited:
		t.Fatal("relay exited")
	default:
	}
}

// TestCountersWriteFailure: while relay.db cannot be written (injected
// with a file size limit on the running daemon: every write past the first
// page fails, as on a full disk), mail still flows, /healthz says the
// counters cannot be written and relay_store_errors_total counts it; once
// writes work again, /healthz is ok.
func TestCountersWriteFailure(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("defer", "100/1h")})
	pid := d.cmd.Process.Pid
	var old unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_FSIZE, &unix.Rlimit{Cur: 4096, Max: unix.RLIM_INFINITY}, &old); err != nil {
		t.Skipf("prlimit: %v", err)
	}
	health := func() (int, string) {
		resp, err := http.Get("http://" + d.admin + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return resp.StatusCode, b.String()
	}
	waitHealth := func(code int, text string) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			got, body := health()
			if got == code && strings.Contains(body, text) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("/healthz: %d %q, want %d %q\n%s", got, body, code, text, d.logs())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	mustPrefix(t, "a message while writes fail", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	waitHealth(http.StatusServiceUnavailable, "counters cannot be written")
	if n, _ := sum(scrape(t, d), "relay_store_errors_total", map[string]string{"op": "write"}); n < 1 {
		t.Errorf("relay_store_errors_total{op=\"write\"} = %v", n)
	}
	if err := unix.Prlimit(pid, unix.RLIMIT_FSIZE, &old, nil); err != nil {
		t.Fatal(err)
	}
	waitHealth(http.StatusOK, "ok")
	noPanic(t, "the log", d.logs())
}
