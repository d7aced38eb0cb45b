package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testQueue makes an empty qmail queue in a temporary directory, laid out
// as qmail's `make setup` does with the given split.
func testQueue(t testing.TB, split int) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "queue")
	for _, d := range []string{"pid", "intd", "todo", "bounce", "lock"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o750); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"mess", "info", "local", "remote"} {
		for s := range split {
			if err := os.MkdirAll(filepath.Join(dir, d, strconv.Itoa(s)), 0o750); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := unix.Mkfifo(filepath.Join(dir, "lock", "trigger"), 0o622); err != nil {
		t.Fatal(err)
	}
	return dir
}

// directPair is a QmailDirect talking to a QueueWriter over a socketpair,
// both in this process.
type directPair struct {
	t       testing.TB
	q       *QmailDirect
	w       *QueueWriter
	dir     string
	served  chan error
	serving sync.WaitGroup
	wEnd    net.Conn
}

func newDirectPair(t testing.TB, dir string, hook func(stage string, n int)) *directPair {
	t.Helper()
	w, err := OpenQueueWriter(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	w.roundHk = hook
	q := NewQmailDirect(5*time.Second, nil)
	q.UID = 4242
	p := &directPair{t: t, q: q, w: w, dir: dir}
	p.connect()
	t.Cleanup(func() {
		q.Close()
		p.serving.Wait()
		w.Close()
	})
	return p
}

// connect starts a writer on a new socketpair and attaches it.
func (p *directPair) connect() {
	p.t.Helper()
	a, b := socketPair(p.t)
	p.wEnd = b
	p.served = make(chan error, 1)
	p.serving.Go(func() { p.served <- p.w.Serve(b) })
	p.q.Attach(a)
}

func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "qw")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

// queueFiles lists the files under dir's queue subdirectories, relative.
func queueFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && d.Type()&os.ModeNamedPipe == 0 {
			rel, _ := filepath.Rel(dir, path)
			out = append(out, rel)
		}
		return nil
	})
	return out
}

var receiptRE = regexp.MustCompile(`^ok \d+ qp (\d+)$`)

