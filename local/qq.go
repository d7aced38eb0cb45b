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

	"github.com/emersion/go-smtp"
	"golang.org/x/sys/unix"

	"relay/config"
)

// Values of local.on_daemon_down.
const (
	DaemonDownAccept = "accept"
	DaemonDownDefer  = "defer"
)

// CheckHelo is the EHLO name that makes a local-socket session a check
// session (reserve, do not hand off) on the daemon.
const CheckHelo = "relay-qq"

// CommitMechanism is the SASL mechanism relay qq uses to tell the daemon
// that the real qmail-queue queued the message, so the reservation is
// charged.
const CommitMechanism = "X-RELAY-COMMIT"

// QQ is relay qq, the filter that stands in for /var/qmail/bin/qmail-queue.
// It reads the message and envelope as qmail-queue does, asks the daemon
// over the local socket, and runs the real qmail-queue as the same caller
// so qmail's "invoked by uid U" line stays true.
type QQ struct {
	Socket       string        // the daemon's local socket
	QmailQueue   string        // the real qmail-queue
	OnDaemonDown string        // DaemonDownAccept or DaemonDownDefer
	ExemptUsers  []string      // accounts that skip the daemon entirely
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

// NewQQ builds relay qq from the config: the first local listener's socket
// and the [local] section. An empty on_daemon_down means accept.
func NewQQ(cfg *config.Config, stderr io.Writer) (*QQ, error) {
	socket, err := SocketPath(cfg)
	if err != nil {
		return nil, err
	}
	if cfg.Local.QmailQueue == "" {
		return nil, errors.New("local.qmail_queue is empty: relay qq needs the real qmail-queue")
	}
	down := cfg.Local.OnDaemonDown
	switch down {
	case "":
		down = DaemonDownAccept
	case DaemonDownAccept, DaemonDownDefer:
	default:
		return nil, fmt.Errorf("local.on_daemon_down = %q: want %q or %q", down, DaemonDownAccept, DaemonDownDefer)
	}
	return &QQ{
		Socket:       socket,
		QmailQueue:   cfg.Local.QmailQueue,
		OnDaemonDown: down,
		ExemptUsers:  cfg.Local.ExemptUsers,
		UID:          os.Getuid(),
		Stderr:       stderr,
	}, nil
}

// Exempt reports whether the caller's account (by uid, from the passwd
// database) is in local.exempt_users: qmail's own users, so bounces
// (qmails) and forwards (alias, qmaill's deliveries) keep flowing.
func (q *QQ) Exempt() bool {
	if len(q.ExemptUsers) == 0 {
		return false
	}
	name := accountName(q.UID)
	return name != "" && slices.Contains(q.ExemptUsers, name)
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
	if err := q.handOverFDs(d.spool, d.envelope); err != nil {
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
	return q.runReal(d.spool, d.envelope)
}

// decision is what relay qq does with a message: exit with code, or (run)
// hand spool and envelope to the real qmail-queue, after committing the
// charge when the daemon reserved one.
type decision struct {
	code     int
	run      bool
	spool    *spool
	envelope *Envelope
	reserved *smtp.Client // the check session whose charge awaits the commit
}

// commit charges the reserved message (AUTH X-RELAY-COMMIT) and ends the
// check session. When the daemon does not take the commit (it gave up on
// the reservation, or restarted), the message would go out uncounted: the
// error says to defer it.
func (q *QQ) commit(d *decision) error {
	if d.reserved == nil {
		return nil
	}
	if err := d.reserved.Auth(commitAuth{}); err != nil {
		q.logf("deferred: the daemon did not take the commit: %v", err)
		return err
	}
	d.reserved.Quit()
	d.reserved = nil
	return nil
}

// close releases the spool and a check session not committed: the daemon
// releases the charge when the session ends without a commit.
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
		run.reserved = check.client // open until the commit
		return run
	}
	if check.client != nil {
		defer check.client.Close()
	}
	switch check.verdict {
	case verdictExempt:
		check.client.Quit()
		return run
	case verdictHeld:
		check.client.Quit()
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
	verdictUnknown  verdict = iota // a 2xx reply to DATA that is not in the protocol
	verdictReserved                // "250 ok reserved": commit, then run the real qmail-queue
	verdictExempt                  // "250 ok exempt": run the real qmail-queue, nothing to commit
	verdictHeld                    // "250 ok held <id>": the daemon has it; do not queue
	verdictDeferred                // a 4xx reply
	verdictRejected                // a 5xx reply
	verdictDown                    // the daemon could not be reached or stopped answering
)

type checkResult struct {
	verdict verdict
	reply   string       // the daemon's reply, or why it is considered down
	client  *smtp.Client // open session (reserved, exempt, held, unknown)
}

// check runs the check conversation: EHLO relay-qq, MAIL, RCPT each, DATA
// with the whole message (dot-stuffed, CRLF). Any non-2xx reply ends it:
// qmail-queue takes a message whole or not at all.
func (q *QQ) check(sp *spool, env *Envelope) checkResult {
	c, err := dial(q.Socket, CheckHelo, q.timeout())
	var refused *smtp.SMTPError
	var connect *connectError
	switch {
	case errors.As(err, &connect) && connect.nobodyListens():
		return checkResult{verdict: verdictDown, reply: fmt.Sprintf("relay daemon at %s unreachable: %v", q.Socket, err)}
	case errors.As(err, &refused):
		// From here on the daemon is up: whatever goes wrong (it refuses
		// with 421, stops answering, closes, does not speak the check
		// protocol) is a deferral, never "down", or whoever can make a
		// conversation fail (by filling the daemon's connection slots, or
		// stopping relay qq until the daemon gives up on it) would get
		// mail past it uncounted.
		return checkResult{verdict: verdictDeferred, reply: replyLine(refused)}
	case err != nil:
		return checkResult{verdict: verdictDeferred, reply: fmt.Sprintf("relay daemon at %s did not answer: %v", q.Socket, err)}
	}
	if !c.SupportsAuth(CommitMechanism) {
		c.Close()
		return checkResult{verdict: verdictDeferred, reply: fmt.Sprintf("relay daemon at %s does not speak the check protocol (no AUTH %s after EHLO %s)", q.Socket, CommitMechanism, CheckHelo)}
	}
	fail := func(err error) checkResult {
		c.Close()
		var se *smtp.SMTPError
		switch {
		case !errors.As(err, &se):
			// The daemon is up (it spoke the check protocol) but the
			// conversation broke: deferring is the only safe answer.
			// Treating it as "down" would let anything that makes the
			// daemon drop a connection pass mail uncounted.
			return checkResult{verdict: verdictDeferred, reply: fmt.Sprintf("relay daemon at %s stopped answering: %v", q.Socket, err)}
		case se.Code >= 400 && se.Code < 500:
			return checkResult{verdict: verdictDeferred, reply: replyLine(se)}
		default:
			return checkResult{verdict: verdictRejected, reply: replyLine(se)}
		}
	}
	if err := c.Mail(env.Sender, nil); err != nil {
		return fail(err)
	}
	for _, rcpt := range env.Recipients {
		if err := c.Rcpt(rcpt, nil); err != nil {
			return fail(err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fail(err)
	}
	if _, err := io.Copy(w, sp.reader()); err != nil {
		return fail(err)
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return fail(err)
	}
	text := statusText(resp.StatusText)
	res := checkResult{verdict: verdictUnknown, reply: "250 " + resp.StatusText, client: c}
	switch f := strings.Fields(strings.ToLower(text)); {
	case len(f) == 2 && f[0] == "ok" && f[1] == "reserved":
		res.verdict = verdictReserved
	case len(f) == 2 && f[0] == "ok" && f[1] == "exempt":
		res.verdict = verdictExempt
	case len(f) == 3 && f[0] == "ok" && f[1] == "held":
		res.verdict = verdictHeld
	}
	return res
}

// runReal (for Filter) runs the real qmail-queue as a child of the same uid: fd 0 a pipe
// with the message exactly as received, closed before fd 1, a pipe with the
// envelope exactly as received (qmail.c's order). It returns the child's
// exit code.
func (q *QQ) runReal(sp *spool, env *Envelope) int {
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
	_, werr := io.Copy(msgW, sp.reader())
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

// handOverFDs makes fd 0 and fd 1 files holding the message and the
// envelope from their start, for the real qmail-queue that Main execs: the
// spool file, or a memfd (an unlinked temporary file where memfd_create is
// not allowed).
func (q *QQ) handOverFDs(sp *spool, env *Envelope) error {
	msg := sp.file
	if msg == nil {
		var err error
		if msg, err = q.memFile("relay-qq-message", sp.head); err != nil {
			return err
		}
	}
	envf, err := q.memFile("relay-qq-envelope", env.Raw)
	if err != nil {
		return err
	}
	if _, err := msg.Seek(0, io.SeekStart); err != nil {
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

// memFile returns a file holding b, positioned at its start: a memfd, or
// a nameless file in TempDir where memfd_create is not allowed.
func (q *QQ) memFile(name string, b []byte) (*os.File, error) {
	var f *os.File
	if fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC); err == nil {
		f = os.NewFile(uintptr(fd), name)
	} else if f, err = namelessFile(q.TempDir); err != nil {
		return nil, err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// badAddress returns the first envelope address that cannot be sent in an
// SMTP command line (it holds CR or LF), or "".
func badAddress(env *Envelope) string {
	for _, a := range append([]string{env.Sender}, env.Recipients...) {
		if strings.ContainsAny(a, "\r\n") {
			return a
		}
	}
	return ""
}

func replyLine(se *smtp.SMTPError) string {
	if se.EnhancedCode != (smtp.EnhancedCode{}) && se.EnhancedCode != smtp.NoEnhancedCode {
		e := se.EnhancedCode
		return fmt.Sprintf("%d %d.%d.%d %s", se.Code, e[0], e[1], e[2], se.Message)
	}
	return fmt.Sprintf("%d %s", se.Code, se.Message)
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

// commitAuth is the SASL client for AUTH X-RELAY-COMMIT: no initial
// response, and an empty answer to any challenge.
type commitAuth struct{}

func (commitAuth) Start() (string, []byte, error) { return CommitMechanism, nil, nil }
func (commitAuth) Next([]byte) ([]byte, error)    { return []byte{}, nil }
