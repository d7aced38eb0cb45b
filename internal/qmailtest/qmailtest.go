// Package qmailtest is the one helper for tests that use the real qmail
// installed in /var/qmail (notqmail, by ../shared/tools/install-notqmail):
// it skips a test where qmail is absent (and fails it instead when
// $NOTQMAIL is set, as in CI), holds an exclusive lock so that tests in
// different packages never use qmail-send or the queue at the same time,
// starts and stops qmail-send with a log of the test's own, reads that
// log, and makes Maildir mailboxes that qmail-send delivers to.
package qmailtest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Home is where qmail is installed.
const Home = "/var/qmail"

// lockPath is the lock every test using /var/qmail holds while it does;
// sendPIDPath names the qmail-send this package started, so that one left
// by a killed test run is stopped by the next.
const (
	lockPath    = "/tmp/relay-qmailtest.lock"
	sendPIDPath = "/tmp/relay-qmailtest.qmail-send.pid"
)

// Qmail is the real qmail, locked for one test.
type Qmail struct {
	t     testing.TB
	Home  string // /var/qmail
	Queue string // its queue
	Me    string // control/me: the domain qmail-send delivers locally
	dir   string // the test's own files: logs, mailboxes
	send  *exec.Cmd
	sent  chan struct{} // closed when qmail-send exited
	log   string
}

// Require returns the real qmail for t, locked until t ends. It skips t
// when qmail is not installed or t is not root (with the reason), unless
// $NOTQMAIL is set, in which case t fails: CI installs qmail and means
// these tests to run.
func Require(t testing.TB) *Qmail {
	t.Helper()
	miss := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("NOTQMAIL") != "" {
			t.Fatalf("NOTQMAIL is set but "+format, args...)
		}
		t.Skipf("real qmail: "+format+" (install it with ../shared/tools/install-notqmail; NOTQMAIL=1 makes this a failure)", args...)
	}
	if _, err := os.Stat(filepath.Join(Home, "bin", "qmail-send")); err != nil {
		miss("%s/bin/qmail-send is not installed", Home)
	}
	if os.Geteuid() != 0 {
		miss("the test must run as root (it starts qmail-send and runs programs as qmail's users)")
	}
	me, err := os.ReadFile(filepath.Join(Home, "control", "me"))
	if err != nil {
		miss("control/me: %v", err)
	}
	q := &Qmail{t: t, Home: Home, Queue: filepath.Join(Home, "queue"), Me: strings.TrimSpace(string(me))}
	q.lock()
	dir, err := os.MkdirTemp("", "relay-qmailtest-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755) // qmail's users reach the logs and mailboxes in it
	q.dir = dir
	t.Cleanup(func() { os.RemoveAll(dir) })
	return q
}

// lock takes the exclusive lock, waiting up to 15 minutes for other
// packages' tests, and stops a qmail-send a killed run of this package
// left behind.
func (q *Qmail) lock() {
	q.t.Helper()
	f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		q.t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Minute)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if err != unix.EWOULDBLOCK || time.Now().After(deadline) {
			f.Close()
			q.t.Fatalf("qmailtest lock %s: %v", lockPath, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	q.t.Cleanup(func() { f.Close() }) // the last cleanup: after qmail-send stopped
	if b, err := os.ReadFile(sendPIDPath); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && isQmailSend(pid) {
			syscall.Kill(pid, syscall.SIGTERM)
			waitGone(pid, 30*time.Second)
		}
		os.Remove(sendPIDPath)
	}
}

func isQmailSend(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && bytes.HasPrefix(b, []byte("qmail-send"))
}

