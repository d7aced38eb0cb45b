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

// childHandoff is one run of a program that takes the message on its fd 0
// (qmail-queue, qmail-inject): the one implementation of starting it,
// feeding it, killing it at the deadline and reading how it ended. What
// an exit code means is the program's own (exitError).
type childHandoff struct {
	name   string // for logs: "qmail-queue", "qmail-inject"
	path   string
	args   []string
	dir    string
	stderr io.Writer // the child's fd 2; nil: /dev/null
	// envelope, when not nil, is written to the child's fd 1 once fd 0 is
	// closed (qmail-queue's protocol).
	envelope []byte
	// errText: fd 6 carries notqmail's error text, passed to exitError.
	errText bool

	execText    string // 451 when the program cannot be started
	timeoutText string // 451 when it was killed at the deadline
	crashedText string // 451 when a signal ended it
	waitText    string // 451 when waiting for it failed
	// writeFailedText is the 451 for a child that exited 0 after one of our
	// writes failed: it cannot have had the whole message.
	writeFailedText string
	// exitError maps a non-zero exit code (and fd 6's text) to the reply.
	exitError func(code int, errText string) *Error
}

// childPipes are the pipes between relay and the child; nil when unused.
type childPipes struct {
	msgR, msgW *os.File // fd 0
	envR, envW *os.File // fd 1
	errR, errW *os.File // fd 6
}

// run starts the child, writes msg and the envelope, waits, and returns
// qmail-smtpd's "ok <unixtime> qp <pid>" or an *Error with the reply (a
// failed read of msg is returned as readError, after the child was killed:
// it never saw the end of the message, nor an envelope).
//
// Every pipe is an *os.File, so os/exec starts no copying goroutine for
// them, and the timeout is a callback rather than a goroutine watching ctx:
// a message costs no goroutine beyond the session's own. The writes get
// the same deadline, because killing the child does not end them when
// something it started still holds the pipes (a wrapper's stuck filter).
func (h *childHandoff) run(ctx context.Context, log *slog.Logger, msg io.Reader) (Receipt, error) {
	var p childPipes
	defer p.closeAll()
	if err := p.open(h.envelope != nil, h.errText); err != nil {
		log.Error(h.name+": pipe", "err", err)
		return Receipt{}, qmailError(451, h.execText)
	}
	cmd := exec.Command(h.path, h.args...)
	cmd.Dir = h.dir
	// A stderr that is not an *os.File is copied by a goroutine of
	// os/exec: once the child exited, a grandchild still holding it does
	// not hold Wait for more than this.
	cmd.WaitDelay = time.Second
	cmd.Stdin = p.msgR // fd 0: the message
	if p.envR != nil {
		cmd.Stdout = p.envR // fd 1: the envelope (read by the child)
	}
	if h.stderr != nil {
		cmd.Stderr = h.stderr // fd 2
	}
	if p.errW != nil {
		cmd.ExtraFiles = []*os.File{nil, nil, nil, p.errW} // fd 6: notqmail's error text; 3–5 closed
	}
	if ctx.Err() != nil {
		return Receipt{}, qmailError(451, h.timeoutText)
	}
	err := cmd.Start()
	p.closeChildEnds()
	if err != nil {
		log.Error(h.name+": cannot start", "path", h.path, "err", err)
		return Receipt{}, qmailError(451, h.execText)
	}
	msgW, envW := p.msgW, p.envW
	if d, ok := ctx.Deadline(); ok {
		msgW.SetWriteDeadline(d)
		if envW != nil {
			envW.SetWriteDeadline(d)
		}
	}
	stopKill := context.AfterFunc(ctx, func() {
		cmd.Process.Kill()
		msgW.SetWriteDeadline(time.Now())
		if envW != nil {
			envW.SetWriteDeadline(time.Now())
		}
	})
	defer stopKill()
	pid := cmd.Process.Pid

	src := &readTracker{r: msg}
	_, writeErr := io.Copy(p.msgW, src)
	if src.err != nil {
		// The client's data is bad: kill the child before it sees the end
		// of the message (qmail-inject passes on only what it read up to
		// EOF) or an envelope (qmail-queue queues only once the
		// envelope's final NUL arrives), so nothing is queued.
		cmd.Process.Kill()
		p.closeParentWriters()
		werr := cmd.Wait()
		log.Warn(h.name+": message read failed, child killed", "qp", pid, "err", src.err, "child", fmt.Sprint(werr))
		return Receipt{}, readError(src.err)
	}
	// qmail.c: the message pipe is closed before the envelope is written.
	if err := p.msgW.Close(); err != nil && writeErr == nil {
		writeErr = err
	}
	p.msgW = nil
	if writeErr == nil && p.envW != nil {
		_, writeErr = p.envW.Write(h.envelope)
	}
	// After a failed write nothing more is sent; closing the envelope pipe
	// early makes a live qmail-queue exit 54 (qq read error) without
	// queueing.
	p.closeParentWriters()
	waitErr := cmd.Wait()

	state := cmd.ProcessState
	if state == nil {
		log.Error(h.name+": wait failed", "qp", pid, "err", waitErr)
		return Receipt{}, qmailError(451, h.waitText)
	}
	if state.Success() && writeErr == nil {
		return Receipt{QP: pid, Reply: fmt.Sprintf("ok %d qp %d", time.Now().Unix(), pid)}, nil
	}
	var qerr *Error
	ws, _ := state.Sys().(syscall.WaitStatus)
	switch {
	case state.Success(): // it did not take all we wrote, yet claims success: do not trust it
		qerr = qmailError(451, h.writeFailedText)
	case ctx.Err() != nil:
		qerr = qmailError(451, h.timeoutText)
	case ws.Signaled():
		qerr = qmailError(451, h.crashedText)
	default:
		qerr = h.exitError(state.ExitCode(), readErrText(p.errR))
	}
	attrs := []any{"qp", pid, "status", state.String(), "reply", qerr.Error(), "write_err", fmt.Sprint(writeErr)}
	if s, ok := h.stderr.(fmt.Stringer); ok {
		attrs = append(attrs, "stderr", s.String())
	}
	log.Warn(h.name+" failed", attrs...)
	return Receipt{}, qerr
}

