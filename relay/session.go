package relay

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"relay/config"
	"relay/dkim"
	"relay/policy"
	"relay/queue"
)

// backend makes a session for each connection of one listener.
type backend struct {
	srv  *Server
	mode string
}

// NewSession runs at the client's first HELO/EHLO (go-smtp's choice), and
// again after STARTTLS.
func (b *backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	s := b.srv
	if s.draining.Load() {
		return nil, replyShuttingDown
	}
	info, ok := connInfoOf(c.Conn())
	if !ok {
		s.log.Error("connection without relay's connection info")
		return nil, replyInternal
	}
	st := info.st
	_, isTLS := c.TLSConnectionState()
	ss := &session{
		srv:       s,
		st:        st,
		conn:      c,
		mode:      b.mode,
		cid:       strconv.FormatUint(info.id, 10),
		remote:    info.remote,
		local:     info.local,
		uid:       info.uid,
		helo:      c.Hostname(),
		tls:       isTLS,
		databytes: info.databytes,
		maxRcpts:  st.maxRcpts,
	}
	if info.local {
		ss.account, ss.exempt = st.localAccount(info.uid)
		ss.relayClient = true
	} else {
		if st.relayNetwork(info.remote) {
			ss.relayClient = true
		}
		if info.ruled {
			if v, ok := info.rule.Env["RELAYCLIENT"]; ok {
				ss.relayClient = true
				ss.rcptSuffix = v
			}
		}
		if ws := st.webserverAt(info.remote); ws != nil {
			ss.webserver = ws
			ss.relayClient = true
		}
	}
	ss.log = s.log.With("cid", ss.cid)
	return ss, nil
}

// session is one SMTP session. Connection fields stay for the session;
// transaction fields (tx) are cleared by Reset. go-smtp may call Reset and
// Logout from another goroutine while Data runs (BDAT, Server.Close), so
// every method holds mu.
type session struct {
	mu   sync.Mutex
	srv  *Server
	st   *settings // the configuration the session started with
	conn *smtp.Conn
	log  *slog.Logger

	// connection
	mode        string
	cid         string
	remote      netip.Addr // invalid on the local socket
	local       bool
	uid         uint32 // peer uid on the local socket
	account     string // its name in /etc/passwd
	exempt      bool   // account is in local.exempt_users
	helo        string
	tls         bool
	user        string // AUTH login
	relayClient bool   // may send anywhere, and is counted by policy
	rcptSuffix  string // tcprules RELAYCLIENT value, appended to recipients
	databytes   int64
	maxRcpts    int // relay.max_recipients; 0 = no limit
	webserver   *webserver

	// transaction
	tx      *transaction
	counted bool // counted in Server.busy
}

// transaction is one MAIL ... DATA.
type transaction struct {
	from        string
	rcpts       []string
	rejected    int
	badMailFrom bool
	ids         []policy.Identity
	ptx         policy.Tx // nil when policy is not consulted
	hold        bool
	holdReason  string
	queue       string // hold into this identity's release queue (releaser.go); "" for mail held for an admin
	queueWhy    string // queuedOverLimit, queuedPace or queuedBehind
	start       time.Time
	size        int64
	code        int // last reply code
	qp          int
	result      string       // metrics result; "" until decided
	fromVerdict dkim.Verdict // DKIM signing and From: control (relay/dkim.go)
}

// trusted reports whether mail from this session is counted by policy:
// authenticated, relay clients (relay_networks, tcprules RELAYCLIENT),
// configured web servers and the local socket (docs/design.md §3). Mail from the
// internet to local domains is not.
func (s *session) trusted() bool { return s.relayClient || s.user != "" }

// identities lists what the envelope tells about the sender, strongest
// first (docs/design.md §3).
func (s *session) identities(from string) []policy.Identity {
	var ids []policy.Identity
	if s.user != "" {
		// vchkpw and other checkpassword programs take a login in any
		// letter case: one account must be one identity, or a suspended
		// user:alice could go on as user:Alice.
		ids = append(ids, policy.UserID(strings.ToLower(s.user)))
	}
	if s.local {
		ids = append(ids, policy.LocalUID(s.uid, s.account))
	}
	if s.remote.IsValid() {
		ids = append(ids, policy.IPID(s.remote))
	}
	ids = append(ids, policy.SenderID(from))
	if d, ok := policy.DomainID(from); ok {
		ids = append(ids, d)
	}
	return ids
}