func waitGone(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if syscall.Kill(pid, 0) != nil {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// SendRunning reports whether some qmail-send holds the queue's
// lock/sendmutex.
func (q *Qmail) SendRunning() bool {
	f, err := os.OpenFile(filepath.Join(q.Queue, "lock", "sendmutex"), os.O_WRONLY, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return true
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}

// StartSend starts qmail-send (qmail-start ./Maildir/ with a log of this
// test's own) and stops it when the test ends. A qmail-send that this
// package did not start (install-notqmail --start) makes the test skip,
// or fail under $NOTQMAIL: it would deliver the test's mail and log
// elsewhere.
func (q *Qmail) StartSend() {
	q.t.Helper()
	if q.send != nil {
		return
	}
	if q.SendRunning() {
		msg := "a qmail-send not started by qmailtest is running (stop it: install-notqmail --stop)"
		if os.Getenv("NOTQMAIL") != "" {
			q.t.Fatal(msg)
		}
		q.t.Skip(msg)
	}
	q.log = filepath.Join(q.dir, "qmail-send.log")
	if err := os.WriteFile(q.log, nil, 0o644); err != nil {
		q.t.Fatal(err)
	}
	if u, err := user.Lookup("qmaill"); err == nil {
		uid, _ := strconv.Atoi(u.Uid)
		os.Chown(q.log, uid, -1)
	}
	cmd := exec.Command(filepath.Join(q.Home, "bin", "qmail-start"), "./Maildir/", "/bin/sh", "-c", "exec cat >>"+q.log)
	cmd.Env = []string{"PATH=" + filepath.Join(q.Home, "bin") + ":/usr/bin:/bin"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		q.t.Fatal(err)
	}
	q.send, q.sent = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(q.sent) }()
	os.WriteFile(sendPIDPath, []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
	q.t.Cleanup(q.StopSend)
	q.WaitLog(30*time.Second, func(log string) bool { return strings.Contains(log, "status: local 0/") })
}

// StopSend stops the qmail-send StartSend started, waiting for it to exit.
func (q *Qmail) StopSend() {
	if q.send == nil {
		return
	}
	q.send.Process.Signal(syscall.SIGTERM)
	select {
	case <-q.sent:
	case <-time.After(60 * time.Second):
		q.send.Process.Kill()
		<-q.sent
	}
	q.send = nil
	os.Remove(sendPIDPath)
}

// SendPID is the pid of the qmail-send StartSend started, 0 if none.
func (q *Qmail) SendPID() int {
	if q.send == nil {
		return 0
	}
	return q.send.Process.Pid
}

// Log is qmail-send's log so far (StartSend's).
func (q *Qmail) Log() string {
	if q.log == "" {
		return ""
	}
	b, _ := os.ReadFile(q.log)
	return string(b)
}

// WaitLog waits up to d for cond to hold of qmail-send's log, and fails
// the test with the log if it does not.
func (q *Qmail) WaitLog(d time.Duration, cond func(log string) bool) string {
	q.t.Helper()
	deadline := time.Now().Add(d)
	for {
		log := q.Log()
		if cond(log) {
			return log
		}
		if time.Now().After(deadline) {
			q.t.Fatalf("qmail-send's log did not show what the test waited for in %v:\n%s", d, tail(log, 3000))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// Mailbox is a local address whose mail qmail-send delivers into a
// Maildir (through ~alias/.qmail-<ext>, so no system user is needed).
type Mailbox struct {
	Addr    string // <ext>@<me>
	Maildir string
	dotq    string
}

// Mailbox makes a new mailbox, removed when the test ends.
func (q *Qmail) Mailbox() *Mailbox {
	q.t.Helper()
	var b [6]byte
	rand.Read(b[:])
	ext := "rqt-" + hex.EncodeToString(b[:])
	aliasU, err := user.Lookup("alias")
	if err != nil {
		q.t.Fatal(err)
	}
	uid, _ := strconv.Atoi(aliasU.Uid)
	gid, _ := strconv.Atoi(aliasU.Gid)
	m := &Mailbox{Addr: ext + "@" + q.Me, Maildir: filepath.Join(q.dir, ext, "Maildir")}
	for _, d := range []string{"", "new", "cur", "tmp"} {
		p := filepath.Join(m.Maildir, d)
		if err := os.MkdirAll(p, 0o700); err != nil {
			q.t.Fatal(err)
		}
		os.Chown(p, uid, gid)
	}
	os.Chmod(filepath.Dir(m.Maildir), 0o755)
	m.dotq = filepath.Join(q.Home, "alias", ".qmail-"+ext)
	if err := os.WriteFile(m.dotq, []byte(m.Maildir+"/\n"), 0o644); err != nil {
		q.t.Fatal(err)
	}
	q.t.Cleanup(func() { os.Remove(m.dotq) })
	return m
}

// Messages reads every message delivered so far (new/ and cur/), in no
// particular order.
func (m *Mailbox) Messages() ([][]byte, error) {
	var out [][]byte
	for _, d := range []string{"new", "cur"} {
		ents, err := os.ReadDir(filepath.Join(m.Maildir, d))
		if err != nil {
			return nil, err
		}
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join(m.Maildir, d, e.Name()))
			if err != nil {
				return nil, err
			}
			out = append(out, b)
		}
	}
	return out, nil
}

// Wait waits up to d until at least n messages are delivered and returns
// them all; the test fails if fewer come.
func (q *Qmail) Wait(m *Mailbox, n int, d time.Duration) [][]byte {
	q.t.Helper()
	deadline := time.Now().Add(d)
	for {
		msgs, err := m.Messages()
		if err != nil {
			q.t.Fatal(err)
		}
		if len(msgs) >= n {
			return msgs
		}
		if time.Now().After(deadline) {
			q.t.Fatalf("%s: %d of %d messages delivered in %v; qmail-send's log:\n%s", m.Addr, len(msgs), n, d, tail(q.Log(), 3000))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StripDelivery removes what qmail-local adds in front of a delivered
// message (Return-Path and Delivered-To), returning the rest: the queue's
// mess file as qmail-send read it.
func StripDelivery(msg []byte) ([]byte, error) {
	for _, field := range []string{"Return-Path: ", "Delivered-To: "} {
		if !bytes.HasPrefix(msg, []byte(field)) {
			return nil, errors.New("no " + strings.TrimSuffix(field, ": ") + " line")
		}
		i := bytes.IndexByte(msg, '\n')
		msg = msg[i+1:]
	}
	return msg, nil
}
