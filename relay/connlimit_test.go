package relay

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"relay/config"
)

func optRate(t testing.TB, s string) config.OptRate {
	t.Helper()
	r, err := config.ParseRate(s)
	if err != nil {
		t.Fatal(err)
	}
	return config.OptRate{Rate: r}
}

func addr4(i int) netip.Prefix {
	return ipKey(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}))
}

// TestLimiterTable: N at once, then one per W/N; strict taking counts
// beyond the bucket; keys are independent.
func TestLimiterTable(t *testing.T) {
	tbl := newLimiterTable[string](optRate(t, "3/1m"), 1000)
	now := time.Unix(1_000_000, 0)
	for i := range 3 {
		if !tbl.allow("a", now) {
			t.Fatalf("token %d refused", i)
		}
	}
	if tbl.allow("a", now) || !tbl.exhausted("a", now) {
		t.Fatal("a 4th token at once")
	}
	if !tbl.allow("b", now) || tbl.exhausted("c", now) {
		t.Fatal("keys are not independent")
	}
	if tbl.allow("a", now.Add(20*time.Second-time.Millisecond)) || !tbl.allow("a", now.Add(20*time.Second)) {
		t.Fatal("one token per 20s")
	}
	// take counts what the bucket lacks, past empty too.
	for i, want := range []int{1, 2, 3, 4} {
		if got := tbl.take("d", now); got != want {
			t.Fatalf("take %d: %d, want %d", i, got, want)
		}
	}
	if newLimiterTable[string](config.OptRate{}, 10) != nil {
		t.Fatal("an off rate made a table")
	}
}

// TestLimiterTableBounded: the table never holds much more than its
// bound; full buckets go first, then those nearest to full, so clients
// over their limit are kept while others come and go.
func TestLimiterTableBounded(t *testing.T) {
	const bound = 1600 // 100 per shard
	tbl := newLimiterTable[netip.Prefix](optRate(t, "5/1h"), bound)
	now := time.Unix(1_000_000, 0)
	// 50 clients drained to nothing.
	for i := range 50 {
		for range 5 {
			tbl.allow(addr4(i), now)
		}
	}
	for i := 50; i < 50_000; i++ {
		tbl.allow(addr4(i), now)
		if n := tbl.size(); n > bound {
			t.Fatalf("%d keys after %d clients, bound %d", n, i+1, bound)
		}
	}
	for i := range 50 {
		if !tbl.exhausted(addr4(i), now) {
			t.Fatalf("drained client %d was dropped for clients nearer to full", i)
		}
	}
	// An hour later every bucket is full again: the next sweep of each
	// shard drops them.
	later := now.Add(2 * time.Hour)
	for i := 100_000; i < 100_000+limiterShards*20; i++ {
		tbl.allow(addr4(i), later)
	}
	if n := tbl.size(); n > limiterShards*20 {
		t.Fatalf("%d keys after the sweep", n)
	}
}

// TestConnRatePerIP: beyond conn_rate_per_ip a client address gets
// 421 4.7.0 instead of the greeting; other addresses, a [[webserver]]'s
// and the local socket, are unaffected; a reload that changes the rate
// starts afresh.
func TestConnRatePerIP(t *testing.T) {
	path := sockPath(t)
	cfg := testConfig(config.Listener{Addr: "127.0.0.1:0", Mode: config.ModeSMTP}, config.Listener{Addr: path, Mode: config.ModeLocal})
	cfg.Relay.ConnRatePerIP = optRate(t, "2/1m")
	cfg.Webservers = []config.Webserver{{Name: "web1", Addr: "127.0.0.7", Accounts: map[uint32]string{}}}
	s := testServer(t, cfg, Deps{}, nil)
	greet := func(from string) string {
		c := dialRawFrom(t, "tcp", tcpAddr(s, 0), from)
		defer c.conn.Close()
		return c.reply()
	}
	for i := range 2 {
		if got := greet("127.0.0.2"); !strings.HasPrefix(got, "220 ") {
			t.Fatalf("connection %d: %q", i+1, got)
		}
	}
	if got := greet("127.0.0.2"); got != tooManyFromAddress {
		t.Fatalf("3rd connection: %q", got)
	}
	if got := greet("127.0.0.3"); !strings.HasPrefix(got, "220 ") {
		t.Fatalf("another address: %q", got)
	}
	for i := range 5 {
		if got := greet("127.0.0.7"); !strings.HasPrefix(got, "220 ") {
			t.Fatalf("web server, connection %d: %q", i+1, got)
		}
	}
	for range 5 {
		c := dialRaw(t, "unix", path)
		if got := c.reply(); !strings.HasPrefix(got, "220 ") {
			t.Fatalf("local socket: %q", got)
		}
		c.conn.Close()
	}
	cfg2 := *cfg
	cfg2.Relay.ConnRatePerIP = optRate(t, "3/1m")
	if err := s.Reload(&cfg2); err != nil {
		t.Fatal(err)
	}
	if got := greet("127.0.0.2"); !strings.HasPrefix(got, "220 ") {
		t.Fatalf("after a reload with a new rate: %q", got)
	}
	if err := s.Reload(&cfg2); err != nil {
		t.Fatal(err)
	}
	greet("127.0.0.2")
	greet("127.0.0.2")
	if got := greet("127.0.0.2"); got != tooManyFromAddress {
		t.Fatalf("a reload with the same rate started afresh: %q", got)
	}
}