// AuthMechanisms: PLAIN and LOGIN where an Authenticator is configured
// (go-smtp offers them only over TLS unless auth.require_tls = false);
// nothing on the local socket.
func (s *session) AuthMechanisms() []string {
	switch {
	case s.local:
		return nil
	case s.srv.deps.Auth != nil && s.srv.deps.Auth.Enabled():
		return []string{sasl.Plain, sasl.Login}
	}
	return nil
}

// Auth starts an AUTH exchange.
func (s *session) Auth(mech string) (sasl.Server, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tx != nil {
		return nil, replyAuthInMail
	}
	switch {
	case s.local || s.srv.deps.Auth == nil || !s.srv.deps.Auth.Enabled():
		return nil, smtp.ErrAuthUnknownMechanism
	case mech == sasl.Plain:
		return NewPlainServer(s.authenticate), nil
	case mech == sasl.Login:
		return NewLoginServer(s.authenticate), nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

// authenticate checks a login; on success the session may relay and is
// counted as user:<login>.
func (s *session) authenticate(login, password string) error {
	err := s.srv.deps.Auth.Authenticate(s.srv.ctx, login, password, s.remote)
	switch {
	case err == nil:
		s.mu.Lock()
		s.user = login
		s.mu.Unlock()
		s.log.Info("auth", "user", login)
		return nil
	case errors.Is(err, ErrAuthBad):
		s.log.Info("auth failed", "user", login)
		return replyAuthFailed
	case errors.Is(err, ErrAuthLocked):
		reason := authRefusedAddress
		if errors.Is(err, ErrAuthLockedLogin) {
			reason = authRefusedLogin
		}
		s.log.Info("auth locked", "user", login, "reason", reason)
		s.srv.metrics.authRefused.WithLabelValues(reason).Inc()
		return replyAuthLocked
	case errors.Is(err, ErrAuthTemporary):
		s.log.Warn("auth unavailable", "user", login, "err", err)
		return replyAuthTemporary
	}
	s.log.Error("auth error", "user", login, "err", err)
	return replyAuthTemporary
}

// Mail starts a transaction (a second MAIL replaces the first, as in
// qmail-smtpd).
func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.endTx()
	defer s.syncBusy()
	if s.srv.draining.Load() {
		return replyShuttingDown
	}
	if s.mode == config.ModeSubmission && s.user == "" {
		return replyAuthRequired
	}
	if !addressAcceptable(from) {
		return replyBadSender
	}
	if _, ok := policy.NormalAddress(from); !ok {
		return replyBadSender // a domain literal that is not an IP address
	}
	// RFC 1870 §6.1: a declared size over the limit is refused at once.
	if s.databytes > 0 && opts != nil && opts.Size > s.databytes {
		return replyDatabytes
	}
	tx := &transaction{from: from, start: s.srv.now()}
	tx.badMailFrom = from != "" && s.st.badMailFrom(from)
	if s.trusted() {
		tx.ids = s.identities(from)
		if s.srv.deps.Policy != nil && !s.exempt {
			tx.ptx = s.srv.deps.Policy.Begin(tx.ids)
			d := tx.ptx.Check()
			s.observed("mail", d)
			if r := decisionReply(d); r != nil {
				tx.ptx.Abort()
				tx.ptx = nil
				tx.code = r.Code
				tx.result = txDeferred
				if r.Code >= 500 {
					tx.result = txRejected
				}
				s.tx = tx
				s.endTx()
				return r
			}
		}
	}
	s.tx = tx
	return nil
}

// Rcpt checks one recipient: badmailfrom, then relay control (qmail-smtpd's
// order), then max_recipients, then policy.
func (s *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	tx := s.tx
	if tx == nil { // go-smtp does not call Rcpt before a successful Mail
		return replyInternal
	}
	r, result := s.rcpt(tx, to)
	s.srv.metrics.recipients.WithLabelValues(result).Inc()
	if r != nil {
		tx.rejected++
		tx.code = r.Code
		return r
	}
	return nil
}

func (s *session) rcpt(tx *transaction, to string) (*smtp.SMTPError, string) {
	if !addressAcceptable(to) {
		return replyBadRcpt, rcptRejected
	}
	if tx.badMailFrom {
		return replyBadMailFrom, rcptRejected
	}
	if !s.relayClient && s.user == "" && !rcptAllowedFrom(to, s.st.rcptHostAllowed) {
		s.log.Info("relay denied", "remote", s.remote.String(), "rcpt", to)
		return replyRcptHosts, rcptRelayDenied
	}
	if s.maxRcpts > 0 && len(tx.rcpts) >= s.maxRcpts {
		return replyTooManyRcpts, rcptDeferred
	}
	if tx.ptx != nil {
		d := tx.ptx.AddRcpt(to)
		s.observed("rcpt", d)
		if r := decisionReply(d); r != nil {
			return r, resultOf(r.Code)
		}
		tx.holdFor(d)
	}
	tx.rcpts = append(tx.rcpts, to+s.rcptSuffix)
	return nil, rcptAccepted
}

// idStrings lists the ids of identities.
func idStrings(ids []policy.Identity) []string {
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = id.ID
	}
	return out
}

