package local

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/sys/unix"
)

// fakeDaemon is the daemon's side of the local socket, scripted per test:
// it speaks the check protocol to EHLO relay-qq sessions and records what
// every session did.
type fakeDaemon struct {
	socket string
	script daemonScript

	mu       sync.Mutex
	sessions []*fakeSession
	done     chan *fakeSession // each session once it logged out
}

// daemonScript says how the fake daemon answers. A nil error is 250.
type daemonScript struct {
	mail       error
	rcpt       func(n int, to string) error // n counts from 0
	data       error                        // reply to the end of DATA; nil = "250 ok reserved"
	noCommit   bool                         // do not offer AUTH X-RELAY-COMMIT
	commitFail bool                         // refuse AUTH X-RELAY-COMMIT
}

type fakeSession struct {
	uid       int // from SO_PEERCRED
	helo      string
	from      string
	rcpts     []string
	data      []byte
	resets    int
	committed bool
	commitPID string // the commit's initial response: relay qq's pid
}

func reply(code int, enh smtp.EnhancedCode, msg string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: code, EnhancedCode: enh, Message: msg}
}

var (
	replyHeld      = reply(250, smtp.NoEnhancedCode, "ok held 1795833709.42")
	replyExempt    = reply(250, smtp.EnhancedCode{2, 0, 0}, "ok exempt")
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
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return d
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
	s := &fakeSession{uid: -1, helo: c.Hostname()}
	if uc, ok := c.Conn().(*net.UnixConn); ok {
		if raw, err := uc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
					s.uid = int(cred.Uid)
				}
			})
		}
	}
	d.mu.Lock()
	d.sessions = append(d.sessions, s)
	d.mu.Unlock()
	return &daemonSession{d: d, s: s}, nil
}

// connections is the number of sessions so far (EHLO seen).
func (d *fakeDaemon) connections() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.sessions)
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
	if ds.d.script.data != nil {
		return ds.d.script.data
	}
	if ds.s.helo != CheckHelo {
		return nil // an ordinary submission: "250 2.0.0 OK: queued"
	}
	return reply(250, smtp.NoEnhancedCode, "ok reserved")
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

func (ds *daemonSession) AuthMechanisms() []string {
	if ds.d.script.noCommit || ds.s.helo != CheckHelo {
		return nil
	}
	return []string{CommitMechanism}
}

func (ds *daemonSession) Auth(mech string) (sasl.Server, error) {
	if mech != CommitMechanism || ds.d.script.noCommit {
		return nil, smtp.ErrAuthUnknownMechanism
	}
	return commitServer{ds}, nil
}

type commitServer struct{ ds *daemonSession }

func (c commitServer) Next(resp []byte) ([]byte, bool, error) {
	if c.ds.d.script.commitFail {
		return nil, false, errors.New("no reservation")
	}
	c.ds.d.mu.Lock()
	c.ds.s.committed = true
	c.ds.s.commitPID = string(resp)
	c.ds.d.mu.Unlock()
	return nil, true, nil
}

// crlf is what a message looks like on the wire after the DotWriter.
func crlf(msg []byte) []byte {
	out := bytes.ReplaceAll(msg, []byte("\r\n"), []byte("\n"))
	out = bytes.ReplaceAll(out, []byte("\n"), []byte("\r\n"))
	if len(out) > 0 && !bytes.HasSuffix(out, []byte("\r\n")) {
		out = append(out, "\r\n"...)
	}
	return out
}
