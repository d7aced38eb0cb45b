package relay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"relay/config"
	"relay/dkim"
)

// The daemon's side of `relay qq`'s local check (docs/local-check.md): a
// message about to go to the real qmail-queue is checked as an SMTP
// transaction on the local socket would be, by the same session code
// (MAIL, RCPT and the header's attribution), and then, instead of being
// handed off, reserved until relay qq commits it, held, or refused.

// checkCommitWait bounds how long a reservation waits for its commit;
// relay.timeout when that is shorter. relay qq commits within
// milliseconds; one that stops in between holds its caps no longer.
const checkCommitWait = time.Minute

// checkSniffer is a local-socket connection as go-smtp reads it. go-smtp
// writes its greeting and then reads; the first byte the client sends
// tells what it speaks. A NUL opens a check request, which is answered
// right there, inside that Read, after which go-smtp sees the end of the
// connection and closes it; anything else is SMTP and passes untouched.
type checkSniffer struct {
	*trackedConn
	srv     *Server
	decided bool
}

func (c *checkSniffer) Read(p []byte) (int, error) {
	n, err := c.trackedConn.Read(p)
	if c.decided || n == 0 {
		return n, err
	}
	c.decided = true
	if p[0] != checkMagic[0] {
		return n, err
	}
	c.srv.serveCheck(c.trackedConn, bytes.Clone(p[:n]))
	return 0, io.EOF
}

// check is one check conversation.
type check struct {
	ss       *session // the local origin, running the transaction
	conn     net.Conn
	r        *bufio.Reader
	timeout  time.Duration
	answered bool   // the magic has been written
	verdict  string // for the log line
}

// serveCheck answers one check request on conn, whose first bytes the
// sniffer has already read. A request that breaks the protocol ends the
// connection without a verdict (relay qq then defers).
func (s *Server) serveCheck(conn *trackedConn, first []byte) {
	st := conn.info.st // the settings the connection was accepted under
	ss := &session{
		srv:         s,
		st:          st,
		mode:        config.ModeLocal,
		cid:         strconv.FormatUint(conn.info.id, 10),
		local:       true,
		uid:         conn.info.uid,
		relayClient: true,
	}
	ss.account, ss.exempt = st.localAccount(conn.info.uid)
	ss.log = s.log.With("cid", ss.cid)
	c := &check{
		ss:      ss,
		conn:    conn,
		r:       bufio.NewReader(io.MultiReader(bytes.NewReader(first), conn)),
		timeout: st.timeout,
	}
	defer ss.Logout()
	c.conn.SetReadDeadline(time.Now().Add(c.timeout))
	req, err := readCheckRequest(c.r)
	if err != nil {
		ss.log.Info("check: no valid request", "uid", ss.uid, "err", err)
		return
	}
	switch typ, rep := c.decide(req); typ {
	case frameAccepted:
		c.reserve("")
	case frameSign:
		c.sign(req)
	case frameHold:
		c.hold(req)
	case frameExempt:
		c.verdict = "exempt"
		c.write(frameExempt, "")
	default:
		c.refuse(typ, rep)
	}
	ss.log.Info("check", "uid", ss.uid, "from", req.from, "rcpts", len(req.rcpts), "size", req.size, "verdict", c.verdict)
}

// decide runs the request through the session: MAIL, each RCPT (the first
// refusal ends it), the header's attribution. It returns the verdict's
// frame type, and for D and R the reply.
func (c *check) decide(req *checkRequest) (byte, *smtp.SMTPError) {
	ss := c.ss
	if err := ss.Mail(req.from, nil); err != nil {
		return refusal(err)
	}
	for _, to := range req.rcpts {
		if err := ss.Rcpt(to, nil); err != nil {
			return refusal(err)
		}
	}
	tx := ss.tx
	tx.size = req.size
	if r := ss.attribute(tx, req.head); r != nil {
		tx.code, tx.result = r.Code, txDeferred
		if r.Code >= 500 {
			tx.result = txRejected
		}
		return refusal(r)
	}
	if tx.ptx == nil {
		// Exempt, or no policy: nothing is counted, relay qq runs the
		// real qmail-queue.
		tx.result = txAccepted
		return frameExempt, nil
	}
	// From: control and signing as for SMTP (relay/dkim.go).
	if r := ss.fromControl(tx, req.head, headComplete(req.head)); r != nil {
		tx.code, tx.result = r.Code, txRejected
		return refusal(r)
	}
	switch {
	case tx.hold:
		return frameHold, nil // signed too, when it is to be, as over SMTP
	case tx.fromVerdict.Action == dkim.Sign:
		return frameSign, nil
	}
	return frameAccepted, nil
}

// refusal is the verdict for a refused step: D for 4xx, R for 5xx.
func refusal(err error) (byte, *smtp.SMTPError) {
	r := replyFor(err)
	if r.Code >= 500 {
		return frameReject, r
	}
	return frameDefer, r
}

// refuse answers D or R with the reply relay would give over SMTP.
func (c *check) refuse(typ byte, rep *smtp.SMTPError) {
	text := replyText(rep)
	if len(text) > maxCheckReplyLen {
		text = text[:maxCheckReplyLen]
	}
	c.verdict = text
	if c.ss.tx != nil {
		c.ss.tx.code = rep.Code
	}
	c.write(typ, text)
}

