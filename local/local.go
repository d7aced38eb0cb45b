// Package local owns the client side of local injection: relay qq, the
// qmail-queue filter, and relay sendmail.
//
// Both talk to the relay daemon over its mode = "local" unix socket, where
// the daemon learns the caller's uid from SO_PEERCRED. relay qq speaks the
// check protocol (docs/local-check.md: it sends the envelope and the
// header, the daemon reserves the charge, relay qq commits it) and then
// execs the real qmail-queue in its own place; relay sendmail submits an
// ordinary SMTP message that the daemon counts and hands off itself. The
// settings relay qq needs are also what the daemon writes for relay-qq,
// the C build, to qq.settings (Settings).
package local

import (
	"errors"
	"net"
	"os"
	"os/user"
	"strconv"
	"syscall"
	"time"

	"github.com/emersion/go-smtp"

	"relay/config"
)

// DefaultTimeout bounds connecting to the daemon and each command's reply.
const DefaultTimeout = 10 * time.Second

// SocketPath returns the address of the first mode = "local" listener, the
// socket relay qq and relay sendmail talk to.
func SocketPath(cfg *config.Config) (string, error) {
	for _, l := range cfg.Listen {
		if l.Mode == config.ModeLocal {
			return l.Addr, nil
		}
	}
	return "", errors.New("no [[listen]] with mode = \"local\" in the config")
}

// dial connects to the daemon's local socket and reads its greeting and
// EHLO reply; any failure means the daemon cannot be used, and a failure to
// connect is a *connectError. Each command's reply waits at most timeout,
// and so does each write of the message.
func dial(socket, helo string, timeout time.Duration) (*smtp.Client, error) {
	conn, err := net.DialTimeout("unix", socket, timeout)
	if err != nil {
		return nil, &connectError{err}
	}
	c := smtp.NewClient(deadlineConn{conn, timeout})
	c.CommandTimeout = timeout
	c.SubmissionTimeout = timeout
	if err := c.Hello(helo); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// connectError is a failure to connect to the daemon's socket.
type connectError struct{ err error }

func (e *connectError) Error() string { return e.err.Error() }
func (e *connectError) Unwrap() error { return e.err }

// nobodyListens reports whether the connect failed because no daemon is
// there at all (no socket, or nothing behind it), as opposed to one that
// is slow or full, or trouble of our own.
func (e *connectError) nobodyListens() bool {
	for _, errno := range []syscall.Errno{syscall.ENOENT, syscall.ECONNREFUSED, syscall.ENOTDIR, syscall.EACCES} {
		if errors.Is(e.err, errno) {
			return true
		}
	}
	return false
}

// deadlineConn gives every write its own deadline, so a daemon that stops
// reading during DATA cannot hang the client (go-smtp sets none there).
type deadlineConn struct {
	net.Conn
	timeout time.Duration
}

func (c deadlineConn) Write(p []byte) (int, error) {
	c.Conn.SetWriteDeadline(time.Now().Add(c.timeout))
	return c.Conn.Write(p)
}

// accountName returns the login name of uid from the passwd database, or ""
// when it has none.
func accountName(uid int) string {
	u, err := user.LookupId(strconv.Itoa(uid))
	if err != nil {
		return ""
	}
	return u.Username
}

// hostname returns cfg.Hostname, else the kernel's host name.
func hostname(cfg *config.Config) string {
	if cfg != nil && cfg.Hostname != "" {
		return cfg.Hostname
	}
	if h, err := os.Hostname(); err == nil && h != "" {
		return h
	}
	return "localhost"
}
