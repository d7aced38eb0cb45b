// Package loadgen is the benchmark harness's SMTP load generator: raw SMTP
// over net.Conn, one connection per message or reused sessions, with or
// without PIPELINING (RFC 2920), spreading messages over many senders,
// domains and web-server uids, and charging the server's CPU per message
// from /proc.
package loadgen

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"relay/bench/proc"
)

// Config is one load run.
type Config struct {
	Addr       string        // server host:port
	Conns      int           // concurrent connections (workers)
	Messages   int           // messages to send in all; 0: until Duration
	Duration   time.Duration // stop starting messages after this; 0: until Messages
	Size       int           // message size in bytes as sent (headers and body, CRLF)
	Rcpts      int           // recipients per message
	Reuse      bool          // reuse sessions; false: one connection per message
	Pipelining bool          // batch MAIL, RCPT and DATA in one write (RFC 2920)
	Senders    int           // distinct envelope senders, used round robin
	Domains    int           // distinct sender domains the senders are spread over
	UIDs       int           // >0: a "(qmail N invoked by uid U)" Received line, U round robin over this many
	RcptDomain string        // recipients' domain
	Helo       string        // EHLO argument
	Timeout    time.Duration // per read or write
	ServerPID  int           // >0: charge this process's CPU (and its children's) to the run
	// ExtraPIDs are more processes of the server (relay's supervised
	// daemon and queue writer): their CPU is charged too, as the server's
	// own.
	ExtraPIDs []int
	// Settle is how long to wait after the last message before reading
	// the server's CPU, so that children that exit with the sessions
	// (qmail-smtpd under tcpserver) are reaped and counted.
	Settle time.Duration
	// Tag, when set, goes into every Message-ID, <n.Tag.loadgen@...>, so
	// that messages of different runs can be told apart once delivered.
	Tag string
}

// withDefaults fills what a zero Config leaves open.
func (c Config) withDefaults() Config {
	if c.Conns <= 0 {
		c.Conns = 1
	}
	if c.Size <= 0 {
		c.Size = 1024
	}
	if c.Rcpts <= 0 {
		c.Rcpts = 1
	}
	if c.Senders <= 0 {
		c.Senders = 1
	}
	if c.Domains <= 0 {
		c.Domains = 1
	}
	if c.RcptDomain == "" {
		c.RcptDomain = "rcpt.bench.example"
	}
	if c.Helo == "" {
		c.Helo = "loadgen.bench.example"
	}
	if c.Timeout <= 0 {
		c.Timeout = 30 * time.Second
	}
	return c
}

// SenderAddr is the envelope sender of sender number k of a run whose
// senders are spread over domains domains; bench/cmd/seed uses it to fill
// the store with the same identities.
func SenderAddr(k, domains int) string {
	return "s" + strconv.Itoa(k) + "@d" + strconv.Itoa(k%domains) + ".bench.example"
}

// FirstUID is the uid of web-server uid number 0 in the generated Received
// lines; uid k is FirstUID+k.
const FirstUID = 10000

// Result is what a run measured.
type Result struct {
	// Summary counts 2xx after DATA as accepted, 4xx at MAIL, RCPT, DATA
	// or after it as deferred, 5xx likewise as rejected, connection or
	// protocol failures as errors. Latency runs from dial to the reply after
	// DATA with one connection per message, from MAIL to that reply in
	// reused sessions.
	Summary
	RcptFailures int `json:"rcpt_failures"` // recipients refused in messages that still went through
	// Server CPU per accepted message in µs (/proc/<pid>/stat), 0 without ServerPID.
	CPUSelfUs      float64 `json:"cpu_self_us"`
	CPUChildrenUs  float64 `json:"cpu_children_us"`  // reaped children: the hand-off
	CPUUs          float64 `json:"cpu_us"`           // the two together
	ServerRSSStart int64   `json:"server_rss_start"` // bytes, before the first message
	ServerRSS      int64   `json:"server_rss"`       // bytes, at the end of the run
	ServerPeakRSS  int64   `json:"server_peak_rss"`  // VmHWM at the end (see proc.ResetPeak)
}

// outcome of one message.
type outcome int

const (
	accepted outcome = iota
	deferred
	rejected
	failed // connection or protocol error
)

