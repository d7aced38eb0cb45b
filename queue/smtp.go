package queue

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/textproto"
	"os"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// SMTP forwards messages to another MTA (delivery.smtp_addr). The message,
// stored with LF line ends, is sent with CRLF and dot-stuffed (RFC 5321
// §4.5.2) by go-smtp's DATA writer.
//
// TLS: when TLS is non-nil and the upstream offers STARTTLS, it is used and
// the certificate verified against TLS; a failed handshake fails the
// hand-off (451), never falls back to plain text. NewSMTP sets TLS for every
// upstream except loopback ones, where plain text is used.
//
// Recipients: if the upstream refuses any RCPT, the whole message fails with
// that reply, so the client retries or bounces it as a whole and no
// recipient gets it twice.
type SMTP struct {
	Addr     string        // host:port
	Hostname string        // sent in EHLO
	Timeout  time.Duration // the whole exchange; <= 0 means DefaultTimeout
	TLS      *tls.Config   // nil: never STARTTLS
	Logger   *slog.Logger  // nil: discard
}

// Texts of SMTP forwarding failures that have no upstream reply.
const (
	smtpTextConnect = "connection to mail server failed (#4.4.1)"
	smtpTextComm    = "communication with mail server failed (#4.4.2)"
	smtpTextTimeout = "connection to mail server timed out (#4.4.1)"
	smtpTextTLS     = "TLS with mail server failed (#4.7.0)"
)

