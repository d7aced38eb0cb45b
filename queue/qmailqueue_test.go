package queue

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"relay/internal/fakeqq"
)

// fakeQueue returns a QmailQueue running the fake qmail-queue with env
// (FAKEQQ_*) set, and the directory where it records calls.
func fakeQueue(t *testing.T, bin string, env ...string) (*QmailQueue, string) {
	t.Helper()
	dir := t.TempDir()
	script := writeScript(t, t.TempDir(), "qq",
		fmt.Sprintf("FAKEQQ_DIR=%s %s exec %s\n", dir, strings.Join(env, " "), bin))
	return &QmailQueue{Path: script, Timeout: 20 * time.Second}, dir
}

func TestQmailQueueDelivers(t *testing.T) {
	bin := fakeqq.Build(t)
	q, dir := fakeQueue(t, bin)
	msg := "Received: from unknown (HELO c) (127.0.0.1)\n  by mail.example.test with SMTP; 28 Nov 2026 02:41:53 -0000\n" +
		"Subject: probe\n\n.leading dot stays unstuffed\nbare\rCR\n"
	env := Envelope{From: "sender@example.test", To: []string{"a@example.test", "b@other.test"}}
	r, err := q.Deliver(context.Background(), env, strings.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	calls := fakeqq.Calls(t, dir)
	if len(calls) != 1 {
		t.Fatalf("%d calls recorded, want 1", len(calls))
	}
	c := calls[0]
	if string(c.Message) != msg {
		t.Errorf("message = %q, want %q", c.Message, msg)
	}
	wantEnv := "Fsender@example.test\x00Ta@example.test\x00Tb@other.test\x00\x00"
	if string(c.Envelope) != wantEnv {
		t.Errorf("envelope = %q, want %q", c.Envelope, wantEnv)
	}
	if !strings.Contains(c.Info, fmt.Sprintf("pid=%d", r.QP)) {
		t.Errorf("receipt qp %d, fake says %q", r.QP, c.Info)
	}
	if !regexp.MustCompile(`^ok [0-9]{10,} qp ` + strconv.Itoa(r.QP) + `$`).MatchString(r.Reply) {
		t.Errorf("reply = %q, want \"ok <unixtime> qp %d\"", r.Reply, r.QP)
	}
}

func TestQmailQueueNullSenderAndLongAddresses(t *testing.T) {
	bin := fakeqq.Build(t)
	q, dir := fakeQueue(t, bin)
	ctx := context.Background()
	if _, err := q.Deliver(ctx, Envelope{From: "", To: []string{"postmaster@example.test"}}, strings.NewReader("x\n")); err != nil {
		t.Fatal(err)
	}
	calls := fakeqq.Calls(t, dir)
	if len(calls) != 1 || string(calls[0].Envelope) != "F\x00Tpostmaster@example.test\x00\x00" {
		t.Fatalf("calls = %+v", calls)
	}
	// 1002 bytes pass; 1003 are qmail-queue's to refuse (exit 11), not ours.
	ok := strings.Repeat("a", 990) + "@example.tt"
	if len(ok) != 1001 {
		t.Fatal(len(ok))
	}
	if _, err := q.Deliver(ctx, Envelope{From: ok + "x", To: []string{"a@b"}}, strings.NewReader("x\n")); err != nil {
		t.Fatalf("1002-byte sender: %v", err)
	}
	_, err := q.Deliver(ctx, Envelope{From: "s@b", To: []string{ok + "xy"}}, strings.NewReader("x\n"))
	wantError(t, err, 554, [3]int{5, 1, 3}, "envelope address too long for qq (#5.1.3)")
	if n := len(fakeqq.Calls(t, dir)); n != 2 {
		t.Errorf("%d calls recorded, want 2", n)
	}
}

func TestQmailQueueRefusesNUL(t *testing.T) {
	q := &QmailQueue{Path: "/nonexistent/qq"}
	_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"x@y\x00Tevil@z"}}, strings.NewReader("x\n"))
	wantError(t, err, 554, [3]int{5, 1, 3}, "envelope address contains NUL (#5.1.3)")
}