// resultOf names a refused recipient for metrics: 4xx deferred, 5xx
// rejected.
func resultOf(code int) string {
	if code < 500 {
		return rcptDeferred
	}
	return rcptRejected
}

// observed logs what an observe-mode decision would have done.
func (s *session) observed(stage string, d policy.Decision) {
	if d.Observed && d.WouldBe != policy.Accept {
		s.log.Info("policy observed", "stage", stage, "would_be", d.WouldBe.String(), "reason", d.Text())
	}
}

// Data reads the message, attributes it, asks policy, and hands it off (or
// holds it). The reply is 250 only once the hand-off or the hold spool has
// the message.
func (s *session) Data(r io.Reader) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.syncBusy()
	tx := s.tx
	if tx == nil { // go-smtp does not call Data without MAIL and RCPT
		return replyInternal
	}
	// The buffers go back to the pool when Data returns: by then the
	// message is handed off or held, and nothing refers to them.
	bufs, _ := s.srv.storeBufs.Get().(*storeBuffers)
	if bufs == nil {
		bufs = newStoreBuffers()
	}
	defer s.srv.storeBufs.Put(bufs)
	msg := newStoreReader(r, s.databytes, bufs)
	rep := s.data(tx, msg, bufs.head[:0])
	tx.size = msg.Size()
	tx.code = rep.Code
	if tx.result == "" {
		tx.result = txRejected
		if rep.Code < 500 {
			tx.result = txDeferred
		}
	}
	return rep
}

// data does Data's work and returns the final reply. It resolves the
// policy transaction: committed, held or aborted.
func (s *session) data(tx *transaction, msg *storeReader, headBuf []byte) *smtp.SMTPError {
	head, err := readHead(msg, headBuf)
	if err != nil {
		tx.abort()
		return s.storeFailure(msg)
	}
	if r := s.attribute(tx, head); r != nil {
		return r
	}
	if tx.ptx != nil {
		msg.atEOF = func() error { return s.recheck(tx) }
	}
	if r := s.fromControl(tx, head, !msg.inHeader); r != nil {
		return r
	}
	body := io.MultiReader(strings.NewReader(s.traceHeaders(tx)), bytes.NewReader(head), msg)
	if tx.fromVerdict.Action == dkim.Sign {
		// Signed last, over every byte handed off (docs/design.md §11).
		signed, done, r := s.signed(tx, body, func() *smtp.SMTPError {
			if msg.Err() == nil {
				return nil
			}
			return s.storeFailure(msg)
		})
		if r != nil {
			return r
		}
		defer done.Close()
		body = signed
	}
	if tx.hold {
		return s.holdMessage(tx, head, body, func() *smtp.SMTPError {
			if msg.Err() == nil {
				return nil
			}
			return s.storeFailure(msg)
		})
	}
	handoffStart := s.srv.now()
	receipt, err := s.srv.deps.Handoff.Deliver(s.srv.ctx, queue.Envelope{From: tx.from, To: tx.rcpts}, body)
	if msg.Err() != nil {
		tx.abort()
		if err == nil {
			s.log.Error("hand-off reported success on a failed read; not confirming", "qp", receipt.QP)
		}
		return s.storeFailure(msg)
	}
	if err != nil {
		tx.abort()
		tx.result = txFailed
		s.log.Warn("hand-off failed", "err", err)
		return replyFor(err)
	}
	if tx.ptx != nil {
		tx.ptx.Commit()
		tx.ptx = nil
		if receipt.QP > 0 && s.srv.deps.Handoffs != nil {
			s.srv.deps.Handoffs.HandedOff(receipt.QP, tx.from, idStrings(tx.ids), handoffStart)
		}
	}
	tx.qp = receipt.QP
	tx.result = txAccepted
	return okReply(receipt.Reply)
}

