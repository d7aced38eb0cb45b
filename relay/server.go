// Package relay is the SMTP front end that stands in for qmail-smtpd: it
// listens on the [[listen]] addresses (smtp, submission, smtps and the local
// unix socket), replies as qmail-smtpd does, keeps the server from being an
// open relay (rcpthosts, relay_networks, tcprules, AUTH), attributes each
// message to its identities (login, uid, web server uid and script, sender,
// domain, client IP), asks package policy about them, and hands accepted
// mail to package queue in qmail's stored form. On the local socket it also
// answers `relay qq`'s checks, in their own protocol (check.go,
// docs/local-check.md).
package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
	Queue      Enqueuer              // the releaser of over_limit = "queue" and pace; nil: such mail is deferred
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
	connTotal     int                       // TCP connections (relay.max_connections)
	localTotal    int                       // local socket connections (local.max_connections)
	connPerClient map[connKey]int           // per IP (IPv6 /64) or local uid
	conns         map[*trackedConn]struct{} // open connections, for Shutdown

	busy     inflight
	draining atomic.Bool

	connRate atomic.Pointer[connRate] // [relay] conn_rate_per_ip (connlimit.go)

	storeBufs sync.Pool // *storeBuffers, one set per message in DATA

	// tlsConf serves the certificate of the current settings (STARTTLS
	// and smtps); smtpLog is go-smtp's error log.
	tlsConf *tls.Config
	smtpLog *log.Logger

	dmarc     *dkim.DMARC // DMARC lookups and their cache, across reloads
	dkimStats *dkim.Stats

	mu        sync.Mutex
	listeners []*boundListener
	serving   sync.WaitGroup
}

// boundListener is one open [[listen]] entry.
type boundListener struct {
	conf   config.Listener
	ln     net.Listener
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
	s.setConnRate(st.cfg.Relay.ConnRatePerIP)
	s.smtpLog = slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)
	s.tlsConf = &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			if c := s.settings.Load().cert; c != nil {
				return c, nil
			}
			return nil, errors.New("no certificate configured")
		},
	}
	return s, nil
}

// Reload makes new connections use cfg: relay control, limits, control
// files (the greeting and databytes included), tcprules, web servers,
// passwd, exempt users, timeouts, the TLS certificate and whether STARTTLS
// is offered, and DKIM (keys, owners, actions, resolver). Listeners are not
// rebound, and a connection keeps the settings it was accepted under. On
// error the running configuration stays.
func (s *Server) Reload(cfg *config.Config) error {
	st, err := newSettings(cfg, s.log)
	if err != nil {
		return err
	}
	s.settings.Store(st)
	s.setConnRate(cfg.Relay.ConnRatePerIP)
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
	for _, lc := range st.cfg.Listen {
		b, err := s.listen(lc)
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
			s.serve(b)
		}()
	}
	return nil
}

func (s *Server) listen(lc config.Listener) (*boundListener, error) {
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
	if implicitTLS && s.settings.Load().cert == nil {
		ln.Close()
		return nil, errors.New("smtps needs [tls] cert and key")
	}
	var gated net.Listener = &gateListener{Listener: ln, srv: s, local: local, tls: implicitTLS}
	if implicitTLS {
		gated = tls.NewListener(gated, s.tlsConf)
	}
	b.ln = gated
	return b, nil
}

// serve accepts connections on b until it is closed. Each connection gets a
// go-smtp server of its own, set up from the settings the gate admitted it
// under: go-smtp fixes the greeting, SIZE, the timeouts and STARTTLS per
// server, and this way they follow a reload (control/smtpgreeting and
// databytes as qmail-smtpd, which reads them per connection).
func (s *Server) serve(b *boundListener) {
	var delay time.Duration
	for {
		c, err := b.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || s.draining.Load() {
				return
			}
			if isTemporaryAccept(err) {
				// Out of file descriptors and the like: wait, as net/http does.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "addr", b.conf.Addr, "err", err, "in", delay)
				time.Sleep(delay)
				continue
			}
			s.log.Error("listener stopped", "addr", b.conf.Addr, "err", err)
			return
		}
		delay = 0
		tc, ok := trackedConnOf(c)
		if !ok { // the gate returns nothing else
			c.Close()
			continue
		}
		srv := s.smtpServer(b.conf.Mode, tc.info)
		s.connMu.Lock()
		tc.smtp = srv
		s.connMu.Unlock()
		// Serve hands the one connection to its own goroutine, then returns.
		go srv.Serve(&oneConnListener{conn: c})
	}
}