// sign answers G, reads the message relay qq sends (which must start with
// the header it was judged by), signs it, and answers A with the
// DKIM-Signature fields for relay qq to put on top of the message it hands
// to the real qmail-queue; then it waits for the commit as reserve does.
// When signing fails, A carries nothing and the message goes unsigned, as
// over SMTP.
func (c *check) sign(req *checkRequest) {
	tx := c.ss.tx
	tx.result = txFailed // until the commit comes
	c.verdict = "to sign, message not received"
	if !c.write(frameSign, "") {
		return
	}
	fields, err := c.ss.signatures(tx, c.message(req))
	if err != nil {
		// The client broke off or broke the protocol: no answer.
		c.verdict += ": " + err.Error()
		return
	}
	if len(fields) > maxSignatureFields {
		c.ss.signingFailed(tx, "DKIM-Signature fields too long for relay qq; it hands off unsigned",
			fmt.Errorf("%d bytes, at most %d", len(fields), maxSignatureFields))
		fields = ""
	}
	c.reserve(fields)
}

// message reads the message that follows G or Q as M frames and an E:
// exactly the size the request announced, starting with its header.
func (c *check) message(req *checkRequest) *checkMessageReader {
	return &checkMessageReader{
		r:      c.r,
		size:   req.size,
		head:   req.head,
		before: func() { c.conn.SetReadDeadline(time.Now().Add(c.timeout)) },
	}
}

// reserve answers A, with the DKIM-Signature fields when the message was
// signed, and waits for the commit: C charges the reservation; anything
// else, or nothing in time, releases it (Logout).
func (c *check) reserve(fields string) {
	tx := c.ss.tx
	tx.result = txFailed // until the commit comes
	c.verdict = "reserved, no commit"
	if !c.write(frameAccepted, fields) {
		return
	}
	c.conn.SetReadDeadline(time.Now().Add(min(c.timeout, checkCommitWait)))
	qp, err := readCommit(c.r)
	if err != nil {
		c.verdict += ": " + err.Error()
		return
	}
	// A reservation that lapsed meanwhile (policy.reserve_timeout) is
	// checked again, as at the end of an SMTP DATA.
	var refused *policyRefusal
	if err := c.ss.recheck(tx); errors.As(err, &refused) {
		tx.abort()
		tx.result = txDeferred
		if refused.reply.Code >= 500 {
			tx.result = txRejected
		}
		c.refuse(refusal(refused.reply))
		return
	}
	tx.ptx.Commit()
	tx.ptx = nil
	if qp > 0 && c.ss.srv.deps.Handoffs != nil {
		// relay qq execs qmail-queue in its own process: its pid is the
		// message's qp in qmail-send's log.
		c.ss.srv.deps.Handoffs.HandedOff(qp, tx.from, idStrings(tx.ids), c.ss.srv.now())
	}
	tx.qp = qp
	tx.result, tx.code = txAccepted, 250
	c.verdict = "committed"
	c.write(frameOK, "committed")
}

// hold answers Q, reads the message and puts it in the hold spool as Data
// would: K "held <id>" once the spool has it on disk.
func (c *check) hold(req *checkRequest) {
	ss, tx := c.ss, c.ss.tx
	if ss.srv.deps.Hold == nil {
		// Nowhere to hold it: holdMessage's deferral, before any message.
		c.refuse(refusal(ss.holdMessage(tx, req.head, nil, nil)))
		return
	}
	c.verdict = "hold, message not received"
	if !c.write(frameHold, "") {
		return
	}
	msg := c.message(req)
	readFailure := func() *smtp.SMTPError {
		if msg.err == nil || msg.err == io.EOF { // read whole, or the spool stopped reading
			return nil
		}
		return replyInternal
	}
	var body io.Reader = io.MultiReader(strings.NewReader(ss.traceHeaders(tx)), msg)
	var rep *smtp.SMTPError
	if tx.fromVerdict.Action == dkim.Sign {
		// Held signed, as over SMTP: the releaser hands it off as it is.
		signed, done, r := ss.signed(tx, body, readFailure)
		if r == nil {
			defer done.Close()
			body = signed
		}
		rep = r
	}
	if rep == nil {
		rep = ss.holdMessage(tx, req.head, body, readFailure)
	}
	tx.code = rep.Code
	switch {
	case msg.err != nil && msg.err != io.EOF:
		// The client broke off or broke the protocol: no answer.
		tx.result = txFailed
		c.verdict += ": " + msg.err.Error()
	case rep.Code == 250:
		c.verdict = rep.Message
		c.write(frameOK, strings.TrimPrefix(rep.Message, "ok "))
	default:
		c.refuse(refusal(rep))
	}
}

// write writes one frame, after the magic when it is the first. It
// reports whether the write went through.
func (c *check) write(typ byte, text string) bool {
	var b []byte
	if !c.answered {
		b = append(b, checkMagic...)
		c.answered = true
	}
	b = appendFrame(b, typ, text)
	c.conn.SetWriteDeadline(time.Now().Add(c.timeout))
	if _, err := c.conn.Write(b); err != nil {
		c.verdict += "; answer not written: " + err.Error()
		return false
	}
	return true
}

// replyText is an SMTP reply as relay qq reports it: "451 4.7.1 text".
func replyText(r *smtp.SMTPError) string {
	e := r.EnhancedCode
	if e == smtp.NoEnhancedCode || e == smtp.EnhancedCodeNotSet {
		return fmt.Sprintf("%d %s", r.Code, r.Message)
	}
	return fmt.Sprintf("%d %d.%d.%d %s", r.Code, e[0], e[1], e[2], r.Message)
}