// worker state: one goroutine, its latencies and counts.
type worker struct {
	cfg      *Config
	msg      *message
	next     *atomic.Int64 // message counter shared by the workers
	deadline time.Time

	tally
	rcptFail int
}

// Summary is what every run reports: outcomes, rate and latency.
type Summary struct {
	Accepted   int     `json:"accepted"`
	Deferred   int     `json:"deferred"`
	Rejected   int     `json:"rejected"`
	Errors     int     `json:"errors"`
	FirstError string  `json:"first_error,omitempty"`
	Seconds    float64 `json:"seconds"`
	MsgsPerSec float64 `json:"msgs_per_sec"` // accepted messages per second
	P50us      float64 `json:"p50_us"`       // latency of accepted messages
	P99us      float64 `json:"p99_us"`
	MaxUs      float64 `json:"max_us"`
}

// tally is one goroutine's outcomes and latencies.
type tally struct {
	lat      []time.Duration
	counts   [4]int
	firstErr error
}

func (t *tally) record(o outcome, lat time.Duration, err error) {
	t.counts[o]++
	if o == accepted {
		t.lat = append(t.lat, lat)
	}
	if err != nil && t.firstErr == nil {
		t.firstErr = err
	}
}

// summarize adds up the goroutines' tallies over a run of length elapsed.
func summarize(tallies []*tally, elapsed time.Duration) Summary {
	var s Summary
	var lat []time.Duration
	for _, t := range tallies {
		s.Accepted += t.counts[accepted]
		s.Deferred += t.counts[deferred]
		s.Rejected += t.counts[rejected]
		s.Errors += t.counts[failed]
		if t.firstErr != nil && s.FirstError == "" {
			s.FirstError = t.firstErr.Error()
		}
		lat = append(lat, t.lat...)
	}
	s.Seconds = elapsed.Seconds()
	s.MsgsPerSec = float64(s.Accepted) / elapsed.Seconds()
	slices.Sort(lat)
	s.P50us, s.P99us = percentile(lat, 50), percentile(lat, 99)
	if len(lat) > 0 {
		s.MaxUs = us(lat[len(lat)-1])
	}
	return s
}

// Run sends the load and measures it. It returns an error only when the
// run could not be measured at all (e.g. ServerPID unreadable); SMTP
// failures are counted in the Result.
func Run(cfg Config) (Result, error) {
	cfg = cfg.withDefaults()
	if cfg.Messages <= 0 && cfg.Duration <= 0 {
		return Result{}, errors.New("loadgen: need Messages or Duration")
	}
	msg := newMessage(cfg.Size)
	var before proc.CPU
	if cfg.ServerPID > 0 {
		var err error
		if before, err = serverCPU(&cfg); err != nil {
			return Result{}, err
		}
	}
	var rssStart int64
	if cfg.ServerPID > 0 {
		if m, err := proc.ReadMemory(cfg.ServerPID); err == nil {
			rssStart = m.RSS
		}
	}
	var next atomic.Int64
	start := time.Now()
	var deadline time.Time
	if cfg.Duration > 0 {
		deadline = start.Add(cfg.Duration)
	}
	workers := make([]*worker, cfg.Conns)
	var wg sync.WaitGroup
	for i := range workers {
		w := &worker{cfg: &cfg, msg: msg, next: &next, deadline: deadline}
		workers[i] = w
		wg.Go(w.run)
	}
	wg.Wait()
	elapsed := time.Since(start)

	res := Result{ServerRSSStart: rssStart}
	tallies := make([]*tally, len(workers))
	for i, w := range workers {
		tallies[i] = &w.tally
		res.RcptFailures += w.rcptFail
	}
	res.Summary = summarize(tallies, elapsed)
	if cfg.ServerPID > 0 {
		time.Sleep(cfg.Settle)
		after, err := serverCPU(&cfg)
		if err != nil {
			return res, err
		}
		d := after.Sub(before)
		if res.Accepted > 0 {
			n := float64(res.Accepted)
			res.CPUSelfUs = us(d.Self) / n
			res.CPUChildrenUs = us(d.Children) / n
			res.CPUUs = us(d.Total()) / n
		}
		if m, err := proc.ReadMemory(cfg.ServerPID); err == nil {
			res.ServerRSS, res.ServerPeakRSS = m.RSS, m.Peak
		}
	}
	return res, nil
}

