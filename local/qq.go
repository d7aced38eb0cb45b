package local

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"relay/config"
)

// Values of local.on_daemon_down.
const (
	DaemonDownAccept = "accept"
	DaemonDownDefer  = "defer"
)

// QQ is relay qq, the filter that stands in for /var/qmail/bin/qmail-queue.
// It reads the message and envelope as qmail-queue does, asks the daemon
// over the local socket, and runs the real qmail-queue as the same caller
// so qmail's "invoked by uid U" line stays true.
type QQ struct {
	Socket       string        // the daemon's local socket
	QmailQueue   string        // the real qmail-queue
	OnDaemonDown string        // DaemonDownAccept or DaemonDownDefer
	ExemptUIDs   []uint32      // callers that skip the daemon entirely
	Timeout      time.Duration // connect and per-reply timeout; 0 = DefaultTimeout
	SpoolMemory  int64         // message bytes kept in memory; 0 = DefaultSpoolMemory
	TempDir      string        // where larger messages spool; "" = os.TempDir()
	UID          int           // the caller's uid (os.Getuid())

	// Stderr gets relay qq's one-line reports and the real qmail-queue's
	// stderr.
	Stderr io.Writer
	// ErrFD, when set, is passed to the real qmail-queue that Filter runs
	// as fd 6, where notqmail's qmail-queue writes its error text for exit
	// 82. (Main execs it, and it inherits the caller's fd 6.)
	ErrFD *os.File
}

// NewQQ builds relay qq from the config (NewSettings, with the exempt
// accounts looked up in /etc/passwd).
func NewQQ(cfg *config.Config, stderr io.Writer) (*QQ, error) {
	accounts, _ := config.ReadPasswdFile(passwdFile) // unreadable: nobody is exempt here, nor on the daemon
	st, err := NewSettings(cfg, accounts)
	if err != nil {
		return nil, err
	}
	return &QQ{
		Socket:       st.Socket,
		QmailQueue:   st.QmailQueue,
		OnDaemonDown: st.OnDaemonDown,
		ExemptUIDs:   st.ExemptUIDs,
		UID:          os.Getuid(),
		Stderr:       stderr,
	}, nil
}

// passwdFile is where local.exempt_users are looked up.
const passwdFile = "/etc/passwd"

// Exempt reports whether the caller's uid is exempt (qmail's own users,
// so bounces (qmails) and forwards (alias, qmaill's deliveries) keep
// flowing).
func (q *QQ) Exempt() bool {
	return q.UID >= 0 && slices.Contains(q.ExemptUIDs, uint32(q.UID))
}

// Main is relay qq as a program: the message on fd 0, the envelope on fd 1,
// and the exit code as the return value. When the real qmail-queue is to
// run, it is exec'd in place (docs/design.md §7), so the caller waits for it and
// gets its exit code, and qmail's "invoked by uid" line names the caller:
// an exempt caller's with fds 0 and 1 untouched, anyone else's with the
// message and envelope as read, from memory or the spool file. Main
// returns only when the real qmail-queue does not run or cannot be
// exec'd.
func (q *QQ) Main() int {
	if q.Exempt() {
		err := syscall.Exec(q.QmailQueue, []string{q.QmailQueue}, os.Environ())
		q.logf("cannot run the real qmail-queue %s: %v", q.QmailQueue, err)
		return ExitDeferred
	}
	// fd 1 is read as a bare descriptor: an *os.File for it would close
	// it when collected, and fd 1 is where the envelope goes next.
	d := q.decide(os.Stdin, fdReader(1), false)
	defer d.close()
	if !d.run {
		return d.code
	}
	// fds 0 and 1 are set up before the commit, so that only the exec
	// itself can fail once the message is charged; if they cannot be, the
	// session ends without a commit and the daemon releases the charge.
	if err := q.handOverFDs(d.spool, d.envelope, d.signatures); err != nil {
		q.logf("cannot hand the message to the real qmail-queue: %v", err)
		return ExitDeferred
	}
	if q.commit(&d) != nil {
		return ExitDeferred
	}
	err := syscall.Exec(q.QmailQueue, []string{q.QmailQueue}, os.Environ())
	q.logf("cannot run the real qmail-queue %s: %v", q.QmailQueue, err)
	return ExitDeferred
}

