package bench_test

import (
	"net/netip"
	"strconv"
	"syscall"
	"testing"
	"time"

	"relay/bench/loadgen"
	"relay/config"
	"relay/policy"
)

// benchPolicy is bench/run's realistic policy: several windows per kind.
func benchPolicy(tb testing.TB) *config.Config {
	tb.Helper()
	rates := func(s ...string) []config.Rate {
		rs := make([]config.Rate, len(s))
		for i, v := range s {
			r, err := config.ParseRate(v)
			if err != nil {
				tb.Fatal(err)
			}
			rs[i] = r
		}
		return rs
	}
	cfg := config.Default()
	cfg.DataDir = tb.TempDir()
	cfg.Policy.Mode = config.PolicyEnforce
	cfg.Policy.OverLimit = config.OverLimitDefer
	cfg.Policy.SuspendAfter = 5
	cfg.Policy.Limits = config.KindLimits{
		User: &config.Limits{MaxRcptsPerMsg: 50, Rcpts: rates("100/1m", "500/1h", "2000/24h"), Msgs: rates("200/1h", "1000/24h")},
		UID: &config.Limits{MaxRcptsPerMsg: 50, Rcpts: rates("1000000/1m", "5000000/1h", "20000000/24h"),
			Msgs: rates("1000000/1m", "2000000/1h", "10000000/24h")},
		Sender: &config.Limits{MaxRcptsPerMsg: 50, Rcpts: rates("1000/1m", "5000/1h", "20000/24h"), Msgs: rates("500/1m", "2000/1h", "10000/24h")},
		Domain: &config.Limits{Rcpts: rates("100000/1m", "500000/1h", "2000000/24h"), Msgs: rates("50000/1m", "200000/1h", "1000000/24h")},
		IP: &config.Limits{Rcpts: rates("10000000/1m", "50000000/1h", "200000000/24h"),
			Msgs: rates("1000000/1m", "5000000/1h", "20000000/24h")},
	}
	return cfg
}

// seededEngine is a policy engine whose table holds n senders spread over
// n/100 domains, each charged one message.
func seededEngine(tb testing.TB, n int) *policy.Engine {
	tb.Helper()
	cfg := benchPolicy(tb)
	db, err := policy.OpenDB(cfg.DataDir)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	eng, err := policy.New(db, cfg, policy.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { eng.Close() })
	for k := range n {
		if d := decide(eng, k, n/100); d.Action != policy.Accept {
			tb.Fatalf("seeding identity %d: %+v", k, d)
		}
	}
	return eng
}

var benchIP = policy.IPID(netip.MustParseAddr("127.0.0.1"))

// decide runs one message with one recipient from sender k through the
// policy, as the SMTP front end does for a relay client: identities from
// the connection and MAIL, Check at MAIL, AddRcpt at RCPT, Message at DATA,
// Commit after the hand-off.
func decide(eng *policy.Engine, k, domains int) policy.Decision {
	addr := loadgen.SenderAddr(k, domains)
	dom, _ := policy.DomainID(addr)
	tx := eng.Begin([]policy.Identity{benchIP, policy.SenderID(addr), dom})
	d := tx.Check()
	if d.Action == policy.Accept {
		d = tx.AddRcpt("rcpt@example.net")
	}
	if d.Action == policy.Accept {
		d = tx.AddIdentities(policy.WebUID("web1", uint32(loadgen.FirstUID+k%9000), "", ""))
	}
	if d.Action == policy.Accept {
		d = tx.Message()
	}
	if d.Action != policy.Accept {
		tx.Abort()
		return d
	}
	tx.Commit()
	return d
}

// BenchmarkPolicyDecision is one message's whole passage through policy
// (four identities, three windows per metric each) with 100,000 senders
// already in the table. Target: at most 5 µs (docs/performance.md).
func BenchmarkPolicyDecision(b *testing.B) {
	const identities = 100_000
	eng := seededEngine(b, identities)
	b.Run("serial", func(b *testing.B) {
		k := 0
		cpu := processCPU()
		for b.Loop() {
			if d := decide(eng, k%identities, identities/100); d.Action != policy.Accept {
				b.Fatalf("%+v", d)
			}
			k += 7919 // a prime stride: spread over the table, not a hot few
		}
		// CPU time (this process, the background flush included) per
		// decision: steadier than ns/op on a shared, busy machine.
		b.ReportMetric(float64(processCPU()-cpu)/float64(b.N), "cpu-ns/op")
	})
	b.Run("parallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			k := 0
			for pb.Next() {
				if d := decide(eng, k%identities, identities/100); d.Action != policy.Accept {
					b.Errorf("%+v", d)
					return
				}
				k += 7919
			}
		})
	})
}

// TestPolicyDecisionDefers proves decide can fail: a sender past its
// 500/1m message window is deferred.
func TestPolicyDecisionDefers(t *testing.T) {
	eng := seededEngine(t, 0)
	var last policy.Decision
	for range 501 {
		last = decide(eng, 42, 1)
	}
	if last.Action != policy.Defer || last.Identity != "sender:"+loadgen.SenderAddr(42, 1) {
		t.Fatalf("the 501st message in a minute: %+v, want Defer for sender %s", last, strconv.Quote(loadgen.SenderAddr(42, 1)))
	}
}

// processCPU is this process's user+system time.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