// BenchmarkLimiterTableMemory: the heap 100,000 client addresses take in
// the conn_rate_per_ip table and both fail_limit tables (address, login),
// each with a bucket taken; reported as MB/100k (it must stay under 50).
func BenchmarkLimiterTableMemory(b *testing.B) {
	const clients = 100_000
	for range b.N {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		conns := newLimiterTable[netip.Prefix](optRate(b, "60/1m"), 2*clients)
		fails := newLimiterTable[netip.Prefix](optRate(b, "10/10m"), 2*clients)
		logins := newLimiterTable[string](optRate(b, "10/10m"), 2*clients)
		now := time.Now()
		for i := range clients {
			conns.allow(addr4(i), now)
			fails.take(addr4(i), now)
			logins.take(fmt.Sprintf("user%06d@example.com", i), now)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), "MB/100k")
		runtime.KeepAlive(conns)
		runtime.KeepAlive(fails)
		runtime.KeepAlive(logins)
	}
}

// BenchmarkConnLimiterAllow: one conn_rate_per_ip check, 20 goroutines at
// once over 20 addresses (as 20 connections would).
func BenchmarkConnLimiterAllow(b *testing.B) {
	tbl := newLimiterTable[netip.Prefix](optRate(b, "1000000/1s"), maxLimiterKeys)
	var n sync.Mutex
	next := 0
	b.SetParallelism(20)
	b.RunParallel(func(pb *testing.PB) {
		n.Lock()
		key := addr4(next)
		next++
		n.Unlock()
		for pb.Next() {
			tbl.allow(key, time.Now())
		}
	})
}

// BenchmarkConnections20: connections opened by 20 clients at once, each
// reading the greeting, sending QUIT and closing, against a server with
// conn_rate_per_ip and fail_limit off and on (a rate never reached); the
// difference is what the x/time/rate check costs a connection.
func BenchmarkConnections20(b *testing.B) {
	for _, on := range []bool{false, true} {
		name := "off"
		cfg := testConfig()
		if on {
			name = "on"
			cfg.Relay.ConnRatePerIP = optRate(b, "1000000/1s")
			cfg.Auth.FailLimit = optRate(b, "10/10m")
		}
		b.Run(name, func(b *testing.B) {
			st, err := newSettings(cfg, slog.New(slog.DiscardHandler))
			if err != nil {
				b.Fatal(err)
			}
			s, err := newServer(st, Deps{Handoff: &fakeHandoff{}})
			if err != nil {
				b.Fatal(err)
			}
			if err := s.Start(); err != nil {
				b.Fatal(err)
			}
			defer s.Shutdown(context.Background())
			addr := tcpAddr(s, 0)
			b.SetParallelism(10) // 20 on this machine's 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, 256)
				for pb.Next() {
					c, err := net.Dial("tcp", addr)
					if err != nil {
						b.Error(err)
						return
					}
					if _, err := c.Read(buf); err != nil || buf[0] != '2' {
						b.Errorf("greeting %q %v", buf, err)
					}
					io.WriteString(c, "QUIT\r\n")
					c.Read(buf)
					c.Close()
				}
			})
		})
	}
}
