package bench_test

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"relay/bench/loadgen"
	"relay/bench/sink"
	"relay/internal/fakeqq"
)

// startSink serves the bare sink on loopback, handing mail to qq.
func startSink(t *testing.T, qq string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := sink.NewServer(sink.Config{QmailQueue: qq, Timeout: 10 * time.Second})
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

// TestLoadgenAgainstSink runs the load generator against the sink, which
// hands to the fake qmail-queue that checks the fd 0/fd 1 protocol byte
// for byte: every message must arrive once, in qmail's stored form, with
// the envelope the generator sent.
func TestLoadgenAgainstSink(t *testing.T) {
	qqDir := t.TempDir()
	t.Setenv("FAKEQQ_DIR", qqDir)
	addr := startSink(t, fakeqq.Build(t))

	runs := []loadgen.Config{
		{Conns: 2, Messages: 20, Rcpts: 2, Size: 2048},                                         // one connection per message
		{Conns: 3, Messages: 30, Rcpts: 3, Size: 1024, Reuse: true, Pipelining: true, UIDs: 7}, // reused, pipelined
	}
	total := 0
	for _, c := range runs {
		c.Addr, c.Senders, c.Domains, c.Timeout = addr, 5, 2, 10*time.Second
		res, err := loadgen.Run(c)
		if err != nil {
			t.Fatal(err)
		}
		if res.Accepted != c.Messages || res.Deferred+res.Rejected+res.Errors != 0 {
			t.Fatalf("%+v: %+v", c, res)
		}
		if res.P50us <= 0 || res.P99us < res.P50us || res.MaxUs < res.P99us {
			t.Errorf("latencies out of order: %+v", res)
		}
		total += c.Messages
	}

	calls := fakeqq.Calls(t, qqDir)
	if len(calls) != total {
		t.Fatalf("%d hand-offs, want %d", len(calls), total)
	}
	senders := map[string]bool{}
	for k := range 5 {
		senders[loadgen.SenderAddr(k, 2)] = true
	}
	uidLines := 0
	for _, c := range calls {
		if !senders[c.From()] {
			t.Errorf("envelope sender %q is none of the generator's", c.From())
		}
		if n := len(c.To()); n != 2 && n != 3 {
			t.Errorf("%d recipients, want 2 or 3", n)
		}
		if !bytes.HasPrefix(c.Message, []byte("Received: from unknown (127.0.0.1)\n")) {
			t.Errorf("message does not start with the sink's Received line: %.80q", c.Message)
		}
		if bytes.Contains(c.Message, []byte("\r")) || !bytes.HasSuffix(c.Message, []byte("\n")) || bytes.HasSuffix(c.Message, []byte(".\n")) {
			t.Errorf("message not in qmail's stored form (LF ends, no final dot): ...%q", c.Message[max(len(c.Message)-40, 0):])
		}
		if bytes.Contains(c.Message, []byte(" invoked by uid ")) {
			uidLines++
		}
	}
	if uidLines != 30 {
		t.Errorf("%d messages carry the uid Received line, want 30", uidLines)
	}
}

// TestLoadgenCountsDeferrals proves the generator tells a failed hand-off
// from an accepted one.
func TestLoadgenCountsDeferrals(t *testing.T) {
	t.Setenv("FAKEQQ_DIR", "")
	t.Setenv("FAKEQQ_EXIT", "71")
	addr := startSink(t, fakeqq.Build(t))
	res, err := loadgen.Run(loadgen.Config{Addr: addr, Messages: 4, Reuse: true, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 0 || res.Deferred != 4 || res.MsgsPerSec != 0 {
		t.Fatalf("%+v, want 4 deferred", res)
	}
}

// TestStandinAndExec runs both stand-ins (Go, and C where a compiler is)
// directly through the generator's local-injection mode, and once with a
// short envelope that they must refuse.
func TestStandinAndExec(t *testing.T) {
	bins := map[string]string{"go": filepath.Join(t.TempDir(), "standin")}
	if out, err := exec.Command("go", "build", "-o", bins["go"], "relay/bench/cmd/standin").CombinedOutput(); err != nil {
		t.Fatalf("building the stand-in: %v\n%s", err, out)
	}
	for _, cc := range []string{"musl-gcc", "cc"} {
		if p, err := exec.LookPath(cc); err == nil {
			bins["c"] = filepath.Join(t.TempDir(), "standin-c")
			if out, err := exec.Command(p, "-O2", "-static", "-Wall", "-Wextra", "-Werror", "-o", bins["c"], "cstandin/standin.c").CombinedOutput(); err != nil {
				t.Fatalf("building the C stand-in: %v\n%s", err, out)
			}
			break
		}
	}
	if bins["c"] == "" && os.Getenv("RELAY_REQUIRE_CC") != "" {
		t.Error("no C compiler for bench/cstandin")
	}
	for name, bin := range bins {
		t.Run(name, func(t *testing.T) {
			res, err := loadgen.RunExec(loadgen.ExecConfig{Argv: []string{bin}, Messages: 5, Conns: 2, Size: 4096, Rcpts: 2})
			if err != nil {
				t.Fatal(err)
			}
			if res.Accepted != 5 || res.Errors+res.Deferred+res.Rejected != 0 {
				t.Fatalf("%+v", res)
			}
			// Reading fd 1 fails when it is not readable: the stand-in
			// must not claim success then (qmail-queue exits 54).
			cmd := exec.Command(bin)
			cmd.Stdin = strings.NewReader("x\n")
			w, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			cmd.Stdout = w
			if err := cmd.Run(); cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 54 {
				t.Fatalf("stand-in with a write-only fd 1: %v, want exit 54", err)
			}
		})
	}
}
