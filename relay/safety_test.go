package relay

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"relay/config"
	"relay/internal/fakeqq"
	"relay/local"
)

// A client that stalls in the middle of DATA must not hold Shutdown past its
// deadline: the hand-off is killed and the connection closed, as Shutdown
// promises, not left until relay.timeout ends the read.
func TestShutdownDeadlineWithStalledData(t *testing.T) {
	cfg := testConfig()
	cfg.Relay.Timeout = config.Duration{Duration: 5 * time.Minute}
	h := &fakeHandoff{}
	s := testServer(t, cfg, Deps{Handoff: h}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("x")
	c.mailNoWait("a@remote.test", "u@example.test", "Subject: s\r\n\r\nhalf a mess")
	time.Sleep(100 * time.Millisecond) // let the server start reading the data

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	select {
	case err := <-done:
		if err != context.DeadlineExceeded {
			t.Fatalf("Shutdown = %v, want the deadline's error", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Shutdown still waiting for a stalled DATA long after its deadline")
	}
	if got := c.reply(); strings.HasPrefix(got, "250") {
		t.Fatalf("cut-short transaction got %q", got)
	}
	if len(h.deliveries()) != 0 {
		t.Fatal("a partial message was handed off")
	}
}

// longLineMessage has a header line and a body line longer than the SMTP
// listeners' line limit: qmail-queue takes any line length, and scripts do
// put a whole HTML body on one line.
func longLineMessage() string {
	return "Subject: s\n\n<html>" + strings.Repeat("x", 3*maxLineLength) + "</html>\n" +
		strings.Repeat("padding line\n", 60000)
}

// End to end through relay qq: any line length qmail-queue takes (a line
// longer than even the local socket's SMTP limit, in the header and in the
// body) is counted and queued byte for byte; it is neither deferred nor
// passed uncounted (on_daemon_down = accept).
func TestQQLongLinesAreCountedAndQueued(t *testing.T) {
	path := sockPath(t)
	cfg := testConfig(config.Listener{Addr: path, Mode: config.ModeLocal})
	ck := &fakeChecker{}
	testServer(t, cfg, Deps{Policy: ck}, nil)

	for _, msg := range []string{
		longLineMessage(),
		"Subject: s\n\n" + strings.Repeat("x", 2*maxLocalLineLength) + "\n",
		"X-Long: " + strings.Repeat("x", 2*maxHeadBytes) + "\nSubject: s\n\nbody\n",
	} {
		ck.mu.Lock()
		ck.calls = nil
		ck.mu.Unlock()
		q, calls, stderr := newQQ(t, path)
		env := []byte("Fwww@example.test\x00Tx@far.test\x00\x00")
		if code := q.Filter(strings.NewReader(msg), bytes.NewReader(env)); code != local.ExitQueued {
			t.Fatalf("relay qq exit %d, want 0; stderr: %s", code, stderr)
		}
		got := fakeqq.Calls(t, calls)
		if len(got) != 1 || string(got[0].Message) != msg || !bytes.Equal(got[0].Envelope, env) {
			t.Fatalf("real qmail-queue ran %d times or got other bytes", len(got))
		}
		waitFor(t, func() bool { return strings.HasSuffix(ck.log(), "; msg; commit") })
		if strings.Contains(stderr.String(), "uncounted") {
			t.Fatalf("passed uncounted: %s", stderr)
		}
	}
}

// One local user cannot take every connection slot: max_connections_per_ip
// counts the peer's uid on the local socket, and relay qq defers on the
// 421 rather than treating the daemon as down (which could pass mail on
// uncounted).
func TestLocalConnectionsCappedPerUID(t *testing.T) {
	path := sockPath(t)
	cfg := testConfig(config.Listener{Addr: path, Mode: config.ModeLocal})
	cfg.Relay.MaxConnectionsPerIP = 2
	ck := &fakeChecker{}
	testServer(t, cfg, Deps{Policy: ck}, nil)
	for i := range 2 {
		if got := dialRaw(t, "unix", path).reply(); !strings.HasPrefix(got, "220 ") {
			t.Fatalf("local connection %d: %q", i+1, got)
		}
	}
	if got := dialRaw(t, "unix", path).reply(); got != "421 4.7.0 too many connections\r\n" {
		t.Fatalf("third local connection of one uid: %q", got)
	}

	q, calls, stderr := newQQ(t, path)
	env := []byte("Fwww@example.test\x00Tx@far.test\x00\x00")
	if code := q.Filter(strings.NewReader("Subject: s\n\nbody\n"), bytes.NewReader(env)); code != local.ExitDeferred {
		t.Fatalf("relay qq against a full daemon: exit %d, want 71; stderr: %s", code, stderr)
	}
	if got := fakeqq.Calls(t, calls); len(got) != 0 {
		t.Fatalf("the real qmail-queue ran %d times", len(got))
	}
}

// newQQ is relay qq against the daemon at socket, with the fake qmail-queue
// recording into calls and on_daemon_down = accept (the setting a bypass
// would exploit).
func newQQ(t *testing.T, socket string) (q *local.QQ, calls string, stderr *bytes.Buffer) {
	t.Helper()
	calls = t.TempDir()
	t.Setenv("FAKEQQ_DIR", calls)
	stderr = &bytes.Buffer{}
	q = &local.QQ{
		Socket:       socket,
		QmailQueue:   fakeqq.Build(t),
		OnDaemonDown: local.DaemonDownAccept,
		Timeout:      10 * time.Second,
		UID:          os.Getuid(),
		Stderr:       stderr,
	}
	return q, calls, stderr
}
