package doctor

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"

	"relay/config"
	"relay/local"
)

// The programs' places, as the README installs them.
const (
	installedRelayQQ    = "/usr/local/bin/relay-qq"
	installedRelayLocal = "/usr/local/bin/relay-local"
	defaultQQGroup      = "relayqq"
	passwdFile          = "/etc/passwd"
)

// realQmailQueue is the real qmail-queue relay qq runs.
func (r *run) realQmailQueue() string {
	if r.cfg != nil && r.cfg.Local.QmailQueue != "" {
		return r.cfg.Local.QmailQueue
	}
	return filepath.Join(r.o.QmailHome, "bin", "qmail-queue.orig")
}

// qqGroup is the group that may run the real qmail-queue: its file's
// group, unless that is still qmail's own (then the README's relayqq).
// gid is -1 when the group is not known yet.
func (r *run) qqGroup() (gid int, name string) {
	st, err := statPath(r.realQmailQueue())
	if err != nil || st.gid == qmailGroup() {
		if g, err := user.LookupGroup(defaultQQGroup); err == nil {
			n, _ := strconv.Atoi(g.Gid)
			return n, defaultQQGroup
		}
		return -1, defaultQQGroup
	}
	return st.gid, groupName(st.gid)
}

// qmailGroup is the group qmail's queue belongs to (qmailq's), -1 if none.
func qmailGroup() int {
	u, err := user.Lookup("qmailq")
	if err != nil {
		return -1
	}
	n, err := strconv.Atoi(u.Gid)
	if err != nil {
		return -1
	}
	return n
}

// checkQQ: qmail's qmail-queue is relay qq, setgid to the group that may
// run the real one; relay-qq's relay-local too.
func (r *run) checkQQ() {
	const check = "qmail-queue"
	path := filepath.Join(r.o.QmailHome, "bin", "qmail-queue")
	real := r.realQmailQueue()
	gid, gname := r.qqGroup()
	var v verdict
	link := "ln -sf " + installedRelayQQ + " " + path
	if _, err := os.Lstat(path); err != nil {
		v.bad(Fail, link, "%s: %v: qmail-inject, sendmail and every local script fail", path, unwrapPath(err))
		r.emit(check, &v, "")
		return
	}
	target, err := filepath.EvalSymlinks(path)
	if err != nil {
		v.bad(Fail, link, "%s leads nowhere (%v): qmail-inject, sendmail and every local script fail", path, unwrapPath(err))
		r.emit(check, &v, "")
		return
	}
	st, err := statPath(target)
	if err != nil {
		v.bad(Fail, link, "%s: %v", target, err)
		r.emit(check, &v, "")
		return
	}
	prog, err := identify(target)
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			r.notChecked(check, fmt.Sprintf("%s cannot be read: %v", target, err))
			return
		}
		v.bad(Fail, link, "%s: %v", target, err)
		r.emit(check, &v, "")
		return
	}
	r.qq = prog
	switch prog.kind {
	case binOther:
		if st.uid == lookupUID("qmailq") && st.mode&modeSetuid != 0 {
			r.qqStillQmails = true
			fix := link
			if _, err := statPath(real); err != nil {
				fix = fmt.Sprintf("mv %[1]s %[2]s && chgrp %[3]s %[2]s && chmod 4710 %[2]s && ln -s %[4]s %[1]s", path, real, gname, installedRelayQQ)
			}
			v.bad(Fail, fix, "%s is still qmail's own qmail-queue: mail from local scripts (PHP mail(), sendmail, qmail-inject) is queued uncounted", path)
		} else {
			v.bad(Fail, link, "%s (%s) is neither relay qq nor qmail's qmail-queue", path, target)
		}
	case binRelay:
		v.bad(Warn, link+" (README, Installing, step 2)", "%s is the relay binary: it works, at a Go runtime's start per message, where relay-qq costs ~2 ms", target)
		judgeSetgid(&v, target, st, gid, gname)
	default:
		judgeSetgid(&v, target, st, gid, gname)
	}
	ok := fmt.Sprintf("%s is %s (%s), %s", path, prog.kind, target, st)
	if target == path {
		ok = fmt.Sprintf("%s is %s, %s", path, prog.kind, st)
	}
	r.emit(check, &v, ok)
	if prog.kind == binRelayQQ {
		r.checkRelayLocal(prog.localPath, gid, gname)
	}
}

