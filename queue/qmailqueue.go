package queue

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// QmailQueue hands messages to qmail-queue (or anything speaking its
// protocol) exactly as qmail-smtpd does (qmail.c): the message on fd 0, the
// envelope on fd 1 once fd 0 is closed, and the exit code mapped to qmail's
// reply texts (qmail-queue(8); reference/qmail.md §3.3, §9.4).
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
	log := orDiscard(q.Logger)
	ctx, cancel := withTimeout(ctx, q.Timeout)
	defer cancel()

	var p qqPipes
	if err := p.open(); err != nil {
		p.closeAll()
		log.Error("qmail-queue: pipe", "err", err)
		return Receipt{}, qmailError(451, qqTextExec)
	}
	defer p.closeAll()

	cmd := exec.Command(q.Path, q.Args...)
	cmd.Dir = q.dir()
	cmd.Stdin = p.msgR  // fd 0: the message
	cmd.Stdout = p.envR // fd 1: the envelope (read by the child)
	if q.Stderr != nil {
		cmd.Stderr = q.Stderr // fd 2
	}
	cmd.ExtraFiles = []*os.File{nil, nil, nil, p.errW} // fd 6: notqmail's error text; 3–5 closed
	if ctx.Err() != nil {
		return Receipt{}, qmailError(451, qqTextTimeout)
	}
	err := cmd.Start()
	p.closeChildEnds()
	if err != nil {
		log.Error("qmail-queue: cannot start", "path", q.Path, "err", err)
		return Receipt{}, qmailError(451, qqTextExec)
	}
	// Every pipe is an *os.File, so os/exec starts no copying goroutine, and
	// the timeout is a callback rather than a goroutine watching ctx: a
	// message costs no goroutine beyond the session's own. The writes get
	// the same deadline, because killing the child does not end them when
	// something it started still holds the pipes (a wrapper's stuck
	// filter).
	msgW, envW := p.msgW, p.envW
	if d, ok := ctx.Deadline(); ok {
		msgW.SetWriteDeadline(d)
		envW.SetWriteDeadline(d)
	}
	stopKill := context.AfterFunc(ctx, func() {
		cmd.Process.Kill()
		msgW.SetWriteDeadline(time.Now())
		envW.SetWriteDeadline(time.Now())
	})
	defer stopKill()
	pid := cmd.Process.Pid

	src := &readTracker{r: msg}
	_, copyErr := io.Copy(p.msgW, src)
	if src.err != nil {
		// The client's data is bad: kill the child before it sees an
		// envelope, so nothing can be queued (qmail-queue queues only once
		// the envelope's final NUL arrives).
		cmd.Process.Kill()
		p.closeParentWriters()
		werr := cmd.Wait()
		log.Warn("qmail-queue: message read failed, child killed before the envelope", "qp", pid, "err", src.err, "child", fmt.Sprint(werr))
		return Receipt{}, readError(src.err)
	}
	// qmail.c: the message pipe is closed before the envelope is written.
	writeErr := copyErr
	if err := p.msgW.Close(); err != nil && writeErr == nil {
		writeErr = err
	}
	p.msgW = nil
	if writeErr == nil {
		_, writeErr = p.envW.Write(AppendEnvelope(make([]byte, 0, envelopeSize(env)), env))
	}
	// After a failed write nothing more is sent; closing the envelope pipe
	// early makes a live child exit 54 (qq read error) without queueing.
	p.closeParentWriters()
	waitErr := cmd.Wait()

	state := cmd.ProcessState
	if state == nil {
		log.Error("qmail-queue: wait failed", "qp", pid, "err", waitErr)
		return Receipt{}, qmailError(451, qqTextWait)
	}
	if state.Success() {
		if writeErr != nil {
			// qmail.c: exit 0 after our own write failed is still "qq read error".
			log.Error("qmail-queue: exited 0 after a failed write", "qp", pid, "err", writeErr)
			return Receipt{}, qmailError(451, qqTextRead)
		}
		return Receipt{QP: pid, Reply: fmt.Sprintf("ok %d qp %d", time.Now().Unix(), pid)}, nil
	}
	var qerr *Error
	ws, _ := state.Sys().(syscall.WaitStatus)
	switch {
	case ctx.Err() != nil:
		qerr = qmailError(451, qqTextTimeout)
	case ws.Signaled():
		qerr = qmailError(451, qqTextCrashed)
	case state.ExitCode() == 82:
		qerr = qqCustomError(readErrText(p.errR))
	default:
		qerr = qqExitError(state.ExitCode())
	}
	log.Warn("qmail-queue failed", "qp", pid, "status", state.String(), "reply", qerr.Error(),
		"write_err", fmt.Sprint(writeErr))
	return Receipt{}, qerr
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

// qqPipes are the three pipes between relay and qmail-queue.
type qqPipes struct {
	msgR, msgW *os.File // fd 0
	envR, envW *os.File // fd 1
	errR, errW *os.File // fd 6
}

// open makes the pipes. Only the two ends relay writes to (the message
// and the envelope) are non-blocking and registered with Go's poller, so
// a slow child parks the session's goroutine rather than a thread; the
// child's ends, and the fd 6 end read once the child has exited, are
// plain descriptors: registering and unregistering each with
// epoll costs more than the hand-off's own writes.
func (p *qqPipes) open() error {
	var err error
	if p.msgR, p.msgW, err = pipe(true); err != nil {
		return err
	}
	if p.envR, p.envW, err = pipe(true); err != nil {
		return err
	}
	p.errR, p.errW, err = pipe(false)
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
func (p *qqPipes) closeChildEnds() {
	closeFile(&p.msgR)
	closeFile(&p.envR)
	closeFile(&p.errW)
}

func (p *qqPipes) closeParentWriters() {
	closeFile(&p.msgW)
	closeFile(&p.envW)
}

func (p *qqPipes) closeAll() {
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