func TestQmailQueueExitCodes(t *testing.T) {
	bin := fakeqq.Build(t)
	cases := []struct {
		exit int
		code int
		text string
	}{
		{11, 554, "envelope address too long for qq (#5.1.3)"},
		{31, 554, "mail server permanently rejected message (#5.3.0)"},
		{51, 451, "qq out of memory (#4.3.0)"},
		{52, 451, "qq timeout (#4.3.0)"},
		{53, 451, "qq write error or disk full (#4.3.0)"},
		{54, 451, "qq read error (#4.3.0)"},
		{55, 451, "qq unable to read configuration (#4.3.0)"},
		{56, 451, "qq trouble making network connection (#4.3.0)"},
		{61, 451, "qq trouble in home directory (#4.3.0)"},
		{62, 451, "qq trouble creating files in queue (#4.3.0)"},
		{63, 451, "qq trouble creating files in queue (#4.3.0)"},
		{64, 451, "qq trouble creating files in queue (#4.3.0)"},
		{65, 451, "qq trouble creating files in queue (#4.3.0)"},
		{66, 451, "qq trouble creating files in queue (#4.3.0)"},
		{71, 451, "mail server temporarily rejected message (#4.3.0)"},
		{72, 451, "connection to mail server timed out (#4.4.1)"},
		{73, 451, "connection to mail server rejected (#4.4.1)"},
		{74, 451, "communication with mail server failed (#4.4.2)"},
		{81, 451, "qq internal bug (#4.3.0)"},
		{91, 451, "qq internal bug (#4.3.0)"},
		{120, 451, "unable to exec qq (#4.3.0)"},
		{12, 554, "qq permanent problem (#5.3.0)"},
		{40, 554, "qq permanent problem (#5.3.0)"},
		{10, 451, "qq temporary problem (#4.3.0)"},
		{41, 451, "qq temporary problem (#4.3.0)"},
		{1, 451, "qq temporary problem (#4.3.0)"},
		{100, 451, "qq temporary problem (#4.3.0)"},
		{111, 451, "qq temporary problem (#4.3.0)"},
	}
	for _, c := range cases {
		t.Run(strconv.Itoa(c.exit), func(t *testing.T) {
			q, _ := fakeQueue(t, bin, fmt.Sprintf("FAKEQQ_EXIT=%d", c.exit))
			_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
			wantError(t, err, c.code, parseEnhanced(c.text), c.text)
			if parseEnhanced(c.text)[0] != c.code/100 {
				t.Errorf("enhanced %v does not match code %d", parseEnhanced(c.text), c.code)
			}
		})
	}
}

func TestQmailQueueExit82(t *testing.T) {
	bin := fakeqq.Build(t)
	cases := []struct {
		fd6  string
		code int
		enh  [3]int
		text string
	}{
		{"Dcustom permanent reject from fake qq (#5.7.0)", 554, [3]int{5, 7, 0}, "custom permanent reject from fake qq (#5.7.0)"},
		{"Zcustom temporary reject from fake qq (#4.7.0)", 451, [3]int{4, 7, 0}, "custom temporary reject from fake qq (#4.7.0)"},
		{"Dno enhanced code here", 554, [3]int{}, "no enhanced code here"},
		{"Xnot a marker (#5.7.0)", 451, [3]int{4, 3, 0}, "qq temporary problem (#4.3.0)"},
	}
	for _, c := range cases {
		t.Run(c.fd6[:1], func(t *testing.T) {
			q, _ := fakeQueue(t, bin, "FAKEQQ_EXIT=82", "FAKEQQ_FD6='"+c.fd6+"'")
			_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
			wantError(t, err, c.code, c.enh, c.text)
		})
	}
	t.Run("empty", func(t *testing.T) {
		q, _ := fakeQueue(t, bin, "FAKEQQ_EXIT=82")
		_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
		wantError(t, err, 451, [3]int{4, 3, 0}, "qq temporary problem (#4.3.0)")
	})
}

func TestQmailQueueCrash(t *testing.T) {
	for _, sig := range []string{"KILL", "SEGV"} {
		t.Run(sig, func(t *testing.T) {
			script := writeScript(t, t.TempDir(), "qq", "cat >/dev/null\nkill -"+sig+" $$\n")
			q := &QmailQueue{Path: script}
			_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
			wantError(t, err, 451, [3]int{4, 3, 0}, "qq crashed (#4.3.0)")
		})
	}
}

func TestQmailQueueExecFailure(t *testing.T) {
	q := &QmailQueue{Path: filepath.Join(t.TempDir(), "missing-qmail-queue")}
	_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
	wantError(t, err, 451, [3]int{4, 3, 0}, "unable to exec qq (#4.3.0)")
}

