package local

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/sys/unix"
)

// fakeDaemon is the daemon's side of the local socket, scripted per test:
// it answers checks (docs/local-check.md) as the script says, takes SMTP
// (relay sendmail) through go-smtp, and records what every session did.
type fakeDaemon struct {
	socket string
	script daemonScript

	mu       sync.Mutex
	sessions []*fakeSession
	done     chan *fakeSession // each session once it ended
}

// daemonScript says how the fake daemon answers.
type daemonScript struct {
	// A check: the verdict frame (0: 'A') and its text; commitFail
	// answers the commit with D; held is the answer to a held message
	// (nil: K "held 1795833709.42"); signed the answer to a message to
	// sign (G; nil: A with testSignatures); notCheck makes the socket
	// plain SMTP that knows nothing of checks.
	verdict    byte
	text       string
	commitFail bool
	held       *frameReply
	signed     *frameReply
	notCheck   bool

	// SMTP (relay sendmail); a nil error is 250.
	mail error
	rcpt func(n int, to string) error // n counts from 0
	data error                        // reply to the end of DATA
}

type frameReply struct {
	typ  byte
	text string
}

type fakeSession struct {
	uid       int    // from SO_PEERCRED
	kind      string // "check" or "smtp"
	helo      string // smtp
	from      string
	rcpts     []string
	size      int64  // check: the S frame
	head      []byte // check: the H frame
	data      []byte // smtp: DATA; check: the held message
	resets    int
	committed bool
	commitPID string // the commit's payload: relay qq's pid
}

func reply(code int, enh smtp.EnhancedCode, msg string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: code, EnhancedCode: enh, Message: msg}
}

var (
	replyOverLimit = reply(451, smtp.EnhancedCode{4, 7, 1}, "uid:local:1001 over 100 recipients/1m, try again later")
	replyRejected  = reply(550, smtp.EnhancedCode{5, 7, 1}, "uid:local:1001 is suspended")
)

// startDaemon serves the fake daemon on a unix socket in a world-traversable
// directory (so tests may connect as another user).
func startDaemon(t testing.TB, script daemonScript) *fakeDaemon {
	t.Helper()
	dir := worldDir(t)
	d := &fakeDaemon{socket: filepath.Join(dir, "submit.sock"), script: script, done: make(chan *fakeSession, 64)}
	l, err := net.Listen("unix", d.socket)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(d.socket, 0o777)
	srv := smtp.NewServer(smtp.BackendFunc(d.newSession))
	srv.Domain = "fake.test"
	srv.AllowInsecureAuth = true
	srv.ReadTimeout = 10 * time.Second
	srv.WriteTimeout = 10 * time.Second
	srv.ErrorLog = discardLogger{}
	go srv.Serve(sniffListener{l, d})
	t.Cleanup(func() { srv.Close() })
	return d
}

// sniffListener hands go-smtp connections that divert a check, as the
// daemon's local socket does: go-smtp greets, and a first byte NUL makes
// the rest a check, answered inside that Read.
type sniffListener struct {
	net.Listener
	d *fakeDaemon
}

func (l sniffListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil || l.d.script.notCheck {
		return c, err
	}
	return &sniffConn{Conn: c, d: l.d}, nil
}

type sniffConn struct {
	net.Conn
	d       *fakeDaemon
	decided bool
}

func (c *sniffConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.decided || n == 0 {
		return n, err
	}
	c.decided = true
	if p[0] != 0 {
		return n, err
	}
	c.d.serveCheck(c.Conn, bytes.Clone(p[:n]))
	return 0, io.EOF
}

