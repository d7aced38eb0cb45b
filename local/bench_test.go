package local

import (
	"bytes"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// BenchmarkQQOverhead shows what relay qq adds per message to a bare
// qmail-queue stand-in (the fake qmail-queue, recording nothing):
//
//   - direct:  the stand-in run with the message and envelope on pipes
//   - check:   only the check conversation and the commit, no process
//   - filter:  the same through QQ.Filter, with the check conversation
//     against an in-process fake daemon on a unix socket
//   - process: the stand-in exec'd as a program, as qmail-inject runs it
//   - process-qq: relay qq's code as a program (the test binary acting as
//     relay qq: startup, config and passwd read, check, then the stand-in)
//
// filter minus direct is the per-message cost of the check itself;
// process-qq minus process adds the extra process and the config read.
// Besides wall time each reports cpu-us/op: CPU of this process (which
// includes the fake daemon) and of the reaped children, which a loaded
// machine disturbs far less than wall time.
func BenchmarkQQOverhead(b *testing.B) {
	b.Setenv("FAKEQQ_DIR", "")
	msg := bytes.Repeat([]byte("a line of a typical message, some seventy bytes long, for the bench\n"), 60)
	d := startDaemon(b, daemonScript{})
	q := &QQ{Socket: d.socket, QmailQueue: fakeQQ, OnDaemonDown: DaemonDownDefer, UID: os.Getuid(), Stderr: os.Stderr}
	drain := func() {
		for {
			select {
			case <-d.done:
			default:
				return
			}
		}
	}

	cpu := func(b *testing.B, run func()) {
		start := cpuTime()
		for b.Loop() {
			run()
		}
		b.ReportMetric(float64((cpuTime()-start).Microseconds())/float64(b.N), "cpu-us/op")
	}

	b.Run("direct", func(b *testing.B) {
		sp := &spool{head: msg, size: int64(len(msg))}
		env, _ := ReadEnvelope(bytes.NewReader(testEnvelope))
		cpu(b, func() {
			if code := q.runReal(sp, env, ""); code != 0 {
				b.Fatalf("exit %d", code)
			}
		})
	})
	b.Run("check", func(b *testing.B) {
		sp := &spool{head: msg, size: int64(len(msg))}
		env, _ := ReadEnvelope(bytes.NewReader(testEnvelope))
		cpu(b, func() {
			res := q.check(sp, env)
			if res.verdict != verdictReserved {
				b.Fatalf("verdict %d: %s", res.verdict, res.reply)
			}
			if err := res.conn.commit(); err != nil {
				b.Fatal(err)
			}
			res.conn.Close()
			drain()
		})
	})
	b.Run("filter", func(b *testing.B) {
		cpu(b, func() {
			if code := q.Filter(bytes.NewReader(msg), bytes.NewReader(testEnvelope)); code != 0 {
				b.Fatalf("exit %d", code)
			}
			drain()
		})
	})
	cfg := writeConfig(b, d.socket, "defer", []string{"qmails"})
	b.Run("process", func(b *testing.B) {
		cpu(b, func() {
			if code, _, stderr := runProcess(b, exec.Command(fakeQQ), msg, testEnvelope); code != 0 {
				b.Fatalf("exit %d: %s", code, stderr)
			}
		})
	})
	b.Run("process-qq", func(b *testing.B) {
		cpu(b, func() {
			if code, _, stderr := runProcess(b, helperCmd(b, os.Args[0], cfg, ""), msg, testEnvelope); code != 0 {
				b.Fatalf("exit %d: %s", code, stderr)
			}
			drain()
		})
	})
}

// cpuTime is the user and system CPU of this process and its reaped
// children so far.
func cpuTime() time.Duration {
	var self, children syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &self)
	syscall.Getrusage(syscall.RUSAGE_CHILDREN, &children)
	total := time.Duration(0)
	for _, ru := range []syscall.Rusage{self, children} {
		total += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return total
}
