// Package relay is the SMTP front end that stands in for qmail-smtpd: it
// listens on the [[listen]] addresses (smtp, submission, smtps and the local
// unix socket), replies as qmail-smtpd does, keeps the server from being an
// open relay (rcpthosts, relay_networks, tcprules, AUTH), attributes each
// message to its identities (login, uid, web server uid and script, sender,
// domain, client IP), asks package policy about them, and hands accepted
// mail to package queue in qmail's stored form. It also answers the check
// sessions of `relay qq` on the local socket.
package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus"

	"relay/config"
	"relay/dkim"
	"relay/policy"
	"relay/queue"
)

// HoldSpool keeps messages that policy holds for review. Put stores the
// message durably (fsynced) before it returns and fills in meta.ID; if
// reading msg fails nothing may be kept and the error is returned.
type HoldSpool interface {
	Put(meta queue.HeldMeta, msg io.Reader) (queue.HeldMeta, error)
}

// Deps are the Server's collaborators.
type Deps struct {
	Policy     policy.Checker        // nil: no policy, nothing counted
	Handoff    queue.Handoff         // required
	Hold       HoldSpool             // nil: a hold decision defers instead
	Auth       Authenticator         // nil: no AUTH offered
	Logger     *slog.Logger          // nil: discard
	Registerer prometheus.Registerer // nil: metrics are kept but not registered
	Now        func() time.Time      // nil: time.Now
}

// Defaults where neither relay.toml nor qmail's control files say.
const (
	// DefaultTimeout is qmail's timeoutsmtpd default.
	DefaultTimeout = 1200 * time.Second
	// maxLineLength bounds a command or message line. RFC 5321 §4.5.3.1.6
	// allows 1000 octets; qmail has no limit, and scripts do send longer
	// unwrapped lines, so relay is generous but bounded.
	maxLineLength = 64 << 10
	// maxLocalLineLength is the line limit on mode = "local" sockets.
	maxLocalLineLength = 1 << 20
	// checkHelo is the EHLO name with which `relay qq` opens a check session
	// on the local socket.
	checkHelo = "relay-qq"
)

// Server is the SMTP front end. Build it with New, then Start it.
type Server struct {
	deps    Deps
	log     *slog.Logger
	now     func() time.Time
	metrics *metrics

	settings atomic.Pointer[settings]

	// ctx is cancelled when Shutdown gives up waiting, so hand-offs still
	// running are killed (a message that did not get 250 is not queued).
	ctx    context.Context
	cancel context.CancelFunc

	nextConnID    atomic.Uint64
	connMu        sync.Mutex
	connTotal     int
	connPerClient map[connKey]int           // per IP (IPv6 /64) or local uid
	conns         map[*trackedConn]struct{} // open connections, for Shutdown

	busy     inflight
	draining atomic.Bool

	storeBufs sync.Pool // *storeBuffers, one set per message in DATA

	dmarc     *dkim.DMARC // DMARC lookups and their cache, across reloads
	dkimStats *dkim.Stats

	mu        sync.Mutex
	listeners []*boundListener
	serving   sync.WaitGroup
}

// boundListener is one open [[listen]] entry and the go-smtp server on it.
type boundListener struct {
	conf   config.Listener
	ln     net.Listener
	smtp   *smtp.Server
	socket string // unix socket path to remove at shutdown
}

// New checks cfg and builds a Server; nothing is opened until Start.
func New(cfg *config.Config, deps Deps) (*Server, error) {
	log := deps.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	st, err := newSettings(cfg, log)
	if err != nil {
		return nil, err
	}
	return newServer(st, deps)
}