// fdReader reads a descriptor it does not own.
type fdReader int

func (fd fdReader) Read(p []byte) (int, error) {
	for {
		n, err := syscall.Read(int(fd), p)
		switch {
		case err == syscall.EINTR:
			continue
		case err != nil:
			return 0, &os.PathError{Op: "read", Path: fmt.Sprintf("fd %d", int(fd)), Err: err}
		case n == 0 && len(p) > 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// Filter is Main for a caller that is not relay qq's own process: it reads
// the message from msg to EOF and the envelope from env, asks the daemon,
// and runs the real qmail-queue as a child where Main would exec it. It
// returns qmail-queue's exit code: the real qmail-queue's own code when it
// ran, 71 when deferred, 31 when rejected, 0 when the daemon held the
// message, and 11/54/91 for what qmail-queue itself would refuse (the
// daemon is then not asked).
func (q *QQ) Filter(msg, env io.Reader) int {
	d := q.decide(msg, env, q.Exempt())
	defer d.close()
	if !d.run {
		return d.code
	}
	if q.commit(&d) != nil {
		return ExitDeferred
	}
	return q.runReal(d.spool, d.envelope, d.signatures)
}

// decision is what relay qq does with a message: exit with code, or (run)
// hand spool and envelope to the real qmail-queue, after committing the
// charge when the daemon reserved one, with the daemon's DKIM-Signature
// fields on top.
type decision struct {
	code       int
	run        bool
	spool      *spool
	envelope   *Envelope
	signatures string     // to put on top of the message
	reserved   *checkConn // the check whose charge awaits the commit
}

// commit charges the reserved message and ends the check. When the daemon
// does not take the commit (it gave up on the reservation, or restarted),
// the message would go out uncounted: the error says to defer it.
func (q *QQ) commit(d *decision) error {
	if d.reserved == nil {
		return nil
	}
	err := d.reserved.commit()
	d.reserved.Close()
	d.reserved = nil
	if err != nil {
		q.logf("deferred: the daemon did not take the commit: %v", err)
	}
	return err
}

// close releases the spool and a check not committed: the daemon
// releases the charge when the connection ends without a commit.
func (d *decision) close() {
	if d.reserved != nil {
		d.reserved.Close()
	}
	if d.spool != nil {
		d.spool.close()
	}
}

// decide reads the message and the envelope and settles what happens to
// them. A reserved charge is committed (q.commit) just before the real
// qmail-queue runs: Main execs it, so nothing of relay qq is left to
// commit after. A real qmail-queue that then fails (disk full) has been
// charged for a message it did not queue, and the caller's retry is
// charged again: counting errs on the side of more, never of less.
func (q *QQ) decide(msg, env io.Reader, exempt bool) decision {
	sp, err := readSpool(msg, q.spoolMemory(), q.TempDir)
	if err != nil {
		q.logf("reading the message: %v", err)
		var we spoolWriteError
		if errors.As(err, &we) {
			return decision{code: ExitWriteError}
		}
		return decision{code: ExitReadError}
	}
	envelope, err := ReadEnvelope(env)
	if err != nil {
		sp.close()
		q.logf("%v", err)
		return decision{code: err.(*EnvelopeError).Code}
	}
	run := decision{run: true, spool: sp, envelope: envelope}
	exit := func(code int) decision {
		sp.close()
		return decision{code: code}
	}
	if exempt || len(envelope.Recipients) == 0 {
		// Nothing to count: exempt account, or a message nobody receives.
		return run
	}
	if bad := badAddress(envelope); bad != "" {
		q.logf("rejected: envelope address %q contains CR or LF", bad)
		return exit(ExitRejected)
	}

	check := q.check(sp, envelope)
	if check.verdict == verdictReserved {
		run.reserved = check.conn // open until the commit
		run.signatures = check.signatures
		return run
	}
	if check.conn != nil {
		check.conn.Close()
	}
	switch check.verdict {
	case verdictExempt:
		return run
	case verdictHeld:
		return exit(ExitQueued)
	case verdictDeferred:
		q.logf("deferred: %s", check.reply)
		return exit(ExitDeferred)
	case verdictRejected:
		q.logf("rejected: %s", check.reply)
		return exit(ExitRejected)
	case verdictDown:
		if q.OnDaemonDown == DaemonDownDefer {
			q.logf("%s; deferring (on_daemon_down = defer)", check.reply)
			return exit(ExitDeferred)
		}
		q.logf("%s; passing the message uncounted (on_daemon_down = accept)", check.reply)
		return run
	}
	q.logf("deferred: daemon reply not understood: %s", check.reply)
	return exit(ExitDeferred)
}

type verdict int

const (
	verdictUnknown  verdict = iota // a frame that is not in the protocol
	verdictReserved                // A: commit, then run the real qmail-queue
	verdictExempt                  // X: run the real qmail-queue, nothing to commit
	verdictHeld                    // Q, then K: the daemon has it; do not queue
	verdictDeferred                // D, or anything going wrong once connected
	verdictRejected                // R
	verdictDown                    // nobody listens at the socket
)

type checkResult struct {
	verdict    verdict
	reply      string     // the daemon's reply, or why it is considered down
	conn       *checkConn // open while reserved
	signatures string     // reserved after G: the DKIM-Signature fields
}

// check asks the daemon (docs/local-check.md): the request, the verdict,
// and for a hold or a signature the message itself.
func (q *QQ) check(sp *spool, env *Envelope) checkResult {
	c, err := dialCheck(q.Socket, q.timeout())
	var connect *connectError
	switch {
	case errors.As(err, &connect) && connect.nobodyListens():
		return checkResult{verdict: verdictDown, reply: fmt.Sprintf("relay daemon at %s unreachable: %v", q.Socket, err)}
	case err != nil:
		return checkResult{verdict: verdictDeferred, reply: fmt.Sprintf("relay daemon at %s: %v", q.Socket, err)}
	}
	// From here on the daemon is up: whatever goes wrong (it refuses with
	// 421, stops answering, closes, does not speak the check protocol) is
	// a deferral, never "down", or whoever can make a conversation fail
	// (by filling the daemon's connection slots, or stopping relay qq
	// until the daemon gives up on it) would get mail past it uncounted.
	fail := func(err error) checkResult {
		c.Close()
		var refused *refusedError
		switch {
		case errors.As(err, &refused):
			return checkResult{verdict: verdictDeferred, reply: refused.line}
		case errors.Is(err, errNotCheck):
			return checkResult{verdict: verdictDeferred, reply: fmt.Sprintf("relay daemon at %s %v", q.Socket, err)}
		}
		return checkResult{verdict: verdictDeferred, reply: fmt.Sprintf("relay daemon at %s stopped answering: %v", q.Socket, err)}
	}
	// A failed write may still leave a refusal to read (a 421 at once).
	werr := c.request(env, sp)
	typ, text, err := c.verdict()
	if err != nil {
		if werr != nil && !errors.As(err, new(*refusedError)) {
			err = werr
		}
		return fail(err)
	}
	switch typ {
	case frameHold:
		// The daemon keeps the message: K, or a refusal.
		if typ, text, err = c.sendMessage(sp, maxReplyFrame); err != nil {
			return fail(err)
		}
		if typ == frameOK {
			c.Close()
			return checkResult{verdict: verdictHeld, reply: text}
		}
		if typ == frameAccepted {
			typ = 0 // not an answer to a hold
		}
	case frameSign:
		// The daemon signs the message: A with the signatures, or a
		// refusal.
		if typ, text, err = c.sendMessage(sp, maxSignatureFrame); err != nil {
			return fail(err)
		}
		if typ == frameAccepted {
			if !signatureFields(text) {
				c.Close()
				return checkResult{verdict: verdictUnknown, reply: fmt.Sprintf("%q: not DKIM-Signature fields: %q", typ, text[:min(len(text), 200)])}
			}
			return checkResult{verdict: verdictReserved, conn: c, signatures: text}
		}
	}
	res := checkResult{verdict: verdictUnknown, reply: fmt.Sprintf("%q %q", typ, text)}
	switch typ {
	case frameAccepted:
		return checkResult{verdict: verdictReserved, conn: c}
	case frameExempt:
		res.verdict = verdictExempt
	case frameDefer:
		res.verdict, res.reply = verdictDeferred, text
	case frameReject:
		res.verdict, res.reply = verdictRejected, text
	}
	c.Close()
	return res
}

// runReal (for Filter) runs the real qmail-queue as a child of the same uid: fd 0 a pipe
// with the signatures and then the message exactly as received, closed
// before fd 1, a pipe with the envelope exactly as received (qmail.c's
// order). It returns the child's exit code.
func (q *QQ) runReal(sp *spool, env *Envelope, signatures string) int {
	msgR, msgW, err := os.Pipe()
	if err != nil {
		q.logf("cannot make a pipe: %v", err)
		return ExitDeferred
	}
	envR, envW, err := os.Pipe()
	if err != nil {
		msgR.Close()
		msgW.Close()
		q.logf("cannot make a pipe: %v", err)
		return ExitDeferred
	}
	cmd := exec.Command(q.QmailQueue)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = msgR, envR, q.Stderr
	if q.ErrFD != nil {
		cmd.ExtraFiles = []*os.File{nil, nil, nil, q.ErrFD} // fd 3+3 = 6
	}
	err = cmd.Start()
	msgR.Close()
	envR.Close()
	if err != nil {
		msgW.Close()
		envW.Close()
		q.logf("cannot run the real qmail-queue %s: %v", q.QmailQueue, err)
		return ExitDeferred
	}
	// Write errors (the child exited early) are judged by its exit code.
	_, werr := io.Copy(msgW, io.MultiReader(strings.NewReader(signatures), sp.reader()))
	msgW.Close()
	if werr == nil {
		_, werr = envW.Write(env.Raw)
	}
	envW.Close()
	err = cmd.Wait()
	code := cmd.ProcessState.ExitCode()
	if code < 0 {
		q.logf("the real qmail-queue %s: %v", q.QmailQueue, err)
		return ExitInternalBug
	}
	if code == ExitQueued && werr != nil {
		// qmail.c: queued although our write failed counts as a read error.
		q.logf("writing to the real qmail-queue: %v", werr)
		return ExitReadError
	}
	return code
}

// handOverFDs makes fd 0 and fd 1 files holding the signatures and the
// message, and the envelope, read from their start, for the real
// qmail-queue that Main execs: the spool file (the signatures written into
// the room in front of the message), or a memfd (an unlinked temporary
// file where memfd_create is not allowed).
func (q *QQ) handOverFDs(sp *spool, env *Envelope, signatures string) error {
	msg := sp.file
	if msg == nil {
		var err error
		if msg, err = q.memFile("relay-qq-message", []byte(signatures), sp.head); err != nil {
			return err
		}
	} else if err := sp.fd0(signatures); err != nil {
		return err
	}
	envf, err := q.memFile("relay-qq-envelope", env.Raw)
	if err != nil {
		return err
	}
	if err := unix.Dup3(int(msg.Fd()), 0, 0); err != nil {
		return fmt.Errorf("dup3 to fd 0: %w", err)
	}
	if err := unix.Dup3(int(envf.Fd()), 1, 0); err != nil {
		return fmt.Errorf("dup3 to fd 1: %w", err)
	}
	return nil
}

// memFile returns a file holding the parts one after the other,
// positioned at its start: a memfd, or a nameless file in TempDir where
// memfd_create is not allowed.
func (q *QQ) memFile(name string, parts ...[]byte) (*os.File, error) {
	var f *os.File
	if fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC); err == nil {
		f = os.NewFile(uintptr(fd), name)
	} else if f, err = namelessFile(q.TempDir); err != nil {
		return nil, err
	}
	for _, b := range parts {
		if _, err := f.Write(b); err != nil {
			f.Close()
			return nil, err
		}
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// badAddress returns the first envelope address that holds CR or LF, or
// "": nothing a mail system downstream could take for a line break is
// passed on.
func badAddress(env *Envelope) string {
	for _, a := range append([]string{env.Sender}, env.Recipients...) {
		if strings.ContainsAny(a, "\r\n") {
			return a
		}
	}
	return ""
}

func (q *QQ) logf(format string, args ...any) {
	if q.Stderr != nil {
		fmt.Fprintf(q.Stderr, "relay qq: "+format+"\n", args...)
	}
}

func (q *QQ) timeout() time.Duration {
	if q.Timeout > 0 {
		return q.Timeout
	}
	return DefaultTimeout
}

func (q *QQ) spoolMemory() int64 {
	if q.SpoolMemory > 0 {
		return q.SpoolMemory
	}
	return DefaultSpoolMemory
}