// attribute adds what the header tells (header identities, the sample
// for notifications) to the transaction and asks policy about the
// message. A refusal aborts the policy transaction and is returned.
func (s *session) attribute(tx *transaction, head []byte) *smtp.SMTPError {
	extra, refusal := s.headerIdentities(tx.from, head)
	if refusal != nil {
		tx.abort()
		return refusal
	}
	if len(extra) > 0 {
		tx.ids = append(tx.ids, extra...)
		if tx.ptx != nil {
			if r := s.decide(tx, "data", tx.ptx.AddIdentities(extra...)); r != nil {
				return r
			}
		}
	}
	if tx.ptx != nil {
		tx.ptx.SetSample(safeHeaderValue(firstHeader(head, "Message-ID")), safeHeaderValue(firstHeader(head, "Subject")))
		if r := s.decide(tx, "data", tx.ptx.Message()); r != nil {
			return r
		}
		tx.ids = tx.ptx.Identities()
	}
	return nil
}

// decide applies a decision taken at DATA: a refusal aborts the policy
// transaction and is returned; Hold marks the message for the hold spool.
func (s *session) decide(tx *transaction, stage string, d policy.Decision) *smtp.SMTPError {
	s.observed(stage, d)
	if r := decisionReply(d); r != nil {
		tx.abort()
		return r
	}
	tx.holdFor(d)
	return nil
}

// holdMessage puts the message into the hold spool instead of handing it
// off: "250 ok held <id>" once the spool has it on disk ("250 ok queued
// <id>" for a release queue). readFailure is the reply for a message that
// could not be read whole, nil when it was.
func (s *session) holdMessage(tx *transaction, head []byte, body io.Reader, readFailure func() *smtp.SMTPError) *smtp.SMTPError {
	if s.srv.deps.Hold == nil || (tx.queue != "" && s.srv.deps.Queue == nil) {
		tx.abort()
		s.log.Warn("policy says hold or queue but no hold spool or releaser is configured; deferring")
		return reply(451, smtp.EnhancedCode{4, 7, 1}, safeHeaderValue(tx.holdReason))
	}
	meta := queue.HeldMeta{
		Time:    s.srv.now(),
		From:    tx.from,
		To:      tx.rcpts,
		Reason:  tx.holdReason,
		Subject: firstHeader(head, "Subject"),
		Queue:   tx.queue,
		Paced:   tx.queueWhy == queuedPace,
	}
	for _, id := range tx.ids {
		meta.Identities = append(meta.Identities, id.ID)
	}
	meta, err := s.srv.deps.Hold.Put(meta, body)
	if r := readFailure(); r != nil {
		tx.abort()
		return r
	}
	if err != nil {
		tx.abort()
		tx.result = txFailed
		s.log.Error("hold spool", "err", err)
		return replyInternal
	}
	if tx.ptx != nil {
		tx.ptx.Held(meta.ID)
		tx.ptx = nil
	}
	tx.result = txHeld
	if tx.queue != "" {
		return s.queued(tx, meta)
	}
	s.log.Info("held", "id", meta.ID, "reason", tx.holdReason)
	return okReply("ok held " + safeHeaderValue(meta.ID))
}

