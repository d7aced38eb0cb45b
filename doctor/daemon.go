package doctor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"relay/config"
)

// verdict gathers what one check found: the worst status wins, the
// details and fixes are joined on its one line.
type verdict struct {
	st      Status
	details []string
	fixes   []string
}

func rank(s Status) int {
	switch s {
	case Warn:
		return 1
	case Fail:
		return 2
	}
	return 0
}

func (v *verdict) bad(st Status, fix, format string, args ...any) {
	if rank(st) > rank(v.st) {
		v.st = st
	}
	v.details = append(v.details, fmt.Sprintf(format, args...))
	if fix != "" && !slices.Contains(v.fixes, fix) {
		v.fixes = append(v.fixes, fix)
	}
}

// note adds to the detail without changing the status.
func (v *verdict) note(format string, args ...any) {
	v.details = append(v.details, fmt.Sprintf(format, args...))
}

// emit records the check: okDetail when nothing was wrong (with any
// notes), else what was.
func (r *run) emit(check string, v *verdict, okDetail string) {
	if rank(v.st) == 0 {
		d := v.details
		if okDetail != "" {
			d = append([]string{okDetail}, d...)
		}
		r.ok(check, "%s", strings.Join(d, "; "))
		return
	}
	r.add(check, v.st, strings.Join(v.fixes, "; "), "%s", strings.Join(v.details, "; "))
}

// socketProbe is what connecting to a local listener showed.
type socketProbe struct {
	pid, uid int    // the listening process (SO_PEERCRED)
	greeting string // its first line
	err      error
}

// probeUnix connects to a unix socket as relay qq would, takes the
// listener's credentials from the kernel, reads the greeting and says
// QUIT.
func probeUnix(ctx context.Context, path string, timeout time.Duration) socketProbe {
	d := net.Dialer{Timeout: timeout}
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return socketProbe{err: err}
	}
	defer c.Close()
	var p socketProbe
	if raw, err := c.(*net.UnixConn).SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
				p.pid, p.uid = int(cred.Pid), int(cred.Uid)
			}
		})
	}
	c.SetDeadline(time.Now().Add(timeout))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	p.greeting = strings.TrimRight(line, "\r\n")
	if err != nil {
		p.err = fmt.Errorf("no greeting: %w", err)
		return p
	}
	fmt.Fprint(c, "QUIT\r\n")
	br.ReadString('\n')
	return p
}

// isRelayServe reports whether p is `relay serve`.
func isRelayServe(p *proc) bool {
	return len(p.argv) >= 2 && p.argv[1] == "serve" && (p.name == "relay" || filepath.Base(p.argv[0]) == "relay")
}

// serveConfig is the config a relay serve process was started with: its
// --config, else its $RELAY_CONFIG (readable by root), else the default.
// config.PathFromArgs is not used: it would take this process's
// environment.
func (r *run) serveConfig(p *proc) string {
	path := r.serveConfigArg(p)
	if !filepath.IsAbs(path) {
		if cwd, err := r.procs.link(p.pid, "cwd"); err == nil {
			return filepath.Join(cwd, path)
		}
	}
	return path
}

func (r *run) serveConfigArg(p *proc) string {
	args := p.argv[2:]
	if len(args) >= 2 && (args[0] == "--config" || args[0] == "-config") {
		return args[1]
	}
	if len(args) >= 1 {
		if v, ok := strings.CutPrefix(args[0], "--config="); ok {
			return v
		}
	}
	if env, err := os.ReadFile(filepath.Join(r.procs.root, strconv.Itoa(p.pid), "environ")); err == nil {
		for _, kv := range strings.Split(string(env), "\x00") {
			if v, ok := strings.CutPrefix(kv, "RELAY_CONFIG="); ok && v != "" {
				return v
			}
		}
	}
	return config.DefaultPath
}

func samePath(a, b string) bool {
	fa, ea := filepath.Abs(a)
	fb, eb := filepath.Abs(b)
	if ea != nil || eb != nil {
		return a == b
	}
	if ra, err := filepath.EvalSymlinks(fa); err == nil {
		fa = ra
	}
	if rb, err := filepath.EvalSymlinks(fb); err == nil {
		fb = rb
	}
	return fa == fb
}

// findDaemon finds the relay serve that the config's sockets lead to:
// the listener of its local socket (SO_PEERCRED, which any user may ask),
// else the holder of a TCP listener (root only), else a relay serve
// started with this config. Started as root with method qmail-direct,
// relay serve is a root supervisor whose child, as qmaild, is the daemon.
func (r *run) findDaemon() {
	r.probes = map[string]socketProbe{}
	for _, l := range r.cfg.Listen {
		if l.Mode != config.ModeLocal {
			continue
		}
		p := probeUnix(r.ctx, l.Addr, r.o.Timeout)
		r.probes[l.Addr] = p
		if r.daemon == nil && p.pid > 0 {
			if d := r.procs.get(p.pid); d != nil {
				r.daemon, r.daemonHow = d, "answers on "+l.Addr
			}
		}
	}
	if r.daemon == nil {
		for _, l := range r.cfg.Listen {
			if l.Mode == config.ModeLocal {
				continue
			}
			for _, h := range r.holders(l.Addr) {
				if h.p != nil && isRelayServe(h.p) {
					r.daemon, r.daemonHow = h.p, "holds "+l.Addr
					break
				}
			}
			if r.daemon != nil {
				break
			}
		}
	}
	if r.daemon == nil {
		for _, p := range r.procs.all() {
			if isRelayServe(p) && samePath(r.serveConfig(p), r.o.Config) && (r.daemon == nil || r.daemon.uid == 0) {
				r.daemon, r.daemonHow = p, "started with "+r.o.Config
			}
		}
	}
	if r.daemon == nil {
		return
	}
	if parent := r.procs.get(r.daemon.ppid); parent != nil && parent.uid == 0 && isRelayServe(parent) && r.daemon.uid != 0 {
		r.supervisor = parent
	}
	keeper := r.daemon
	if r.supervisor != nil {
		keeper = r.supervisor
	}
	for _, c := range r.procs.children(keeper.pid) {
		if len(c.argv) >= 2 && c.argv[1] == "queue-writer" {
			r.writers = append(r.writers, c)
		}
	}
}

