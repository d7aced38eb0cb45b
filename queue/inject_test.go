package queue

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeInject writes a qmail-inject stand-in that records its arguments (one
// per line) and its stdin in dir, prints a message on stderr and exits with
// exit.
func fakeInject(t *testing.T, exit int) (*QmailInject, string) {
	t.Helper()
	dir := t.TempDir()
	script := writeScript(t, dir, "qmail-inject", fmt.Sprintf(
		"printf '%%s\\n' \"$@\" > %[1]s/args\ncat > %[1]s/stdin\necho 'qmail-inject: fatal: secret detail' >&2\nexit %[2]d\n", dir, exit))
	return &QmailInject{Path: script, Timeout: 20 * time.Second}, dir
}

func TestQmailInjectArgsAndStdin(t *testing.T) {
	q, dir := fakeInject(t, 0)
	q.Args = []string{"-n"}
	msg := "Subject: hi\n\n.dot\nbody\n"
	r, err := q.Deliver(context.Background(), Envelope{From: "s@example.test", To: []string{"a@x", "-b@y"}}, strings.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	if r.QP == 0 || !strings.HasPrefix(r.Reply, "ok ") {
		t.Errorf("receipt %+v", r)
	}
	args, _ := os.ReadFile(filepath.Join(dir, "args"))
	if want := "-n\n-f\ns@example.test\n-a\n--\na@x\n-b@y\n"; string(args) != want {
		t.Errorf("args = %q, want %q", args, want)
	}
	stdin, _ := os.ReadFile(filepath.Join(dir, "stdin"))
	if string(stdin) != msg {
		t.Errorf("stdin = %q, want %q", stdin, msg)
	}
}

func TestQmailInjectNullSender(t *testing.T) {
	q, dir := fakeInject(t, 0)
	if _, err := q.Deliver(context.Background(), Envelope{From: "", To: []string{"a@x"}}, strings.NewReader("x\n")); err != nil {
		t.Fatal(err)
	}
	args, _ := os.ReadFile(filepath.Join(dir, "args"))
	if want := "-f\n\n-a\n--\na@x\n"; string(args) != want {
		t.Errorf("args = %q, want %q (-f with an empty argument)", args, want)
	}
}

func TestQmailInjectExitCodes(t *testing.T) {
	cases := []struct {
		exit int
		code int
		text string
	}{
		{100, 554, "qmail-inject permanent failure (#5.3.0)"},
		{111, 451, "qmail-inject temporary failure (#4.3.0)"},
		{1, 451, "qmail-inject temporary failure (#4.3.0)"},
	}
	for _, c := range cases {
		t.Run(fmt.Sprint(c.exit), func(t *testing.T) {
			q, _ := fakeInject(t, c.exit)
			var logs logBuffer
			q.Logger = logs.logger()
			_, err := q.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
			wantError(t, err, c.code, parseEnhanced(c.text), c.text)
			if strings.Contains(err.Error(), "secret") {
				t.Errorf("stderr leaked into the client text: %v", err)
			}
			if !strings.Contains(logs.String(), "secret detail") {
				t.Errorf("stderr not logged: %s", logs.String())
			}
		})
	}
}

func TestQmailInjectFailures(t *testing.T) {
	env := Envelope{From: "a@b", To: []string{"c@d"}}
	t.Run("exec", func(t *testing.T) {
		q := &QmailInject{Path: filepath.Join(t.TempDir(), "missing")}
		_, err := q.Deliver(context.Background(), env, strings.NewReader("x\n"))
		wantError(t, err, 451, [3]int{4, 3, 0}, "unable to exec qmail-inject (#4.3.0)")
	})
	t.Run("crash", func(t *testing.T) {
		q := &QmailInject{Path: writeScript(t, t.TempDir(), "qi", "cat >/dev/null\nkill -KILL $$\n")}
		_, err := q.Deliver(context.Background(), env, strings.NewReader("x\n"))
		wantError(t, err, 451, [3]int{4, 3, 0}, "qmail-inject crashed (#4.3.0)")
	})
	t.Run("timeout", func(t *testing.T) {
		q := &QmailInject{Path: writeScript(t, t.TempDir(), "qi", "cat >/dev/null\nexec sleep 60\n"), Timeout: 300 * time.Millisecond}
		_, err := q.Deliver(context.Background(), env, strings.NewReader("x\n"))
		wantError(t, err, 451, [3]int{4, 3, 0}, "qmail-inject timed out (#4.3.0)")
	})
	t.Run("reader", func(t *testing.T) {
		dir := t.TempDir()
		done := filepath.Join(dir, "completed")
		// Reads stdin to EOF and only then "queues" (touches done).
		q := &QmailInject{Path: writeScript(t, dir, "qi", "cat >/dev/null && touch "+done+"\n")}
		_, err := q.Deliver(context.Background(), env, &failingReader{data: []byte("Subject: x\n\npartial")})
		if !errors.Is(err, errBadData) {
			t.Fatalf("error = %v, want the reader's", err)
		}
		if _, err := os.Stat(done); err == nil {
			t.Fatal("qmail-inject saw EOF and completed after the reader failed")
		}
	})
}
