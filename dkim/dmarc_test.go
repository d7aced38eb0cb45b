package dkim

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"relay/config"
	"relay/internal/dnstest"
)

// logBuffer collects log lines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newTestDMARC(dns *dnstest.Server, log *logBuffer, now func() time.Time) *DMARC {
	return NewDMARC(DMARCOptions{Server: dns.Addr, Timeout: 300 * time.Millisecond, CacheSize: 4,
		Logger: slog.New(slog.NewTextHandler(log, nil)), Now: now})
}

func TestDMARCPolicies(t *testing.T) {
	dns := dnstest.New(t)
	dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=reject; rua=mailto:d@bank.example")
	dns.SetTXT("_dmarc.news.example", "v=DMARC1;p=quarantine;pct=100")
	dns.SetTXT("_dmarc.blog.example", "v=DMARC1; p=none")
	dns.SetTXT("_dmarc.spf.example", "v=spf1 -all", "v=DMARC1; p=reject") // other TXT records are skipped
	dns.SetTXT("_dmarc.two.example", "v=DMARC1; p=reject", "v=DMARC1; p=none")
	dns.SetTXT("_dmarc.bad.example", "v=DMARC1; p=bogus")
	dns.SetTXT("_dmarc.long.example", "v=DMARC1; p=reject; rua=mailto:"+strings.Repeat("x", 300)+"@long.example")
	var log logBuffer
	d := newTestDMARC(dns, &log, nil)
	for domain, want := range map[string]string{
		"bank.example": "reject", "news.example": "quarantine", "blog.example": "none",
		"spf.example": "reject", "two.example": "", "bad.example": "", "none.example": "",
		"long.example": "reject", // two character-strings, one record
	} {
		if got := d.Policy(context.Background(), domain); got != want {
			t.Errorf("%s: %q, want %q", domain, got, want)
		}
	}
	if strings.Contains(log.String(), "lookup failed") {
		t.Errorf("answers logged as failures:\n%s", log.String())
	}
}

func TestDMARCOverTCP(t *testing.T) {
	dns := dnstest.New(t)
	dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=reject")
	dns.TruncateUDP(true)
	d := newTestDMARC(dns, &logBuffer{}, nil)
	if got := d.Policy(context.Background(), "bank.example"); got != "reject" {
		t.Fatalf("got %q", got)
	}
	if dns.Queries("tcp", "_dmarc.bank.example") == 0 {
		t.Fatal("no TCP query after a truncated UDP answer")
	}
}

func TestDMARCCache(t *testing.T) {
	dns := dnstest.New(t)
	dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=reject")
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	d := newTestDMARC(dns, &logBuffer{}, clock)

	// Concurrent first lookups share one query.
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() { d.Policy(context.Background(), "bank.example") })
	}
	wg.Wait()
	d.Policy(context.Background(), "nothing.example")
	d.Policy(context.Background(), "nothing.example")
	if n := dns.Queries("", "_dmarc.bank.example"); n != 1 {
		t.Errorf("%d queries for one domain, want 1 (cached, in flight once)", n)
	}
	if n := dns.Queries("", "_dmarc.nothing.example"); n != 1 {
		t.Errorf("no record: %d queries, want 1 (cached too)", n)
	}
	dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=none")
	advance(dmarcTTL - time.Second)
	if got := d.Policy(context.Background(), "bank.example"); got != "reject" {
		t.Errorf("within the TTL: %q", got)
	}
	advance(2 * time.Second)
	if got := d.Policy(context.Background(), "bank.example"); got != "none" {
		t.Errorf("after the TTL: %q", got)
	}
	// Bounded: a flood of domains never grows it past its size.
	for _, dom := range []string{"a.example", "b.example", "c.example", "d.example", "e.example", "f.example"} {
		d.Policy(context.Background(), dom)
		if n := d.Cached(); n > 4 {
			t.Fatalf("cache holds %d, its size is 4", n)
		}
	}
	// A new server empties it.
	d.SetServer("127.0.0.1:9")
	if d.Cached() != 0 {
		t.Error("cache kept across a server change")
	}
}