// unwrapPath drops the path from a *fs.PathError, which the message
// names already.
func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// judgeSetgid holds relay qq (relay-qq or relay-local) to its mode: run by
// everyone, setgid to the group that may run the real qmail-queue, never
// setuid.
func judgeSetgid(v *verdict, path string, st fileStat, gid int, gname string) {
	fix := fmt.Sprintf("chgrp %s %s && chmod 2755 %s", gname, path, path)
	switch {
	case st.mode&modeSetuid != 0:
		v.bad(Fail, fix, "%s is setuid (%s): relay qq refuses to run so, since the daemon would count every caller as %s", path, st, userName(st.uid))
	case st.mode&modeSetgid == 0:
		v.bad(Fail, fix, "%s is not setgid (%s): it cannot run the real qmail-queue, which only group %s may run", path, st, gname)
	case gid >= 0 && st.gid != gid:
		v.bad(Fail, fix, "%s is setgid %s (%s), but only group %s may run the real qmail-queue", path, groupName(st.gid), st, gname)
	case st.mode&0o001 == 0:
		v.bad(Fail, fix, "%s (%s) may not be run by every user, and every user's mail goes through it", path, st)
	}
}

// checkRelayLocal: the relay-local that relay-qq hands to is there, and
// installed as relay-qq is.
func (r *run) checkRelayLocal(path string, gid int, gname string) {
	const check = "relay-local"
	var v verdict
	build := fmt.Sprintf("CGO_ENABLED=0 go build -o %[1]s ./cmd/relay-local && chgrp %[2]s %[1]s && chmod 2755 %[1]s", path, gname)
	if path == "" {
		v.bad(Warn, fmt.Sprintf(`rebuild relay-qq with -DRELAY_LOCAL_PATH='"%s"' (README, Installing)`, installedRelayLocal), "relay-qq names no relay-local (it was built with -DRELAY_LOCAL_PATH of another name); not checked")
		r.emit(check, &v, "")
		return
	}
	st, err := statPath(path)
	if err != nil {
		v.bad(Fail, build, "%s, which relay-qq hands a message to when it is unsure (no qq.settings, the daemon down), is missing: those messages fail", path)
		r.emit(check, &v, "")
		return
	}
	prog, err := identify(path)
	switch {
	case errors.Is(err, fs.ErrPermission):
		r.notChecked(check, fmt.Sprintf("%s cannot be read: %v", path, err))
		return
	case err != nil || prog.kind != binRelayLocal && prog.kind != binRelay:
		v.bad(Fail, build, "%s is not relay-local (%s)", path, prog.kind)
	default:
		judgeSetgid(&v, path, st, gid, gname)
	}
	r.emit(check, &v, fmt.Sprintf("%s, which relay-qq hands to when unsure, is %s, %s", path, prog.kind, st))
}

// checkRealQmailQueue: [local] qmail_queue is qmail's qmail-queue, setuid
// qmailq, and only the group of relay qq may run it (4710).
func (r *run) checkRealQmailQueue() {
	const check = "real qmail-queue"
	path := r.realQmailQueue()
	qq := filepath.Join(r.o.QmailHome, "bin", "qmail-queue")
	_, gname := r.qqGroup()
	var v verdict
	st, err := statPath(path)
	if err != nil {
		fix := fmt.Sprintf(`set [local] qmail_queue = "%s.orig" in %s, with qmail's qmail-queue moved there (README, Installing, step 2)`, qq, r.o.Config)
		if r.qqStillQmails {
			fix = fmt.Sprintf("mv %[1]s %[2]s && chgrp %[3]s %[2]s && chmod 4710 %[2]s (then relay qq in its place, as the qmail-queue line says)", qq, path, gname)
		}
		v.bad(Fail, fix, "[local] qmail_queue = %q: %v: relay qq has no qmail-queue to run, so all local mail fails", path, unwrapPath(err))
		r.emit(check, &v, "")
		return
	}
	if samePath(path, qq) {
		v.bad(Fail, fmt.Sprintf(`set [local] qmail_queue = "%s.orig" in %s`, qq, r.o.Config), "[local] qmail_queue names %s, relay qq's own place", path)
		r.emit(check, &v, "")
		return
	}
	prog, err := identify(path)
	if err == nil && prog.kind != binOther {
		v.bad(Fail, fmt.Sprintf(`set [local] qmail_queue = "%s.orig" in %s`, qq, r.o.Config), "[local] qmail_queue names %s, which is %s, not qmail's qmail-queue: relay qq would run itself", path, prog.kind)
		r.emit(check, &v, "")
		return
	}
	// chown and chgrp clear the setuid bit: chmod comes last.
	var steps []string
	if st.uid != lookupUID("qmailq") {
		steps = append(steps, "chown qmailq "+path)
	}
	if st.gid == qmailGroup() || groupName(st.gid) != gname {
		steps = append(steps, fmt.Sprintf("chgrp %s %s", gname, path))
	}
	fix := strings.Join(append(steps, "chmod 4710 "+path), " && ")
	switch {
	case st.uid != lookupUID("qmailq") || st.mode&modeSetuid == 0:
		v.bad(Fail, fix, "%s is %s, not setuid qmailq: it cannot write qmail's queue", path, st)
	case st.mode&0o001 != 0:
		v.bad(Fail, fix, "%s is %s: any user may run it and queue mail past relay", path, st)
	case st.gid == qmailGroup():
		v.bad(Fail, fix, "%s is %s: group %s may run it, not the group relay qq is setgid to", path, st, groupName(st.gid))
	case st.mode&0o7777 != 0o4710:
		v.bad(Warn, fix, "%s is %s; the README's mode is 4710", path, st)
	}
	r.emit(check, &v, fmt.Sprintf("%s is qmail's qmail-queue, %s: only group %s may run it", path, st, groupName(st.gid)))
}

