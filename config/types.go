// Package config owns relay's configuration: the TOML schema and its
// defaults, validation that reports every problem as file:line:col, and the
// qmail inputs relay reads beside it (control files and tcprules text).
package config

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Config is the whole relay.toml. Names follow docs/design.md §4; they are a
// contract that outside tests rely on.
type Config struct {
	Hostname   string      `toml:"hostname"`
	DataDir    string      `toml:"data_dir"`
	Listen     []Listener  `toml:"listen"`
	TLS        TLS         `toml:"tls"`
	Relay      Relay       `toml:"relay"`
	Auth       Auth        `toml:"auth"`
	Delivery   Delivery    `toml:"delivery"`
	Local      Local       `toml:"local"`
	Admin      Admin       `toml:"admin"`
	Policy     Policy      `toml:"policy"`
	Webservers []Webserver `toml:"webserver"`
	Notify     Notify      `toml:"notify"`
	DKIM       DKIM        `toml:"dkim"`

	// Filled by Load, not by TOML.

	// Path is the file the config was read from ("" for Default()).
	Path string `toml:"-"`
	// Control holds what was read from qmail's control directory, or the
	// values derived from this file when relay.qmail_control_dir is empty.
	Control *Control `toml:"-"`
	// TCPRules is the parsed relay.tcprules file, nil when none is set.
	TCPRules *TCPRules `toml:"-"`
	// Warnings are problems that do not stop relay (a submission listener
	// that can never offer AUTH), each at its file:line:col.
	Warnings Errors `toml:"-"`
}

// Listener modes.
const (
	ModeSMTP       = "smtp"
	ModeSubmission = "submission"
	ModeSMTPS      = "smtps"
	ModeLocal      = "local"
)

// Listener is one [[listen]] entry.
type Listener struct {
	Addr string `toml:"addr"`
	Mode string `toml:"mode"`
}

// TLS is the [tls] section: STARTTLS on smtp/submission, required by smtps.
type TLS struct {
	Cert string `toml:"cert"`
	Key  string `toml:"key"`
}

// Relay is the [relay] section: the SMTP front end's limits and relay control.
type Relay struct {
	LocalDomains        []string `toml:"local_domains"`
	RelayNetworks       []string `toml:"relay_networks"`
	MaxMessageBytes     int64    `toml:"max_message_bytes"`
	MaxRecipients       int      `toml:"max_recipients"`
	MaxConnections      int      `toml:"max_connections"`
	MaxConnectionsPerIP int      `toml:"max_connections_per_ip"`
	Timeout             Duration `toml:"timeout"`
	// MaxSession ends a TCP session this long after it was accepted,
	// whatever it is doing (a client dripping bytes resets every timeout).
	MaxSession      Duration `toml:"max_session"`
	QmailControlDir string   `toml:"qmail_control_dir"`
	TCPRules        string   `toml:"tcprules"`
	// SenderIDHeader adds "X-Sender-Id: <primary identity>" to handed-off mail.
	SenderIDHeader bool `toml:"sender_id_header"`
	// ConnRatePerIP bounds new connections per client address (IPv6 by
	// /64), a token bucket: beyond it "421 4.7.0" at the greeting. Off
	// when empty; the local socket is never limited.
	ConnRatePerIP OptRate `toml:"conn_rate_per_ip"`
}

// Auth is the [auth] section.
type Auth struct {
	Checkpassword string   `toml:"checkpassword"` // program and arguments, split on spaces
	UsersFile     string   `toml:"users_file"`
	RequireTLS    bool     `toml:"require_tls"`
	Timeout       Duration `toml:"timeout"` // checkpassword is killed after this
	// FailLimit bounds failed logins per client address and per login, a
	// token bucket: once over, AUTH from that address or for that login
	// gets "454 4.7.0". Off when empty.
	FailLimit OptRate `toml:"fail_limit"`

	// Users is users_file read by Load: login -> bcrypt hash (cost checked).
	Users map[string][]byte `toml:"-"`
}

// Delivery methods.
const (
	DeliverQmailQueue  = "qmail-queue"
	DeliverQmailInject = "qmail-inject"
	DeliverSMTP        = "smtp"
	DeliverMaildir     = "maildir"
	DeliverQmailDirect = "qmail-direct"
)

