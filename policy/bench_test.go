package policy

import (
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
		if tx.AddRcpt().Action != Accept || tx.Message().Action != Accept {
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
		if tx.AddRcpt().Action != Accept || tx.Message().Action != Accept {
			b.Fatal("refused")
		}
		tx.Commit()
		n++
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(4*n), "ns/miss")
}
