package main

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"relay/config"
)

// Method qmail-direct's process arrangement (README, "Installing"):
//
//	relay serve            root: starts the two below, forwards signals, restarts the writer
//	├── relay serve        qmaild (qmail-smtpd's user): SMTP, policy, admin; the daemon
//	└── relay queue-writer qmailq, group qmail, no other groups: writes qmail's queue
//
// The daemon gets each writer's socket over a control socket from the
// supervisor (the supervised serve finds it on the descriptor named by
// $RELAY_SUPERVISOR_FD); nothing else can open it. Started by a user who
// is not root, relay serve runs the writer itself, as that user.
const (
	envSupervisorFD = "RELAY_SUPERVISOR_FD"
	daemonUser      = "qmaild"
	writerUser      = "qmailq"
)

// account is a user to run a child as.
type account struct {
	name   string
	uid    uint32
	gid    uint32
	groups []uint32 // supplementary groups
}

func (a account) credential() *syscall.Credential {
	return &syscall.Credential{Uid: a.uid, Gid: a.gid, Groups: a.groups}
}

// lookupAccount finds name in the user database; withGroups adds its
// supplementary groups from /etc/group, without group 0.
func lookupAccount(name string, withGroups bool) (account, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return account{}, fmt.Errorf("user %s: %w", name, err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err := errors.Join(err1, err2); err != nil || uid == 0 {
		return account{}, fmt.Errorf("user %s: uid %s gid %s: not usable", name, u.Uid, u.Gid)
	}
	a := account{name: name, uid: uint32(uid), gid: uint32(gid), groups: []uint32{}}
	if withGroups {
		ids, err := u.GroupIds()
		if err != nil {
			return account{}, fmt.Errorf("groups of %s: %w", name, err)
		}
		for _, s := range ids {
			if g, err := strconv.ParseUint(s, 10, 32); err == nil && g != 0 && uint32(g) != a.gid {
				a.groups = append(a.groups, uint32(g))
			}
		}
	}
	return a, nil
}

// superviseServe is relay serve started as root with method qmail-direct:
// it runs the daemon as qmaild and the queue writer as qmailq, restarting
// the writer whenever it exits, until the daemon exits; its exit code is
// the daemon's.
func superviseServe(args []string, cfg *config.Config, log *slog.Logger) int {
	daemonAcct, err := lookupAccount(daemonUser, true)
	if err == nil {
		var w account
		w, err = lookupAccount(writerUser, false)
		if err == nil {
			err = prepareDaemonDirs(cfg, daemonAcct)
		}
		if err == nil {
			return runSupervisor(args, cfg, daemonAcct, w, log)
		}
	}
	log.Error("cannot start: method qmail-direct started as root needs qmail's users", "err", err)
	return 1
}

func runSupervisor(args []string, cfg *config.Config, daemonAcct, writerAcct account, log *slog.Logger) int {
	exe, err := os.Executable()
	if err != nil {
		log.Error("cannot start: own executable", "err", err)
		return 1
	}
	ctlFDs, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		log.Error("cannot start: control socket", "err", err)
		return 1
	}
	ctl := os.NewFile(uintptr(ctlFDs[0]), "control")
	ctlChild := os.NewFile(uintptr(ctlFDs[1]), "control")
	defer ctl.Close()

	// Signals are caught before the daemon starts, so none is lost.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)

	daemon := exec.Command(exe, append([]string{"serve"}, args...)...)
	daemon.Env = append(os.Environ(), envSupervisorFD+"=3")
	daemon.ExtraFiles = []*os.File{ctlChild}
	daemon.Stdin, daemon.Stdout, daemon.Stderr = nil, os.Stdout, os.Stderr
	daemon.SysProcAttr = &syscall.SysProcAttr{
		Credential:  daemonAcct.credential(),
		AmbientCaps: []uintptr{unix.CAP_NET_BIND_SERVICE}, // ports 25 and 587, as qmaild
		Pdeathsig:   syscall.SIGTERM,
	}
	if err := daemon.Start(); err != nil {
		ctlChild.Close()
		log.Error("cannot start the daemon", "user", daemonAcct.name, "err", err)
		return 1
	}
	ctlChild.Close()
	exited := make(chan struct{})
	go func() { daemon.Wait(); close(exited) }()

	keeper := &writerKeeper{exe: exe, queueDir: cfg.Delivery.QueueDir, cred: writerAcct.credential(), log: log,
		deliver: func(f *os.File) error { return sendFD(ctl, f) }}
	keeper.start()
	log.Info("supervising", "daemon_pid", daemon.Process.Pid, "daemon_user", daemonAcct.name, "writer_user", writerAcct.name)
wait:
	for {
		select {
		case sig := <-sigs:
			daemon.Process.Signal(sig)
		case <-exited:
			break wait
		}
	}
	keeper.stop()
	st := daemon.ProcessState
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		log.Error("the daemon was killed", "signal", ws.Signal().String())
		return 1
	}
	return st.ExitCode()
}