// checkQQSettings: <data_dir>/qq.settings is what the daemon would write
// for the config, relay-qq reads that file, and every user may.
func (r *run) checkQQSettings() {
	const check = "qq.settings"
	path := filepath.Join(r.cfg.DataDir, local.SettingsFile)
	var v verdict
	accounts, err := config.ReadPasswdFile(passwdFile)
	if err != nil {
		v.bad(Warn, "chmod 644 "+passwdFile, "%s: %v (exempt uids not compared)", passwdFile, err)
	}
	want, err := local.NewSettings(r.cfg, accounts)
	if err != nil {
		v.bad(Warn, `add [[listen]] addr = "/run/relay/submit.sock" mode = "local" to `+r.o.Config+", then "+r.restartFix(),
			"%v: the daemon writes no qq.settings, and relay qq cannot ask it", err)
		r.emit(check, &v, "")
		return
	}
	if r.qq.kind == binRelayQQ && r.qq.settingsPath != "" && !samePath(r.qq.settingsPath, path) {
		v.bad(Fail, fmt.Sprintf(`set data_dir = "%s" in %s, or rebuild relay-qq with -DRELAY_QQ_SETTINGS='"%s"' (then chgrp and chmod 2755 it again)`, filepath.Dir(r.qq.settingsPath), r.o.Config, path),
			"relay-qq reads %s, but the daemon writes %s: relay-qq follows the other file, or runs relay-local for every message", r.qq.settingsPath, path)
	}
	got, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrPermission):
		r.notChecked(check, fmt.Sprintf("%s cannot be read: %v", path, unwrapPath(err)))
		return
	case err != nil && r.daemon == nil:
		v.bad(Warn, r.startFix(), "%s: %v (the daemon writes it at start)", path, unwrapPath(err))
	case err != nil:
		v.bad(Warn, "the daemon's log says why it could not write it (journalctl -u relay), then "+r.restartFix(),
			"%s: %v, though the daemon runs: relay-qq hands every message to relay-local (the same decision, ~15 ms slower)", path, unwrapPath(err))
	default:
		if diff := settingsDiff(got, want); diff != "" {
			fix := "systemctl reload relay (the daemon writes it at start and on every reload)"
			if strings.Contains(diff, "socket=") {
				fix = r.restartFix() + " (the local socket changes at restart only)"
			}
			v.bad(Fail, fix, "%s is not what %s says (%s): relay-qq follows the file", path, r.o.Config, diff)
		} else {
			v.note("%s matches %s", path, r.o.Config)
		}
		if err := local.OthersCanRead(path); err != nil {
			v.bad(Warn, "chmod o+x "+filepath.Dir(path)+" (relay makes data_dir 0711)", "%v: relay-qq runs as the caller and cannot read it, so every message goes through relay-local (~15 ms slower)", err)
		}
	}
	r.emit(check, &v, "")
}

