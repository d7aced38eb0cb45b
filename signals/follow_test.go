package signals

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"relay/config"
)

// fakeSink records what the follower hands over.
type fakeSink struct {
	mu       sync.Mutex
	recs     []record
	flushes  int
	flushErr error
}

func (s *fakeSink) RecordDelivery(ids []string, outcome string, at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.recs = append(s.recs, record{append([]string(nil), ids...), outcome, at})
}

func (s *fakeSink) Flush() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.flushes++
	return s.flushErr
}

// counts returns outcome -> number of records for id.
func (s *fakeSink) counts(id string) map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := map[string]int{}
	for _, r := range s.recs {
		for _, x := range r.ids {
			if x == id {
				m[r.outcome]++
			}
		}
	}
	return m
}

func (s *fakeSink) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.recs)
}

// waitFor polls cond until it holds (bounded: a loaded machine is slow,
// never wrong).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(25 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// logBuffer collects a follower's log.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type harness struct {
	t       *testing.T
	dataDir string
	path    string
	sink    *fakeSink
	logs    *logBuffer
	f       *Follower
}

func newHarness(t *testing.T, path string) *harness {
	h := &harness{t: t, dataDir: t.TempDir(), path: path, sink: &fakeSink{}, logs: &logBuffer{}}
	h.start()
	return h
}

func (h *harness) start() {
	h.t.Helper()
	cfg := &config.Config{DataDir: h.dataDir, Signals: config.SignalsConfig{QmailSendLog: h.path}}
	f, err := New(cfg, h.sink, Options{
		Logger: slog.New(slog.NewTextHandler(h.logs, nil)), Poll: 5 * time.Millisecond, SaveEvery: 10 * time.Millisecond,
	})
	if err != nil {
		h.t.Fatal(err)
	}
	f.Start()
	h.f = f
	h.t.Cleanup(func() { f.Close() })
}

func appendFile(t *testing.T, path string, lines ...string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, l := range lines {
		if _, err := f.WriteString(l + "\n"); err != nil {
			t.Fatal(err)
		}
	}
}

// rotateMultilog does what multilog does when current is full.
func rotateMultilog(t *testing.T, dir string, at time.Time) string {
	t.Helper()
	archive := tai64n(at) + ".s"
	if err := os.Rename(filepath.Join(dir, "current"), filepath.Join(dir, archive)); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "current"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return archive
}

var bobIDs = []string{"user:bob", "sender:bob@example.com"} // a hand-off's identities

func TestFollowMultilogAcrossRotation(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current, multilogLine(testTime, "status: local 0/10 remote 0/20")) // history: not read
	h := newHarness(t, current)
	at := testTime
	h.f.HandedOff(101, "bob@example.com", bobIDs, at)
	h.f.HandedOff(102, "bob@example.com", bobIDs, at)
	appendFile(t, current, msgLines(at.Add(time.Second), 5001, 101, "bob@example.com", 1, "failure", 2)...)
	waitFor(t, "two failures", func() bool { return h.sink.counts("user:bob")["failure"] == 2 })

	// Message 5002's deliveries start in one file and end in the next.
	ls := msgLines(at.Add(2*time.Second), 5002, 102, "bob@example.com", 10, "deferral", 2)
	appendFile(t, current, ls[:4]...) // new, info, two starts
	rotateMultilog(t, dir, at.Add(3*time.Second))
	appendFile(t, current, ls[4:]...)
	appendFile(t, current, multilogLine(at, "delivery 11: success: retried"))
	waitFor(t, "deferrals after the rotation", func() bool {
		c := h.sink.counts("user:bob")
		return c["deferral"] == 2
	})
	// 11 was closed by its deferral: a success for it counts nothing.
	if c := h.sink.counts("user:bob"); c["success"] != 0 || h.sink.total() != 4 {
		t.Fatalf("counts %v, %d records", c, h.sink.total())
	}
}

// Two rotations between two looks, and lines written to the old file
// after the follower's last read but before the rename: nothing is lost.
func TestFollowFastRotations(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current)
	h := newHarness(t, current)
	for i := range 3 {
		h.f.HandedOff(200+i, "bob@example.com", bobIDs, testTime)
	}
	h.f.mu.Lock() // hold the follower between two looks
	appendFile(t, current, msgLines(testTime, 1, 200, "bob@example.com", 1, "failure", 1)...)
	rotateMultilog(t, dir, testTime.Add(time.Second))
	appendFile(t, current, msgLines(testTime, 2, 201, "bob@example.com", 2, "failure", 1)...)
	rotateMultilog(t, dir, testTime.Add(2*time.Second))
	appendFile(t, current, msgLines(testTime, 3, 202, "bob@example.com", 3, "failure", 1)...)
	h.f.mu.Unlock()
	waitFor(t, "three failures", func() bool { return h.sink.counts("user:bob")["failure"] == 3 })
}