// daemonCred is who the daemon is (its process) or, when it is not
// running, who it would be: qmaild with its groups from the group file.
// who names it for messages.
func (r *run) daemonCred() (c cred, who string, ok bool) {
	if r.daemon != nil {
		return procCred(r.daemon), "the daemon (" + userName(r.daemon.uid) + ")", true
	}
	u, err := user.Lookup(daemonUser)
	if err != nil {
		return cred{}, "", false
	}
	uid, err1 := strconv.Atoi(u.Uid)
	gid, err2 := strconv.Atoi(u.Gid)
	if err1 != nil || err2 != nil {
		return cred{}, "", false
	}
	c = cred{uid: uid, gids: []int{gid}}
	if ids, err := u.GroupIds(); err == nil {
		for _, s := range ids {
			if g, err := strconv.Atoi(s); err == nil {
				c.gids = append(c.gids, g)
			}
		}
	}
	return c, daemonUser + " (the daemon's user; it is not running)", true
}

// daemonUser is the user the README runs the daemon as.
const daemonUser = "qmaild"

// unitName is the systemd unit relay runs in, for the fixes.
func (r *run) unitName() string {
	for _, p := range []*proc{r.supervisor, r.daemon} {
		if p != nil {
			if u := r.procs.unit(p.pid); u != "" {
				return u
			}
		}
	}
	return "relay.service"
}

func (r *run) restartFix() string {
	return "systemctl restart " + strings.TrimSuffix(r.unitName(), ".service")
}

// startFix is how to start a daemon that is not running.
func (r *run) startFix() string {
	return "systemctl start relay (journalctl -u relay -n 50 says why it stopped)"
}

// checkDaemon: the daemon runs, as a user other than root (qmaild), with
// this config, from the binary on disk.
func (r *run) checkDaemon() {
	const check = "daemon"
	d := r.daemon
	if d == nil {
		var where []string
		for _, l := range r.cfg.Listen {
			where = append(where, l.Addr)
		}
		r.add(check, Fail, r.startFix(), "no relay serve runs for %s (nothing answers on %s)", r.o.Config, strings.Join(where, ", "))
		return
	}
	var v verdict
	desc := fmt.Sprintf("relay serve pid %d as %s (groups %s), %s", d.pid, userName(d.uid), groupNames(append([]int{d.gid}, d.groups...)), r.daemonHow)
	if r.supervisor != nil {
		desc += fmt.Sprintf(", child of the root supervisor pid %d", r.supervisor.pid)
	}
	v.note("%s", desc)
	unit := r.unitName()
	switch {
	case d.uid == 0:
		fix := "in " + unit + ": User=qmaild, Group=nofiles, SupplementaryGroups=relayqq, AmbientCapabilities=CAP_NET_BIND_SERVICE (README, Installing, step 4); then " + r.restartFix()
		if r.cfg.Delivery.Method == config.DeliverQmailDirect {
			fix = "it runs as root without its supervisor: " + r.restartFix()
		}
		v.bad(Fail, fix, "it runs as root: every client's bytes are parsed with every right on the machine")
	case d.uid != lookupUID(daemonUser):
		v.bad(Warn, "User=qmaild in "+unit+", then "+r.restartFix(), "it runs as %s, not qmaild (qmail-smtpd's user, whom qmail treats as the network)", userName(d.uid))
	}
	if cfgPath := r.serveConfig(d); !samePath(cfgPath, r.o.Config) {
		v.bad(Warn, "relay doctor --config "+cfgPath, "it was started with --config %s, not %s", cfgPath, r.o.Config)
	}
	if exe, err := r.procs.link(d.pid, "exe"); err == nil && strings.HasSuffix(exe, " (deleted)") {
		v.bad(Warn, r.restartFix(), "it runs a binary since replaced on disk (%s): a restart runs the new one", exe)
	}
	r.emit(check, &v, "")
}

// checkAdmin: the admin listener is the daemon's and /healthz says ok.
func (r *run) checkAdmin() {
	const check = "admin"
	listen := r.cfg.Admin.Listen
	if listen == "" {
		r.ok(check, "the admin API is off (admin.listen is empty)")
		return
	}
	var v verdict
	r.judgeHolders(&v, listen, "the admin API")
	if r.o.AdminHealth != nil && rank(v.st) < 2 {
		ctx, cancel := context.WithTimeout(r.ctx, r.o.Timeout)
		err := r.o.AdminHealth(ctx, r.cfg)
		cancel()
		switch {
		case err == nil:
			v.note("/healthz: ok")
		case isConnRefused(err):
			v.bad(Fail, r.startFix(), "nothing answers on %s", listen)
		default:
			v.bad(Fail, "the daemon's log names the cause (journalctl -u relay -n 50); a damaged relay.db: README, Damaged state",
				"/healthz: %v", err)
		}
	}
	r.emit(check, &v, "")
}

func isConnRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED)
}