// prepareDaemonDirs makes data_dir (and whatever in it root owns) and
// missing local-socket directories the daemon user's, as systemd's
// StateDirectory does for a service's User. A socket directory that exists
// is left as it is: the daemon must be able to write there.
func prepareDaemonDirs(cfg *config.Config, a account) error {
	mk := func(dir string, mode os.FileMode) error {
		if _, err := os.Stat(dir); err == nil {
			return nil
		}
		if err := os.MkdirAll(dir, mode); err != nil {
			return err
		}
		return os.Chown(dir, int(a.uid), int(a.gid))
	}
	// 0711: relay-qq, running as the caller, reads qq.settings there.
	if err := mk(cfg.DataDir, 0o711); err != nil {
		return fmt.Errorf("data_dir: %w", err)
	}
	err := filepath.WalkDir(cfg.DataDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		if st.Uid == 0 {
			return os.Lchown(path, int(a.uid), int(a.gid))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("data_dir: making it %s's: %w", a.name, err)
	}
	for _, l := range cfg.Listen {
		if l.Mode == config.ModeLocal {
			// Every local user's relay qq connects there.
			if err := mk(filepath.Dir(l.Addr), 0o755); err != nil {
				return fmt.Errorf("listen %s: %w", l.Addr, err)
			}
		}
	}
	return nil
}

// sendFD passes f over the control socket.
func sendFD(ctl *os.File, f *os.File) error {
	return unix.Sendmsg(int(ctl.Fd()), []byte{'W'}, unix.UnixRights(int(f.Fd())), nil, 0)
}

// supervisedWriters reads the writer connections the supervisor passes on
// descriptor fd. When the supervisor goes away, SIGTERM is sent to stop:
// the daemon shuts down as it would on SIGTERM.
func supervisedWriters(fd int, log *slog.Logger, stop chan<- os.Signal) <-chan net.Conn {
	conns := make(chan net.Conn)
	go func() {
		defer close(conns)
		buf := make([]byte, 16)
		oob := make([]byte, unix.CmsgSpace(4*4))
		for {
			n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
			if err == unix.EINTR {
				continue
			}
			if err != nil || n == 0 {
				log.Error("the supervisor is gone: shutting down", "err", fmt.Sprint(err))
				stop <- syscall.SIGTERM
				return
			}
			for _, f := range receivedFiles(oob[:oobn]) {
				c, err := net.FileConn(f)
				f.Close()
				if err != nil {
					log.Error("queue writer socket", "err", err)
					continue
				}
				conns <- c
			}
		}
	}()
	return conns
}

func receivedFiles(oob []byte) []*os.File {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "queue-writer"))
		}
	}
	return files
}

