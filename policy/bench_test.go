package policy

import (
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"relay/config"
)

// benchConfig has caps on every kind that a benchmark never reaches.
func benchConfig(b *testing.B) *config.Config {
	cfg := baseConfig()
	big := &config.Limits{MaxRcptsPerMsg: 100, Rcpts: rates(b, "1000000/1m", "10000000/1h", "100000000/24h"), Msgs: rates(b, "1000000/1h")}
	cfg.Policy.Limits = config.KindLimits{User: big, UID: big, Sender: big, Domain: big, IP: big}
	cfg.Policy.Allow = []config.AllowRule{{Match: "sender:*@lists.example.com", Unlimited: true}}
	return cfg
}

// BenchmarkDecision is one message's passage (Begin, AddRcpt, Message,
// Commit) for a message with four identities, with 100,000 identities
// known to the engine, all resident.
func BenchmarkDecision(b *testing.B) {
	db, err := OpenDB(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	e, err := New(db, benchConfig(b), Options{FlushInterval: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	msgs := manyIdentities(100000)
	for _, ids := range msgs {
		send(e, ids, 1)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		tx := e.Begin(msgs[i%len(msgs)])
		if tx.AddRcpt("rcpt@example.net").Action != Accept || tx.Message().Action != Accept {
			b.Fatal("refused")
		}
		tx.Commit()
	}
}

// BenchmarkDecisionMiss is BenchmarkDecision with none of the message's
// four identities resident: each is read from bbolt (100,000 stored) on
// Begin. ns/miss is the time per identity.
func BenchmarkDecisionMiss(b *testing.B) {
	cfg := benchConfig(b)
	dir := b.TempDir()
	clk := newClock()
	msgs := manyIdentities(100000)
	seedStore(b, dir, cfg, clk, msgs)
	clk.Add(time.Hour)
	db, err := OpenDB(dir)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	e, err := New(db, cfg, Options{Now: clk.Now, FlushInterval: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	b.ReportAllocs()
	b.ResetTimer()
	n := 0
	for i := 0; b.Loop(); i++ {
		if i > 0 && i%len(msgs) == 0 {
			b.StopTimer()
			evictAll(b, e, clk)
			b.StartTimer()
		}
		tx := e.Begin(msgs[i%len(msgs)])
		if tx.AddRcpt("rcpt@example.net").Action != Accept || tx.Message().Action != Accept {
			b.Fatal("refused")
		}
		tx.Commit()
		n++
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(4*n), "ns/miss")
}

// BenchmarkDecisionNewRcpts is BenchmarkDecision with a new_rcpts cap on
// every kind, so each of the message's four identities checks its
// first-time-recipient memory, with 100,000 identities' memories of 1,000
// recipients each resident. One recipient in ten is new to the identity
// (and learnt at Commit). The "off" run is the same loop, with the same
// memories in the heap, without the cap: the difference is what the
// first-time check adds to a decision. Both run with GOGC=10: with the
// default, a 1.7 GB live heap makes the collector run so rarely that the
// transactions' garbage keeps landing on fresh pages, and a page fault
// costs ~40 µs on this VM, which buries what is measured (either run,
// +5 to +10 µs). Compare cpu-ns/op of runs in separate processes:
// go test -c, then -test.bench 'DecisionNewRcpts/off' and '/on' in turn.
func BenchmarkDecisionNewRcpts(b *testing.B) {
	msgs := manyIdentities(100000)
	known := make([]string, 1000)
	for i := range known {
		known[i] = "r" + strconv.Itoa(i) + "@example.net"
	}
	defer debug.SetGCPercent(debug.SetGCPercent(10))
	for _, on := range []bool{false, true} {
		name := "off"
		if on {
			name = "on"
		}
		b.Run(name, func(b *testing.B) {
			cfg := benchConfig(b)
			if on {
				for _, l := range []*config.Limits{cfg.Policy.Limits.User, cfg.Policy.Limits.UID, cfg.Policy.Limits.Sender,
					cfg.Policy.Limits.Domain, cfg.Policy.Limits.IP} {
					l.NewRcpts = rates(b, "1000000/1h", "10000000/24h")
				}
			}
			db, err := OpenDB(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			e, err := New(db, cfg, Options{FlushInterval: time.Hour})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			for _, ids := range msgs {
				send(e, ids, 1)
			}
			{
				today := e.now().UnixNano() / dayNanos
				tmpl := &rcptMemory{}
				for _, r := range known {
					tmpl.touch(e.rcptKey(r), today, 30)
				}
				for i := range e.shards {
					for _, st := range e.shards[i].states {
						st.mem = rcptMemory{slots: slices.Clone(tmpl.slots), n: tmpl.n}
					}
				}
			}
			one := func(i int) {
				rcpt := known[i%len(known)]
				if i%10 == 0 {
					rcpt = "new" + strconv.Itoa(i) + "@example.org"
				}
				tx := e.Begin(msgs[i%len(msgs)])
				if tx.AddRcpt(rcpt).Action != Accept || tx.Message().Action != Accept {
					b.Fatal("refused")
				}
				tx.Commit()
			}
			// Warm up: the heap's pages faulted in and recycled once, as
			// in a daemon that has run a while.
			for i := range 4 * len(msgs) {
				one(1<<30 + i)
			}
			runtime.GC()
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime()
			defer func() { b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op") }()
			for i := 0; b.Loop(); i++ {
				one(i)
			}
		})
	}
}

// BenchmarkRecipientMemoryCost stores first-time-recipient memories of
// 1,000 recipients for 100,000 identities and reports what they cost:
// the bbolt file (disk-MB), and the heap of 10,000 of them resident
// (resident-MB-per-1000-identities), as read back on their next message.
// One iteration is enough: go test -run '^$' -bench RecipientMemoryCost
// -benchtime 1x ./policy
func BenchmarkRecipientMemoryCost(b *testing.B) {
	const ids, per, resident = 100000, 1000, 10000
	for b.Loop() {
		dir := b.TempDir()
		db, err := OpenDB(dir)
		if err != nil {
			b.Fatal(err)
		}
		cfg := benchConfig(b)
		cfg.Policy.Limits.User.NewRcpts = rates(b, "1000000/1h")
		e, err := New(db, cfg, Options{FlushInterval: time.Hour})
		if err != nil {
			b.Fatal(err)
		}
		today := e.now().UnixNano() / dayNanos
		for i := range ids {
			id := "user:u" + strconv.Itoa(i) + "@example.com"
			st, si, _ := e.lockState(id, "user", true)
			for j := range per {
				st.mem.touch(e.rcptKey("r"+strconv.Itoa(i*per+j)+"@example.net"), today-int64(j%30), 30)
			}
			e.shards[si].markDirty(st)
			e.shards[si].mu.Unlock()
			if i%5000 == 4999 {
				if err := e.flush(); err != nil {
					b.Fatal(err)
				}
				e.sweepAll()
			}
		}
		e.Close()
		st, err := os.Stat(filepath.Join(dir, DBFile))
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(st.Size())/1e6, "disk-MB")
		e, err = New(db, cfg, Options{FlushInterval: time.Hour})
		if err != nil {
			b.Fatal(err)
		}
		before := heapInuse()
		for i := range resident {
			_, si, _ := e.lockState("user:u"+strconv.Itoa(i)+"@example.com", "user", false)
			e.shards[si].mu.Unlock()
		}
		after := heapInuse()
		b.ReportMetric(float64(after-before)/1e6/(resident/1000), "resident-MB-per-1000-identities")
		e.Close()
		db.Close()
	}
}

// sweepAll drops every flushed state from memory (a benchmark's way to
// keep its heap small).
func (e *Engine) sweepAll() {
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		for id, st := range sh.states {
			if !st.dirty && st.refs == 0 && st.suspension == nil {
				delete(sh.states, id)
				sh.dropped++
			}
		}
		sh.mu.Unlock()
	}
}

// cpuTime is the process's CPU time so far (user and system): on a shared
// machine it says more than the wall clock.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