// The follower remembers where it was: a restart reads exactly the lines
// logged since, across a rotation while it was down, and joins hand-offs
// recorded before it stopped.
func TestFollowRestart(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current)
	h := newHarness(t, current)
	h.f.HandedOff(301, "bob@example.com", bobIDs, testTime)
	h.f.HandedOff(302, "bob@example.com", bobIDs, testTime)
	h.f.HandedOff(303, "bob@example.com", bobIDs, testTime)
	appendFile(t, current, msgLines(testTime, 1, 301, "bob@example.com", 1, "failure", 1)...)
	ls := msgLines(testTime, 2, 302, "bob@example.com", 2, "success", 1)
	appendFile(t, current, ls[:3]...) // new, info, start
	waitFor(t, "the first failure", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
	if err := h.f.Close(); err != nil {
		t.Fatal(err)
	}
	if h.sink.flushes == 0 {
		t.Fatal("the state was saved without flushing the sink first")
	}
	// While relay is down: the delivery ends, multilog rotates, more mail.
	appendFile(t, current, ls[3:]...)
	rotateMultilog(t, dir, testTime.Add(time.Minute))
	appendFile(t, current, msgLines(testTime, 3, 303, "bob@example.com", 3, "failure", 2)...)
	h.start()
	waitFor(t, "everything logged while down", func() bool {
		c := h.sink.counts("user:bob")
		return c["success"] == 1 && c["failure"] == 3
	})
	appendFile(t, current, multilogLine(testTime, "status: local 0/10 remote 0/20"))
	waitFor(t, "the follower to read on", func() bool {
		h.f.mu.Lock()
		defer h.f.mu.Unlock()
		return h.f.tail.readOff > 0 && h.f.tail.pos.Name == "current" && len(h.f.tail.buf) == 0
	})
	if n := h.sink.total(); n != 4 {
		t.Fatalf("%d records, want 4 (nothing twice)", n)
	}
	if !strings.Contains(h.logs.String(), "rotated while relay was down") {
		t.Errorf("log: %s", h.logs.String())
	}
}

// A syslog file, renamed by logrotate, then truncated in place.
func TestFollowSyslog(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "mail.log")
	appendFile(t, path, "Mar  2 09:00:00 mail sshd[1]: session opened")
	h := newHarness(t, path)
	for i := range 3 {
		h.f.HandedOff(400+i, "bob@example.com", bobIDs, testTime)
	}
	syslog := func(lines []string) []string {
		out := make([]string, len(lines))
		for i, l := range lines {
			out[i] = syslogLine(testTime, l[len(tai64n(testTime))+1:])
		}
		return out
	}
	appendFile(t, path, syslog(msgLines(testTime, 1, 400, "bob@example.com", 1, "failure", 1))...)
	waitFor(t, "a failure", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	appendFile(t, path+".1", syslog(msgLines(testTime, 2, 401, "bob@example.com", 2, "failure", 1))...)
	appendFile(t, path, syslog(msgLines(testTime, 3, 402, "bob@example.com", 3, "success", 1))...)
	waitFor(t, "both files", func() bool {
		c := h.sink.counts("user:bob")
		return c["failure"] == 2 && c["success"] == 1
	})
	// copytruncate: the same file, shorter than where the follower was.
	if err := os.Truncate(path, 0); err != nil {
		t.Fatal(err)
	}
	h.f.HandedOff(403, "bob@example.com", bobIDs, testTime)
	waitFor(t, "the truncation", func() bool { return strings.Contains(h.logs.String(), "truncated") })
	appendFile(t, path, syslog(msgLines(testTime, 4, 403, "bob@example.com", 4, "deferral", 1))...)
	waitFor(t, "a deferral after the truncation", func() bool { return h.sink.counts("user:bob")["deferral"] == 1 })
}