// settingsDiff names the key=value lines where the file and want differ.
func settingsDiff(got []byte, want local.Settings) string {
	wantText, err := want.Marshal()
	if err != nil {
		return err.Error()
	}
	lines := func(b []byte) map[string]string {
		m := map[string]string{}
		for l := range bytes.Lines(b) {
			s := strings.TrimRight(string(l), "\n")
			if s == "" || s[0] == '#' {
				continue
			}
			k, val, _ := strings.Cut(s, "=")
			m[k] = val
		}
		return m
	}
	g, w := lines(got), lines(wantText)
	var diffs []string
	for _, k := range []string{"socket", "qmail_queue", "on_daemon_down", "exempt_uids"} {
		if g[k] != w[k] {
			diffs = append(diffs, fmt.Sprintf("%s=%s, want %s", k, g[k], w[k]))
		}
	}
	for k := range g {
		if _, ok := w[k]; !ok {
			diffs = append(diffs, "unknown key "+k)
		}
	}
	return strings.Join(diffs, ", ")
}

// checkSendmail: /usr/sbin/sendmail, PHP's sendmail_path, leads to
// qmail's sendmail or to relay sendmail.
func (r *run) checkSendmail() {
	const check = "sendmail"
	path := r.o.Sendmail
	qmailSendmail := filepath.Join(r.o.QmailHome, "bin", "sendmail")
	fix := fmt.Sprintf("ln -sf %s %s", qmailSendmail, path)
	var v verdict
	if _, err := os.Lstat(path); err != nil {
		v.bad(Fail, fix, "%s: %v: PHP's mail() runs it (sendmail_path) and fails", path, unwrapPath(err))
		r.emit(check, &v, "")
		return
	}
	target, err := filepath.EvalSymlinks(path)
	if err != nil {
		v.bad(Fail, fix, "%s leads nowhere (%v): PHP's mail() fails", path, unwrapPath(err))
		r.emit(check, &v, "")
		return
	}
	if q, err := filepath.EvalSymlinks(qmailSendmail); err == nil && q == target {
		if st, err := statPath(target); err == nil && st.mode&0o001 == 0 {
			v.bad(Fail, "chmod 755 "+target, "%s (%s) may not be run by every user", target, st)
		}
		r.emit(check, &v, fmt.Sprintf("%s leads to qmail's sendmail (qmail-inject, then relay qq)", path))
		return
	}
	prog, err := identify(target)
	switch {
	case errors.Is(err, fs.ErrPermission):
		r.notChecked(check, fmt.Sprintf("%s cannot be read: %v", target, err))
		return
	case err == nil && (prog.kind == binRelayLocal || prog.kind == binRelay):
		r.emit(check, &v, fmt.Sprintf("%s leads to relay sendmail (%s)", path, target))
		return
	}
	v.bad(Fail, fix, "%s leads to %s, which is neither qmail's sendmail nor relay's: PHP's mail() may not pass relay", path, target)
	r.emit(check, &v, "")
}

// checkQmailSend: a qmail-send holds the queue's lock/sendmutex, as
// qmail-send does while it runs.
func (r *run) checkQmailSend() {
	const check = "qmail-send"
	queue := filepath.Join(r.o.QmailHome, "queue")
	mutex := filepath.Join(queue, "lock", "sendmutex")
	fix := "start qmail the way this server does (svc -u /service/qmail-send, or qmail's init script running qmail-start)"
	st, err := statPath(mutex)
	if errors.Is(err, fs.ErrPermission) {
		var seen []string
		for _, p := range r.procs.all() {
			if p.name == "qmail-send" {
				seen = append(seen, strconv.Itoa(p.pid))
			}
		}
		if len(seen) == 0 {
			r.add(check, Fail, fix, "no qmail-send process runs: nothing queued is delivered")
			return
		}
		r.notChecked(check, fmt.Sprintf("qmail-send runs (pid %s), but whether on %s only root can see", strings.Join(seen, ", "), queue))
		return
	}
	if err != nil {
		r.add(check, Fail, "relay doctor --qmail DIR, DIR being where qmail is installed", "%s: %v: is qmail installed in %s?", mutex, unwrapPath(err), r.o.QmailHome)
		return
	}
	for _, l := range r.procs.locks() {
		if l.inode != st.ino {
			continue
		}
		// The inode and the holder's name suffice: a file system may show
		// stat another device number than /proc/locks (btrfs subvolumes).
		if p := r.procs.get(l.pid); p == nil || p.name != "qmail-send" {
			continue
		}
		r.ok(check, "pid %d runs on %s", l.pid, queue)
		return
	}
	r.add(check, Fail, fix, "no qmail-send runs on %s (none holds %s): nothing queued is delivered", queue, mutex)
}
