// Package queue owns where accepted mail goes: the hand-off to qmail-queue,
// qmail-inject, another MTA over SMTP or a Maildir; the hold (quarantine)
// spool; and reading qmail's own queue for inspection.
package queue

import (
	"context"
	"fmt"
	"io"
)

// Envelope is a message's sender and recipients.
type Envelope struct {
	From string   // "" for the null sender
	To   []string // at least one
}

// Receipt is what a successful hand-off reports.
type Receipt struct {
	QP    int    // pid of qmail-queue / qmail-inject (0 for smtp and maildir)
	Reply string // text after "250 " to give the client, e.g. "ok 1795833709 qp 11827"
}

// Error is a failed hand-off in SMTP terms.
type Error struct {
	Code     int    // 451, 554, 552 ...
	Enhanced [3]int // RFC 3463 code, {0,0,0} when none
	Text     string // the client-facing text, qmail's where qmail has one
}

func (e *Error) Error() string { return fmt.Sprintf("%d %s", e.Code, e.Text) }

// Temporary reports whether the sender should retry (4xx).
func (e *Error) Temporary() bool { return e.Code < 500 }

// Handoff hands one accepted message on. msg is in qmail's stored form: LF
// line ends, dot-unstuffed, Received header already prepended. If reading msg
// fails, nothing may be queued and the reader's error is returned wrapped.
// Any error that is not an *Error is temporary. Deliver is done with msg
// when it returns (the SMTP server reuses its buffers).
type Handoff interface {
	Deliver(ctx context.Context, env Envelope, msg io.Reader) (Receipt, error)
}