// Delivery is the [delivery] section: where accepted mail goes.
type Delivery struct {
	Method   string   `toml:"method"`
	Command  string   `toml:"command"`
	SMTPAddr string   `toml:"smtp_addr"`
	Maildir  string   `toml:"maildir"`
	Timeout  Duration `toml:"timeout"`
	QueueDir string   `toml:"queue_dir"` // qmail's queue, for method qmail-direct
}

// Local is the [local] section: relay qq and relay sendmail.
type Local struct {
	QmailQueue   string   `toml:"qmail_queue"`
	OnDaemonDown string   `toml:"on_daemon_down"` // accept | defer
	ExemptUsers  []string `toml:"exempt_users"`
	// MaxConnections is the local socket's own budget of connections at
	// once, never shared with the TCP listeners' relay.max_connections.
	MaxConnections int `toml:"max_connections"`
}

// Admin is the [admin] section.
type Admin struct {
	Listen    string `toml:"listen"`
	TokenFile string `toml:"token_file"`
	Pprof     bool   `toml:"pprof"` // serve /debug/pprof/ behind the token
	// TLSCert and TLSKey (PEM) make the admin listener HTTPS only.
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
	// InsecurePlainHTTP lets a non-loopback listener serve plain HTTP.
	InsecurePlainHTTP bool `toml:"insecure_plain_http"`
}

// Policy modes and over-limit actions.
const (
	PolicyEnforce = "enforce"
	PolicyObserve = "observe"

	OverLimitDefer  = "defer"
	OverLimitReject = "reject"
	OverLimitHold   = "hold"
	OverLimitQueue  = "queue" // accepted into the release queue, let out as the windows free up
)

// Policy is the [policy] section.
type Policy struct {
	Mode         string `toml:"mode"`
	OverLimit    string `toml:"over_limit"`
	SuspendAfter int    `toml:"suspend_after"`
	// SuspendKinds are the identity kinds suspend_after may suspend; an
	// over-limit attempt counts only towards identities of these kinds.
	SuspendKinds []string `toml:"suspend_kinds"`
	// ReserveTimeout is how long a transaction may hold the recipients it
	// reserved before finishing its DATA; then they are released and the
	// transaction is checked again.
	ReserveTimeout Duration `toml:"reserve_timeout"`
	// QueueMax bounds the release queue (over_limit = "queue", pace) per
	// identity, in messages; beyond it the over_limit reply, with defer
	// standing for queue.
	QueueMax int         `toml:"queue_max"`
	Limits   KindLimits  `toml:"limits"`
	Allow    []AllowRule `toml:"allow"`
}

// Identity kinds (docs/design.md §3). IdentityKinds lists them in order.
const (
	KindUser   = "user"
	KindUID    = "uid"
	KindScript = "script"
	KindIP     = "ip"
	KindSender = "sender"
	KindDomain = "domain"
)

// IdentityKinds returns every identity kind, strongest first (the order a
// message's identities are listed in). It is the one list of kinds: the
// config's limits tables, policy's ranks and the admin API's ids all
// follow it.
func IdentityKinds() []string {
	return []string{KindUser, KindUID, KindScript, KindIP, KindSender, KindDomain}
}

// KindRank is kind's place in IdentityKinds, or len(IdentityKinds()) for
// a string that is not a kind.
func KindRank(kind string) int {
	switch kind {
	case KindUser:
		return 0
	case KindUID:
		return 1
	case KindScript:
		return 2
	case KindIP:
		return 3
	case KindSender:
		return 4
	case KindDomain:
		return 5
	}
	return NumKinds
}

// NumKinds is how many identity kinds there are.
const NumKinds = 6

// StrongKind reports whether ids of kind come from something the sender
// cannot choose (a login, the kernel's uid, a web server's qmail, the
// client's address) rather than from what the client writes (the envelope
// sender and its domain): docs/design.md §3's trust column.
func StrongKind(kind string) bool {
	r := KindRank(kind)
	return r <= KindRank(KindIP)
}