// serveCheck answers one check as the script says.
func (d *fakeDaemon) serveCheck(conn net.Conn, first []byte) {
	s := &fakeSession{uid: peerUID(conn), kind: "check"}
	d.mu.Lock()
	d.sessions = append(d.sessions, s)
	d.mu.Unlock()
	defer func() { d.done <- s }()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(io.MultiReader(bytes.NewReader(first), conn))
	magic := make([]byte, len(checkMagic))
	if _, err := io.ReadFull(r, magic); err != nil || string(magic) != checkMagic {
		return
	}
	for {
		typ, p, err := readTestFrame(r)
		if err != nil {
			return
		}
		d.mu.Lock()
		switch typ {
		case frameFrom:
			s.from = string(p)
		case frameTo:
			s.rcpts = append(s.rcpts, string(p))
		case frameSize:
			s.size, _ = strconv.ParseInt(string(p), 10, 64)
		case frameHeader:
			s.head = p
		}
		d.mu.Unlock()
		if typ == frameEnd {
			break
		}
	}
	verdict := d.script.verdict
	if verdict == 0 {
		verdict = frameAccepted
	}
	conn.Write(appendFrame([]byte(checkMagic), verdict, d.script.text))
	if verdict == frameHold || verdict == frameSign {
		var msg []byte
		for {
			typ, p, err := readTestFrame(r)
			if err != nil {
				return
			}
			if typ == frameEnd {
				break
			}
			msg = append(msg, p...)
		}
		d.mu.Lock()
		s.data = msg
		d.mu.Unlock()
		answer := frameReply{frameOK, "held 1795833709.42"}
		switch {
		case verdict == frameHold && d.script.held != nil:
			answer = *d.script.held
		case verdict == frameSign && d.script.signed != nil:
			answer = *d.script.signed
		case verdict == frameSign:
			answer = frameReply{frameAccepted, testSignatures}
		}
		conn.Write(appendFrame(nil, answer.typ, answer.text))
		if verdict == frameHold || answer.typ != frameAccepted {
			return
		}
		verdict = frameAccepted // the commit follows as for A
	}
	if verdict == frameAccepted {
		typ, pid, err := readTestFrame(r)
		if err != nil || typ != frameCommit {
			return
		}
		if d.script.commitFail {
			conn.Write(appendFrame(nil, frameDefer, "451 4.3.0 no reservation to commit"))
			return
		}
		d.mu.Lock()
		s.committed = true
		s.commitPID = string(pid)
		d.mu.Unlock()
		conn.Write(appendFrame(nil, frameOK, "committed"))
	}
}

// testSignatures is what the fake daemon answers to a message it signs: two
// fields, the second folded.
const testSignatures = "DKIM-Signature: v=1; a=ed25519-sha256; d=example.com; s=ed1; b=AAAA\n" +
	"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa1;\n b=BBBB\n"

func readTestFrame(r *bufio.Reader) (byte, []byte, error) {
	var h [5]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	p := make([]byte, binary.BigEndian.Uint32(h[1:]))
	_, err := io.ReadFull(r, p)
	return h[0], p, err
}

// peerUID is the uid at the other end of a unix socket, -1 if unknown.
func peerUID(c net.Conn) int {
	if sc, ok := c.(*sniffConn); ok {
		c = sc.Conn
	}
	uid := -1
	if uc, ok := c.(*net.UnixConn); ok {
		if raw, err := uc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
					uid = int(cred.Uid)
				}
			})
		}
	}
	return uid
}

type discardLogger struct{}

func (discardLogger) Printf(string, ...any) {}
func (discardLogger) Println(...any)        {}

// worldDir is a fresh directory anyone may enter and write, removed after
// the test.
func worldDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "relay-local-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o777)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (d *fakeDaemon) newSession(c *smtp.Conn) (smtp.Session, error) {
	s := &fakeSession{uid: peerUID(c.Conn()), kind: "smtp", helo: c.Hostname()}
	d.mu.Lock()
	d.sessions = append(d.sessions, s)
	d.mu.Unlock()
	return &daemonSession{d: d, s: s}, nil
}

// connections is the number of sessions so far (a check, or EHLO seen).
func (d *fakeDaemon) connections() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.sessions)
}

// reset forgets the sessions so far, for a daemon shared by subtests.
func (d *fakeDaemon) reset() {
	for {
		select {
		case <-d.done:
		default:
			d.mu.Lock()
			d.sessions = nil
			d.mu.Unlock()
			return
		}
	}
}

// session waits for the next session to end and returns a copy of it.
func (d *fakeDaemon) session(t testing.TB) fakeSession {
	t.Helper()
	select {
	case s := <-d.done:
		d.mu.Lock()
		defer d.mu.Unlock()
		return *s
	case <-time.After(10 * time.Second):
		t.Fatal("no daemon session ended within 10s")
	}
	return fakeSession{}
}

type daemonSession struct {
	d *fakeDaemon
	s *fakeSession
}

func (ds *daemonSession) Mail(from string, _ *smtp.MailOptions) error {
	ds.d.mu.Lock()
	ds.s.from = from
	ds.d.mu.Unlock()
	return ds.d.script.mail
}

func (ds *daemonSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	ds.d.mu.Lock()
	n := len(ds.s.rcpts)
	ds.s.rcpts = append(ds.s.rcpts, to)
	ds.d.mu.Unlock()
	if ds.d.script.rcpt != nil {
		return ds.d.script.rcpt(n, to)
	}
	return nil
}

func (ds *daemonSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	ds.d.mu.Lock()
	ds.s.data = b
	ds.d.mu.Unlock()
	if err != nil {
		return err
	}
	return ds.d.script.data
}

func (ds *daemonSession) Reset() {
	ds.d.mu.Lock()
	ds.s.resets++
	ds.d.mu.Unlock()
}

func (ds *daemonSession) Logout() error {
	ds.d.done <- ds.s
	return nil
}