// writerConns gives method qmail-direct its writer connections: from the
// supervisor when there is one, else from a writer this process runs
// itself. stop is how the supervisor's end reaches the daemon's signal
// loop; the returned func stops a writer of this process's own.
func writerConns(cfg *config.Config, log *slog.Logger, stop chan<- os.Signal) (<-chan net.Conn, func(), error) {
	if cfg.Delivery.Method != config.DeliverQmailDirect {
		return nil, func() {}, nil
	}
	if s := os.Getenv(envSupervisorFD); s != "" {
		os.Unsetenv(envSupervisorFD)
		fd, err := strconv.Atoi(s)
		if err != nil || fd < 3 {
			return nil, nil, fmt.Errorf("%s=%q: not a descriptor", envSupervisorFD, s)
		}
		unix.CloseOnExec(fd)
		return supervisedWriters(fd, log, stop), func() {}, nil
	}
	return localWriters(cfg, log)
}

// localWriters is method qmail-direct in a relay serve that is not root
// and not supervised: it runs the writer itself, as its own user.
func localWriters(cfg *config.Config, log *slog.Logger) (<-chan net.Conn, func(), error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, nil, err
	}
	conns := make(chan net.Conn, 1)
	k := &writerKeeper{exe: exe, queueDir: cfg.Delivery.QueueDir, log: log, deliver: func(f *os.File) error {
		c, err := net.FileConn(f)
		if err != nil {
			return err
		}
		conns <- c
		return nil
	}}
	k.start()
	return conns, k.stop, nil
}

// writerKeeper runs `relay queue-writer` and starts a new one whenever it
// exits, each on a new socketpair whose other end goes to deliver.
type writerKeeper struct {
	exe      string
	queueDir string
	cred     *syscall.Credential // nil: this process's own
	log      *slog.Logger
	deliver  func(*os.File) error

	mu      sync.Mutex
	cur     *os.Process
	stopped bool
	quit    chan struct{}
	done    chan struct{}
}

// Restart delays: a writer that keeps failing at start is retried at most
// every maxRestartDelay.
const (
	minRestartDelay = 100 * time.Millisecond
	maxRestartDelay = 5 * time.Second
)

func (k *writerKeeper) start() {
	k.quit, k.done = make(chan struct{}), make(chan struct{})
	go k.run()
}

func (k *writerKeeper) run() {
	defer close(k.done)
	delay := minRestartDelay
	for {
		began := time.Now()
		err := k.once()
		select {
		case <-k.quit:
			return
		default:
		}
		if time.Since(began) > 30*time.Second {
			delay = minRestartDelay
		}
		k.log.Error("queue writer exited; starting another", "status", fmt.Sprint(err), "in", delay.String())
		select {
		case <-k.quit:
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, maxRestartDelay)
	}
}

// once runs one writer until it exits.
func (k *writerKeeper) once() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	mine := os.NewFile(uintptr(fds[0]), "queue-writer")
	theirs := os.NewFile(uintptr(fds[1]), "daemon")
	defer mine.Close()
	cmd := exec.Command(k.exe, "queue-writer", "--queue", k.queueDir)
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: k.cred, Pdeathsig: syscall.SIGTERM}
	k.mu.Lock()
	if k.stopped {
		k.mu.Unlock()
		theirs.Close()
		return errors.New("stopped")
	}
	err = cmd.Start()
	if err == nil {
		k.cur = cmd.Process
	}
	k.mu.Unlock()
	theirs.Close()
	if err != nil {
		return err
	}
	if err := k.deliver(mine); err != nil {
		k.log.Error("handing the queue writer's socket to the daemon", "err", err)
		cmd.Process.Signal(syscall.SIGTERM)
	}
	mine.Close()
	err = cmd.Wait()
	k.mu.Lock()
	k.cur = nil
	k.mu.Unlock()
	return err
}

// stop ends the keeper: the writer is told to stop (it finishes its round)
// and is waited for, at most 10 seconds.
func (k *writerKeeper) stop() {
	k.mu.Lock()
	k.stopped = true
	if k.cur != nil {
		k.cur.Signal(syscall.SIGTERM)
	}
	k.mu.Unlock()
	close(k.quit)
	select {
	case <-k.done:
	case <-time.After(10 * time.Second):
		k.mu.Lock()
		if k.cur != nil {
			k.cur.Kill()
		}
		k.mu.Unlock()
		<-k.done
	}
}