// A child that outlives the timeout is killed and the message answered
// 451, whether it hangs after the envelope or never reads the message.
func TestQmailQueueTimeoutKillsChild(t *testing.T) {
	bin := fakeqq.Build(t)
	t.Run("after envelope", func(t *testing.T) {
		q, dir := fakeQueue(t, bin, "FAKEQQ_SLEEP=60s")
		q.Timeout = time.Second
		_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
		wantError(t, err, 451, [3]int{4, 3, 0}, "qq timeout (#4.3.0)")
		// On a loaded machine the child may be killed before it records
		// the call; when it did record, its pid must be gone.
		for _, c := range fakeqq.Calls(t, dir) {
			var pid int
			fmt.Sscanf(c.Info[strings.Index(c.Info, "pid="):], "pid=%d", &pid)
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("child %d still exists after the timeout (kill 0: %v)", pid, err)
			}
		}
	})
	t.Run("never reads", func(t *testing.T) {
		script := writeScript(t, t.TempDir(), "qq", "exec sleep 60\n")
		q := &QmailQueue{Path: script, Timeout: time.Minute}
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		// 1 MiB does not fit in a pipe: the write blocks until the kill.
		_, err := q.Deliver(ctx, Envelope{From: "a@b", To: []string{"c@d"}}, &patternReader{left: 1 << 20})
		wantError(t, err, 451, [3]int{4, 3, 0}, "qq timeout (#4.3.0)")
	})
}

// A message reader that fails must never produce a queued message: the
// child is killed before any envelope byte is written.
func TestQmailQueueReaderFailure(t *testing.T) {
	bin := fakeqq.Build(t)
	for _, size := range []int{0, 100, 300 << 10} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			q, dir := fakeQueue(t, bin)
			var logs logBuffer
			q.Logger = logs.logger()
			_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}},
				&failingReader{data: bytes.Repeat([]byte("line\n"), size/5)})
			if !errors.Is(err, errBadData) {
				t.Fatalf("error = %v, want it to wrap the reader's error", err)
			}
			var qe *Error
			if errors.As(err, &qe) {
				t.Errorf("reader failure returned as hand-off error %v", qe)
			}
			if calls := fakeqq.Calls(t, dir); len(calls) != 0 {
				t.Fatalf("a message was queued after the reader failed: %+v", calls[0].Info)
			}
			if !strings.Contains(logs.String(), "signal: killed") {
				t.Errorf("child was not killed before the envelope; log: %s", logs.String())
			}
		})
	}
}

// Envelope bytes sent while the message pipe is open make the fake exit 81;
// a long envelope (bigger than a pipe buffer) must still work.
func TestQmailQueueManyRecipients(t *testing.T) {
	bin := fakeqq.Build(t)
	q, dir := fakeQueue(t, bin)
	var to []string
	for i := range 3000 {
		to = append(to, fmt.Sprintf("recipient-%04d@example.test", i))
	}
	if _, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: to}, strings.NewReader("x\n")); err != nil {
		t.Fatal(err)
	}
	calls := fakeqq.Calls(t, dir)
	if len(calls) != 1 || len(calls[0].To()) != 3000 || calls[0].To()[2999] != to[2999] {
		t.Fatalf("recipients not passed on")
	}
}

// The message streams to the child: handing off 10 MiB allocates far less
// than the message.
func TestQmailQueueStreams(t *testing.T) {
	bin := fakeqq.Build(t)
	q := &QmailQueue{Path: bin} // the fake buffers the message in its own process, not in ours
	const size = 10 << 20
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	if _, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, &patternReader{left: size}); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > size/8 {
		t.Errorf("handing off %d bytes allocated %d bytes: the message is buffered", size, alloc)
	}
}

func TestQmailQueueLargeMessageIntact(t *testing.T) {
	bin := fakeqq.Build(t)
	q, dir := fakeQueue(t, bin)
	const size = 3 << 20
	h := sha256.New()
	if _, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}},
		io.TeeReader(&patternReader{left: size}, h)); err != nil {
		t.Fatal(err)
	}
	calls := fakeqq.Calls(t, dir)
	if len(calls) != 1 || len(calls[0].Message) != size {
		t.Fatalf("message not recorded whole")
	}
	if got := sha256.Sum256(calls[0].Message); !bytes.Equal(got[:], h.Sum(nil)) {
		t.Fatal("message changed on the way")
	}
}

func TestQmailQueueDir(t *testing.T) {
	if d := (&QmailQueue{Path: "/var/qmail/bin/qmail-queue"}).dir(); d != "/var/qmail" {
		t.Errorf("dir = %q", d)
	}
	if d := (&QmailQueue{Path: "/usr/local/bin/qq"}).dir(); d != "/" {
		t.Errorf("dir = %q", d)
	}
	tmp := t.TempDir()
	out := filepath.Join(tmp, "pwd")
	script := writeScript(t, tmp, "qq", "pwd > "+out+"\ncat >/dev/null\ncat <&1 >/dev/null\n")
	q := &QmailQueue{Path: script, Dir: tmp}
	if _, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n")); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(out)
	if strings.TrimSpace(string(got)) != tmp {
		t.Errorf("child ran in %q, want %q", got, tmp)
	}
}