// storeFailure is the reply for a message that could not be stored.
func (s *session) storeFailure(msg *storeReader) *smtp.SMTPError {
	var refused *policyRefusal
	switch err := msg.Err(); {
	case errors.As(err, &refused):
		return refused.reply
	case errors.Is(err, errBareNewline):
		return replyBareNewline
	case errors.Is(err, errTooBig), errors.Is(err, smtp.ErrDataTooLarge):
		return replyDatabytes
	case errors.Is(err, errTooManyHops):
		return replyHops
	case err != nil:
		s.log.Warn("reading message", "err", err)
	}
	return replyInternal
}

// readHead reads the start of the message, through the end of its header
// or maxHeadBytes, whichever comes first. It returns an error only when
// the message cannot be read or stored (msg.Err tells why).
func readHead(msg *storeReader, head []byte) ([]byte, error) {
	head = head[:0]
	for msg.inHeader && len(head) < maxHeadBytes {
		if len(head) == cap(head) {
			head = append(head, 0)[:len(head)]
		}
		n, err := msg.Read(head[len(head):min(cap(head), maxHeadBytes)])
		head = head[:len(head)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	return head, nil
}

// traceHeaders are the header lines relay prepends: Received, and
// X-Sender-Id with the strongest identity when relay.sender_id_header is on.
func (s *session) traceHeaders(tx *transaction) string {
	h := formatReceived(receivedInfo{
		Helo:     s.helo,
		HasHelo:  s.helo != "",
		Remote:   s.remote.String(),
		UID:      s.uid,
		Local:    s.local,
		User:     s.user,
		TLS:      s.tls,
		By:       s.st.me,
		Received: s.srv.now(),
	})
	if s.st.cfg.Relay.SenderIDHeader && len(tx.ids) > 0 {
		h += "X-Sender-Id: " + safeHeaderValue(tx.ids[0].ID) + "\n"
	}
	return h
}

// Reset ends the transaction (RSET, a new EHLO, or go-smtp after DATA).
func (s *session) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.endTx()
	s.syncBusy()
}

// Logout ends the session: anything not committed is released.
func (s *session) Logout() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.endTx()
	s.syncBusy()
	return nil
}

// abort releases the transaction's policy reservations, if any are open.
func (tx *transaction) abort() {
	if tx.ptx != nil {
		tx.ptx.Abort()
		tx.ptx = nil
	}
}

// endTx closes the current transaction: releases what policy reserved,
// counts it and writes its log line.
func (s *session) endTx() {
	tx := s.tx
	if tx == nil {
		return
	}
	s.tx = nil
	tx.abort()
	if tx.result == "" && tx.rejected > 0 {
		tx.result = txRejected
		if tx.code < 500 {
			tx.result = txDeferred
		}
	}
	if tx.result != "" {
		s.srv.metrics.transactions.WithLabelValues(tx.result).Inc()
	}
	attrs := []any{
		"remote", s.remoteName(), "helo", s.helo, "user", s.user,
		"from", tx.from, "rcpts", len(tx.rcpts), "size", tx.size,
		"code", tx.code, "qp", tx.qp, "ms", s.srv.now().Sub(tx.start).Milliseconds(),
		"result", tx.result,
	}
	if len(tx.ids) > 0 {
		attrs = append(attrs, "id", tx.ids[0].ID)
	}
	if v := tx.fromVerdict; v.Domain != "" {
		attrs = append(attrs, "dkim", dkimLogValue(v))
		s.recordFrom(tx)
	}
	s.log.Info("transaction", attrs...)
}

// remoteName is the client for logs: its IP, or "uid:N" on the local socket.
func (s *session) remoteName() string {
	if s.local {
		return "uid:" + strconv.FormatUint(uint64(s.uid), 10)
	}
	return s.remote.String()
}

// syncBusy keeps Server.busy counting this session while it has a
// transaction open, so Shutdown waits for it.
func (s *session) syncBusy() {
	busy := s.tx != nil
	if busy != s.counted {
		s.counted = busy
		if busy {
			s.srv.busy.add(1)
		} else {
			s.srv.busy.add(-1)
		}
	}
}
