package signals

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"relay/config"
)

// fakeSink counts what the follower hands over and keeps its records
// as policy does: flush takes the follower's changes and the counts under
// the follower's lock and "commits" both; a crash drops what was not
// flushed.
type fakeSink struct {
	mu       sync.Mutex
	recs     []record // flushed
	pending  []record // counted since the last flush
	store    map[string][]byte
	part     FlushPart
	flushes  int
	flushErr error
}

func newFakeSink() *fakeSink { return &fakeSink{store: map[string][]byte{}} }

func (s *fakeSink) RecordDelivery(ids []string, outcome string, at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pending = append(s.pending, record{append([]string(nil), ids...), outcome, at})
}

func (s *fakeSink) AttachFlushPart(bucket string, part FlushPart, load func(k, v []byte) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if bucket != Bucket {
		return fmt.Errorf("bucket %q", bucket)
	}
	keys := make([]string, 0, len(s.store))
	for k := range s.store {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if err := load([]byte(k), s.store[k]); err != nil {
			return err
		}
	}
	s.part = part
	return nil
}

// flush is policy's flush: the part's changes and the counts it made,
// in one "transaction".
func (s *fakeSink) flush() error {
	s.mu.Lock()
	p := s.part
	s.mu.Unlock()
	p.Lock()
	var keys, vals [][]byte
	done := p.TakeChanges(func(k, v []byte) { keys, vals = append(keys, k), append(vals, v) })
	s.mu.Lock()
	taken := s.pending
	s.pending = nil
	s.mu.Unlock()
	p.Unlock()
	s.mu.Lock()
	err := s.flushErr
	s.flushes++
	if err == nil {
		for i, k := range keys {
			if vals[i] == nil {
				delete(s.store, string(k))
			} else {
				s.store[string(k)] = vals[i]
			}
		}
		s.recs = append(s.recs, taken...)
	} else {
		s.pending = append(taken, s.pending...)
	}
	s.mu.Unlock()
	done(err == nil)
	return err
}

// crash forgets what was counted since the last flush.
func (s *fakeSink) crash() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pending = nil
}

// counts returns outcome -> number of records for id, flushed or not.
func (s *fakeSink) counts(id string) map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := map[string]int{}
	for _, r := range append(append([]record(nil), s.recs...), s.pending...) {
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
	return len(s.recs) + len(s.pending)
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
	t         *testing.T
	dataDir   string
	path      string
	sink      *fakeSink
	logs      *logBuffer
	f         *Follower
	stopFlush chan struct{}
	flushDone chan struct{}
}

func newHarness(t *testing.T, path string) *harness {
	h := &harness{t: t, dataDir: t.TempDir(), path: path, sink: newFakeSink(), logs: &logBuffer{}}
	h.start()
	return h
}

// start starts a follower and, as policy does, a flusher.
func (h *harness) start() {
	h.t.Helper()
	h.startFollower()
	h.stopFlush, h.flushDone = make(chan struct{}), make(chan struct{})
	go func(stop, done chan struct{}) {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
				h.sink.flush()
			}
		}
	}(h.stopFlush, h.flushDone)
	h.t.Cleanup(h.stop)
}

func (h *harness) startFollower() {
	h.t.Helper()
	cfg := &config.Config{DataDir: h.dataDir, Signals: config.SignalsConfig{QmailSendLog: h.path}}
	f, err := New(cfg, h.sink, Options{Logger: slog.New(slog.NewTextHandler(h.logs, nil)), Poll: 5 * time.Millisecond})
	if err != nil {
		h.t.Fatal(err)
	}
	f.Start()
	h.f = f
}

// stop is relay's shutdown: the follower stops, then policy's last flush.
func (h *harness) stop() {
	h.stopFlusher()
	h.f.Close()
	if err := h.sink.flush(); err != nil {
		h.t.Errorf("the last flush: %v", err)
	}
}

func (h *harness) stopFlusher() {
	select {
	case <-h.stopFlush:
	default:
		close(h.stopFlush)
	}
	<-h.flushDone
}