// DefaultSuspendKinds are the kinds suspend_after suspends unless
// policy.suspend_kinds says otherwise: the strong ones. A suspended
// sender: or domain: would stop the address's real owner, whom anyone can
// name in MAIL FROM.
func DefaultSuspendKinds() []string {
	var out []string
	for _, k := range IdentityKinds() {
		if StrongKind(k) {
			out = append(out, k)
		}
	}
	return out
}

// KindLimits holds [policy.limits.<kind>]; a nil kind is not capped.
type KindLimits struct {
	User   *Limits `toml:"user"`
	UID    *Limits `toml:"uid"`
	Script *Limits `toml:"script"`
	IP     *Limits `toml:"ip"`
	Sender *Limits `toml:"sender"`
	Domain *Limits `toml:"domain"`
}

// ForKind returns the limits of one identity kind, nil when not capped.
func (k KindLimits) ForKind(kind string) *Limits {
	switch kind {
	case KindUser:
		return k.User
	case KindUID:
		return k.UID
	case KindScript:
		return k.Script
	case KindIP:
		return k.IP
	case KindSender:
		return k.Sender
	case KindDomain:
		return k.Domain
	}
	return nil
}

// Limits is one set of caps. Zero values and empty lists are not capped.
type Limits struct {
	MaxRcptsPerMsg int    `toml:"max_rcpts_per_msg"`
	Rcpts          []Rate `toml:"rcpts"`
	Msgs           []Rate `toml:"msgs"`
	// Pace "N/D" lets the identity's messages out at N per D with bursts
	// of N (a token bucket); faster mail joins the release queue.
	Pace OptRate `toml:"pace"`
}

// AllowRule is one [[policy.allow]] entry: the mailing-list allowlist.
type AllowRule struct {
	Match          string `toml:"match"`
	MaxRcptsPerMsg int    `toml:"max_rcpts_per_msg"`
	Rcpts          []Rate `toml:"rcpts"`
	Msgs           []Rate `toml:"msgs"`
	Unlimited      bool   `toml:"unlimited"`
	// Pace as in Limits; it may go with unlimited = true.
	Pace OptRate `toml:"pace"`
	// Action over these caps: defer, reject, hold or queue; empty: the
	// policy's over_limit.
	Action string `toml:"action"`
}

// Webserver is one [[webserver]] entry.
type Webserver struct {
	Name   string `toml:"name"`
	Addr   string `toml:"addr"`
	Passwd string `toml:"passwd"`
	// RequireUID refuses mail from Addr whose first Received field is not
	// qmail's "(qmail N invoked by uid U)" line. Load makes it true when
	// the file leaves it out.
	RequireUID bool `toml:"require_uid"`

	// Accounts is the passwd file read by Load: uid -> account name.
	Accounts map[uint32]string `toml:"-"`
}

// Notify is the [notify] section.
type Notify struct {
	Email   string `toml:"email"`
	Webhook string `toml:"webhook"`
}

// From: control actions of [dkim] unowned_from and foreign_dmarc.
const (
	FromAccept = "accept"
	FromHold   = "hold"
	FromReject = "reject"
)

// DKIM is the [dkim] section (docs/design.md §11): signing and From: control.
type DKIM struct {
	// KeysDir holds <domain>/<selector>.key; "" signs nothing.
	KeysDir string `toml:"keys_dir"`
	// Headers are the header fields signed (h=), in order; From is signed
	// twice whatever the list says.
	Headers []string `toml:"headers"`
	// UnownedFrom: a From: in a domain we sign for, sent by an identity
	// that does not own it (accept unsigned, hold, reject). "" (a config
	// built in code) is accept.
	UnownedFrom string `toml:"unowned_from"`
	// ForeignDMARC: a From: in a foreign domain whose DMARC policy is
	// reject or quarantine. "" (a config built in code) is accept: no
	// lookups.
	ForeignDMARC string `toml:"foreign_dmarc"`
	// DNS is "ip:port" of the resolver for DMARC and `relay dkim check`;
	// "" is the system's.
	DNS     string       `toml:"dns"`
	Domains []DKIMDomain `toml:"domain"`
}