func TestQmailDirectWritesWhatQmailQueueWrites(t *testing.T) {
	dir := testQueue(t, 23)
	p := newDirectPair(t, dir, nil)
	// qmail-send reads the trigger: hold it open so the pull is seen.
	trig, err := os.OpenFile(filepath.Join(dir, "lock", "trigger"), os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer trig.Close()

	msg := "Received: from unknown (HELO c) (127.0.0.1)\n  by mail.example.test with SMTP; 5 Mar 2024 07:04:09 -0000\nSubject: hi\n\nbody\n"
	before := time.Now().UTC()
	r, err := p.q.Deliver(context.Background(), Envelope{From: "a@example.com", To: []string{"b@example.net", "c@example.org"}}, strings.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	m := receiptRE.FindStringSubmatch(r.Reply)
	if m == nil || m[1] != strconv.Itoa(r.QP) {
		t.Fatalf("reply %q, qp %d", r.Reply, r.QP)
	}
	if r.QP < minQP {
		t.Errorf("qp %d could be a process id", r.QP)
	}
	files := queueFiles(t, dir)
	if len(files) != 3 {
		t.Fatalf("queue holds %v, want mess, intd and todo", files)
	}
	var id uint64
	var messPath string
	for _, f := range files {
		if strings.HasPrefix(f, "mess/") {
			messPath = f
			fmt.Sscanf(filepath.Base(f), "%d", &id)
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(dir, messPath), &st); err != nil {
		t.Fatal(err)
	}
	if st.Ino != id || messPath != fmt.Sprintf("mess/%d/%d", id%23, id) {
		t.Errorf("mess file %s has inode %d", messPath, st.Ino)
	}
	got, _ := os.ReadFile(filepath.Join(dir, messPath))
	// The date is the writer's clock at the message's start.
	want1 := fmt.Sprintf("Received: (qmail %d invoked by uid 4242); %s\n", r.QP, Date822(before))
	want2 := fmt.Sprintf("Received: (qmail %d invoked by uid 4242); %s\n", r.QP, Date822(before.Add(time.Second)))
	if string(got) != want1+msg && string(got) != want2+msg {
		t.Errorf("mess:\n%q\nwant\n%q", got, want1+msg)
	}
	intd, _ := os.ReadFile(filepath.Join(dir, "intd", strconv.FormatUint(id, 10)))
	todo, _ := os.ReadFile(filepath.Join(dir, "todo", strconv.FormatUint(id, 10)))
	wantEnv := fmt.Sprintf("u4242\x00p%d\x00Fa@example.com\x00Tb@example.net\x00Tc@example.org\x00", r.QP)
	if string(todo) != wantEnv || string(intd) != wantEnv {
		t.Errorf("todo %q intd %q, want %q", todo, intd, wantEnv)
	}
	for _, f := range files {
		fi, _ := os.Stat(filepath.Join(dir, f))
		if fi.Mode().Perm() != 0o644 {
			t.Errorf("%s has mode %v, want 0644", f, fi.Mode())
		}
	}
	var ti, ii unix.Stat_t
	unix.Stat(filepath.Join(dir, "todo", strconv.FormatUint(id, 10)), &ti)
	unix.Stat(filepath.Join(dir, "intd", strconv.FormatUint(id, 10)), &ii)
	if ti.Ino != ii.Ino || ti.Nlink != 2 {
		t.Errorf("todo is not intd's hard link (inodes %d %d, links %d)", ti.Ino, ii.Ino, ti.Nlink)
	}
	b := make([]byte, 8)
	if n, _ := trig.Read(b); n != 1 || b[0] != 0 {
		t.Errorf("trigger got %q, want one NUL", b[:n])
	}
}

func TestQmailDirectReceivedNames(t *testing.T) {
	w := &QueueWriter{aliasU: 7, qmaildU: 8, qmailsU: 9}
	at := time.Date(2024, 3, 5, 7, 4, 9, 0, time.UTC)
	for uid, how := range map[int]string{7: "by alias", 8: "from network", 9: "for bounce", 1001: "by uid 1001", 0: "by uid 0"} {
		want := "Received: (qmail 4194305 invoked " + how + "); 5 Mar 2024 07:04:09 -0000\n"
		if got := string(w.received(4194305, uid, at)); got != want {
			t.Errorf("uid %d: %q, want %q", uid, got, want)
		}
	}
}

// TestQmailDirectGroupCommit: messages that arrive while a round is
// running share the next one: 1 + 199 messages take two rounds, and
// every client is answered after its own round.
func TestQmailDirectGroupCommit(t *testing.T) {
	dir := testQueue(t, 23)
	const n = 200
	var mu sync.Mutex
	var rounds []int
	release := make(chan struct{})
	first := true
	p := newDirectPair(t, dir, func(stage string, k int) {
		if stage != "synced" {
			return
		}
		mu.Lock()
		rounds = append(rounds, k)
		hold := first
		first = false
		mu.Unlock()
		if hold {
			<-release
		}
	})
	p.q.Timeout = 60 * time.Second
	deliver := func(i int) (Receipt, error) {
		return p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{fmt.Sprintf("r%d@y", i)}}, strings.NewReader(fmt.Sprintf("Subject: %d\n\nhi\n", i)))
	}
	firstDone := make(chan error, 1)
	go func() { _, err := deliver(0); firstDone <- err }()
	waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(rounds) == 1 })
	var wg sync.WaitGroup
	errs := make(chan error, n)
	qps := make(chan int, n)
	for i := 1; i < n; i++ {
		wg.Go(func() {
			r, err := deliver(i)
			errs <- err
			qps <- r.QP
		})
	}
	// All 199 wait in the writer for the first round to finish.
	waitFor(t, func() bool { return len(queueFiles(t, filepath.Join(dir, "intd"))) == n })
	select {
	case err := <-errs:
		t.Fatalf("a message was answered before its round: %v", err)
	default:
	}
	close(release)
	if err := <-firstDone; err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	close(qps)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	seen := map[int]bool{}
	for qp := range qps {
		if seen[qp] {
			t.Fatalf("qp %d given twice", qp)
		}
		seen[qp] = true
	}
	mu.Lock()
	defer mu.Unlock()
	if len(rounds) != 2 || rounds[0] != 1 || rounds[1] != n-1 {
		t.Errorf("rounds of %v messages, want [1 %d]", rounds, n-1)
	}
	if todo := queueFiles(t, filepath.Join(dir, "todo")); len(todo) != n {
		t.Errorf("%d in todo/, want %d", len(todo), n)
	}
}

// waitFor polls cond for up to 30 seconds.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 30s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestQmailDirectRefusesAsQmailQueueDoes(t *testing.T) {
	dir := testQueue(t, 5)
	p := newDirectPair(t, dir, nil)
	long := strings.Repeat("a", 1003)
	_, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{long}}, strings.NewReader("x\n"))
	var qe *Error
	if !errors.As(err, &qe) || qe.Code != 554 || qe.Text != "envelope address too long for qq (#5.1.3)" {
		t.Fatalf("1003-byte recipient: %v", err)
	}
	ok := strings.Repeat("a", 1002)
	if _, err := p.q.Deliver(context.Background(), Envelope{From: ok, To: []string{ok}}, strings.NewReader("x\n")); err != nil {
		t.Fatalf("1002-byte addresses: %v", err)
	}
	if files := queueFiles(t, dir); len(files) != 3 {
		t.Errorf("queue holds %v, want the one accepted message", files)
	}
}

func TestQmailDirectReadErrorQueuesNothing(t *testing.T) {
	dir := testQueue(t, 5)
	p := newDirectPair(t, dir, nil)
	big := bytes.Repeat([]byte("0123456789\n"), 30000) // several chunks
	_, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, &failingReader{data: big})
	if !errors.Is(err, errBadData) {
		t.Fatalf("err %v, want the reader's", err)
	}
	// The abort is processed in order with later frames: after a message
	// that went through, nothing of the failed one is left.
	if _, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader("ok\n")); err != nil {
		t.Fatal(err)
	}
	if files := queueFiles(t, dir); len(files) != 3 {
		t.Errorf("queue holds %v, want only the second message", files)
	}
}