// crash is kill -9: nothing more is flushed, what was not is lost; the
// journal's writes stay (they are the kernel's).
func (h *harness) crash() {
	h.stopFlusher()
	h.f.Close()
	h.sink.crash()
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
	h.stop()
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
	tl := newTail(path, slog.New(slog.DiscardHandler), testMetrics())
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

// A stored record that cannot be read is logged and dropped: relay
// starts, the follower reads the log from its end (its place was lost).
func TestStateDamagedIsLogged(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current, msgLines(testTime, 1, 901, "bob@example.com", 1, "failure", 1)...)
	h := &harness{t: t, dataDir: t.TempDir(), path: current, sink: newFakeSink(), logs: &logBuffer{}}
	h.sink.store[keyState] = []byte{stateVersion, 0xff}
	h.sink.store[string(recordKey(prefixMessage, 7))] = []byte("junk")
	h.start()
	if !strings.Contains(h.logs.String(), "cannot be read; dropped") {
		t.Fatalf("log: %s", h.logs.String())
	}
	if got := testutil.ToFloat64(h.f.metrics.errors.WithLabelValues(errLoad)); got != 2 {
		t.Errorf("load errors %v, want 2", got)
	}
	h.f.HandedOff(902, "bob@example.com", bobIDs, testTime)
	appendFile(t, current, msgLines(testTime, 2, 902, "bob@example.com", 2, "failure", 1)...)
	waitFor(t, "the failure after the damaged state", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
}

// Flushes that fail keep the follower's changes: once one succeeds, a
// crash loses nothing and counts nothing twice.
func TestFlushFailureKeepsChanges(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current)
	h := newHarness(t, current)
	h.sink.mu.Lock()
	h.sink.flushErr = errors.New("disk full")
	h.sink.mu.Unlock()
	h.f.HandedOff(801, "bob@example.com", bobIDs, testTime)
	h.f.HandedOff(802, "bob@example.com", bobIDs, testTime)
	appendFile(t, current, msgLines(testTime, 1, 801, "bob@example.com", 1, "failure", 1)...)
	waitFor(t, "the failure", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
	waitFor(t, "failed flushes", func() bool { h.sink.mu.Lock(); defer h.sink.mu.Unlock(); return h.sink.flushes > 3 })
	h.sink.mu.Lock()
	if len(h.sink.store) != 0 || len(h.sink.recs) != 0 {
		t.Fatalf("stored %d records, %d counts while flushes fail", len(h.sink.store), len(h.sink.recs))
	}
	h.sink.flushErr = nil
	h.sink.mu.Unlock()
	waitFor(t, "a flush that works", func() bool { h.sink.mu.Lock(); defer h.sink.mu.Unlock(); return len(h.sink.recs) == 1 })
	h.crash()
	h.start()
	appendFile(t, current, msgLines(testTime, 2, 802, "bob@example.com", 2, "failure", 1)...)
	waitFor(t, "the second failure", func() bool { return h.sink.counts("user:bob")["failure"] == 2 })
	h.stop()
	if n := h.sink.total(); n != 2 {
		t.Fatalf("%d counts, want 2", n)
	}
}

// kill -9 right after the 250: the hand-off is in the journal, the
// restarted follower joins it; the journal is gone once flushed.
func TestHandoffSurvivesCrash(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current)
	h := newHarness(t, current)
	h.stopFlusher() // no flush between the hand-offs and the crash
	for i := range 3 {
		h.f.HandedOff(1001+i, "bob@example.com", bobIDs, testTime)
	}
	h.crash()
	if len(h.sink.store) != 0 {
		t.Fatal("something was flushed")
	}
	h.start()
	appendFile(t, current, msgLines(testTime, 1, 1001, "bob@example.com", 1, "failure", 1)...)
	appendFile(t, current, msgLines(testTime, 2, 1002, "bob@example.com", 2, "success", 1)...)
	waitFor(t, "both outcomes", func() bool { c := h.sink.counts("user:bob"); return c["failure"] == 1 && c["success"] == 1 })
	// Crash again before a flush took the replayed hand-offs, then once
	// after: the third hand-off joins either way, each only once.
	h.crash()
	h.start()
	waitFor(t, "a flush", func() bool { h.sink.mu.Lock(); defer h.sink.mu.Unlock(); return len(h.sink.recs) >= 2 })
	h.crash()
	h.start()
	appendFile(t, current, msgLines(testTime, 3, 1003, "bob@example.com", 3, "deferral", 1)...)
	waitFor(t, "the deferral", func() bool { return h.sink.counts("user:bob")["deferral"] == 1 })
	h.stop()
	if c := h.sink.counts("user:bob"); c["failure"] != 1 || c["success"] != 1 || c["deferral"] != 1 || h.sink.total() != 3 {
		t.Fatalf("counts %v (%d)", c, h.sink.total())
	}
	if ents, _ := os.ReadDir(filepath.Join(h.dataDir, JournalDir)); len(ents) != 0 {
		t.Errorf("journal files left after a clean stop: %v", ents)
	}
}

