package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// service is relay serve started the way a service manager starts it: as
// a given user and groups, with the capability to bind port 25, and
// optionally under a wrapper (setpriv --no-new-privs, as systemd's
// NoNewPrivileges=yes).
type service struct {
	t      *testing.T
	config string
	opts   serviceOpts
	cmd    *exec.Cmd
	logMu  sync.Mutex
	log    bytes.Buffer
	exited chan struct{}
}

type serviceOpts struct {
	cred  *syscall.Credential // nil: this process's (root)
	wrap  []string            // a command that execs relay serve
	ready []string            // log lines that say it is up ("relay started")
}

// startService starts relay serve --config config and waits until its log
// shows every ready line; it is stopped when the test ends.
func startService(t *testing.T, config string, o serviceOpts) *service {
	t.Helper()
	if len(o.ready) == 0 {
		o.ready = []string{"relay started"}
	}
	s := &service{t: t, config: config, opts: o}
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *service) start() {
	s.t.Helper()
	s.logMu.Lock()
	s.log.Reset()
	s.logMu.Unlock()
	argv := append(append([]string{}, s.opts.wrap...), bins.relay, "serve", "--config", s.config, "--grace", "5s")
	s.cmd = exec.Command(argv[0], argv[1:]...)
	w := lockedWriter{&s.logMu, &s.log}
	s.cmd.Stdout, s.cmd.Stderr = w, w
	s.cmd.Dir = "/"
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.opts.cred}
	if s.opts.cred != nil {
		s.cmd.SysProcAttr.AmbientCaps = []uintptr{unix.CAP_NET_BIND_SERVICE}
	}
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	s.exited = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { c.Wait(); close(done) }(s.cmd, s.exited)
	deadline := time.Now().Add(20 * time.Second)
	for {
		up := true
		for _, r := range s.opts.ready {
			up = up && strings.Contains(s.logs(), r)
		}
		if up {
			return
		}
		select {
		case <-s.exited:
			s.t.Fatalf("relay serve exited at start:\n%s", s.logs())
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("relay serve did not come up:\n%s", s.logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits; a service already stopped is left alone.
func (s *service) stop() {
	select {
	case <-s.exited:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(20 * time.Second):
		s.cmd.Process.Kill()
		<-s.exited
	}
	if s.t.Failed() {
		s.t.Logf("relay log:\n%s", s.logs())
	}
}

func (s *service) pid() int { return s.cmd.Process.Pid }

func (s *service) logs() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.log.String()
}

// noNewPrivs reads NoNewPrivs from a process's status.
func noNewPrivs(t *testing.T, pid int) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(b), "\nNoNewPrivs:\t1\n")
}

// worldTempDir is a temporary directory every user may reach, removed
// when the test ends (t.TempDir's parent is root's alone).
func worldTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "relay-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