// open makes the pipes: fd 0 always, fd 1 and fd 6 when asked. Only the
// ends relay writes to (the message and the envelope) are non-blocking
// and registered with Go's poller, so a slow child parks the session's
// goroutine rather than a thread; the child's ends, and the fd 6 end read
// once the child has exited, are plain descriptors: registering and
// unregistering each with epoll costs more than the hand-off's own writes.
func (p *childPipes) open(envelope, errText bool) error {
	var err error
	if p.msgR, p.msgW, err = pipe(true); err != nil {
		return err
	}
	if envelope {
		if p.envR, p.envW, err = pipe(true); err != nil {
			return err
		}
	}
	if errText {
		p.errR, p.errW, err = pipe(false)
	}
	return err
}

// pipe returns a close-on-exec pipe; with pollWriter its write end is
// non-blocking and polled.
func pipe(pollWriter bool) (r, w *os.File, err error) {
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC); err != nil {
		return nil, nil, os.NewSyscallError("pipe2", err)
	}
	if pollWriter {
		if err := syscall.SetNonblock(fds[1], true); err != nil {
			syscall.Close(fds[0])
			syscall.Close(fds[1])
			return nil, nil, os.NewSyscallError("setnonblock", err)
		}
	}
	// os.NewFile registers a descriptor with the poller only when it is
	// already non-blocking.
	return os.NewFile(uintptr(fds[0]), "|0"), os.NewFile(uintptr(fds[1]), "|1"), nil
}

// closeChildEnds closes relay's copies of the ends the child owns, so the
// child alone holds them and EOF/EPIPE arrive when it should.
func (p *childPipes) closeChildEnds() {
	closeFile(&p.msgR)
	closeFile(&p.envR)
	closeFile(&p.errW)
}

func (p *childPipes) closeParentWriters() {
	closeFile(&p.msgW)
	closeFile(&p.envW)
}

func (p *childPipes) closeAll() {
	p.closeChildEnds()
	p.closeParentWriters()
	closeFile(&p.errR)
}

func closeFile(f **os.File) {
	if *f != nil {
		(*f).Close()
		*f = nil
	}
}
