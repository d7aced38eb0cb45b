package signals

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"relay/config"
)

// BenchmarkFollow1M follows a multilog file of 1,000,000 lines from its
// start to its end, as a restart that catches up would: 125,000 messages
// relay handed off, each with new, info, two deliveries started and
// ended, end, and a status line. cpu-s/1M-lines is the process's CPU
// time (user and system, GC included) per million lines.
func BenchmarkFollow1M(b *testing.B) {
	const msgs = 125000
	dir := b.TempDir()
	current := filepath.Join(dir, "current")
	fh, err := os.Create(current)
	if err != nil {
		b.Fatal(err)
	}
	w := bufio.NewWriter(fh)
	at := testTime
	for i := range msgs {
		s := tai64n(at.Add(time.Duration(i) * time.Millisecond))
		n, d := 100000+i, 2*i+1
		fmt.Fprintf(w, "%s new msg %d\n", s, n)
		fmt.Fprintf(w, "%s info msg %d: bytes 2345 from <user%d@example.com> qp %d uid 1001\n", s, n, i%5000, 1000+i)
		fmt.Fprintf(w, "%s starting delivery %d: msg %d to remote rcpt%d@example.net\n", s, d, n, i)
		fmt.Fprintf(w, "%s starting delivery %d: msg %d to local box%d@example.com\n", s, d+1, n, i)
		fmt.Fprintf(w, "%s delivery %d: success: 192.0.2.1_accepted_message./Remote_host_said:_250_2.0.0_Ok:_queued_as_ABCDEF/\n", s, d)
		fmt.Fprintf(w, "%s delivery %d: failure: Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/\n", s, d+1)
		fmt.Fprintf(w, "%s end msg %d\n", s, n)
		fmt.Fprintf(w, "%s status: local 0/10 remote 0/20\n", s)
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	fh.Close()
	st, _ := os.Stat(current)
	dev, ino := fileID(st)
	b.ResetTimer()
	var cpu time.Duration
	for b.Loop() {
		b.StopTimer()
		dataDir := b.TempDir()
		cfg := &config.Config{DataDir: dataDir, Signals: config.SignalsConfig{QmailSendLog: current}}
		sink := &countSink{}
		f, err := New(cfg, sink, Options{})
		if err != nil {
			b.Fatal(err)
		}
		f.saved = &filePos{Dev: dev, Ino: ino, Name: "current"}
		for i := range msgs {
			f.HandedOff(1000+i, fmt.Sprintf("user%d@example.com", i%5000), []string{"user:u", "sender:s", "ip:192.0.2.9"}, at)
		}
		b.StartTimer()
		before := cpuTime()
		f.Start()
		for sink.n.Load() < 2*msgs {
			time.Sleep(time.Millisecond)
		}
		cpu += cpuTime() - before
		b.StopTimer()
		f.Close()
		b.StartTimer()
	}
	b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/1M-lines")
}

type countSink struct{ n atomic.Int64 }

func (s *countSink) RecordDelivery([]string, string, time.Time) { s.n.Add(1) }
func (s *countSink) AttachFlushPart(string, FlushPart, func(k, v []byte) error) error {
	return nil
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkHandedOff is what recording a hand-off adds to the 250: the
// journal's one write(2) and the queue, with a flush taking the queue
// every 1,000 hand-offs (a busy second).
func BenchmarkHandedOff(b *testing.B) {
	dataDir := b.TempDir()
	cfg := &config.Config{DataDir: dataDir, Signals: config.SignalsConfig{QmailSendLog: filepath.Join(dataDir, "current")}}
	sink := newFakeSink()
	f, err := New(cfg, sink, Options{Poll: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	ids := []string{"user:bob", "sender:bob@example.com", "ip:192.0.2.1"}
	at := time.Now()
	b.ResetTimer()
	for i := range b.N {
		f.HandedOff(1000+i, "bob@example.com", ids, at)
		if i%1000 == 999 {
			b.StopTimer()
			sink.flush()
			b.StartTimer()
		}
	}
}
