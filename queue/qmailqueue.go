package queue

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// QmailQueue hands messages to qmail-queue (or anything speaking its
// protocol) exactly as qmail-smtpd does (qmail.c): the message on fd 0, the
// envelope on fd 1 once fd 0 is closed, and the exit code mapped to qmail's
// reply texts (qmail-queue(8); docs/qmail.md §1.5, §2.3).
type QmailQueue struct {
	Path    string        // the program, e.g. /var/qmail/bin/qmail-queue
	Args    []string      // arguments after Path (none for qmail-queue itself)
	Timeout time.Duration // the child is killed after this; <= 0 means DefaultTimeout
	// Dir is the child's working directory. Empty: qmail's home when Path is
	// in /var/qmail/bin (as qmail.c does chdir(auto_qmail)), "/" otherwise.
	Dir    string
	Logger *slog.Logger // nil: discard
	// Stderr is the child's fd 2, as qmail-smtpd passes its own (under
	// tcpserver, the log): a wrapper's complaints reach relay's log
	// however long they are. nil: /dev/null.
	Stderr *os.File
}

// Texts the qmail-queue hand-off answers with itself.
const (
	qqTextExec    = "unable to exec qq (#4.3.0)"
	qqTextTimeout = "qq timeout (#4.3.0)"
	qqTextCrashed = "qq crashed (#4.3.0)"
	qqTextRead    = "qq read error (#4.3.0)"
	qqTextWait    = "qq waitpid surprise (#4.3.0)"
)

// maxErrText bounds what is read of notqmail's fd 6 text.
const maxErrText = 1024

// Deliver runs one qmail-queue. The reply on success is qmail-smtpd's
// "ok <unixtime> qp <pid>".
func (q *QmailQueue) Deliver(ctx context.Context, env Envelope, msg io.Reader) (Receipt, error) {
	if err := checkEnvelope(env); err != nil {
		return Receipt{}, err
	}
	ctx, cancel := withTimeout(ctx, q.Timeout)
	defer cancel()
	h := childHandoff{
		name:            "qmail-queue",
		path:            q.Path,
		args:            q.Args,
		dir:             q.dir(),
		envelope:        AppendEnvelope(make([]byte, 0, envelopeSize(env)), env),
		errText:         true,
		execText:        qqTextExec,
		timeoutText:     qqTextTimeout,
		crashedText:     qqTextCrashed,
		waitText:        qqTextWait,
		writeFailedText: qqTextRead, // qmail.c: exit 0 after our own write failed
		exitError: func(code int, errText string) *Error {
			if code == 82 {
				return qqCustomError(errText)
			}
			return qqExitError(code)
		},
	}
	if q.Stderr != nil {
		h.stderr = q.Stderr
	}
	return h.run(ctx, orDiscard(q.Logger), msg)
}

func (q *QmailQueue) dir() string {
	if q.Dir != "" {
		return q.Dir
	}
	if d := filepath.Dir(q.Path); d == "/var/qmail/bin" {
		return "/var/qmail"
	}
	return "/"
}

// readErrText returns the first maxErrText bytes (trimmed) of notqmail's
// fd 6 text that an exited child left in the pipe r: what it wrote is
// already there, so the reads never wait (a grandchild still holding the
// pipe gets no say).
func readErrText(r *os.File) string {
	if r == nil {
		return ""
	}
	fd := int(r.Fd())
	if err := syscall.SetNonblock(fd, true); err != nil {
		return ""
	}
	buf := make([]byte, maxErrText)
	n := 0
	for n < len(buf) {
		k, err := syscall.Read(fd, buf[n:])
		if err == syscall.EINTR {
			continue
		}
		if k <= 0 || err != nil {
			break
		}
		n += k
	}
	return strings.TrimSpace(string(buf[:n]))
}

// qqCustomError maps notqmail's exit 82: fd 6 carries the reply text, whose
// first byte is D (permanent, 554) or Z (temporary, 451). Text without that
// marker is treated as an unknown temporary problem.
func qqCustomError(text string) *Error {
	text = strings.TrimRight(text, "\x00\r\n")
	if i := strings.IndexAny(text, "\x00\r\n"); i >= 0 {
		text = text[:i] // one line, as the reply can carry only one
	}
	if len(text) < 2 {
		return qmailError(451, "qq temporary problem (#4.3.0)")
	}
	switch text[0] {
	case 'D':
		return qmailError(554, text[1:])
	case 'Z':
		return qmailError(451, text[1:])
	}
	return qmailError(451, "qq temporary problem (#4.3.0)")
}

// qqExitError maps a qmail-queue exit code as qmail.c does: 11–40 are
// permanent (554), everything else temporary (451).
func qqExitError(code int) *Error {
	switch code {
	case 11:
		return qmailError(554, "envelope address too long for qq (#5.1.3)")
	case 31:
		return qmailError(554, "mail server permanently rejected message (#5.3.0)")
	case 51:
		return qmailError(451, "qq out of memory (#4.3.0)")
	case 52:
		return qmailError(451, "qq timeout (#4.3.0)")
	case 53:
		return qmailError(451, "qq write error or disk full (#4.3.0)")
	case 54:
		return qmailError(451, qqTextRead)
	case 55:
		return qmailError(451, "qq unable to read configuration (#4.3.0)")
	case 56:
		return qmailError(451, "qq trouble making network connection (#4.3.0)")
	case 61:
		return qmailError(451, "qq trouble in home directory (#4.3.0)")
	case 62, 63, 64, 65, 66:
		return qmailError(451, "qq trouble creating files in queue (#4.3.0)")
	case 71:
		return qmailError(451, "mail server temporarily rejected message (#4.3.0)")
	case 72:
		return qmailError(451, "connection to mail server timed out (#4.4.1)")
	case 73:
		return qmailError(451, "connection to mail server rejected (#4.4.1)")
	case 74:
		return qmailError(451, "communication with mail server failed (#4.4.2)")
	case 81, 91:
		return qmailError(451, "qq internal bug (#4.3.0)")
	case 120:
		return qmailError(451, qqTextExec)
	}
	if code >= 11 && code <= 40 {
		return qmailError(554, "qq permanent problem (#5.3.0)")
	}
	return qmailError(451, "qq temporary problem (#4.3.0)")
}

// AppendEnvelope appends env in qmail-queue's fd 1 format to dst:
// "F" sender NUL, "T" recipient NUL for each recipient, and a final NUL
// (qmail-queue(8)). Addresses are written as given; qmail-queue itself
// refuses one of 1003 bytes or more (exit 11).
func AppendEnvelope(dst []byte, env Envelope) []byte {
	dst = append(dst, 'F')
	dst = append(dst, env.From...)
	dst = append(dst, 0)
	for _, to := range env.To {
		dst = append(dst, 'T')
		dst = append(dst, to...)
		dst = append(dst, 0)
	}
	return append(dst, 0)
}

// checkEnvelope refuses an envelope without recipients, and an address with
// a NUL byte: in qmail-queue's
// format it would end the record early and could smuggle in a recipient.
// (qmail-smtpd never passes one on; relay's front end should not either.)
func checkEnvelope(env Envelope) error {
	if len(env.To) == 0 {
		return errNoRecipients
	}
	bad := strings.IndexByte(env.From, 0) >= 0
	for _, to := range env.To {
		bad = bad || strings.IndexByte(to, 0) >= 0
	}
	if bad {
		return qmailError(554, "envelope address contains NUL (#5.1.3)")
	}
	return nil
}

func envelopeSize(env Envelope) int {
	n := len(env.From) + 3
	for _, to := range env.To {
		n += len(to) + 2
	}
	return n
}
