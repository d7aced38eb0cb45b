package queue

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"syscall"
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
	log := orDiscard(q.Logger)
	ctx, cancel := withTimeout(ctx, q.Timeout)
	defer cancel()

	args := make([]string, 0, len(q.Args)+4+len(env.To))
	args = append(args, q.Args...)
	args = append(args, "-f", env.From, "-a", "--") // "-f" "" for the null sender
	args = append(args, env.To...)

	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		log.Error("qmail-inject: pipe", "err", err)
		return Receipt{}, qmailError(451, injectTextExec)
	}
	defer stdinW.Close()
	stderr := &boundedBuffer{max: maxErrText}
	cmd := exec.CommandContext(ctx, q.Path, args...)
	cmd.Dir = "/"
	cmd.Stdin = stdinR
	cmd.Stderr = stderr
	cmd.WaitDelay = time.Second
	err = cmd.Start()
	stdinR.Close()
	if err != nil {
		if ctx.Err() != nil {
			return Receipt{}, qmailError(451, injectTextTimeout)
		}
		log.Error("qmail-inject: cannot start", "path", q.Path, "err", err)
		return Receipt{}, qmailError(451, injectTextExec)
	}
	pid := cmd.Process.Pid

	src := &readTracker{r: msg}
	_, writeErr := io.Copy(stdinW, src)
	if src.err != nil {
		// qmail-inject hands on only what it read up to EOF; killed
		// before EOF, its qmail-queue never sees an envelope.
		cmd.Process.Kill()
		stdinW.Close()
		werr := cmd.Wait()
		log.Warn("qmail-inject: message read failed, child killed", "pid", pid, "err", src.err, "child", fmt.Sprint(werr))
		return Receipt{}, readError(src.err)
	}
	if err := stdinW.Close(); err != nil && writeErr == nil {
		writeErr = err
	}
	waitErr := cmd.Wait()
	state := cmd.ProcessState
	if state == nil {
		log.Error("qmail-inject: wait failed", "pid", pid, "err", waitErr)
		return Receipt{}, qmailError(451, injectTextTemp)
	}
	if state.Success() && writeErr == nil {
		return Receipt{QP: pid, Reply: fmt.Sprintf("ok %d qp %d", time.Now().Unix(), pid)}, nil
	}
	var qerr *Error
	ws, _ := state.Sys().(syscall.WaitStatus)
	switch {
	case state.Success(): // it stopped reading yet claims success: do not trust it
		qerr = qmailError(451, injectTextTemp)
	case ctx.Err() != nil:
		qerr = qmailError(451, injectTextTimeout)
	case ws.Signaled():
		qerr = qmailError(451, injectTextCrashed)
	case state.ExitCode() == 100:
		qerr = qmailError(554, injectTextPerm)
	default: // 111 and anything else
		qerr = qmailError(451, injectTextTemp)
	}
	log.Warn("qmail-inject failed", "pid", pid, "status", state.String(), "reply", qerr.Error(),
		"stderr", stderr.String(), "write_err", fmt.Sprint(writeErr))
	return Receipt{}, qerr
}
