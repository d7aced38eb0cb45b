package queue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"relay/config"
)

// DefaultTimeout bounds one hand-off when the configuration gives none.
const DefaultTimeout = 60 * time.Second

// Default programs of a standard qmail install.
const (
	DefaultQmailQueue  = "/var/qmail/bin/qmail-queue"
	DefaultQmailInject = "/var/qmail/bin/qmail-inject"
)

// Options are the dependencies of New.
type Options struct {
	Logger     *slog.Logger          // nil: discard
	Registerer prometheus.Registerer // nil: no metrics
	// ChildStderr is where a qmail-queue child's stderr goes: relay's own,
	// as qmail-smtpd's goes to tcpserver's log. nil: /dev/null.
	ChildStderr *os.File
	// Writers brings method qmail-direct its queue-writer connections, a
	// new one whenever a writer is (re)started. nil: the hand-off has no
	// writer and defers every message.
	Writers <-chan net.Conn
}

// New builds the hand-off that d.Method names, instrumented with the
// relay_handoff_seconds histogram (labels method and result ok|temp|perm)
// when opts.Registerer is set. hostname is used in EHLO and Maildir file
// names.
func New(d config.Delivery, hostname string, opts Options) (Handoff, error) {
	log := orDiscard(opts.Logger)
	log = log.With("method", d.Method)
	timeout := d.Timeout.Duration
	var h Handoff
	switch d.Method {
	case config.DeliverQmailQueue:
		path, args, err := splitCommand(d.Command, DefaultQmailQueue)
		if err != nil {
			return nil, err
		}
		h = &QmailQueue{Path: path, Args: args, Timeout: timeout, Logger: log, Stderr: opts.ChildStderr}
	case config.DeliverQmailInject:
		path, args, err := splitCommand(d.Command, DefaultQmailInject)
		if err != nil {
			return nil, err
		}
		h = &QmailInject{Path: path, Args: args, Timeout: timeout, Logger: log}
	case config.DeliverSMTP:
		if d.SMTPAddr == "" {
			return nil, errors.New("delivery.smtp_addr is empty")
		}
		s, err := NewSMTP(d.SMTPAddr, hostname, timeout)
		if err != nil {
			return nil, err
		}
		s.Logger = log
		h = s
	case config.DeliverMaildir:
		m, err := NewMaildir(d.Maildir, hostname)
		if err != nil {
			return nil, err
		}
		m.Logger = log
		h = m
	case config.DeliverQmailDirect:
		q := NewQmailDirect(timeout, log)
		if opts.Writers != nil {
			go func() {
				for c := range opts.Writers {
					q.Attach(c)
				}
			}()
		}
		h = q
	default:
		return nil, fmt.Errorf("unknown delivery.method %q (want %s, %s, %s, %s or %s)", d.Method,
			config.DeliverQmailQueue, config.DeliverQmailInject, config.DeliverSMTP, config.DeliverMaildir, config.DeliverQmailDirect)
	}
	if opts.Registerer == nil {
		return h, nil
	}
	hist, err := handoffHistogram(opts.Registerer)
	if err != nil {
		return nil, err
	}
	return &instrumented{next: h, method: d.Method, seconds: hist}, nil
}

// splitCommand splits delivery.command on white space: a program and its
// leading arguments.
func splitCommand(command, def string) (string, []string, error) {
	f := strings.Fields(command)
	if len(f) == 0 {
		return def, nil, nil
	}
	if !strings.HasPrefix(f[0], "/") {
		return "", nil, fmt.Errorf("delivery.command %q: want an absolute path", f[0])
	}
	return f[0], f[1:], nil
}

func handoffHistogram(reg prometheus.Registerer) (*prometheus.HistogramVec, error) {
	hist := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "relay_handoff_seconds",
		Help:    "Time to hand one message on, by delivery method and result (ok, temp, perm).",
		Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
	}, []string{"method", "result"})
	if err := reg.Register(hist); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(*prometheus.HistogramVec); ok {
				return existing, nil
			}
		}
		return nil, err
	}
	return hist, nil
}

// instrumented times every hand-off.
type instrumented struct {
	next    Handoff
	method  string
	seconds *prometheus.HistogramVec
}

func (i *instrumented) Deliver(ctx context.Context, env Envelope, msg io.Reader) (Receipt, error) {
	start := time.Now()
	r, err := i.next.Deliver(ctx, env, msg)
	i.seconds.WithLabelValues(i.method, resultLabel(err)).Observe(time.Since(start).Seconds())
	return r, err
}

// resultLabel classifies a hand-off outcome: ok, perm (a 5xx *Error) or temp.
func resultLabel(err error) string {
	if err == nil {
		return "ok"
	}
	var qe *Error
	if errors.As(err, &qe) && !qe.Temporary() {
		return "perm"
	}
	return "temp"
}

// qmailError builds an Error from a qmail-style text that ends in "(#x.y.z)".
func qmailError(code int, text string) *Error {
	return &Error{Code: code, Enhanced: parseEnhanced(text), Text: text}
}

// parseEnhanced reads the RFC 3463 code qmail writes at the end of a reply
// text, "(#4.3.0)"; {0,0,0} when there is none or it is malformed.
func parseEnhanced(text string) [3]int {
	text = strings.TrimRight(text, " \t\r\n")
	if !strings.HasSuffix(text, ")") {
		return [3]int{}
	}
	i := strings.LastIndex(text, "(#")
	if i < 0 {
		return [3]int{}
	}
	parts := strings.Split(text[i+2:len(text)-1], ".")
	if len(parts) != 3 {
		return [3]int{}
	}
	var code [3]int
	for k, p := range parts {
		if len(p) == 0 || len(p) > 3 {
			return [3]int{}
		}
		n := 0
		for _, c := range []byte(p) {
			if c < '0' || c > '9' {
				return [3]int{}
			}
			n = n*10 + int(c-'0')
		}
		code[k] = n
	}
	// RFC 3463 §2: the class is 2, 4 or 5.
	if c := code[0]; c != 2 && c != 4 && c != 5 {
		return [3]int{}
	}
	return code
}

// readTracker remembers the error of the message reader, so that a failure
// to read the client's data (which must abort the hand-off) is told apart
// from a failure to write to the hand-off target.
type readTracker struct {
	r   io.Reader
	n   int64
	err error
}

func (t *readTracker) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	t.n += int64(n)
	if err != nil && err != io.EOF {
		t.err = err
	}
	return n, err
}

// readError wraps the message reader's error: the caller's errors.Is still
// finds the original.
func readError(err error) error { return fmt.Errorf("reading message: %w", err) }

// boundedBuffer keeps the first max bytes written to it (a child's stderr for
// the log) and discards the rest, so a chatty child cannot grow memory.
type boundedBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *boundedBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if room := t.max - len(t.b); room > 0 {
		t.b = append(t.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (t *boundedBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimSpace(string(t.b))
}

// withTimeout applies the hand-off's own timeout (DefaultTimeout when d <= 0)
// on top of ctx.
// errNoRecipients refuses an envelope without recipients; the SMTP front
// end never hands one off.
var errNoRecipients = errors.New("queue: envelope has no recipients")

// orDiscard is l, or a logger that drops everything when l is nil.
func orDiscard(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

func withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if d <= 0 {
		d = DefaultTimeout
	}
	return context.WithTimeout(ctx, d)
}

// isLoopback reports whether host names the local machine.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
