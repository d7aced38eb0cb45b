package queue

import (
	"context"
	"io"
	"log/slog"
	"time"
)

// QmailInject hands messages to qmail-inject (qmail-inject(8)) as
// `Path Args... -f <sender> -a -- <rcpt>...`: the envelope from the
// arguments only (-a), never from the header, and "--" so that a recipient
// starting with "-" cannot be taken for an option. The message goes to its
// stdin. Exit 0 is success, 100 permanent, 111 and anything else temporary.
type QmailInject struct {
	Path    string        // e.g. /var/qmail/bin/qmail-inject
	Args    []string      // arguments before -f
	Timeout time.Duration // the child is killed after this; <= 0 means DefaultTimeout
	Logger  *slog.Logger  // stderr of a failed run is logged here, never shown to clients
}

// Texts of qmail-inject failures. qmail-inject's own message is on its
// stderr, which goes to the log only.
const (
	injectTextPerm    = "qmail-inject permanent failure (#5.3.0)"
	injectTextTemp    = "qmail-inject temporary failure (#4.3.0)"
	injectTextExec    = "unable to exec qmail-inject (#4.3.0)"
	injectTextTimeout = "qmail-inject timed out (#4.3.0)"
	injectTextCrashed = "qmail-inject crashed (#4.3.0)"
)

// Deliver runs one qmail-inject.
func (q *QmailInject) Deliver(ctx context.Context, env Envelope, msg io.Reader) (Receipt, error) {
	if err := checkEnvelope(env); err != nil {
		return Receipt{}, err
	}
	ctx, cancel := withTimeout(ctx, q.Timeout)
	defer cancel()
	args := make([]string, 0, len(q.Args)+4+len(env.To))
	args = append(args, q.Args...)
	args = append(args, "-f", env.From, "-a", "--") // "-f" "" for the null sender
	args = append(args, env.To...)
	h := childHandoff{
		name:            "qmail-inject",
		path:            q.Path,
		args:            args,
		dir:             "/",
		stderr:          &boundedBuffer{max: maxErrText},
		execText:        injectTextExec,
		timeoutText:     injectTextTimeout,
		crashedText:     injectTextCrashed,
		waitText:        injectTextTemp,
		writeFailedText: injectTextTemp,
		exitError: func(code int, _ string) *Error {
			if code == 100 {
				return qmailError(554, injectTextPerm)
			}
			return qmailError(451, injectTextTemp) // 111 and anything else
		},
	}
	return h.run(ctx, orDiscard(q.Logger), msg)
}
