// Package sink is the benchmark's baseline: a bare go-smtp server that
// accepts every message and hands it to a qmail-queue-protocol program the
// way qmail-smtpd does (qmail.c: a Received line and the message with LF
// line ends on fd 0, closed, then the envelope on fd 1), with no policy,
// no relay control and no attribution. relay is measured against it.
package sink

import (
	"bytes"
	"io"
	"net"
	"os"
	"os/exec"
	"time"

	"github.com/emersion/go-smtp"
)

// Config is a sink's setup.
type Config struct {
	Hostname        string
	QmailQueue      string        // the program handed each message (the stand-in)
	Timeout         time.Duration // per read or write, and per hand-off
	MaxMessageBytes int64
}

// NewServer returns a go-smtp server that hands every message to
// cfg.QmailQueue; serve it with Serve(listener).
func NewServer(cfg Config) *smtp.Server {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 60 * time.Second
	}
	if cfg.Hostname == "" {
		cfg.Hostname = "sink.bench.example"
	}
	be := smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return &session{cfg: &cfg, remote: c.Conn().RemoteAddr()}, nil
	})
	s := smtp.NewServer(be)
	s.Domain = cfg.Hostname
	s.ReadTimeout = cfg.Timeout
	s.WriteTimeout = cfg.Timeout
	s.MaxMessageBytes = cfg.MaxMessageBytes
	s.ErrorLog = discardLogger{}
	return s
}

type discardLogger struct{}

func (discardLogger) Printf(string, ...any) {}
func (discardLogger) Println(...any)        {}

type session struct {
	cfg    *Config
	remote net.Addr
	from   string
	to     []string
}

func (s *session) Reset()        { s.from, s.to = "", s.to[:0] }
func (s *session) Logout() error { return nil }

func (s *session) Mail(from string, _ *smtp.MailOptions) error {
	s.from, s.to = from, s.to[:0]
	return nil
}

func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.to = append(s.to, to)
	return nil
}

func (s *session) Data(r io.Reader) error {
	defer s.Reset()
	if err := handOff(s.cfg, s.received(), s.from, s.to, r); err != nil {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "qq temporary problem"}
	}
	return nil
}

// received is the line qmail-smtpd would prepend (received.c), LF-ended.
func (s *session) received() string {
	ip := s.remote.String()
	if h, _, err := net.SplitHostPort(ip); err == nil {
		ip = h
	}
	return "Received: from unknown (" + ip + ")\n  by " + s.cfg.Hostname + " with SMTP; " +
		time.Now().UTC().Format("2 Jan 2006 15:04:05 -0000") + "\n"
}

// handOff runs one qmail-queue: the message on fd 0 until EOF, then the
// envelope on fd 1 (qmail-queue(8)).
func handOff(cfg *Config, received, from string, to []string, msg io.Reader) error {
	msgR, msgW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer msgR.Close()
	defer msgW.Close()
	envR, envW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer envR.Close()
	defer envW.Close()
	cmd := exec.Command(cfg.QmailQueue)
	cmd.Stdin, cmd.Stdout = msgR, envR
	if err := cmd.Start(); err != nil {
		return err
	}
	msgR.Close()
	envR.Close()
	timer := time.AfterFunc(cfg.Timeout, func() { cmd.Process.Kill() })
	defer timer.Stop()

	_, werr := io.WriteString(msgW, received)
	if werr == nil {
		werr = copyLF(msgW, msg)
	}
	if cerr := msgW.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		_, werr = envW.Write(Envelope(from, to))
	}
	if cerr := envW.Close(); werr == nil {
		werr = cerr
	}
	if err := cmd.Wait(); err != nil {
		return err
	}
	if werr != nil {
		return werr
	}
	return nil
}

// Envelope encodes qmail-queue's envelope: F sender NUL, T recipient NUL
// for each recipient, then a final NUL (qmail-queue(8)).
func Envelope(from string, to []string) []byte {
	n := 3 + len(from)
	for _, t := range to {
		n += 2 + len(t)
	}
	b := make([]byte, 0, n)
	b = append(b, 'F')
	b = append(b, from...)
	b = append(b, 0)
	for _, t := range to {
		b = append(b, 'T')
		b = append(b, t...)
		b = append(b, 0)
	}
	return append(b, 0)
}

// copyLF copies the dot-unstuffed DATA stream to w with every CRLF turned
// into LF, the form qmail stores (qmail-smtpd.c blast); a CR not followed by
// LF is kept.
func copyLF(w io.Writer, r io.Reader) error {
	buf := make([]byte, 32<<10)
	carry := 0 // 1 when a CR that ended the last read waits at buf[0]
	for {
		n, rerr := r.Read(buf[carry:])
		data := buf[:carry+n]
		hold := rerr == nil && len(data) > 0 && data[len(data)-1] == '\r'
		if hold {
			data = data[:len(data)-1]
		}
		if out := crlfToLF(data); len(out) > 0 {
			if _, err := w.Write(out); err != nil {
				return err
			}
		}
		carry = 0
		if hold {
			buf[0], carry = '\r', 1
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// crlfToLF rewrites b in place, dropping the CR of every CRLF.
func crlfToLF(b []byte) []byte {
	w, r := 0, 0
	for {
		i := bytes.Index(b[r:], []byte("\r\n"))
		if i < 0 {
			w += copy(b[w:], b[r:])
			return b[:w]
		}
		w += copy(b[w:], b[r:r+i])
		b[w] = '\n'
		w++
		r += i + 2
	}
}