// isTemporaryAccept reports an accept error worth waiting out: the process
// or the system is out of descriptors or memory, or the peer gave up
// before the accept.
func isTemporaryAccept(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// smtpServer is the go-smtp server for one connection of a listener in
// mode, with info's settings.
func (s *Server) smtpServer(mode string, info connInfo) *smtp.Server {
	st := info.st
	local := mode == config.ModeLocal
	srv := smtp.NewServer(&backend{srv: s, mode: mode})
	srv.Domain = st.greeting
	srv.ReadTimeout = st.timeout
	srv.WriteTimeout = st.timeout
	srv.MaxLineLength = maxLineLength
	srv.ErrorLog = s.smtpLog
	// EHLO shows SIZE <databytes> (RFC 1870), and go-smtp refuses a
	// declared or transferred size over it, counted as the message
	// travels (CRLF line ends), as SIZE is; Data counts the stored size
	// too. max_recipients is answered in Rcpt with relay's text.
	srv.MaxMessageBytes = info.databytes
	srv.MaxRecipients = 0
	srv.AllowInsecureAuth = local || !st.cfg.Auth.RequireTLS
	if local {
		// go-smtp's line limit also applies inside DATA, and scripts do put
		// a whole HTML body on one line: the local socket takes far longer
		// lines than the network, yet still a bounded number of bytes per
		// line from any local user. (relay qq's checks do not speak SMTP:
		// neither this nor databytes applies to them, as qmail-queue has
		// no such limits; check.go.)
		srv.MaxLineLength = maxLocalLineLength
	} else if st.cert != nil {
		srv.TLSConfig = s.tlsConf
	}
	return srv
}

// oneConnListener hands one connection to a go-smtp server's Serve, then
// reports itself closed, which ends Serve; the connection goes on.
type oneConnListener struct {
	mu   sync.Mutex
	conn net.Conn
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.conn
	if c == nil {
		return nil, net.ErrClosed
	}
	l.conn = nil
	return c, nil
}

func (l *oneConnListener) Close() error { return nil }

func (l *oneConnListener) Addr() net.Addr { return dummyAddr{} }

// dummyAddr is oneConnListener's address: go-smtp never asks for it.
type dummyAddr struct{}

func (dummyAddr) Network() string { return "relay" }
func (dummyAddr) String() string  { return "relay" }

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
// check its commit or abort) or ctx ends. Then it closes all
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
	servers := s.closeConns()
	// go-smtp's Close ends each session (Logout) before it returns, so
	// nothing is left reserved in policy when Shutdown returns.
	for _, srv := range servers {
		srv.Close()
	}
	for _, b := range bound {
		if b.socket != "" {
			os.Remove(b.socket)
		}
	}
	s.serving.Wait()
	return err
}

// closeConns closes every open client connection and returns their go-smtp
// servers.
func (s *Server) closeConns() []*smtp.Server {
	s.connMu.Lock()
	open := make([]*trackedConn, 0, len(s.conns))
	servers := make([]*smtp.Server, 0, len(s.conns))
	for c := range s.conns {
		open = append(open, c)
		if c.smtp != nil {
			servers = append(servers, c.smtp)
		}
	}
	s.connMu.Unlock()
	for _, c := range open {
		c.Close()
	}
	return servers
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
	maxLocalConns int
	maxSession    time.Duration // 0: none

	rcptHostAllowed func(domain string) bool
	badMailFrom     func(sender string) bool
	tcpRules        func(netip.Addr) (config.TCPRule, bool) // nil: no tcprules file

	relayNets  []netip.Prefix
	webservers []*webserver
	accounts   map[uint32]string // /etc/passwd uid -> name
	exempt     map[string]bool
	cert       *tls.Certificate
	dkim       *dkim.Set
}

// webserver is one [[webserver]] entry.
type webserver struct {
	name       string
	addr       netip.Addr
	accounts   map[uint32]string // its passwd file (config.Load reads it); nil when none is set
	requireUID bool
	lastEvent  atomic.Int64 // unix ns of its last EventRefused
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
		maxLocalConns:   cfg.Local.MaxConnections,
		maxSession:      cfg.Relay.MaxSession.Duration,
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
		st.webservers = append(st.webservers, &webserver{name: w.Name, addr: a.Unmap().WithZone(""), accounts: w.Accounts, requireUID: w.RequireUID})
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

// localAccount returns the passwd name of a local uid and whether it is in
// local.exempt_users.
func (st *settings) localAccount(uid uint32) (name string, exempt bool) {
	name = st.accounts[uid]
	return name, name != "" && st.exempt[name]
}

// webserverAt returns the [[webserver]] whose address a is.
func (st *settings) webserverAt(a netip.Addr) *webserver {
	for _, ws := range st.webservers {
		if ws.addr == a {
			return ws
		}
	}
	return nil
}
