package config

import (
	"net/netip"
	"time"
)

// Control is what relay takes from qmail's control directory (or, when
// relay.qmail_control_dir is empty, from relay.toml itself).
type Control struct {
	Me           string        // control/me, else hostname
	Greeting     string        // control/smtpgreeting first line, else Me
	Databytes    int64         // control/databytes, else relay.max_message_bytes; 0 = unlimited
	TimeoutSMTPD time.Duration // control/timeoutsmtpd, else relay.timeout
	rcptHosts    map[string]bool
	badMailFrom  map[string]bool
}

// RcptHostAllowed reports whether mail to domain is accepted from anyone
// (qmail rcpthosts semantics: whole domain, or a suffix written with a
// leading dot). local_domains and rcpthosts/morercpthosts are merged.
func (c *Control) RcptHostAllowed(domain string) bool { panic("TODO") }

// BadMailFrom reports whether the envelope sender is in badmailfrom
// (exact address, or an "@domain" line).
func (c *Control) BadMailFrom(sender string) bool { panic("TODO") }

// TCPRules is a parsed tcprules text file (tcp.smtp).
type TCPRules struct {
	rules []tcpRule
}

type tcpRule struct{}

// TCPRule is what a matched tcprules line says.
type TCPRule struct {
	Allow bool
	Env   map[string]string // e.g. RELAYCLIENT: "" ; DATABYTES: "0"
}

// Match returns the most specific rule for ip; ok is false when no rule
// matches (which tcpserver treats as allow).
func (t *TCPRules) Match(ip netip.Addr) (rule TCPRule, ok bool) { panic("TODO") }
