// Package admin serves relay's admin HTTP API, the dashboard page the mail
// admin opens when a complaint comes in, and the Prometheus metrics
// (docs/design.md §6). It also holds the client side used by "relay ctl".
//
// Every path but /healthz and /login needs the bearer token, or the session
// cookie the page gets by logging in with the token once (until it logs
// out, expires or relay restarts). With a certificate it serves HTTPS
// only. Every POST is
// refused when a browser says it comes from another site, and a POST
// authenticated by the cookie must also carry the session's CSRF token.
package admin

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"relay/queue"
)

// Options configures a Server.
type Options struct {
	Listen string // host:port (config.validate: loopback unless the admin chose the token and TLS)
	Token  string // the bearer token (LoadOrCreateToken)
	Policy Policy
	Held   Held // nil: no hold spool, the lists are empty
	// Queues describes the release queues (over_limit = "queue", pace);
	// nil: none.
	Queues func() []queue.ReleaseQueue
	// Reload re-reads the config file. A bad file keeps the running policy
	// and its error text (config.Errors, file:line:col) goes to the client.
	Reload   func() error
	Gatherer prometheus.Gatherer // served at /metrics; nil: no /metrics
	Logger   *slog.Logger        // nil: discard
	Pprof    bool                // serve /debug/pprof/ behind the token
	DKIM     DKIM                // nil: the DKIM section and /api/dkim are empty
	Now      func() time.Time    // nil: time.Now
	// Health reports what is wrong now (relay.db cannot be written or is
	// damaged); /healthz answers 503 with its text. nil: always ok.
	Health func() error
	// TLSCert and TLSKey (PEM files): Start serves HTTPS only. Empty:
	// plain HTTP (config refuses that on a non-loopback listen unless
	// admin.insecure_plain_http says so).
	TLSCert, TLSKey string
}

// Server is the admin HTTP server.
type Server struct {
	opts    Options
	token   []byte
	log     *slog.Logger
	now     func() time.Time
	origin  *http.CrossOriginProtection
	pages   *template.Template
	cspHash string // CSP hash of the embedded style sheet
	handler http.Handler

	sessions sessionStore

	srv *http.Server
	ln  net.Listener
}

// Timeouts of the HTTP server: the API is small; a raw held message is the
// largest reply.
const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	writeTimeout      = 2 * time.Minute
	idleTimeout       = 2 * time.Minute
	maxHeaderBytes    = 64 << 10
	maxFormBytes      = 64 << 10
)

// New checks opts and builds the routes. It does not listen yet.
func New(opts Options) (*Server, error) {
	if len(opts.Token) < minTokenLen {
		return nil, fmt.Errorf("admin: token shorter than %d characters", minTokenLen)
	}
	if opts.Policy == nil {
		return nil, errors.New("admin: no policy")
	}
	if opts.Listen != "" {
		if _, _, err := net.SplitHostPort(opts.Listen); err != nil {
			return nil, fmt.Errorf("admin: listen %q: %v", opts.Listen, err)
		}
	}
	s := &Server{
		opts:   opts,
		token:  []byte(opts.Token),
		log:    opts.Logger,
		now:    opts.Now,
		origin: http.NewCrossOriginProtection(),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	var err error
	if s.pages, err = parsePages(); err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(styleSheet))
	s.cspHash = "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
	s.handler = s.routes()
	return s, nil
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /login", s.loginForm)
	mux.HandleFunc("POST /login", s.login)
	mux.Handle("POST /logout", s.page(s.logout))

	mux.Handle("GET /{$}", s.page(s.dashboard))
	mux.Handle("GET /ui/senders/{id}", s.page(s.senderPage))
	mux.Handle("POST /ui/senders/{id}/{action}", s.page(s.senderActionUI))
	mux.Handle("GET /ui/held/{id}", s.page(s.heldPage))
	mux.Handle("POST /ui/held/{id}/{action}", s.page(s.heldActionUI))
	mux.Handle("POST /ui/reload", s.page(s.reloadUI))

	mux.Handle("GET /api/senders", s.api(s.listSenders))
	mux.Handle("GET /api/senders/{id}", s.api(s.getSender))
	mux.Handle("POST /api/senders/{id}/{action}", s.api(s.senderAction))
	mux.Handle("GET /api/held", s.api(s.listHeld))
	mux.Handle("GET /api/held/{id}", s.api(s.getHeld))
	mux.Handle("POST /api/held/{id}/{action}", s.api(s.heldAction))
	mux.Handle("GET /api/events", s.api(s.listEvents))
	mux.Handle("GET /api/queue", s.api(s.listQueues))
	mux.Handle("POST /api/reload", s.api(s.reload))
	mux.Handle("GET /api/dkim", s.api(s.getDKIM))

	if s.opts.Gatherer != nil {
		metrics := promhttp.HandlerFor(s.opts.Gatherer, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
		mux.Handle("GET /metrics", s.api(metrics.ServeHTTP))
	}
	if s.opts.Pprof {
		mux.Handle("GET /debug/pprof/", s.api(pprof.Index))
		mux.Handle("GET /debug/pprof/cmdline", s.api(pprof.Cmdline))
		mux.Handle("GET /debug/pprof/profile", s.api(pprof.Profile))
		mux.Handle("GET /debug/pprof/symbol", s.api(pprof.Symbol))
		mux.Handle("GET /debug/pprof/trace", s.api(pprof.Trace))
	}
	// Anything else: 401 without the token, 404 with it.
	mux.Handle("/", s.api(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such path")
	}))
	return securityHeaders(mux)
}

// securityHeaders keeps the admin's answers out of caches and frames.
func securityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Cache-Control", "no-store")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("Referrer-Policy", "no-referrer")
		h.ServeHTTP(w, r)
	})
}

// Handler is the whole admin HTTP handler (for httptest and for wiring).
func (s *Server) Handler() http.Handler { return s.handler }

// Start listens on Options.Listen and serves in the background: HTTPS
// when Options.TLSCert is set, else plain HTTP.
func (s *Server) Start() error {
	if s.srv != nil {
		return errors.New("admin: already started")
	}
	var tlsConf *tls.Config
	if s.opts.TLSCert != "" || s.opts.TLSKey != "" {
		cert, err := tls.LoadX509KeyPair(s.opts.TLSCert, s.opts.TLSKey)
		if err != nil {
			return fmt.Errorf("admin: tls_cert/tls_key: %w", err)
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	ln, err := net.Listen("tcp", s.opts.Listen)
	if err != nil {
		return fmt.Errorf("admin: %w", err)
	}
	s.ln = ln
	s.srv = &http.Server{
		TLSConfig:         tlsConf,
		Handler:           s.handler,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	go func() {
		var err error
		if tlsConf != nil {
			err = s.srv.ServeTLS(ln, "", "")
		} else {
			err = s.srv.Serve(ln)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("admin server stopped", "err", err)
		}
	}()
	s.log.Info("admin listening", "addr", ln.Addr().String(), "https", tlsConf != nil)
	return nil
}

// Addr is the address Start listens on (nil before Start).
func (s *Server) Addr() net.Addr {
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Shutdown stops accepting and waits for requests in flight until ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	if s.srv == nil {
		return nil
	}
	return s.srv.Shutdown(ctx)
}

// healthz answers 200 "ok", or 503 with one line per problem Health
// reports (mail still flows then; what it says needs the admin).
func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if s.opts.Health != nil {
		if err := s.opts.Health(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, err)
			return
		}
	}
	fmt.Fprintln(w, "ok")
}
