package dkim

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-msgauth/dmarc"
)

// Defaults of DMARC lookups: quick to give up (the client waits at the end
// of DATA), cached for a while, bounded.
const (
	DefaultDMARCTimeout = 2 * time.Second
	// dmarcTTL keeps an answer (a record, or none); Go's resolver does not
	// tell a record's own TTL.
	dmarcTTL = time.Hour
	// dmarcFailTTL keeps a failed lookup (timeout, SERVFAIL), so that a
	// dead resolver costs one timeout a minute per domain, not one per
	// message.
	dmarcFailTTL = time.Minute
	// DefaultDMARCCacheSize bounds the cache: one entry is a domain and a
	// policy word.
	DefaultDMARCCacheSize = 10000
)

// NewResolver returns a resolver that asks the DNS server at addr
// ("ip:port", over UDP and over TCP for long answers) instead of the
// system's; addr "" is the system's resolver.
func NewResolver(addr string) *net.Resolver {
	if addr == "" {
		return net.DefaultResolver
	}
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
}

// DMARCOptions configures a DMARC.
type DMARCOptions struct {
	Server    string        // "ip:port"; "" the system's resolver
	Timeout   time.Duration // per lookup; 0: DefaultDMARCTimeout
	CacheSize int           // 0: DefaultDMARCCacheSize
	Logger    *slog.Logger  // failed lookups are logged here; nil: discard
	Now       func() time.Time
}

// DMARC looks up domains' DMARC policies (RFC 7489 §6.6.3, without a
// public-suffix list: a domain's organisational domain is the domain
// itself) through a bounded cache. It lives as long as the daemon; reloads
// change its server with SetServer.
type DMARC struct {
	timeout time.Duration
	size    int
	log     *slog.Logger
	now     func() time.Time

	mu       sync.Mutex
	server   string
	resolver *net.Resolver
	cache    map[string]dmarcEntry
	inflight map[string]*dmarcCall
}

type dmarcEntry struct {
	policy  string
	expires time.Time
}

// dmarcCall is one lookup in flight; others wanting the same domain wait
// for it.
type dmarcCall struct {
	done   chan struct{}
	policy string
}

// NewDMARC makes a lookup cache.
func NewDMARC(o DMARCOptions) *DMARC {
	d := &DMARC{timeout: o.Timeout, size: o.CacheSize, log: o.Logger, now: o.Now,
		cache: map[string]dmarcEntry{}, inflight: map[string]*dmarcCall{}}
	if d.timeout <= 0 {
		d.timeout = DefaultDMARCTimeout
	}
	if d.size <= 0 {
		d.size = DefaultDMARCCacheSize
	}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	if d.now == nil {
		d.now = time.Now
	}
	d.setServer(o.Server)
	return d
}

// SetServer points lookups at another DNS server ("" the system's); the
// cache is emptied when it changes.
func (d *DMARC) SetServer(addr string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if addr != d.server {
		d.setServer(addr)
		clear(d.cache)
	}
}

func (d *DMARC) setServer(addr string) {
	d.server, d.resolver = addr, NewResolver(addr)
}

// Policy returns domain's DMARC policy: "reject", "quarantine" or "none";
// "" when it publishes none, and also when the lookup fails or times out
// (failing open: the message goes on; the failure is logged).
func (d *DMARC) Policy(ctx context.Context, domain string) string {
	d.mu.Lock()
	if e, ok := d.cache[domain]; ok && d.now().Before(e.expires) {
		d.mu.Unlock()
		return e.policy
	}
	if c, ok := d.inflight[domain]; ok {
		d.mu.Unlock()
		select {
		case <-c.done:
			return c.policy
		case <-ctx.Done():
			return ""
		}
	}
	c := &dmarcCall{done: make(chan struct{})}
	d.inflight[domain] = c
	resolver := d.resolver
	d.mu.Unlock()

	policy, ttl := d.lookup(ctx, resolver, domain)

	d.mu.Lock()
	delete(d.inflight, domain)
	if ttl > 0 {
		d.store(domain, dmarcEntry{policy: policy, expires: d.now().Add(ttl)})
	}
	d.mu.Unlock()
	c.policy = policy
	close(c.done)
	return policy
}

// store adds an entry, first making room: expired entries go, then, if
// the cache is still full, a tenth of it (map order: arbitrary ones).
func (d *DMARC) store(domain string, e dmarcEntry) {
	if len(d.cache) >= d.size {
		now := d.now()
		for k, v := range d.cache {
			if !now.Before(v.expires) {
				delete(d.cache, k)
			}
		}
		for k := range d.cache {
			if len(d.cache) < d.size-d.size/10 {
				break
			}
			delete(d.cache, k)
		}
	}
	d.cache[domain] = e
}

// Cached is the number of domains in the cache.
func (d *DMARC) Cached() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.cache)
}

// lookup asks DNS for _dmarc.<domain>. It returns the policy and how long
// to keep it (0: not at all, when ctx ended for the caller's own reasons).
func (d *DMARC) lookup(parent context.Context, r *net.Resolver, domain string) (string, time.Duration) {
	ctx, cancel := context.WithTimeout(parent, d.timeout)
	defer cancel()
	var lookupErr error
	rec, err := dmarc.LookupWithOptions(domain, &dmarc.LookupOptions{
		LookupTXT: func(name string) ([]string, error) {
			txts, err := r.LookupTXT(ctx, name+".")
			lookupErr = err
			return dmarcRecords(txts), err
		},
	})
	var dnsErr *net.DNSError
	switch {
	case err == nil:
		return string(rec.Policy), dmarcTTL
	case errors.Is(err, dmarc.ErrNoPolicy):
		return "", dmarcTTL
	case errors.As(lookupErr, &dnsErr) && dnsErr.IsNotFound:
		return "", dmarcTTL
	case lookupErr == nil:
		// A record that go-msgauth cannot read: receivers differ on what
		// they make of it; we let the mail go.
		d.log.Warn("DMARC record unreadable; accepting", "domain", domain, "err", err)
		return "", dmarcTTL
	}
	if parent.Err() != nil {
		return "", 0 // the session ended: nothing learnt about the domain
	}
	d.log.Warn("DMARC lookup failed; accepting", "domain", domain, "err", lookupErr)
	return "", dmarcFailTTL
}

// dmarcRecords keeps the TXT records that are DMARC records ("v=DMARC1"
// first); more than one is no policy at all (RFC 7489 §6.6.3).
func dmarcRecords(txts []string) []string {
	var recs []string
	for _, t := range txts {
		if v, _, _ := strings.Cut(t, ";"); strings.TrimSpace(v) == "v=DMARC1" {
			recs = append(recs, t)
		}
	}
	if len(recs) != 1 {
		return nil
	}
	return recs
}