func TestQmailDirectWithoutWriterDefers(t *testing.T) {
	q := NewQmailDirect(time.Second, nil)
	q.WaitWriter = 50 * time.Millisecond
	_, err := q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader("x\n"))
	var qe *Error
	if !errors.As(err, &qe) || qe.Code != 451 {
		t.Fatalf("no writer: %v, want 451", err)
	}
}

// TestQmailDirectWriterGoneThenBack: a writer that dies under a message
// defers it; the next writer continues with larger qps.
func TestQmailDirectWriterGoneThenBack(t *testing.T) {
	dir := testQueue(t, 5)
	block := make(chan struct{})
	var blocking sync.Mutex
	blockNext := false
	p := newDirectPair(t, dir, func(stage string, _ int) {
		blocking.Lock()
		b := blockNext
		blocking.Unlock()
		if stage == "synced" && b {
			<-block
		}
	})
	r1, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader("one\n"))
	if err != nil {
		t.Fatal(err)
	}
	blocking.Lock()
	blockNext = true
	blocking.Unlock()
	done := make(chan error, 1)
	go func() {
		_, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader("two\n"))
		done <- err
	}()
	waitFor(t, func() bool { return len(queueFiles(t, filepath.Join(dir, "intd"))) == 2 })
	p.wEnd.Close() // the writer's socket goes away (as when it is killed)
	var qe *Error
	if err := <-done; !errors.As(err, &qe) || qe.Code != 451 {
		t.Fatalf("writer gone: %v, want 451", err)
	}
	blocking.Lock()
	blockNext = false
	blocking.Unlock()
	close(block)
	<-p.served
	p.connect()
	r3, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader("three\n"))
	if err != nil {
		t.Fatal(err)
	}
	if r3.QP <= r1.QP {
		t.Errorf("qp went from %d to %d", r1.QP, r3.QP)
	}
}

// TestQmailDirectSlowWriterDefers: a writer that does not answer within
// the timeout gets 451, and the message it was holding is not queued.
func TestQmailDirectSlowWriterDefers(t *testing.T) {
	dir := testQueue(t, 5)
	block := make(chan struct{})
	p := newDirectPair(t, dir, func(stage string, _ int) {
		if stage == "synced" {
			<-block
		}
	})
	p.q.Timeout = 300 * time.Millisecond
	_, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader("slow\n"))
	var qe *Error
	if !errors.As(err, &qe) || qe.Code != 451 || qe.Text != qqTextTimeout {
		t.Fatalf("slow writer: %v, want 451 %s", err, qqTextTimeout)
	}
	// The abort reaches the writer while the round waits before its links.
	waitFor(t, func() bool { return p.w.aborts.Load() == 1 })
	close(block)
	p.q.Timeout = 5 * time.Second
	if _, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader("next\n")); err != nil {
		t.Fatal(err)
	}
	if files := queueFiles(t, dir); len(files) != 3 {
		t.Errorf("queue holds %v, want only the second message", files)
	}
}

// TestQmailDirectCrashLeavesWhatQmailQueueLeaves stops a round at each of
// its steps and looks at what a crash there would leave: before the
// links, mess and intd without todo (qmail-send's cleanup removes them
// after 36 h); after them, a complete message.
func TestQmailDirectCrashLeavesWhatQmailQueueLeaves(t *testing.T) {
	dir := testQueue(t, 5)
	type state struct{ mess, intd, todo, pid int }
	look := func() state {
		return state{len(queueFiles(t, filepath.Join(dir, "mess"))), len(queueFiles(t, filepath.Join(dir, "intd"))),
			len(queueFiles(t, filepath.Join(dir, "todo"))), len(queueFiles(t, filepath.Join(dir, "pid")))}
	}
	seen := map[string]state{}
	p := newDirectPair(t, dir, func(stage string, _ int) { seen[stage] = look() })
	if _, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader("m\n")); err != nil {
		t.Fatal(err)
	}
	want := map[string]state{"synced": {1, 1, 0, 0}, "linked": {1, 1, 1, 0}, "durable": {1, 1, 1, 0}}
	for stage, w := range want {
		if seen[stage] != w {
			t.Errorf("at %s: %+v, want %+v", stage, seen[stage], w)
		}
	}
}

func TestQmailDirectRefusesAnEnvelopeTooLargeForAFrame(t *testing.T) {
	dir := testQueue(t, 5)
	p := newDirectPair(t, dir, nil)
	to := make([]string, 17000)
	for i := range to {
		to[i] = strings.Repeat("a", 990) + "@example.com"
	}
	_, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: to}, strings.NewReader("x\n"))
	var qe *Error
	if !errors.As(err, &qe) || qe.Code != 554 {
		t.Fatalf("17,000 long recipients: %v, want 554", err)
	}
	// The connection is still good.
	if _, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader("x\n")); err != nil {
		t.Fatal(err)
	}
}
