package policy

import (
	"net/netip"
	"strconv"
	"testing"
	"time"

	"relay/config"
)

// BenchmarkDecision is one message's passage (Begin, AddRcpt, Message,
// Commit) for a message with four identities, with 100,000 identities
// known to the engine.
func BenchmarkDecision(b *testing.B) {
	cfg := baseConfig()
	big := &config.Limits{MaxRcptsPerMsg: 100, Rcpts: rates(b, "1000000/1m", "10000000/1h", "100000000/24h"), Msgs: rates(b, "1000000/1h")}
	cfg.Policy.Limits = config.KindLimits{User: big, UID: big, Sender: big, Domain: big, IP: big}
	cfg.Policy.Allow = []config.AllowRule{{Match: "sender:*@lists.example.com", Unlimited: true}}
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
	const known = 100000
	msgs := make([][]Identity, known/4)
	for i := range msgs {
		n := strconv.Itoa(i)
		msgs[i] = []Identity{UserID("user" + n), IPID(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})), SenderID("s" + n + "@example.com"), {ID: "domain:d" + n + ".example", Kind: "domain"}}
		send(e, msgs[i], 1)
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