func TestAppendEnvelope(t *testing.T) {
	got := AppendEnvelope([]byte("x"), Envelope{From: "", To: []string{"a@b", "c@d"}})
	if want := "xF\x00Ta@b\x00Tc@d\x00\x00"; string(got) != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	env := Envelope{From: "s@x", To: []string{"r@y"}}
	if n := len(AppendEnvelope(nil, env)); n != envelopeSize(env) {
		t.Errorf("envelopeSize = %d, encoded %d", envelopeSize(env), n)
	}
}

func FuzzAppendEnvelope(f *testing.F) {
	f.Add("sender@example.test", "a@b\nc@d")
	f.Add("", "postmaster")
	f.Fuzz(func(t *testing.T, from, tos string) {
		env := Envelope{From: from, To: strings.Split(tos, "\n")}
		if checkEnvelope(env) != nil {
			return
		}
		b := AppendEnvelope(nil, env)
		if len(b) != envelopeSize(env) {
			t.Fatalf("size %d, want %d", len(b), envelopeSize(env))
		}
		c := fakeqq.Call{Envelope: b}
		if c.From() != from && from != "" {
			t.Fatalf("from %q, want %q", c.From(), from)
		}
		got := c.To()
		if len(got) != len(env.To) {
			t.Fatalf("to %q, want %q", got, env.To)
		}
		for i := range got {
			if got[i] != env.To[i] {
				t.Fatalf("to %q, want %q", got, env.To)
			}
		}
	})
}

func TestQQCustomErrorText(t *testing.T) {
	wantError(t, qqCustomError("Dbad thing (#5.7.1)\n"), 554, [3]int{5, 7, 1}, "bad thing (#5.7.1)")
	wantError(t, qqCustomError("Ztry later (#4.7.1)\x00"), 451, [3]int{4, 7, 1}, "try later (#4.7.1)")
	wantError(t, qqCustomError("Dtwo\nlines (#5.7.1)"), 554, [3]int{}, "two")
	wantError(t, qqCustomError("D"), 451, [3]int{4, 3, 0}, "qq temporary problem (#4.3.0)")
}

func FuzzQQCustomError(f *testing.F) {
	f.Add("Dcustom permanent reject from fake qq (#5.7.0)")
	f.Add("Zcustom temporary reject (#4.7.0)\n")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		e := qqCustomError(s)
		if e.Code != 451 && e.Code != 554 {
			t.Fatalf("code %d", e.Code)
		}
		if strings.ContainsAny(e.Text, "\r\n\x00") {
			t.Fatalf("text %q spans lines", e.Text)
		}
		if e.Enhanced != ([3]int{}) && e.Enhanced[0] != 2 && e.Enhanced[0] != 4 && e.Enhanced[0] != 5 {
			t.Fatalf("enhanced %v", e.Enhanced)
		}
	})
}

func BenchmarkAppendEnvelope(b *testing.B) {
	env := Envelope{From: "newsletter-bounces@lists.example.com"}
	for i := range 50 {
		env.To = append(env.To, fmt.Sprintf("subscriber%02d@example.org", i))
	}
	buf := make([]byte, 0, 4096)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendEnvelope(buf[:0], env)
	}
	b.SetBytes(int64(len(buf)))
}

func BenchmarkQmailQueue1KiB(b *testing.B) {
	bin := fakeqq.Build(b)
	q := &QmailQueue{Path: bin}
	msg := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n"), 16)
	env := Envelope{From: "a@example.test", To: []string{"b@example.test"}}
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := q.Deliver(context.Background(), env, bytes.NewReader(msg)); err != nil {
			b.Fatal(err)
		}
	}
}

// A child that exits without reading the whole message: the write fails
// and the child's exit code decides the reply; exit 0 is not trusted.
func TestQmailQueueChildStopsReading(t *testing.T) {
	cases := []struct {
		exit int
		code int
		text string
	}{
		{53, 451, "qq write error or disk full (#4.3.0)"},
		{31, 554, "mail server permanently rejected message (#5.3.0)"},
		{0, 451, "qq read error (#4.3.0)"},
	}
	for _, c := range cases {
		t.Run(strconv.Itoa(c.exit), func(t *testing.T) {
			script := writeScript(t, t.TempDir(), "qq", fmt.Sprintf("exit %d\n", c.exit))
			q := &QmailQueue{Path: script}
			_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, &patternReader{left: 1 << 20})
			wantError(t, err, c.code, parseEnhanced(c.text), c.text)
		})
	}
}

