package policy

import (
	"fmt"
	"strings"
	"time"

	"relay/config"
)

// limitSet is the caps that apply to one identity: its kind's defaults or
// the first [[policy.allow]] rule that matches it.
type limitSet struct {
	rule     string // "default user", "allow sender:*@lists.example.com", "none"
	maxRcpts int64  // 0: no per-message cap
	rcpts    []config.Rate
	msgs     []config.Rate
	pace     config.OptRate // token bucket of messages; off when !pace.On()
	action   Action         // over these caps: Defer, Reject, Hold or Queue
}

// noLimits applies to identities of a kind without [policy.limits.<kind>].
var noLimits = &limitSet{rule: "none"}

func (ls *limitSet) rates(metric uint8) []config.Rate {
	if metric == metricMsgs {
		return ls.msgs
	}
	return ls.rcpts
}

// allowRule is one precompiled [[policy.allow]] entry.
type allowRule struct {
	kind   string
	match  glob
	limits *limitSet
}

// policyConf is the part of the config policy decides with, compiled once
// per New/Reload and swapped atomically.
type policyConf struct {
	observe      bool
	overAction   Action
	fullAction   Action // over a full release queue: overAction, Defer for Queue
	queueMax     int64  // messages waiting per identity in the release queue
	suspendAfter int
	suspendable  [numKinds]bool // by rank: kinds in suspend_kinds
	// reserveTimeout is how long a transaction holds its reservations
	// before they lapse (reserve_timeout); 0: they never do.
	reserveTimeout time.Duration
	defaults       [numKinds]*limitSet
	rules          []allowRule
	hostname       string
	notifyEmail    string
	webhook        string
}

func compileConf(cfg *config.Config) (*policyConf, error) {
	p := cfg.Policy
	c := &policyConf{
		suspendAfter:   p.SuspendAfter,
		reserveTimeout: p.ReserveTimeout.Duration,
		hostname:       cfg.Hostname,
		notifyEmail:    cfg.Notify.Email,
		webhook:        cfg.Notify.Webhook,
	}
	switch p.Mode {
	case "", config.PolicyEnforce:
	case config.PolicyObserve:
		c.observe = true
	default:
		return nil, fmt.Errorf("policy.mode %q: want enforce or observe", p.Mode)
	}
	switch p.OverLimit {
	case "", config.OverLimitDefer:
		c.overAction = Defer
	case config.OverLimitReject:
		c.overAction = Reject
	case config.OverLimitHold:
		c.overAction = Hold
	case config.OverLimitQueue:
		c.overAction = Queue
	default:
		return nil, fmt.Errorf("policy.over_limit %q: want defer, reject, hold or queue", p.OverLimit)
	}
	c.fullAction = c.overAction
	if c.fullAction == Queue {
		c.fullAction = Defer
	}
	c.queueMax = int64(p.QueueMax)
	if c.queueMax <= 0 {
		c.queueMax = defaultQueueMax
	}
	if p.SuspendAfter < 0 {
		return nil, fmt.Errorf("policy.suspend_after %d: must not be negative", p.SuspendAfter)
	}
	for _, kind := range p.SuspendKinds {
		rank := kindRank(kind)
		if rank == numKinds {
			return nil, fmt.Errorf("policy.suspend_kinds: %q is not an identity kind", kind)
		}
		c.suspendable[rank] = true
	}
	for rank, kind := range config.IdentityKinds() {
		l := p.Limits.ForKind(kind)
		if l == nil {
			c.defaults[rank] = noLimits
			continue
		}
		ls, err := newLimitSet("default "+kind, l.MaxRcptsPerMsg, l.Rcpts, l.Msgs)
		if err != nil {
			return nil, fmt.Errorf("policy.limits.%s: %v", kind, err)
		}
		ls.pace, ls.action = l.Pace, c.overAction
		c.defaults[rank] = ls
	}
	for i, r := range p.Allow {
		kind := KindOf(r.Match)
		if kind == "" {
			return nil, fmt.Errorf("policy.allow[%d].match %q: want <kind>:<address> with kind %s", i, r.Match, strings.Join(config.IdentityKinds(), ", "))
		}
		pattern := r.Match
		if kind == config.KindSender || kind == config.KindDomain {
			pattern = strings.ToLower(pattern) // those ids are lowercased
		}
		ls := &limitSet{rule: "allow " + r.Match}
		if !r.Unlimited {
			var err error
			ls, err = newLimitSet("allow "+r.Match, r.MaxRcptsPerMsg, r.Rcpts, r.Msgs)
			if err != nil {
				return nil, fmt.Errorf("policy.allow[%d]: %v", i, err)
			}
		}
		ls.pace, ls.action = r.Pace, c.overAction
		if r.Action != "" {
			a, err := parseOverLimit(r.Action)
			if err != nil {
				return nil, fmt.Errorf("policy.allow[%d].action: %v", i, err)
			}
			ls.action = a
		}
		c.rules = append(c.rules, allowRule{kind: kind, match: compileGlob(pattern), limits: ls})
	}
	return c, nil
}