// TestDMARCFailsOpen: SERVFAIL, silence and a dead server all give "" (the
// mail goes on) with a log line, within the timeout; the failure is kept
// a minute so a dead resolver is not asked per message.
func TestDMARCFailsOpen(t *testing.T) {
	dns := dnstest.New(t)
	dns.SetMode("_dmarc.fail.example", dnstest.ServFail)
	dns.SetMode("_dmarc.silent.example", dnstest.Drop)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var log logBuffer
	d := newTestDMARC(dns, &log, func() time.Time { return now })
	for _, domain := range []string{"fail.example", "silent.example"} {
		start := time.Now()
		if got := d.Policy(context.Background(), domain); got != "" {
			t.Errorf("%s: %q", domain, got)
		}
		if el := time.Since(start); el > 10*time.Second {
			t.Errorf("%s took %v", domain, el)
		}
		if !strings.Contains(log.String(), "DMARC lookup failed; accepting") || !strings.Contains(log.String(), domain) {
			t.Errorf("no log line for %s:\n%s", domain, log.String())
		}
	}
	before := dns.Queries("", "_dmarc.silent.example")
	d.Policy(context.Background(), "silent.example")
	if dns.Queries("", "_dmarc.silent.example") != before {
		t.Error("a failed lookup was tried again at once")
	}
	dead := NewDMARC(DMARCOptions{Server: "127.0.0.1:1", Timeout: 300 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(&log, nil))})
	if got := dead.Policy(context.Background(), "bank.example"); got != "" {
		t.Errorf("dead server: %q", got)
	}
	// A lookup cut short by the session's end is not remembered.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	d.Policy(ctx, "later.example")
	if _, ok := d.cache["later.example"]; ok {
		t.Error("a cancelled lookup was cached")
	}
}

func TestCheckDNS(t *testing.T) {
	dns := dnstest.New(t)
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"rsa1@example.com": rsaKey(), "ed1@example.com": ed25519Key()})
	_, fresh, _ := ed25519.GenerateKey(rand.Reader)
	other := testSet(t, config.DKIM{}, map[string]crypto.Signer{"x@example.org": fresh})
	r := NewResolver(dns.Addr)
	rsa1, ed1 := s.DomainKeys("example.com")[1], s.DomainKeys("example.com")[0]
	check := func(k *Key) string {
		if err := CheckDNS(context.Background(), r, k); err != nil {
			return err.Error()
		}
		return "ok"
	}
	if got := check(rsa1); !strings.Contains(got, "no TXT record at rsa1._domainkey.example.com; publish: rsa1._domainkey.example.com. 3600 IN TXT") {
		t.Errorf("missing: %s", got)
	}
	dns.SetTXT(rsa1.Name(), rsa1.Record())
	dns.SetTXT(ed1.Name(), ed1.Record())
	if got := check(rsa1); got != "ok" {
		t.Errorf("rsa: %s", got)
	}
	if got := check(ed1); got != "ok" {
		t.Errorf("ed25519: %s", got)
	}
	dns.TruncateUDP(true) // a 2048-bit key's record over TCP
	if got := check(rsa1); got != "ok" {
		t.Errorf("rsa over TCP: %s", got)
	}
	dns.TruncateUDP(false)
	for _, tc := range []struct{ rec, want string }{
		{other.Keys()[0].Record(), "p= is another key"},
		{strings.Replace(ed1.Record(), "k=ed25519", "k=rsa", 1), "k=rsa, the key is ed25519"},
		{"v=DKIM1; k=ed25519; p=", "revokes the key"},
		{"v=spf1 -all", "no DKIM record"},
		{"v=DKIM2; k=ed25519; " + strings.SplitAfter(ed1.Record(), "; k=ed25519; ")[1], "v=DKIM2"},
		{ed1.Record() + "; h=sha1", "does not verify"},
	} {
		dns.SetTXT(ed1.Name(), tc.rec)
		if got := check(ed1); !strings.Contains(got, tc.want) {
			t.Errorf("record %q: %s, want %q", tc.rec, got, tc.want)
		}
	}
	dns.SetTXT(ed1.Name(), ed1.Record(), ed1.Record())
	if got := check(ed1); !strings.Contains(got, "2 DKIM records") {
		t.Errorf("two records: %s", got)
	}
	dns.SetMode(ed1.Name(), dnstest.ServFail)
	if got := check(ed1); !strings.Contains(got, "looking up") {
		t.Errorf("servfail: %s", got)
	}
}