// A journal cut short by a system crash: the records before the cut are
// taken, the file is not an error.
func TestJournalTornRecord(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current)
	h := newHarness(t, current)
	h.stopFlusher()
	h.f.HandedOff(1101, "bob@example.com", bobIDs, testTime)
	h.f.HandedOff(1102, "bob@example.com", bobIDs, testTime)
	h.crash()
	files, _ := filepath.Glob(filepath.Join(h.dataDir, JournalDir, journalPrefix+"*"))
	if len(files) != 1 {
		t.Fatalf("journal files %v", files)
	}
	b, _ := os.ReadFile(files[0])
	os.WriteFile(files[0], b[:len(b)-3], 0o600)
	h.start()
	if !strings.Contains(h.logs.String(), "journal ends early") {
		t.Errorf("log: %s", h.logs.String())
	}
	appendFile(t, current, msgLines(testTime, 1, 1101, "bob@example.com", 1, "failure", 1)...)
	appendFile(t, current, msgLines(testTime, 2, 1102, "bob@example.com", 2, "failure", 1)...)
	waitFor(t, "the first hand-off's failure", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
	h.stop()
	if n := h.sink.counts("user:bob")["failure"]; n != 1 {
		t.Fatalf("%d failures: the torn record joined", n)
	}
}

// Exactly once, whatever the moment of the crash: a writer logs the
// deliveries of many messages while the follower is flushed and crashed
// at random moments; every delivery line is counted once in the end.
func TestExactlyOnceAcrossCrashes(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current)
	h := newHarness(t, current)
	h.stopFlusher()
	const msgs = 300
	rng := rand.New(rand.NewPCG(1, 2))
	want := map[string]int{}
	for i := range msgs {
		qp := 5000 + i
		outcome := []string{"success", "failure", "deferral"}[i%3]
		h.f.HandedOff(qp, "bob@example.com", bobIDs, testTime)
		ls := msgLines(testTime, 100+i, qp, "bob@example.com", 1+2*i, outcome, 2)
		for j, l := range ls {
			appendFile(t, current, l)
			if j == 0 && i%7 == 0 {
				// Rotations too.
				rotateMultilog(t, dir, testTime.Add(time.Duration(i)*time.Second))
			}
			switch rng.IntN(20) {
			case 0:
				h.sink.flush()
			case 1:
				time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond) // let the follower read some
				h.crash()
				h.startFollower()
			}
		}
		want[outcome] += 2
	}
	waitFor(t, "every line", func() bool {
		c := h.sink.counts("user:bob")
		return c["success"] >= want["success"] && c["failure"] >= want["failure"] && c["deferral"] >= want["deferral"]
	})
	h.f.Close()
	h.sink.flush()
	if c := h.sink.counts("user:bob"); !maps.Equal(c, want) {
		t.Fatalf("counts %v, want %v", c, want)
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

// The very first run begins at the log's end; a kill -9 before relay.db
// has that place (the start file keeps it) neither skips nor recounts
// the lines read meanwhile, also when a flush came before the log was
// opened (it stores no place).
func TestFirstRunPlaceSurvivesCrash(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current, msgLines(testTime, 1, 700, "bob@example.com", 1, "failure", 1)...) // before relay: not counted
	h := &harness{t: t, dataDir: t.TempDir(), path: current, sink: newFakeSink(), logs: &logBuffer{}}
	cfg := &config.Config{DataDir: h.dataDir, Signals: config.SignalsConfig{QmailSendLog: current}}
	f, err := New(cfg, h.sink, Options{Logger: slog.New(slog.NewTextHandler(h.logs, nil)), Poll: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	h.f = f
	if err := h.sink.flush(); err != nil { // before Start: no place yet
		t.Fatal(err)
	}
	f.Start()
	f.HandedOff(701, "bob@example.com", bobIDs, testTime)
	appendFile(t, current, msgLines(testTime, 2, 701, "bob@example.com", 2, "failure", 1)...)
	waitFor(t, "the failure", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
	f.Close()
	h.sink.crash() // kill -9: the count is lost, relay.db has no place
	h.start()
	waitFor(t, "the failure again", func() bool { return h.sink.counts("user:bob")["failure"] == 1 })
	h.stop()
	if n := h.sink.counts("user:bob")["failure"]; n != 1 {
		t.Fatalf("%d failures, want 1", n)
	}
	if _, err := os.Stat(filepath.Join(h.dataDir, JournalDir, "start")); err == nil {
		t.Error("the start file outlived the first stored place")
	}
}

// An earlier relay's data_dir/signals.state: the follower resumes at its
// place (not at the log's end), and removes it once relay.db has one.
func TestLegacyStateFile(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current, msgLines(testTime, 1, 710, "bob@example.com", 1, "failure", 1)...) // read by the earlier relay
	st, err := os.Stat(current)
	if err != nil {
		t.Fatal(err)
	}
	dev, ino := fileID(st)
	// While relay was being upgraded: a message whose info line came
	// before relay recorded its hand-off (it waits for it).
	appendFile(t, current, msgLines(testTime, 2, 711, "bob@example.com", 2, "failure", 1)...)
	h := &harness{t: t, dataDir: t.TempDir(), path: current, sink: newFakeSink(), logs: &logBuffer{}}
	legacy := filepath.Join(h.dataDir, "signals.state")
	os.WriteFile(legacy, fmt.Appendf(nil, `{"version":1,"file":{"dev":%d,"ino":%d,"name":%q,"offset":%d},"handoffs":[],"messages":[],"deliveries":[]}`,
		dev, ino, current, st.Size()), 0o600)
	h.start()
	if !strings.Contains(h.logs.String(), "resuming at the place an earlier relay saved") {
		t.Fatalf("log: %s", h.logs.String())
	}
	h.f.HandedOff(711, "bob@example.com", bobIDs, testTime)
	h.f.HandedOff(712, "bob@example.com", bobIDs, testTime)
	appendFile(t, current, msgLines(testTime, 3, 712, "bob@example.com", 3, "failure", 1)...)
	waitFor(t, "the failures during and after the upgrade", func() bool { return h.sink.counts("user:bob")["failure"] == 2 })
	waitFor(t, "the old file removed", func() bool { _, err := os.Stat(legacy); return err != nil })
	h.stop()
	if n := h.sink.counts("user:bob")["failure"]; n != 2 {
		t.Fatalf("%d failures, want 2", n)
	}
}

// A journal that cannot be written: the hand-offs stay in memory and go
// to relay.db with the next flush (they survive a crash after it); the
// failure is logged once a streak, and counted each time.
func TestJournalWriteFails(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current")
	appendFile(t, current)
	h := newHarness(t, current)
	h.stopFlusher()
	jdir := filepath.Join(h.dataDir, JournalDir)
	if err := os.RemoveAll(jdir); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(jdir, nil, 0o600) // not a directory: even root cannot write in it
	h.f.HandedOff(1201, "bob@example.com", bobIDs, testTime)
	h.f.HandedOff(1202, "bob@example.com", bobIDs, testTime)
	if n := strings.Count(h.logs.String(), "writing the hand-off journal fails"); n != 1 {
		t.Errorf("logged %d times:\n%s", n, h.logs.String())
	}
	if got := testutil.ToFloat64(h.f.metrics.errors.WithLabelValues(errJournal)); got != 2 {
		t.Errorf("journal errors %v, want 2", got)
	}
	if err := h.sink.flush(); err != nil {
		t.Fatal(err)
	}
	h.crash()
	os.Remove(jdir)
	h.start()
	appendFile(t, current, msgLines(testTime, 1, 1201, "bob@example.com", 1, "failure", 1)...)
	appendFile(t, current, msgLines(testTime, 2, 1202, "bob@example.com", 2, "success", 1)...)
	waitFor(t, "both outcomes", func() bool { c := h.sink.counts("user:bob"); return c["failure"] == 1 && c["success"] == 1 })
}