func newServer(st *settings, deps Deps) (*Server, error) {
	if deps.Handoff == nil {
		return nil, errors.New("relay: no hand-off configured")
	}
	m, err := newMetrics(deps.Registerer)
	if err != nil {
		return nil, err
	}
	stats, err := dkim.NewStats(deps.Registerer, deps.Now)
	if err != nil {
		return nil, err
	}
	s := &Server{
		deps:          deps,
		log:           deps.Logger,
		now:           deps.Now,
		metrics:       m,
		connPerClient: map[connKey]int{},
		conns:         map[*trackedConn]struct{}{},
		dkimStats:     stats,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.dmarc = dkim.NewDMARC(dkim.DMARCOptions{Server: st.cfg.DKIM.DNS, Logger: s.log})
	if s.now == nil {
		s.now = time.Now
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.settings.Store(st)
	return s, nil
}

// Reload makes new sessions use cfg: relay control, limits, control files,
// tcprules, web servers, passwd, exempt users, the TLS certificate and
// DKIM (keys, owners, actions, resolver).
// Listeners are not rebound, and the greeting, the timeouts and whether
// STARTTLS is offered stay as they were at Start (go-smtp fixes them per
// listener). On error the running configuration stays.
func (s *Server) Reload(cfg *config.Config) error {
	st, err := newSettings(cfg, s.log)
	if err != nil {
		return err
	}
	s.settings.Store(st)
	s.dmarc.SetServer(cfg.DKIM.DNS)
	return nil
}

// Start opens every [[listen]] entry and serves each in its own goroutine.
// A stale unix socket file is removed first; the new one is made mode 0666
// so every local user can submit (the peer uid tells them apart). If any
// listener cannot be opened, those already open are closed and the error
// is returned.
func (s *Server) Start() error {
	st := s.settings.Load()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.listeners) > 0 {
		return errors.New("relay: already started")
	}
	var opened []*boundListener
	fail := func(err error) error {
		for _, b := range opened {
			b.ln.Close()
			if b.socket != "" {
				os.Remove(b.socket)
			}
		}
		return err
	}
	var tlsConf *tls.Config
	if st.cert != nil {
		tlsConf = &tls.Config{
			MinVersion: tls.VersionTLS12,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
				if c := s.settings.Load().cert; c != nil {
					return c, nil
				}
				return nil, errors.New("no certificate configured")
			},
		}
	}
	for _, lc := range st.cfg.Listen {
		b, err := s.listen(lc, st, tlsConf)
		if err != nil {
			return fail(fmt.Errorf("listen %s %s: %w", lc.Mode, lc.Addr, err))
		}
		opened = append(opened, b)
	}
	s.listeners = opened
	for _, b := range opened {
		s.serving.Add(1)
		go func() {
			defer s.serving.Done()
			err := b.smtp.Serve(b.ln)
			if err != nil && !errors.Is(err, net.ErrClosed) {
				s.log.Error("listener stopped", "addr", b.conf.Addr, "err", err)
			}
		}()
	}
	return nil
}

func (s *Server) listen(lc config.Listener, st *settings, tlsConf *tls.Config) (*boundListener, error) {
	b := &boundListener{conf: lc}
	var ln net.Listener
	var err error
	local := lc.Mode == config.ModeLocal
	if local {
		if err := removeStaleSocket(lc.Addr); err != nil {
			return nil, err
		}
		ln, err = net.Listen("unix", lc.Addr)
		if err != nil {
			return nil, err
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		b.socket = lc.Addr
		if err := os.Chmod(lc.Addr, 0o666); err != nil {
			ln.Close()
			os.Remove(lc.Addr)
			return nil, err
		}
	} else {
		ln, err = net.Listen("tcp", lc.Addr)
		if err != nil {
			return nil, err
		}
	}
	implicitTLS := lc.Mode == config.ModeSMTPS
	if implicitTLS && tlsConf == nil {
		ln.Close()
		return nil, errors.New("smtps needs [tls] cert and key")
	}
	var gated net.Listener = &gateListener{Listener: ln, srv: s, local: local, tls: implicitTLS}
	if implicitTLS {
		gated = tls.NewListener(gated, tlsConf)
	}
	b.ln = gated

	srv := smtp.NewServer(&backend{srv: s, mode: lc.Mode})
	srv.Domain = st.greeting
	srv.ReadTimeout = st.timeout
	srv.WriteTimeout = st.timeout
	srv.MaxLineLength = maxLineLength
	if local {
		// go-smtp's line limit also applies inside DATA, and scripts do put
		// a whole HTML body on one line: the local socket takes far longer
		// lines than the network (qmail-queue takes any), yet still a
		// bounded number of bytes per line from any local user. A message
		// over it is deferred by relay qq, never passed on uncounted.
		srv.MaxLineLength = maxLocalLineLength
	}
	// databytes is enforced on the stored size in Data, not on the wire
	// size go-smtp would count; max_recipients is answered in Rcpt with
	// relay's text.
	srv.MaxMessageBytes = 0
	srv.MaxRecipients = 0
	srv.AllowInsecureAuth = local || !st.cfg.Auth.RequireTLS
	srv.ErrorLog = slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)
	if !local && tlsConf != nil {
		srv.TLSConfig = tlsConf
	}
	b.smtp = srv
	return b, nil
}

