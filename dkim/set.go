package dkim

import (
	"context"
	"slices"
	"strings"
	"sync"

	msgdkim "github.com/emersion/go-msgauth/dkim"

	"relay/config"
)

// Set is one loaded [dkim] section: the keys, who owns which domain, the
// header fields to sign and the From: control actions. Load builds it on
// every start and reload; it never changes afterwards (but for its pool
// of message buffers).
type Set struct {
	keys    map[string][]*Key   // signing domain -> keys, by selector
	owners  map[string][]string // [[dkim.domain]] name -> owner patterns, lower case
	headers []string            // h=, From at least twice
	unowned string              // config.FromAccept | FromHold | FromReject
	foreign string

	opts map[*Key]*msgdkim.SignOptions // go-msgauth's options per key, made once
	bufs sync.Pool                     // *[]byte: Signing's message buffers
}

// Load reads the keys of c.KeysDir and prepares c for signing. Every bad
// key is reported, each naming its file.
func Load(c config.DKIM) (*Set, error) {
	keys, err := LoadKeys(c.KeysDir)
	if err != nil {
		return nil, err
	}
	s := &Set{keys: keys, owners: map[string][]string{}, unowned: orAccept(c.UnownedFrom), foreign: orAccept(c.ForeignDMARC)}
	for _, d := range c.Domains {
		name := strings.ToLower(strings.TrimSuffix(d.Name, "."))
		for _, o := range d.Owners {
			s.owners[name] = append(s.owners[name], strings.ToLower(o))
		}
	}
	s.headers = signedHeaders(c.Headers)
	s.opts = map[*Key]*msgdkim.SignOptions{}
	for _, ks := range keys {
		for _, k := range ks {
			s.opts[k] = signOptions(k, s.headers)
		}
	}
	return s, nil
}

func orAccept(action string) string {
	if action == "" {
		return config.FromAccept
	}
	return action
}

// signedHeaders is the h= list: the configured one (the defaults when
// empty) with From a second time after the first, unless it is there
// twice already, so no second From: can be added to a signed message.
func signedHeaders(list []string) []string {
	if len(list) == 0 {
		list = config.DefaultDKIMHeaders()
	}
	var out []string
	froms := 0
	for _, h := range list {
		if strings.EqualFold(h, "From") {
			froms++
		}
	}
	for _, h := range list {
		out = append(out, h)
		if strings.EqualFold(h, "From") && froms == 1 {
			out = append(out, "From")
			froms++
		}
	}
	if froms == 0 {
		out = append([]string{"From", "From"}, out...)
	}
	return out
}

// Keys returns every key, by domain, then selector.
func (s *Set) Keys() []*Key {
	var all []*Key
	for _, ks := range s.keys {
		all = append(all, ks...)
	}
	slices.SortFunc(all, func(a, b *Key) int {
		if c := strings.Compare(a.Domain, b.Domain); c != 0 {
			return c
		}
		return strings.Compare(a.Selector, b.Selector)
	})
	return all
}

// DomainKeys returns the keys of one signing domain (lower case).
func (s *Set) DomainKeys(domain string) []*Key { return s.keys[domain] }

// Headers is the h= list every signature uses.
func (s *Set) Headers() []string { return slices.Clone(s.headers) }

// signingDomain finds the keys for a From: domain: its own, or its
// nearest parent's.
func (s *Set) signingDomain(from string) (string, []*Key) {
	for d := from; d != ""; d = parent(d) {
		if ks := s.keys[d]; len(ks) > 0 {
			return d, ks
		}
	}
	return "", nil
}

// parent drops the first label ("a.example.com" -> "example.com"; "com" -> "").
func parent(d string) string {
	_, rest, _ := strings.Cut(d, ".")
	return rest
}

// ownerEntry finds the [[dkim.domain]] entry that decides for a From:
// domain signed as signDomain: the From: domain's own, or the nearest
// parent's up to signDomain.
func (s *Set) ownerEntry(from, signDomain string) ([]string, bool) {
	for d := from; d != ""; d = parent(d) {
		if o, ok := s.owners[d]; ok {
			return o, true
		}
		if d == signDomain {
			break
		}
	}
	return nil, false
}

// owns reports whether one of ids owns mail From: from, signed as
// signDomain. With a [[dkim.domain]] entry, its owners are the whole list;
// without one, the logins (user:<login>) in the From: domain or in the
// signing domain own it.
func (s *Set) owns(from, signDomain string, ids []string) bool {
	if patterns, ok := s.ownerEntry(from, signDomain); ok {
		for _, id := range ids {
			id = strings.ToLower(id)
			for _, p := range patterns {
				if matchGlob(p, id) {
					return true
				}
			}
		}
		return false
	}
	for _, id := range ids {
		login, ok := strings.CutPrefix(strings.ToLower(id), config.KindUser+":")
		if !ok {
			continue
		}
		at := strings.LastIndexByte(login, '@')
		if at < 0 {
			continue
		}
		if d := strings.TrimSuffix(login[at+1:], "."); d == from || d == signDomain {
			return true
		}
	}
	return false
}

// covers reports whether a domain (or a parent) has keys or an entry: the
// domains [dkim] makes ours.
func (s *Set) covers(domain string) bool {
	for d := domain; d != ""; d = parent(d) {
		if len(s.keys[d]) > 0 {
			return true
		}
		if _, ok := s.owners[d]; ok {
			return true
		}
	}
	return false
}