// serverCPU is the CPU of ServerPID and ExtraPIDs together.
func serverCPU(cfg *Config) (proc.CPU, error) {
	total, err := proc.ReadCPU(cfg.ServerPID)
	if err != nil {
		return total, err
	}
	for _, pid := range cfg.ExtraPIDs {
		c, err := proc.ReadCPU(pid)
		if err != nil {
			return total, err
		}
		total.Self += c.Self
		total.Children += c.Children
	}
	return total, nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// percentile of sorted latencies, nearest rank.
func percentile(sorted []time.Duration, p int) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := (len(sorted)*p + 99) / 100
	return us(sorted[max(i-1, 0)])
}

// claim takes the next message number, or reports that the run is over.
func (w *worker) claim() (int, bool) {
	if !w.deadline.IsZero() && !time.Now().Before(w.deadline) {
		return 0, false
	}
	n := int(w.next.Add(1) - 1)
	if w.cfg.Messages > 0 && n >= w.cfg.Messages {
		return 0, false
	}
	return n, true
}

// maxConsecutiveFailures stops a worker that cannot reach the server,
// so a dead server ends the run instead of spinning until its deadline.
const maxConsecutiveFailures = 20

func (w *worker) run() {
	failures := 0
	var s *session
	defer func() {
		if s != nil {
			s.quit()
		}
	}()
	for {
		n, ok := w.claim()
		if !ok {
			return
		}
		start := time.Now()
		if s == nil {
			var err error
			if s, err = w.dial(); err != nil {
				w.record(failed, 0, err)
				if failures++; failures >= maxConsecutiveFailures {
					return
				}
				continue
			}
		}
		if w.cfg.Reuse {
			start = time.Now()
		}
		o, rcptFail, err := s.transaction(w.msg, n)
		w.rcptFail += rcptFail
		if err != nil {
			s.close()
			s = nil
		} else if !w.cfg.Reuse {
			err = s.quit()
			s = nil
		}
		if err != nil {
			o = failed
		}
		w.record(o, time.Since(start), err)
		if o == failed {
			if failures++; failures >= maxConsecutiveFailures {
				return
			}
		} else {
			failures = 0
		}
	}
}

// session is one SMTP connection after EHLO.
type session struct {
	cfg  *Config
	conn net.Conn
	r    *bufio.Reader
	w    *bufio.Writer
	pipe bool // pipelining asked for and advertised
}

// sessionBuffer is the size of a session's read and write buffers.
const sessionBuffer = 16 << 10

func (w *worker) dial() (*session, error) {
	conn, err := net.DialTimeout("tcp", w.cfg.Addr, w.cfg.Timeout)
	if err != nil {
		return nil, err
	}
	s := &session{cfg: w.cfg, conn: conn, r: bufio.NewReaderSize(conn, sessionBuffer), w: bufio.NewWriterSize(conn, sessionBuffer)}
	s.deadline()
	if code, _, err := s.reply(); err != nil || code != 220 {
		s.close()
		return nil, replyErr("banner", code, err)
	}
	s.w.WriteString("EHLO " + w.cfg.Helo + "\r\n")
	if err := s.w.Flush(); err != nil {
		s.close()
		return nil, err
	}
	code, lines, err := s.reply()
	if err != nil || code != 250 {
		s.close()
		return nil, replyErr("EHLO", code, err)
	}
	for _, l := range lines {
		if l == "PIPELINING" {
			s.pipe = w.cfg.Pipelining
		}
	}
	return s, nil
}

func replyErr(stage string, code int, err error) error {
	if err != nil {
		return fmt.Errorf("%s: %w", stage, err)
	}
	return fmt.Errorf("%s: unexpected reply %d", stage, code)
}

func (s *session) deadline() { s.conn.SetDeadline(time.Now().Add(s.cfg.Timeout)) }

func (s *session) close() { s.conn.Close() }

// quit ends the session politely. It waits for the server to close first,
// so TIME_WAIT stays on the server's side and the client's ephemeral ports
// are not used up by per-message connections.
func (s *session) quit() error {
	defer s.close()
	s.deadline()
	s.w.WriteString("QUIT\r\n")
	if err := s.w.Flush(); err != nil {
		return err
	}
	if code, _, err := s.reply(); err != nil || code != 221 {
		return replyErr("QUIT", code, err)
	}
	var buf [64]byte
	for {
		if _, err := s.r.Read(buf[:]); err != nil {
			return nil
		}
	}
}