// removeStaleSocket removes a unix socket file left by an earlier run; any
// other kind of file at path is an error, never removed.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	return os.Remove(path)
}

// Addrs returns the address of every open listener, in [[listen]] order.
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	addrs := make([]net.Addr, len(s.listeners))
	for i, b := range s.listeners {
		addrs[i] = b.ln.Addr()
	}
	return addrs
}

// Shutdown stops accepting connections, refuses new transactions (421), and
// waits until every transaction in flight has had its final reply (and every
// check session its commit or abort) or ctx ends. Then it closes all
// connections, killing hand-offs still running, and removes the unix
// sockets. It returns ctx's error when it had to cut transactions short.
func (s *Server) Shutdown(ctx context.Context) error {
	s.draining.Store(true)
	s.mu.Lock()
	bound := s.listeners
	s.mu.Unlock()
	for _, b := range bound {
		b.ln.Close()
	}
	err := s.busy.wait(ctx)
	s.cancel()
	// A session in DATA holds its lock while it reads from the client, and
	// go-smtp's Close waits for that lock (Logout) before it closes the
	// connection: a stalled client would hold Shutdown until relay.timeout.
	// Closing the connections first ends those reads.
	s.closeConns()
	for _, b := range bound {
		b.smtp.Close()
		if b.socket != "" {
			os.Remove(b.socket)
		}
	}
	s.serving.Wait()
	return err
}

// closeConns closes every open client connection.
func (s *Server) closeConns() {
	s.connMu.Lock()
	open := make([]*trackedConn, 0, len(s.conns))
	for c := range s.conns {
		open = append(open, c)
	}
	s.connMu.Unlock()
	for _, c := range open {
		c.Close()
	}
}

// inflight counts sessions with a transaction open.
type inflight struct {
	mu      sync.Mutex
	n       int
	changed chan struct{}
}

func (f *inflight) add(d int) {
	f.mu.Lock()
	f.n += d
	if f.changed != nil {
		close(f.changed)
		f.changed = nil
	}
	f.mu.Unlock()
}