// Garbage survives: NUL and 0xff bytes, invalid stamps, huge numbers, a
// 300 KB line, a line written in two parts.
func TestFollowGarbage(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current)
	h := newHarness(t, current)
	h.f.HandedOff(501, "bob@example.com", bobIDs, testTime)
	appendFile(t, current,
		"\x00\x00\xff\xfe garbage",
		"@zzzz info msg 1: bytes 1 from <bob@example.com> qp 501",
		multilogLine(testTime, "info msg 99999999999999999999999: bytes 1 from <bob@example.com> qp 501 uid 1"),
		multilogLine(testTime, "info msg 1: bytes 1 from <bob@example.com> qp 18446744073709551616 uid 1"),
		strings.Repeat("x", 300<<10),
		multilogLine(testTime, "delivery 1: failure: "+strings.Repeat("y", 300<<10)),
	)
	ls := msgLines(testTime, 7, 501, "bob@example.com", 1, "failure", 1)
	appendFile(t, current, ls[:3]...)
	half := ls[3][:20]
	f, err := os.OpenFile(current, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(half)
	time.Sleep(30 * time.Millisecond) // let the follower see the half (it must wait for the rest either way)
	f.WriteString(ls[3][20:] + "\n")
	f.Close()
	waitFor(t, "the failure written in two parts", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
	if h.f.tail.skipped < 2 {
		t.Errorf("long lines skipped: %d", h.f.tail.skipped)
	}
}

// The tail hands over a line only once it is whole, and keeps its place
// at the start of an incomplete one.
func TestTailSplitLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "current")
	appendFile(t, path)
	tl := newTail(path, slog.New(slog.DiscardHandler))
	tl.start(nil)
	var got []string
	handle := func(b []byte) { got = append(got, string(b)) }
	f, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	defer f.Close()
	f.WriteString("end msg 1\nend m")
	tl.step(handle)
	if len(got) != 1 || tl.pos.Offset != 10 {
		t.Fatalf("got %q, offset %d", got, tl.pos.Offset)
	}
	f.WriteString("sg 2\n")
	tl.step(handle)
	if len(got) != 2 || got[1] != "end msg 2" || tl.pos.Offset != 20 {
		t.Fatalf("got %q, offset %d", got, tl.pos.Offset)
	}
	// A long line: skipped whole, the place stays at its start until its end.
	f.WriteString(strings.Repeat("z", maxLine+readSize))
	for tl.step(handle) {
	}
	if tl.pos.Offset != 20 || !tl.skip {
		t.Fatalf("offset %d during a long line", tl.pos.Offset)
	}
	f.WriteString("zz\nend msg 3\n")
	for tl.step(handle) {
	}
	if len(got) != 3 || got[2] != "end msg 3" {
		t.Fatalf("after the long line: %q", got[2:])
	}
}

// A missing log is a warning; once it appears it is read from its start.
func TestFollowMissingFile(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "log", "current")
	h := newHarness(t, current)
	waitFor(t, "the warning", func() bool { return strings.Contains(h.logs.String(), "does not exist") })
	h.f.HandedOff(601, "bob@example.com", bobIDs, testTime)
	os.Mkdir(filepath.Dir(current), 0o755)
	appendFile(t, current, msgLines(testTime, 1, 601, "bob@example.com", 1, "failure", 1)...)
	waitFor(t, "the failure", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
	if n := strings.Count(h.logs.String(), "does not exist"); n != 1 {
		t.Errorf("warned %d times", n)
	}
}

// A multilog directory stands for its current.
func TestFollowDirectory(t *testing.T) {
	dir := t.TempDir()
	appendFile(t, filepath.Join(dir, "current"))
	h := newHarness(t, dir)
	h.f.HandedOff(701, "bob@example.com", bobIDs, testTime)
	appendFile(t, filepath.Join(dir, "current"), msgLines(testTime, 1, 701, "bob@example.com", 1, "failure", 1)...)
	waitFor(t, "the failure", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
}

func TestStateDamagedIsAnError(t *testing.T) {
	dataDir := t.TempDir()
	os.WriteFile(filepath.Join(dataDir, StateFile), []byte("{not json"), 0o600)
	cfg := &config.Config{DataDir: dataDir, Signals: config.SignalsConfig{QmailSendLog: filepath.Join(dataDir, "current")}}
	_, err := New(cfg, &fakeSink{}, Options{})
	if err == nil || !strings.Contains(err.Error(), StateFile) || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("err = %v", err)
	}
}

// A sink that cannot flush: the place in the log is not saved past counts
// that are not durable.
func TestStateNotSavedWhenFlushFails(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current)
	h := newHarness(t, current)
	h.sink.mu.Lock()
	h.sink.flushErr = errors.New("disk full")
	h.sink.mu.Unlock()
	h.f.HandedOff(801, "bob@example.com", bobIDs, testTime)
	appendFile(t, current, msgLines(testTime, 1, 801, "bob@example.com", 1, "failure", 1)...)
	waitFor(t, "the error", func() bool { return strings.Contains(h.logs.String(), "disk full") })
	if _, err := os.Stat(filepath.Join(h.dataDir, StateFile)); err == nil {
		t.Fatal("state saved although the counts are not durable")
	}
}

func TestFollowSploggerContinuation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "mail.log")
	appendFile(t, path)
	h := newHarness(t, path)
	from := strings.Repeat("a", 790) + "@example.com"
	h.f.HandedOff(901, from, []string{"user:long"}, testTime)
	info := fmt.Sprintf("info msg 9: bytes 1 from <%s> qp 901 uid 1", from)
	stamp := "1772445600.250000"
	appendFile(t, path,
		"Mar  2 10:00:00 mail qmail: "+stamp+" "+info[:780],
		"Mar  2 10:00:00 mail qmail: "+stamp+"+"+info[780:],
		syslogLine(testTime, "starting delivery 1: msg 9 to remote x@y"),
		syslogLine(testTime, "delivery 1: failure: no"))
	waitFor(t, "the failure", func() bool { return h.sink.counts("user:long")["failure"] == 1 })
}