// reply reads one (possibly multi-line) SMTP reply (RFC 5321 §4.2) and
// returns its code and the text of each line.
func (s *session) reply() (int, []string, error) {
	var lines []string
	for {
		line, err := s.r.ReadSlice('\n')
		if err != nil {
			return 0, nil, err
		}
		if len(line) < 5 || line[len(line)-2] != '\r' {
			return 0, nil, fmt.Errorf("malformed reply %q", line)
		}
		code, err := strconv.Atoi(string(line[:3]))
		if err != nil {
			return 0, nil, fmt.Errorf("malformed reply %q", line)
		}
		lines = append(lines, string(line[4:len(line)-2]))
		switch line[3] {
		case ' ':
			return code, lines, nil
		case '-':
		default:
			return 0, nil, fmt.Errorf("malformed reply %q", line)
		}
	}
}

func classify(code int) outcome {
	switch code / 100 {
	case 2, 3:
		return accepted
	case 4:
		return deferred
	}
	return rejected
}

// transaction sends message n: MAIL, RCPTs, DATA and the content. A
// refusal ends it with RSET; err is set only when the session is broken.
func (s *session) transaction(m *message, n int) (o outcome, rcptFail int, err error) {
	cfg := s.cfg
	s.deadline()
	from := SenderAddr(n%cfg.Senders, cfg.Domains)
	s.w.WriteString("MAIL FROM:<" + from + ">\r\n")
	if !s.pipe {
		if code, err := s.flushReply(); err != nil || code != 250 {
			return s.refused(code, err)
		}
	}
	for i := range cfg.Rcpts {
		s.w.WriteString("RCPT TO:<" + rcptAddr(n, i, cfg.RcptDomain) + ">\r\n")
		if !s.pipe {
			code, err := s.flushReply()
			if err != nil {
				return failed, rcptFail, err
			}
			if code/100 != 2 {
				rcptFail++
			}
		}
	}
	if !s.pipe && rcptFail == cfg.Rcpts {
		o, _, err := s.refused(450, nil)
		return o, 0, err
	}
	s.w.WriteString("DATA\r\n")
	if err := s.w.Flush(); err != nil {
		return failed, rcptFail, err
	}
	firstRefusal := 0
	if s.pipe {
		// RFC 2920 §3.1: one reply per command, in order.
		for i := 0; i < 1+cfg.Rcpts; i++ {
			code, _, err := s.reply()
			if err != nil {
				return failed, rcptFail, err
			}
			if code/100 != 2 {
				if i > 0 {
					rcptFail++
				}
				if firstRefusal == 0 {
					firstRefusal = code
				}
			}
		}
	}
	code, _, err := s.reply()
	if err != nil {
		return failed, rcptFail, err
	}
	if code != 354 {
		if firstRefusal != 0 {
			code = firstRefusal
		}
		o, _, err := s.refused(code, nil)
		return o, rcptFail, err
	}
	if err := m.write(s.w, n, from, cfg); err != nil {
		return failed, rcptFail, err
	}
	code, _, err = s.reply()
	if err != nil {
		return failed, rcptFail, err
	}
	return classify(code), rcptFail, nil
}

func (s *session) flushReply() (int, error) {
	if err := s.w.Flush(); err != nil {
		return 0, err
	}
	code, _, err := s.reply()
	return code, err
}

// refused ends a transaction the server turned down with RSET.
func (s *session) refused(code int, err error) (outcome, int, error) {
	if err != nil {
		return failed, 0, err
	}
	o := classify(code)
	if o == accepted { // an unexpected 2xx/3xx where a refusal was expected
		return failed, 0, fmt.Errorf("unexpected reply %d", code)
	}
	s.w.WriteString("RSET\r\n")
	if c, err := s.flushReply(); err != nil || c != 250 {
		return failed, 0, replyErr("RSET", c, err)
	}
	return o, 0, nil
}

func rcptAddr(n, i int, domain string) string {
	return "r" + strconv.Itoa(n) + "." + strconv.Itoa(i) + "@" + domain
}