// matchGlob matches a pattern whose '*' stands for any run of characters
// (':', '@' and '/' included) against s; everything else is literal.
func matchGlob(pattern, s string) bool {
	star, starS := -1, 0 // last '*' seen in pattern, and where s was then
	p, i := 0, 0
	for i < len(s) {
		switch {
		case p < len(pattern) && pattern[p] == '*':
			star, starS = p, i
			p++
		case p < len(pattern) && pattern[p] == s[i]:
			p++
			i++
		case star >= 0:
			starS++
			p, i = star+1, starS
		default:
			return false
		}
	}
	for p < len(pattern) && pattern[p] == '*' {
		p++
	}
	return p == len(pattern)
}

// Action is what Decide says to do with a message.
type Action int

// Actions, mildest first.
const (
	Unsigned Action = iota // hand off as it is
	Sign                   // sign with Verdict.Keys, then hand off
	Hold                   // into the hold spool, unsigned
	Reject                 // 550 5.7.1 at the end of DATA
)

// Reasons, as the tally and the metrics name them.
const (
	ReasonUnownedFrom     = "unowned_from"     // From: in a domain we sign for, sender not an owner
	ReasonDMARCReject     = "dmarc_reject"     // foreign From: with p=reject
	ReasonDMARCQuarantine = "dmarc_quarantine" // foreign From: with p=quarantine
	ReasonSeveralFrom     = "several_from"     // more than one From: field or domain: not signed
	ReasonLongHeader      = "long_header"      // header past what relay reads: not signed
	ReasonBareCR          = "bare_cr"          // a CR in the message (ErrBareCR): not signed
	ReasonError           = "error"            // signing failed: handed off unsigned
)

// Verdict is Decide's answer.
type Verdict struct {
	Action Action
	// Domain is what the tally counts the message under: the signing
	// domain, or the foreign From: domain that decided; "" when there is
	// nothing to count (no From:, or a domain that is ours without keys).
	Domain string
	Keys   []*Key // Sign: every key of the signing domain
	Reason string // Unsigned (when Domain is set), Hold, Reject: why
	Text   string // Hold, Reject: why, for the reply and the hold spool
}

// Message is what Decide needs to know about one message from a trusted
// origin.
type Message struct {
	From           []string // the From: field values, unfolded, in order
	HeaderComplete bool     // false: the header goes on past what relay read
	IDs            []string // the sender's identity ids (docs/design.md §3)
	// Ours reports the server's own domains beyond [dkim]'s (local_domains
	// and rcpthosts); nil: none.
	Ours func(domain string) bool
}

// PolicyLookup returns a domain's DMARC policy: "reject", "quarantine",
// "none", or "" when there is none or it could not be found (*DMARC.Policy).
type PolicyLookup func(ctx context.Context, domain string) string

// Decide says whether a message from a trusted origin is signed, handed
// off unsigned, held or refused (docs/design.md §11). Every From: domain is
// checked: one we have keys for must be owned by the sender (else
// unowned_from); a foreign one that publishes DMARC p=reject or
// p=quarantine follows foreign_dmarc; our own domains without keys pass.
// The strictest outcome wins. A message is signed only when it has one
// From: field with one domain, that domain has keys and the sender owns it.
func (s *Set) Decide(ctx context.Context, m Message, lookup PolicyLookup) Verdict {
	domains := FromDomains(m.From)
	var worst *Verdict // the strictest refusal (or accept-anyway) found
	consider := func(v Verdict) {
		if worst == nil || v.Action > worst.Action {
			worst = &v
		}
	}
	var sign *Verdict
	for _, d := range domains {
		if sd, keys := s.signingDomain(d); keys != nil {
			if s.owns(d, sd, m.IDs) {
				sign = &Verdict{Action: Sign, Domain: sd, Keys: keys}
				continue
			}
			consider(Verdict{Action: actionOf(s.unowned), Domain: sd, Reason: ReasonUnownedFrom,
				Text: "not allowed to send From: " + d + " here"})
			continue
		}
		if s.foreign == config.FromAccept || s.covers(d) || (m.Ours != nil && m.Ours(d)) || lookup == nil {
			continue
		}
		switch p := lookup(ctx, d); p {
		case "reject", "quarantine":
			consider(Verdict{Action: actionOf(s.foreign), Domain: d, Reason: "dmarc_" + p,
				Text: "From: " + d + " has DMARC p=" + p + "; send its mail through its own servers"})
		}
	}
	switch {
	case worst != nil && worst.Action != Unsigned:
		return *worst
	case sign != nil && (len(m.From) != 1 || len(domains) != 1):
		return Verdict{Action: Unsigned, Domain: sign.Domain, Reason: ReasonSeveralFrom}
	case worst != nil:
		return *worst
	case sign != nil && !m.HeaderComplete:
		return Verdict{Action: Unsigned, Domain: sign.Domain, Reason: ReasonLongHeader}
	case sign != nil:
		return *sign
	}
	return Verdict{Action: Unsigned}
}

func actionOf(setting string) Action {
	switch setting {
	case config.FromHold:
		return Hold
	case config.FromReject:
		return Reject
	}
	return Unsigned
}