// DKIMDomain is one [[dkim.domain]] entry: who owns (may be signed for) a
// domain.
type DKIMDomain struct {
	Name   string   `toml:"name"`
	Owners []string `toml:"owners"` // identity ids with * globs
}

// Duration is a time.Duration written as a Go duration string ("60s").
type Duration struct{ time.Duration }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("invalid duration %q (use e.g. \"60s\", \"20m\")", b)
	}
	if v < 0 {
		return fmt.Errorf("negative duration %q", b)
	}
	d.Duration = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Rate is a limit "N/W": at most N in any interval of length W.
type Rate struct {
	N      int64
	Window time.Duration
}

// String gives the rate back in its config form ("500/1h").
func (r Rate) String() string { return fmt.Sprintf("%d/%s", r.N, FormatWindow(r.Window)) }

// UnmarshalText implements encoding.TextUnmarshaler.
func (r *Rate) UnmarshalText(b []byte) error {
	v, err := ParseRate(string(b))
	if err != nil {
		return err
	}
	*r = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (r Rate) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// OptRate is a Rate that may be left empty ("" or absent): off.
type OptRate struct{ Rate }

// On reports whether a rate is set.
func (r OptRate) On() bool { return r.N > 0 && r.Window > 0 }

// UnmarshalText implements encoding.TextUnmarshaler; "" is off.
func (r *OptRate) UnmarshalText(b []byte) error {
	if strings.TrimSpace(string(b)) == "" {
		*r = OptRate{}
		return nil
	}
	return r.Rate.UnmarshalText(b)
}

// MarshalText implements encoding.TextMarshaler; off is "".
func (r OptRate) MarshalText() ([]byte, error) {
	if !r.On() {
		return nil, nil
	}
	return r.Rate.MarshalText()
}

// String is the rate in its config form, "" when off.
func (r OptRate) String() string {
	if !r.On() {
		return ""
	}
	return r.Rate.String()
}

// ParseRate parses "N/W" where W is a count and a unit s, m, h or d
// ("100/1m", "2000/24h", "3/10s"). A bare unit means one of it ("10/h").
func ParseRate(s string) (Rate, error) {
	ns, ws, ok := strings.Cut(strings.TrimSpace(s), "/")
	if !ok {
		return Rate{}, fmt.Errorf("invalid rate %q: want N/W, e.g. \"500/1h\"", s)
	}
	n, err := strconv.ParseInt(ns, 10, 64)
	if err != nil || n <= 0 {
		return Rate{}, fmt.Errorf("invalid rate %q: N must be a positive whole number", s)
	}
	w, err := parseWindow(ws)
	if err != nil {
		return Rate{}, fmt.Errorf("invalid rate %q: %v", s, err)
	}
	return Rate{N: n, Window: w}, nil
}

const maxWindow = 366 * 24 * time.Hour

func parseWindow(s string) (time.Duration, error) {
	if s == "" {
		return 0, fmt.Errorf("missing window")
	}
	unit := s[len(s)-1]
	num := s[:len(s)-1]
	var per time.Duration
	switch unit {
	case 's':
		per = time.Second
	case 'm':
		per = time.Minute
	case 'h':
		per = time.Hour
	case 'd':
		per = 24 * time.Hour
	default:
		return 0, fmt.Errorf("window unit must be s, m, h or d")
	}
	k := int64(1)
	if num != "" {
		v, err := strconv.ParseInt(num, 10, 64)
		if err != nil || v <= 0 {
			return 0, fmt.Errorf("window must be a positive whole number of %c", unit)
		}
		k = v
	}
	if k > int64(maxWindow/per) {
		return 0, fmt.Errorf("window longer than 366d")
	}
	return time.Duration(k) * per, nil
}

// FormatWindow writes a window the way a config would ("1h", "24h", "10s").
func FormatWindow(w time.Duration) string {
	switch {
	case w%time.Hour == 0:
		return fmt.Sprintf("%dh", w/time.Hour)
	case w%time.Minute == 0:
		return fmt.Sprintf("%dm", w/time.Minute)
	default:
		return fmt.Sprintf("%ds", w/time.Second)
	}
}
