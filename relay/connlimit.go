package relay

import (
	"cmp"
	"hash/maphash"
	"math"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"relay/config"
)

// Connection-level limits: [relay] conn_rate_per_ip (new connections per
// client address) and [auth] fail_limit (failed logins per client address
// and per login). Each is a token bucket of golang.org/x/time/rate per
// key, N per W with bursts of N, kept in memory only.

// limiterTable keeps one token bucket per key with bounded memory. A bucket
// that has refilled to its burst says nothing a new one would not, so it
// is dropped: each shard is swept of full buckets once a window, and when
// a shard reaches its share of maxKeys it is swept at once and, if still
// full, loses the eighth of its keys with the most tokens left, those
// nearest to full (they start again with a full bucket: the table errs
// towards letting them in rather than growing without bound, and those
// most over their limit are kept longest).
type limiterTable[K comparable] struct {
	limit    rate.Limit
	burst    int
	window   time.Duration
	perShard int
	seed     maphash.Seed
	shards   [limiterShards]limiterShard[K]
}

type limiterShard[K comparable] struct {
	mu        sync.Mutex
	m         map[K]*rate.Limiter
	lastSweep time.Time
}

const (
	limiterShards = 16
	// maxLimiterKeys bounds each table: about 13 MB of buckets and map
	// (BenchmarkLimiterTableMemory).
	maxLimiterKeys = 100_000
)

// newLimiterTable makes a table for the rate r (N per W, bursts of N)
// holding at most maxKeys keys; nil when r is off.
func newLimiterTable[K comparable](r config.OptRate, maxKeys int) *limiterTable[K] {
	if !r.On() {
		return nil
	}
	t := &limiterTable[K]{
		limit:    rate.Limit(float64(r.N) / r.Window.Seconds()),
		burst:    int(min(r.N, math.MaxInt32)),
		window:   r.Window,
		perShard: max(maxKeys/limiterShards, 1),
		seed:     maphash.MakeSeed(),
	}
	for i := range t.shards {
		t.shards[i].m = make(map[K]*rate.Limiter)
	}
	return t
}

// get returns key's bucket with its shard locked (the caller unlocks),
// making a full one when it has none.
func (t *limiterTable[K]) get(key K, now time.Time) (*rate.Limiter, *limiterShard[K]) {
	sh := &t.shards[maphash.Comparable(t.seed, key)%limiterShards]
	sh.mu.Lock()
	lim := sh.m[key]
	if lim == nil {
		if now.Sub(sh.lastSweep) >= t.window || len(sh.m) >= t.perShard {
			sh.sweep(now, t.burst, t.perShard)
		}
		lim = rate.NewLimiter(t.limit, t.burst)
		sh.m[key] = lim
	}
	return lim, sh
}

// sweep drops full buckets and, above perShard keys, an eighth of the
// rest. The shard is locked.
func (sh *limiterShard[K]) sweep(now time.Time, burst, perShard int) {
	sh.lastSweep = now
	for k, lim := range sh.m {
		if lim.TokensAt(now) >= float64(burst) {
			delete(sh.m, k)
		}
	}
	if len(sh.m) < perShard {
		return
	}
	type entry struct {
		key    K
		tokens float64
	}
	all := make([]entry, 0, len(sh.m))
	for k, lim := range sh.m {
		all = append(all, entry{k, lim.TokensAt(now)})
	}
	slices.SortFunc(all, func(a, b entry) int { return cmp.Compare(b.tokens, a.tokens) })
	for _, e := range all[:max(len(all)/8, 1)] {
		delete(sh.m, e.key)
	}
}

// allow takes a token for key if one is there now.
func (t *limiterTable[K]) allow(key K, now time.Time) bool {
	lim, sh := t.get(key, now)
	ok := lim.AllowN(now, 1)
	sh.mu.Unlock()
	return ok
}

// exhausted reports whether key has no whole token now, without taking one.
func (t *limiterTable[K]) exhausted(key K, now time.Time) bool {
	sh := &t.shards[maphash.Comparable(t.seed, key)%limiterShards]
	sh.mu.Lock()
	lim := sh.m[key]
	empty := lim != nil && lim.TokensAt(now) < 1
	sh.mu.Unlock()
	return empty
}

// take takes a token for key even when none is left (the bucket then
// owes it: strict counting of failures), and returns how many tokens the
// bucket lacks now: the events it holds against key.
func (t *limiterTable[K]) take(key K, now time.Time) int {
	lim, sh := t.get(key, now)
	lim.ReserveN(now, 1)
	short := float64(t.burst) - lim.TokensAt(now)
	sh.mu.Unlock()
	return int(math.Ceil(short - 1e-9))
}

// size is how many keys the table holds.
func (t *limiterTable[K]) size() int {
	n := 0
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		n += len(sh.m)
		sh.mu.Unlock()
	}
	return n
}

// connRate is [relay] conn_rate_per_ip of the running configuration
// with its buckets (table nil: off). Server.connRate holds the current
// one; a reload that changes the rate starts new buckets.
type connRate struct {
	rate  config.OptRate
	table *limiterTable[netip.Prefix]
}

// setConnRate makes r the rate of new connections, keeping the buckets
// when it did not change.
func (s *Server) setConnRate(r config.OptRate) {
	if cur := s.connRate.Load(); cur != nil && cur.rate == r {
		return
	}
	s.connRate.Store(&connRate{rate: r, table: newLimiterTable[netip.Prefix](r, maxLimiterKeys)})
}

// connAllowed takes a new connection's token for the client at a (IPv6
// by /64); true when conn_rate_per_ip is off.
func (s *Server) connAllowed(a netip.Addr) bool {
	c := s.connRate.Load()
	return c == nil || c.table == nil || c.table.allow(ipKey(a), s.now())
}

// tooManyFromAddress is written by the gate instead of the greeting to a
// client over conn_rate_per_ip.
const tooManyFromAddress = "421 4.7.0 too many connections from your address, try again later\r\n"
