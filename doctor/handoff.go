package doctor

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"relay/config"
)

// NoNewPrivsSettings are the systemd unit settings that give a service
// no_new_privs: NoNewPrivileges= itself, and those that imply it for a
// service that runs as a user other than root (systemd.exec(5)). Under
// it the real qmail-queue's setuid bit is ignored.
func NoNewPrivsSettings() []string {
	return []string{"NoNewPrivileges", "SystemCallFilter", "SystemCallArchitectures", "SystemCallLog", "RestrictAddressFamilies",
		"RestrictNamespaces", "RestrictSUIDSGID", "RestrictRealtime", "PrivateDevices", "ProtectKernelTunables",
		"ProtectKernelModules", "ProtectKernelLogs", "ProtectClock", "MemoryDenyWriteExecute", "LockPersonality", "DynamicUser"}
}

// checkHandoff: the daemon can run what it hands each message to, and
// the kernel honours that program's setuid bit (no NoNewPrivs); with
// qmail-direct, the queue writer runs as the queue's owner.
func (r *run) checkHandoff() {
	const check = "hand-off"
	d := r.cfg.Delivery
	var v verdict
	switch d.Method {
	case config.DeliverQmailQueue:
		r.judgeQueueProgram(&v, d.Command)
	case config.DeliverQmailInject:
		// qmail-inject runs qmail's qmail-queue: relay qq (setgid), then
		// the real one (setuid qmailq), both as the daemon's user.
		r.judgeSetIDExec(&v, d.Command, filepath.Join(r.o.QmailHome, "bin", "qmail-queue"), r.realQmailQueue())
	case config.DeliverQmailDirect:
		r.judgeWriters(&v)
	default:
		r.ok(check, "delivery method %s: the daemon runs nothing of qmail's", d.Method)
		return
	}
	r.emit(check, &v, "")
}

// judgeQueueProgram: [delivery] command is the real qmail-queue, and the
// daemon may run it with its setuid bit honoured.
func (r *run) judgeQueueProgram(v *verdict, cmd string) {
	real := r.realQmailQueue()
	setReal := fmt.Sprintf(`set [delivery] command = "%s" in %s, then %s`, real, r.o.Config, r.restartFix())
	st, err := statPath(cmd)
	if err != nil {
		v.bad(Fail, setReal, "[delivery] command %s: %v: every message gets 451", cmd, unwrapPath(err))
		return
	}
	if prog, err := identify(cmd); err == nil && prog.kind != binOther {
		v.bad(Warn, setReal, "[delivery] command %s is %s: the daemon's own mail goes through relay qq, which runs the real one for it; name the real one", cmd, prog.kind)
	}
	r.judgeSetIDExec(v, cmd, cmd)
	if rank(v.st) == 0 && r.daemon != nil {
		v.note("the daemon (%s, groups %s) runs %s (%s) for each message; NoNewPrivs 0, so its setuid bit takes effect",
			userName(r.daemon.uid), groupNames(append([]int{r.daemon.gid}, r.daemon.groups...)), cmd, st)
	}
}

// judgeSetIDExec: the daemon may run prog, and every program on the way
// that is setuid or setgid really gains its user or group: under
// NoNewPrivs the kernel ignores those bits, and qmail-queue, left as
// qmaild, cannot enter the queue and exits 62 (451 for every message).
func (r *run) judgeSetIDExec(v *verdict, prog string, chain ...string) {
	d := r.daemon
	if d == nil {
		v.note("who runs %s not checked: the daemon is not running", prog)
		return
	}
	unit := r.unitName()
	if err := procCred(d).reach(prog, 1); err != nil {
		fix := reachFix(err, 1)
		if st, serr := statPath(prog); serr == nil && !d.inGroup(st.gid) && st.mode&0o010 != 0 {
			fix = fmt.Sprintf("SupplementaryGroups=%s in the [Service] section of %s, then systemctl daemon-reload && %s", groupName(st.gid), unit, r.restartFix())
		}
		v.bad(Fail, fix, "the daemon (%s, groups %s) may not run %s (%v): every message gets 451",
			userName(d.uid), groupNames(append([]int{d.gid}, d.groups...)), prog, err)
		return
	}
	if !d.noNewPrivs {
		return
	}
	var setid []string
	for _, p := range slices.Compact(chain) {
		if st, err := statPath(p); err == nil && (st.mode&modeSetuid != 0 && st.uid != d.uid || st.mode&modeSetgid != 0 && !d.inGroup(st.gid)) {
			setid = append(setid, fmt.Sprintf("%s (%s)", p, st))
		}
	}
	if len(setid) == 0 {
		return
	}
	v.bad(Fail, fmt.Sprintf("delete NoNewPrivileges=yes from %s (and any of %s=, which imply it), then systemctl daemon-reload && %s", unit, strings.Join(NoNewPrivsSettings()[1:], "=, "), r.restartFix()),
		"the daemon pid %d has NoNewPrivs: 1, so the kernel ignores the setuid and setgid bits of %s: qmail-queue stays %s, cannot enter the queue and exits 62, and every message gets 451",
		d.pid, strings.Join(setid, ", "), userName(d.uid))
}

// judgeWriters: method qmail-direct has its queue writer, running as the
// owner of the queue.
func (r *run) judgeWriters(v *verdict) {
	queue := r.cfg.Delivery.QueueDir
	if r.daemon == nil {
		v.note("queue writer not checked: the daemon is not running")
		return
	}
	if len(r.writers) == 0 {
		v.bad(Fail, "journalctl -u relay -n 50 says why the writer keeps failing ("+queue+" must be qmailq's); then "+r.restartFix(),
			"no relay queue-writer runs beside the daemon: every message waits 5 s, then gets 451 qqt failure")
		return
	}
	st, err := statPath(queue)
	if err != nil {
		if r.root() {
			v.bad(Fail, fmt.Sprintf(`set [delivery] queue_dir = "%s" in %s`, filepath.Join(r.o.QmailHome, "queue"), r.o.Config), "[delivery] queue_dir %s: %v", queue, unwrapPath(err))
		} else {
			v.bad(Warn, "run relay doctor as root", "not checked as uid %d: %s: %v", r.euid, queue, unwrapPath(err))
		}
		return
	}
	for _, w := range r.writers {
		if w.uid != st.uid {
			v.bad(Fail, "start relay serve as root, so that it runs the writer as qmailq (README, Installing, step 5); then "+r.restartFix(),
				"the queue writer pid %d runs as %s, but %s is %s's: it cannot write the queue", w.pid, userName(w.uid), queue, userName(st.uid))
			return
		}
	}
	w := r.writers[0]
	v.note("queue writer pid %d runs as %s (group %s), the owner of %s", w.pid, userName(w.uid), groupName(w.gid), queue)
}