// wait returns when the count is zero, or ctx's error when ctx ends first.
func (f *inflight) wait(ctx context.Context) error {
	for {
		f.mu.Lock()
		if f.n == 0 {
			f.mu.Unlock()
			return nil
		}
		if f.changed == nil {
			f.changed = make(chan struct{})
		}
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// settings is one configuration as sessions use it, prepared once per load
// (qmail-smtpd reads its control files per session; relay reads them per
// load and a session keeps the settings it started with).
type settings struct {
	cfg           *config.Config
	greeting      string // 220 banner host
	me            string // "by" in Received
	databytes     int64
	timeout       time.Duration
	maxRcpts      int
	maxConns      int
	maxConnsPerIP int

	rcptHostAllowed func(domain string) bool
	badMailFrom     func(sender string) bool
	tcpRules        func(netip.Addr) (config.TCPRule, bool) // nil: no tcprules file

	relayNets  []netip.Prefix
	webservers []webserver
	accounts   map[uint32]string // /etc/passwd uid -> name
	exempt     map[string]bool
	cert       *tls.Certificate
	dkim       *dkim.Set
}

// webserver is one [[webserver]] entry.
type webserver struct {
	name     string
	addr     netip.Addr
	accounts map[uint32]string // its passwd file (config.Load reads it); nil when none is set
}

// passwdFile names the local accounts for uid:local identities and
// local.exempt_users.
const passwdFile = "/etc/passwd"

// readAccounts reads the local passwd file once per configuration load. A
// problem is logged, not fatal: without names, exempt_users match nobody
// and uid identities carry no account, but mail still flows and is counted.
func readAccounts(path string, log *slog.Logger) map[uint32]string {
	f, err := os.Open(path)
	if err != nil {
		log.Warn("cannot read local accounts", "file", path, "err", err)
		return map[uint32]string{}
	}
	defer f.Close()
	accounts, err := config.ReadPasswd(f)
	if err != nil {
		log.Warn("cannot read local accounts", "file", path, "err", err)
		return map[uint32]string{}
	}
	return accounts
}

func newSettings(cfg *config.Config, log *slog.Logger) (*settings, error) {
	ctl := cfg.Control
	if ctl == nil {
		ctl = config.NewControl(cfg)
	}
	st := &settings{
		cfg:             cfg,
		greeting:        firstNonEmpty(ctl.Greeting, ctl.Me, cfg.Hostname),
		me:              firstNonEmpty(ctl.Me, cfg.Hostname),
		databytes:       ctl.Databytes,
		timeout:         ctl.TimeoutSMTPD,
		maxRcpts:        cfg.Relay.MaxRecipients,
		maxConns:        cfg.Relay.MaxConnections,
		maxConnsPerIP:   cfg.Relay.MaxConnectionsPerIP,
		rcptHostAllowed: ctl.RcptHostAllowed,
		badMailFrom:     ctl.BadMailFrom,
		exempt:          map[string]bool{},
	}
	if st.me == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("no hostname configured and none from the system: %w", err)
		}
		st.me = h
	}
	if st.greeting == "" {
		st.greeting = st.me
	}
	if st.timeout <= 0 {
		st.timeout = DefaultTimeout
	}
	if cfg.TCPRules != nil {
		st.tcpRules = cfg.TCPRules.Match
	}
	for _, n := range cfg.Relay.RelayNetworks {
		p, err := config.ParseNetwork(n)
		if err != nil {
			return nil, fmt.Errorf("relay.relay_networks: %w", err)
		}
		st.relayNets = append(st.relayNets, p)
	}
	for _, w := range cfg.Webservers {
		a, err := netip.ParseAddr(w.Addr)
		if err != nil {
			return nil, fmt.Errorf("webserver %s: %w", w.Name, err)
		}
		st.webservers = append(st.webservers, webserver{name: w.Name, addr: a.Unmap().WithZone(""), accounts: w.Accounts})
	}
	st.accounts = readAccounts(passwdFile, log)
	for _, u := range cfg.Local.ExemptUsers {
		st.exempt[u] = true
	}
	if cfg.TLS.Cert != "" || cfg.TLS.Key != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLS.Cert, cfg.TLS.Key)
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		st.cert = &cert
	}
	d, err := dkim.Load(cfg.DKIM)
	if err != nil {
		return nil, err
	}
	if len(d.Keys()) > 0 && cfg.Delivery.Method == config.DeliverQmailInject {
		log.Warn("qmail-inject rewrites header fields: DKIM signatures made before it may not verify; deliver with qmail-queue")
	}
	st.dkim = d
	return st, nil
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if strings.TrimSpace(v) != "" {
			return v
		}
	}
	return ""
}

// relayNetwork reports whether a is in relay_networks.
func (st *settings) relayNetwork(a netip.Addr) bool {
	for _, p := range st.relayNets {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// webserverAt returns the [[webserver]] whose address a is.
func (st *settings) webserverAt(a netip.Addr) *webserver {
	for i := range st.webservers {
		if st.webservers[i].addr == a {
			return &st.webservers[i]
		}
	}
	return nil
}
