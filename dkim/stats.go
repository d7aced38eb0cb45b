package dkim

import (
	"cmp"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Outcomes the tally counts.
const (
	OutcomeSigned   = "signed"
	OutcomeUnsigned = "unsigned"
	OutcomeHeld     = "held"
	OutcomeRefused  = "refused"
)

// maxTallyDomains bounds the tally: signing domains always have their row;
// foreign From: domains (DMARC refusals) get one while there is room, then
// count under OtherDomains.
const maxTallyDomains = 1000

// OtherDomains is the row that counts foreign domains past maxTallyDomains.
const OtherDomains = "(other domains)"

// DomainStats is what happened to mail From: one domain since relay
// started.
type DomainStats struct {
	Domain   string           `json:"domain"`
	Signed   int64            `json:"signed"`
	Unsigned map[string]int64 `json:"unsigned"` // reason -> messages
	Held     map[string]int64 `json:"held"`
	Refused  map[string]int64 `json:"refused"`
	Last     time.Time        `json:"last"`
}

// KeyInfo describes one loaded key.
type KeyInfo struct {
	Domain   string `json:"domain"`
	Selector string `json:"selector"`
	Algo     string `json:"algo"`
	Bits     int    `json:"bits"`
	Path     string `json:"path"`
}

// Report is what the admin page, GET /api/dkim and `relay ctl dkim` show.
type Report struct {
	Since        time.Time     `json:"since"` // counting since (the daemon's start)
	UnownedFrom  string        `json:"unowned_from"`
	ForeignDMARC string        `json:"foreign_dmarc"`
	Keys         []KeyInfo     `json:"keys"`
	Domains      []DomainStats `json:"domains"` // signing domains first, then by domain
	DMARCCached  int           `json:"dmarc_cached"`
}

// Stats counts outcomes per domain in memory (they start again at zero
// with the daemon) and in Prometheus: relay_dkim_signed_total{domain},
// relay_dkim_refused_total{reason}, relay_dkim_held_total{reason},
// relay_dkim_unsigned_total{reason}.
type Stats struct {
	since    time.Time
	now      func() time.Time
	signed   *prometheus.CounterVec
	refused  *prometheus.CounterVec
	held     *prometheus.CounterVec
	unsigned *prometheus.CounterVec

	mu      sync.Mutex
	domains map[string]*DomainStats
}

// NewStats makes the tally and registers its metrics with reg (nil: kept,
// not registered).
func NewStats(reg prometheus.Registerer, now func() time.Time) (*Stats, error) {
	if now == nil {
		now = time.Now
	}
	s := &Stats{
		since: now(),
		now:   now,
		signed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_dkim_signed_total", Help: "Messages signed, by signing domain.",
		}, []string{"domain"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_dkim_refused_total", Help: "Messages refused (550) for their From: header, by reason.",
		}, []string{"reason"}),
		held: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_dkim_held_total", Help: "Messages held for their From: header, by reason.",
		}, []string{"reason"}),
		unsigned: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_dkim_unsigned_total", Help: "Messages in a domain with keys (or failing a foreign DMARC policy) handed off unsigned, by reason.",
		}, []string{"reason"}),
		domains: map[string]*DomainStats{},
	}
	for _, r := range []string{ReasonUnownedFrom, ReasonDMARCReject, ReasonDMARCQuarantine} {
		s.refused.WithLabelValues(r)
		s.held.WithLabelValues(r)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{s.signed, s.refused, s.held, s.unsigned} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return s, nil
}

// Record counts one message under domain (Verdict.Domain; "" counts
// nothing). A signing domain always gets its row; foreign ones (the DMARC
// reasons) while there is room.
func (s *Stats) Record(domain, outcome, reason string) {
	if domain == "" {
		return
	}
	switch outcome {
	case OutcomeSigned:
		s.signed.WithLabelValues(domain).Inc()
	case OutcomeRefused:
		s.refused.WithLabelValues(reason).Inc()
	case OutcomeHeld:
		s.held.WithLabelValues(reason).Inc()
	case OutcomeUnsigned:
		s.unsigned.WithLabelValues(reason).Inc()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.domains[domain]
	if d == nil {
		foreign := reason == ReasonDMARCReject || reason == ReasonDMARCQuarantine
		if foreign && len(s.domains) >= maxTallyDomains {
			domain = OtherDomains
			d = s.domains[domain]
		}
		if d == nil {
			d = &DomainStats{Domain: domain, Unsigned: map[string]int64{}, Held: map[string]int64{}, Refused: map[string]int64{}}
			s.domains[domain] = d
		}
	}
	d.Last = s.now()
	switch outcome {
	case OutcomeSigned:
		d.Signed++
	case OutcomeUnsigned:
		d.Unsigned[reason]++
	case OutcomeHeld:
		d.Held[reason]++
	case OutcomeRefused:
		d.Refused[reason]++
	}
}

// Report is the tally with the keys of set (nil: none) and the DMARC
// cache's size (nil: 0). Every domain with keys has a row, counted or not.
func (s *Stats) Report(set *Set, dmarc *DMARC) Report {
	r := Report{Since: s.since, Keys: []KeyInfo{}, Domains: []DomainStats{}}
	ours := map[string]bool{}
	if set != nil {
		r.UnownedFrom, r.ForeignDMARC = set.unowned, set.foreign
		for _, k := range set.Keys() {
			r.Keys = append(r.Keys, KeyInfo{Domain: k.Domain, Selector: k.Selector, Algo: k.Algo, Bits: k.Bits, Path: k.Path})
			ours[k.Domain] = true
		}
	}
	if dmarc != nil {
		r.DMARCCached = dmarc.Cached()
	}
	counted := map[string]bool{}
	s.mu.Lock()
	for _, d := range s.domains {
		c := *d
		c.Unsigned, c.Held, c.Refused = maps.Clone(d.Unsigned), maps.Clone(d.Held), maps.Clone(d.Refused)
		r.Domains = append(r.Domains, c)
		counted[d.Domain] = true
	}
	s.mu.Unlock()
	for d := range ours {
		if !counted[d] {
			r.Domains = append(r.Domains, DomainStats{Domain: d, Unsigned: map[string]int64{}, Held: map[string]int64{}, Refused: map[string]int64{}})
		}
	}
	slices.SortFunc(r.Domains, func(a, b DomainStats) int {
		if ours[a.Domain] != ours[b.Domain] {
			if ours[a.Domain] {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.Domain, b.Domain)
	})
	return r
}
