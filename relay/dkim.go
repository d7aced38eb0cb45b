package relay

import (
	"errors"
	"io"
	"strings"

	"github.com/emersion/go-smtp"

	"relay/dkim"
)

// fromControl decides, once policy has let a message through, whether it
// is signed, handed off unsigned, held or refused for its From: header
// (docs/design.md §11), and keeps the verdict in tx.fromVerdict. A refusal
// is returned (550 5.7.1, the policy reservation released); a hold marks
// tx for the hold spool. Only mail from trusted origins is looked at: mail
// from the internet to our domains is never signed nor judged here, and
// neither is mail of the exempt local users (qmail's own bounces and
// forwards) or mail policy does not count. head is the start of the
// message; complete says the whole header is in it. The SMTP path and relay
// qq's check both decide here: over SMTP the daemon signs what it hands
// off (signed), for relay qq it signs the message relay qq sends and
// answers the fields for relay qq to put on top (signatures).
func (s *session) fromControl(tx *transaction, head []byte, complete bool) *smtp.SMTPError {
	if !s.trusted() || s.exempt {
		return nil
	}
	var from []string
	headerFields(head, func(name, value string) bool {
		if strings.EqualFold(name, "From") {
			from = append(from, value)
		}
		return true
	})
	ids := make([]string, len(tx.ids))
	for i, id := range tx.ids {
		ids[i] = id.ID
	}
	v := s.st.dkim.Decide(s.srv.ctx, dkim.Message{From: from, IDs: ids, HeaderComplete: complete, Ours: s.st.rcptHostAllowed},
		s.srv.dmarc.Policy)
	if v.Action == dkim.Hold || v.Action == dkim.Reject || v.Reason != "" {
		s.log.Info("From: control", "action", actionName(v.Action), "domain", v.Domain, "reason", v.Reason)
	}
	tx.fromVerdict = v
	switch v.Action {
	case dkim.Reject:
		tx.abort()
		return reply(550, smtp.EnhancedCode{5, 7, 1}, safeHeaderValue(v.Text)+" (#5.7.1)")
	case dkim.Hold:
		tx.hold, tx.holdReason = true, v.Text
	}
	return nil
}

func actionName(a dkim.Action) string {
	switch a {
	case dkim.Sign:
		return "sign"
	case dkim.Hold:
		return "hold"
	case dkim.Reject:
		return "reject"
	}
	return "unsigned"
}

// dkimLogValue is the transaction log line's dkim= value:
// "sign:example.com", "unsigned:example.com:unowned_from".
func dkimLogValue(v dkim.Verdict) string {
	out := actionName(v.Action) + ":" + v.Domain
	if v.Reason != "" {
		out += ":" + v.Reason
	}
	return out
}

// signed reads the rest of the message through a dkim.Signing and returns
// it to hand off with the signatures on top, and the Signing to Close once
// the hand-off is done. When signing fails the message goes on unsigned
// (signingFailed). A message that cannot be stored is a reply: body's own
// failure as readFailure says, or our spool file's.
func (s *session) signed(tx *transaction, body io.Reader, readFailure func() *smtp.SMTPError) (io.Reader, io.Closer, *smtp.SMTPError) {
	g, err := s.st.dkim.NewSigning(tx.fromVerdict.Keys, s.st.cfg.DataDir, 0)
	if err != nil {
		s.signingFailed(tx, "DKIM signing cannot start; handing off unsigned", err)
		return body, io.NopCloser(nil), nil
	}
	if _, err := g.ReadFrom(body); err != nil {
		g.Close()
		tx.abort()
		if r := readFailure(); r != nil {
			return nil, nil, r
		}
		s.log.Error("DKIM spool", "err", err)
		return nil, nil, replyInternal
	}
	out, signErr, err := g.Finish()
	if err != nil {
		g.Close()
		tx.abort()
		s.log.Error("DKIM spool", "err", err)
		return nil, nil, replyInternal
	}
	if signErr != nil {
		s.signingFailed(tx, "DKIM signing failed; handing off unsigned", signErr)
	}
	return out, g, nil
}

// signatures signs a message someone else hands off (relay qq's check:
// relay qq puts the fields on top of its own bytes and gives them to the
// real qmail-queue, which adds only its Received line, a field DKIM does
// not sign, above them). It reads msg to its end and returns the
// DKIM-Signature fields, LF line ends, or "" when signing failed
// (signingFailed: the message goes unsigned, as over SMTP). Nothing of the
// message is kept. err is msg's read error.
func (s *session) signatures(tx *transaction, msg io.Reader) (fields string, err error) {
	g, err := s.st.dkim.NewDetachedSigning(tx.fromVerdict.Keys, 0)
	if err != nil {
		s.signingFailed(tx, "DKIM signing cannot start; relay qq hands off unsigned", err)
		_, err = io.Copy(io.Discard, msg)
		return "", err
	}
	defer g.Close()
	if _, err := g.ReadFrom(msg); err != nil {
		return "", err
	}
	fields, signErr := g.Fields()
	if signErr != nil {
		s.signingFailed(tx, "DKIM signing failed; relay qq hands off unsigned", signErr)
		return "", nil
	}
	return fields, nil
}

// signingFailed logs why a message to be signed goes unsigned, and
// counts it so: dkim.ReasonBareCR for a message with a CR in it (its
// sender can fix that), dkim.ReasonError for anything else.
func (s *session) signingFailed(tx *transaction, what string, err error) {
	reason := dkim.ReasonError
	if errors.Is(err, dkim.ErrBareCR) {
		reason = dkim.ReasonBareCR
		s.log.Info("DKIM: not signed", "domain", tx.fromVerdict.Domain, "reason", reason, "why", err)
	} else {
		s.log.Warn(what, "err", err)
	}
	tx.fromVerdict = dkim.Verdict{Action: dkim.Unsigned, Domain: tx.fromVerdict.Domain, Reason: reason}
}

// recordFrom counts what became of the message in the DKIM tally, once
// its final reply is known.
func (s *session) recordFrom(tx *transaction) {
	v := tx.fromVerdict
	var outcome string
	switch {
	case v.Domain == "":
		return
	case tx.result == txRejected && v.Action == dkim.Reject:
		outcome = dkim.OutcomeRefused
	case tx.result == txHeld && v.Action == dkim.Hold:
		outcome = dkim.OutcomeHeld
	case tx.result != txAccepted && tx.result != txHeld:
		return
	case v.Action == dkim.Sign:
		outcome = dkim.OutcomeSigned
	default:
		outcome = dkim.OutcomeUnsigned
	}
	s.srv.dkimStats.Record(v.Domain, outcome, v.Reason)
}

// DKIMReport is what DKIM signing and From: control did since the start,
// with the keys of the running configuration (the admin page, /api/dkim).
func (s *Server) DKIMReport() dkim.Report {
	return s.dkimStats.Report(s.settings.Load().dkim, s.dmarc)
}