// NewSMTP returns an SMTP hand-off to addr (host:port).
func NewSMTP(addr, hostname string, timeout time.Duration) (*SMTP, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	s := &SMTP{Addr: addr, Hostname: hostname, Timeout: timeout}
	if !isLoopback(host) {
		s.TLS = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	return s, nil
}

// Deliver forwards one message. Upstream replies are passed through.
func (s *SMTP) Deliver(ctx context.Context, env Envelope, msg io.Reader) (Receipt, error) {
	if err := checkEnvelope(env); err != nil {
		return Receipt{}, err
	}
	log := orDiscard(s.Logger)
	timeout := s.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", s.Addr)
	if err != nil {
		log.Warn("smtp: connect failed", "addr", s.Addr, "err", err)
		if ctx.Err() != nil {
			return Receipt{}, qmailError(451, smtpTextTimeout)
		}
		return Receipt{}, qmailError(451, smtpTextConnect)
	}
	// Closing the connection is how ctx ends a stalled exchange; go-smtp
	// resets the deadlines it sets per command.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	hostname := s.Hostname
	if hostname == "" || strings.ContainsAny(hostname, "\r\n ") {
		hostname = "localhost"
	}
	if s.TLS != nil {
		conn.SetDeadline(time.Now().Add(timeout))
		tconn, err := s.startTLS(ctx, conn, hostname)
		if err != nil {
			qerr := s.mapError(ctx, "starttls", err)
			log.Warn("smtp: hand-off failed", "addr", s.Addr, "stage", "starttls", "err", err, "reply", qerr.Error())
			return Receipt{}, qerr
		}
		conn.SetDeadline(time.Time{})
		conn = tconn
	}
	c := smtp.NewClient(conn)
	defer c.Close()
	c.CommandTimeout = timeout
	c.SubmissionTimeout = timeout

	fail := func(stage string, err error) (Receipt, error) {
		qerr := s.mapError(ctx, stage, err)
		log.Warn("smtp: hand-off failed", "addr", s.Addr, "stage", stage, "err", err, "reply", qerr.Error())
		return Receipt{}, qerr
	}
	if err := c.Hello(hostname); err != nil {
		return fail("hello", err)
	}
	if err := c.Mail(env.From, nil); err != nil {
		return fail("mail", err)
	}
	for _, to := range env.To {
		if err := c.Rcpt(to, nil); err != nil {
			c.Reset()
			return fail("rcpt", err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fail("data", err)
	}
	src := &readTracker{r: msg}
	if _, err := io.Copy(w, src); err != nil {
		if src.err != nil {
			// Drop the connection without the final dot: the upstream
			// must discard the partial message (RFC 5321 §4.1.1.4).
			conn.Close()
			log.Warn("smtp: message read failed, connection dropped", "addr", s.Addr, "err", src.err)
			return Receipt{}, readError(src.err)
		}
		return fail("data", err)
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return fail("data", err)
	}
	c.Quit()
	reply := strings.TrimSpace(resp.StatusText)
	if reply == "" {
		reply = "ok"
	}
	return Receipt{Reply: reply}, nil
}

// startTLS greets the upstream itself and, when EHLO lists STARTTLS,
// upgrades the connection (RFC 3207). go-smtp's client offers STARTTLS only
// with an EHLO of "localhost" first, so this step is done here and the
// client is handed a connection that replays a greeting; it then sends EHLO
// again, as RFC 3207 §4.2 requires after TLS starts. Without STARTTLS the
// session goes on in plain text: a second EHLO is allowed (RFC 5321 §4.1.4).
func (s *SMTP) startTLS(ctx context.Context, conn net.Conn, hostname string) (net.Conn, error) {
	tp := textproto.NewReader(bufio.NewReader(conn))
	if _, _, err := tp.ReadResponse(220); err != nil {
		return nil, err
	}
	if _, err := fmt.Fprintf(conn, "EHLO %s\r\n", hostname); err != nil {
		return nil, err
	}
	_, ext, err := tp.ReadResponse(250)
	if err != nil {
		var te *textproto.Error
		if errors.As(err, &te) && (te.Code == 500 || te.Code == 502) {
			return &greetedConn{Conn: conn}, nil // no ESMTP, so no STARTTLS either
		}
		return nil, err
	}
	if !hasExtension(ext, "STARTTLS") {
		return &greetedConn{Conn: conn}, nil
	}
	if _, err := io.WriteString(conn, "STARTTLS\r\n"); err != nil {
		return nil, err
	}
	if _, _, err := tp.ReadResponse(220); err != nil {
		return nil, err
	}
	tc := tls.Client(conn, s.TLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return &greetedConn{Conn: tc}, nil
}

// hasExtension reports whether an EHLO reply (lines after the first) lists
// the keyword ext.
func hasExtension(reply, ext string) bool {
	lines := strings.Split(reply, "\n")
	for _, l := range lines[1:] {
		kw, _, _ := strings.Cut(strings.TrimSpace(l), " ")
		if strings.EqualFold(kw, ext) {
			return true
		}
	}
	return false
}

// greetedConn replays a 220 greeting before the connection's own data, for
// a go-smtp client started on a connection that was already greeted.
type greetedConn struct {
	net.Conn
	greeted bool
}

func (g *greetedConn) Read(p []byte) (int, error) {
	if !g.greeted {
		g.greeted = true
		return copy(p, "220 greeted\r\n"), nil
	}
	return g.Conn.Read(p)
}

// mapError turns a failure at stage into the client's reply: an upstream
// reply is passed through, anything else is a temporary failure.
func (s *SMTP) mapError(ctx context.Context, stage string, err error) *Error {
	var te *textproto.Error
	if errors.As(err, &te) {
		code, text := te.Code, te.Msg
		enh := [3]int{}
		if head, rest, ok := strings.Cut(text, " "); ok {
			if e := parseEnhanced("(#" + head + ")"); e != [3]int{} {
				enh, text = e, rest
			}
		}
		err = &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode(enh), Message: text}
	}
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		e := &Error{Code: se.Code, Text: se.Message}
		if se.EnhancedCode != smtp.NoEnhancedCode && se.EnhancedCode != smtp.EnhancedCodeNotSet {
			e.Enhanced = [3]int(se.EnhancedCode)
		}
		if e.Text == "" {
			e.Text = "upstream error"
		}
		if e.Code < 400 || e.Code > 599 {
			// Not a failure reply (e.g. 221 on HELO): still a failure here.
			e.Code, e.Enhanced = 451, [3]int{4, 4, 2}
		}
		return e
	}
	switch {
	case ctx.Err() != nil, errors.Is(err, os.ErrDeadlineExceeded):
		return qmailError(451, smtpTextTimeout)
	case stage == "starttls":
		return qmailError(451, smtpTextTLS)
	case stage == "hello":
		return qmailError(451, smtpTextConnect)
	}
	return qmailError(451, smtpTextComm)
}
