package relay

import (
	"errors"
	"strconv"
	"strings"

	"github.com/emersion/go-smtp"

	"relay/policy"
	"relay/queue"
)

// reply builds the *smtp.SMTPError go-smtp writes as "code x.y.z text".
func reply(code int, enhanced smtp.EnhancedCode, text string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: code, EnhancedCode: enhanced, Message: text}
}

// Replies with qmail-smtpd's texts (docs/qmail.md §1.3) and RFC 3463 codes.
var (
	replyRcptHosts   = reply(553, smtp.EnhancedCode{5, 7, 1}, "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
	replyBadMailFrom = reply(553, smtp.EnhancedCode{5, 7, 1}, "sorry, your envelope sender is in my badmailfrom list (#5.7.1)")
	replyDatabytes   = reply(552, smtp.EnhancedCode{5, 3, 4}, "sorry, that message size exceeds my databytes limit (#5.3.4)")
	replyHops        = reply(554, smtp.EnhancedCode{5, 4, 6}, "too many hops, this message is looping (#5.4.6)")
	// qmail answers a bare LF with this text and drops the connection;
	// relay has read the data to its real end, so it keeps the session.
	replyBareNewline   = reply(451, smtp.EnhancedCode{4, 5, 2}, "See https://cr.yp.to/docs/smtplf.html.")
	replyTooManyRcpts  = reply(452, smtp.EnhancedCode{4, 5, 3}, "too many recipients")
	replyBadSender     = reply(501, smtp.EnhancedCode{5, 1, 7}, "bad sender address syntax (#5.1.7)")
	replyBadRcpt       = reply(501, smtp.EnhancedCode{5, 1, 3}, "bad recipient address syntax (#5.1.3)")
	replyAuthRequired  = reply(530, smtp.EnhancedCode{5, 7, 0}, "authentication required (#5.7.0)")
	replyAuthInMail    = reply(503, smtp.EnhancedCode{5, 5, 1}, "no auth during mail transaction (#5.5.0)")
	replyAuthFailed    = reply(535, smtp.EnhancedCode{5, 7, 8}, "authentication failed (#5.7.1)")
	replyAuthTemporary = reply(454, smtp.EnhancedCode{4, 7, 0}, "temporary authentication failure (#4.3.0)")
	replyAuthLocked    = reply(454, smtp.EnhancedCode{4, 7, 0}, "too many failed authentications, try again later (#4.7.0)")
	// replyAuthMalformed answers an AUTH response relay cannot use (a
	// PLAIN response without exactly three fields, an empty login or
	// password), as qmail's AUTH patch does.
	replyAuthMalformed = reply(501, smtp.EnhancedCode{5, 5, 4}, "malformed auth input (#5.5.4)")
	// replyAuthzid refuses a PLAIN authorization identity other than the
	// login: RFC 4616 §2 lets a server refuse to act as another identity.
	replyAuthzid      = reply(535, smtp.EnhancedCode{5, 7, 8}, "authorization identity must be empty or the login (#5.7.1)")
	replyShuttingDown = reply(421, smtp.EnhancedCode{4, 3, 2}, "service shutting down, try again later (#4.3.2)")
	replyInternal     = reply(451, smtp.EnhancedCode{4, 3, 0}, "temporary local problem, try again later (#4.3.0)")
	// A [[webserver]]'s message whose first Received field is not its
	// qmail-queue's "invoked by uid" line (require_uid).
	replyNoUID = reply(550, smtp.EnhancedCode{5, 7, 1}, "sorry, mail from this web server must come through its qmail, not straight to port 25 (#5.7.1)")
)

// replyFor is the one funnel every error a Session returns to go-smtp goes
// through. go-smtp only recognises an unwrapped *smtp.SMTPError (it type
// asserts) and writes the text of any other error to the client, so this
// returns relay's own replies (unwrapped *smtp.SMTPError values built in
// this package) unchanged, a *queue.Error as the reply it carries (qmail's
// texts), and anything else, wrapped SMTP errors from elsewhere included, as
// a generic 451 4.3.0; the caller logs the original.
func replyFor(err error) *smtp.SMTPError {
	if err == nil {
		return nil
	}
	if se, ok := err.(*smtp.SMTPError); ok {
		return se
	}
	var qe *queue.Error
	if errors.As(err, &qe) {
		return queueReply(qe)
	}
	return replyInternal
}

// queueReply turns a hand-off failure into its SMTP reply, text unchanged.
// When the queue gave no enhanced code, one is taken from a "(#x.y.z)" at
// the end of the text, as qmail writes them.
func queueReply(qe *queue.Error) *smtp.SMTPError {
	code := qe.Code
	if code < 400 || code > 599 {
		return replyInternal
	}
	enh := smtp.EnhancedCode(qe.Enhanced)
	if enh == smtp.EnhancedCodeNotSet {
		enh = enhancedFromText(qe.Text)
	}
	return reply(code, enh, safeHeaderValue(qe.Text))
}

// enhancedFromText finds qmail's "(#4.3.0)" suffix; EnhancedCodeNotSet when
// there is none (go-smtp then writes X.0.0).
func enhancedFromText(text string) smtp.EnhancedCode {
	i := strings.LastIndex(text, "(#")
	if i < 0 || !strings.HasSuffix(text, ")") {
		return smtp.EnhancedCodeNotSet
	}
	parts := strings.Split(text[i+2:len(text)-1], ".")
	if len(parts) != 3 {
		return smtp.EnhancedCodeNotSet
	}
	var enh smtp.EnhancedCode
	for k, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 999 {
			return smtp.EnhancedCodeNotSet
		}
		enh[k] = n
	}
	return enh
}

// decisionReply maps a policy decision that stops a command to its reply
// (docs/design.md §5); nil for Accept and Hold, which go on.
func decisionReply(d policy.Decision) *smtp.SMTPError {
	if d.Err != nil {
		// Policy could not read its counters (it logged why): a temporary
		// local problem, not a cap.
		return replyInternal
	}
	text := safeHeaderValue(d.Text())
	switch d.Action {
	case policy.TooManyRcpts:
		return reply(452, smtp.EnhancedCode{4, 5, 3}, text)
	case policy.Defer:
		return reply(451, smtp.EnhancedCode{4, 7, 1}, text)
	case policy.Reject:
		return reply(550, smtp.EnhancedCode{5, 7, 1}, text)
	}
	return nil
}

// okReply is a 250 with exactly text after the code, no enhanced code, so
// the success line reads as qmail-smtpd's: "250 ok 1795833709 qp 11827".
func okReply(text string) *smtp.SMTPError {
	return reply(250, smtp.NoEnhancedCode, text)
}