// Concurrent hand-offs must not leak pipe ends into each other's children
// (a leaked message pipe would never reach EOF).
func TestQmailQueueConcurrent(t *testing.T) {
	bin := fakeqq.Build(t)
	q, dir := fakeQueue(t, bin)
	const n = 10
	errs := make(chan error, n)
	for i := range n {
		go func() {
			env := Envelope{From: fmt.Sprintf("s%d@x", i), To: []string{"c@d"}}
			_, err := q.Deliver(context.Background(), env, &patternReader{left: 256 << 10})
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	calls := fakeqq.Calls(t, dir)
	if len(calls) != n {
		t.Fatalf("%d calls, want %d", len(calls), n)
	}
	seen := map[string]bool{}
	for _, c := range calls {
		if len(c.Message) != 256<<10 {
			t.Errorf("%s: message of %d bytes", c.From(), len(c.Message))
		}
		seen[c.From()] = true
	}
	if len(seen) != n {
		t.Errorf("senders %v", seen)
	}
}

// The child's stderr is relay's own (Stderr), as qmail-smtpd passes its
// fd 2: whatever a wrapper writes there reaches the log, however much, and
// never the client's reply.
func TestQmailQueueStderr(t *testing.T) {
	t.Run("to relay's stderr", func(t *testing.T) {
		script := writeScript(t, t.TempDir(), "qq", "cat >/dev/null\necho 'scanner: clamd socket gone' >&2\nexit 81\n")
		errFile, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
		if err != nil {
			t.Fatal(err)
		}
		defer errFile.Close()
		q := &QmailQueue{Path: script, Stderr: errFile}
		_, err = q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
		wantError(t, err, 451, [3]int{4, 3, 0}, "qq internal bug (#4.3.0)")
		if strings.Contains(err.Error(), "clamd") {
			t.Errorf("stderr leaked into the reply: %v", err)
		}
		if b, _ := os.ReadFile(errFile.Name()); string(b) != "scanner: clamd socket gone\n" {
			t.Errorf("relay's stderr got %q", b)
		}
	})
	t.Run("a flood before reading", func(t *testing.T) {
		script := writeScript(t, t.TempDir(), "qq", "head -c 200000 /dev/zero >&2\ncat >/dev/null\nexit 0\n")
		errFile, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
		if err != nil {
			t.Fatal(err)
		}
		defer errFile.Close()
		q := &QmailQueue{Path: script, Timeout: 10 * time.Second, Stderr: errFile}
		if _, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n")); err != nil {
			t.Fatalf("%v; want queued", err)
		}
		if st, _ := errFile.Stat(); st.Size() != 200000 {
			t.Errorf("relay's stderr got %d bytes, want 200000", st.Size())
		}
	})
	t.Run("none", func(t *testing.T) {
		script := writeScript(t, t.TempDir(), "qq", "echo noise >&2\ncat >/dev/null\nexit 0\n")
		q := &QmailQueue{Path: script}
		if _, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n")); err != nil {
			t.Fatalf("%v; want queued (stderr to /dev/null)", err)
		}
	})
}

// A child that leaves something holding the message pipe without reading
// it (a wrapper's stuck filter) cannot hold the session past the timeout:
// killing the child does not end the write, its deadline does.
func TestQmailQueueTimeoutWithGrandchild(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "grandchild.pid")
	// (sh gives a background job /dev/null as stdin unless told otherwise.)
	script := writeScript(t, dir, "qq", "exec 3<&0\nsleep 20 <&3 &\necho $! >"+pidFile+"\nexec sleep 20\n")
	t.Cleanup(func() {
		if b, err := os.ReadFile(pidFile); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	q := &QmailQueue{Path: script, Timeout: 500 * time.Millisecond}
	done := make(chan error, 1)
	go func() {
		// 1 MiB does not fit in the pipe: the write blocks.
		_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, &patternReader{left: 1 << 20})
		done <- err
	}()
	select {
	case err := <-done:
		wantError(t, err, 451, [3]int{4, 3, 0}, "qq timeout (#4.3.0)")
	case <-time.After(15 * time.Second):
		t.Fatal("Deliver still blocked 15s after its 500ms timeout, behind the grandchild holding the pipe")
	}
}