// defaultQueueMax is [policy] queue_max when a config leaves it 0.
const defaultQueueMax = 10000

// parseOverLimit reads an over_limit or allow action word.
func parseOverLimit(s string) (Action, error) {
	switch s {
	case config.OverLimitDefer:
		return Defer, nil
	case config.OverLimitReject:
		return Reject, nil
	case config.OverLimitHold:
		return Hold, nil
	case config.OverLimitQueue:
		return Queue, nil
	}
	return 0, fmt.Errorf("%q: want defer, reject, hold or queue", s)
}

func newLimitSet(rule string, maxRcpts int, rcpts, msgs []config.Rate) (*limitSet, error) {
	if maxRcpts < 0 {
		return nil, fmt.Errorf("max_rcpts_per_msg %d: must not be negative", maxRcpts)
	}
	for _, r := range append(append([]config.Rate(nil), rcpts...), msgs...) {
		if r.N <= 0 || r.Window <= 0 {
			return nil, fmt.Errorf("limit %q: N and W must be positive", r.String())
		}
	}
	return &limitSet{rule: rule, maxRcpts: int64(maxRcpts), rcpts: rcpts, msgs: msgs}, nil
}

// limitsFor returns the caps of one identity: the first allow rule that
// matches it, else its kind's defaults.
func (c *policyConf) limitsFor(id, kind string) *limitSet {
	for i := range c.rules {
		r := &c.rules[i]
		if r.kind == kind && r.match.matches(id) {
			return r.limits
		}
	}
	if id == nullSender {
		// Every bounce and autoreply shares the null sender: capping it as
		// one sender would defer them all at once. It still counts against
		// the login, uid and IP it comes from, and an allow rule may cap it.
		return noLimits
	}
	if rank := kindRank(kind); rank < numKinds {
		return c.defaults[rank]
	}
	return noLimits
}

// nullSender is the identity of MAIL FROM:<>.
const nullSender = "sender:<>"

// glob is a compiled pattern where '*' matches any run of characters.
type glob struct {
	parts []string // the literal text between the stars
}

func compileGlob(pattern string) glob { return glob{parts: strings.Split(pattern, "*")} }

func (g glob) matches(s string) bool {
	if len(g.parts) == 1 {
		return s == g.parts[0]
	}
	first, last := g.parts[0], g.parts[len(g.parts)-1]
	if len(s) < len(first)+len(last) || !strings.HasPrefix(s, first) || !strings.HasSuffix(s, last) {
		return false
	}
	s = s[len(first) : len(s)-len(last)]
	for _, p := range g.parts[1 : len(g.parts)-1] {
		i := strings.Index(s, p)
		if i < 0 {
			return false
		}
		s = s[i+len(p):]
	}
	return true
}
