package doctor

import (
	"errors"
	"fmt"
	"io/fs"
	"time"

	"relay/config"
	"relay/signals"
)

// sampleBytes is how much of qmail_send_log's end checkSignalsLog reads.
const sampleBytes = 64 << 10

// checkSignalsLog: [signals] qmail_send_log names a regular file the
// daemon may read, and its last lines read as qmail-send's to the
// follower's own parser (signals.SampleLog). Unset, it warns only when
// some limits section has bounce caps, which then never trip.
func (r *run) checkSignalsLog() {
	const check = "qmail_send_log"
	conf := r.cfg.Signals.QmailSendLog
	setFix := fmt.Sprintf("set [signals] qmail_send_log = \"/var/log/qmail/current\" (qmail-send's multilog) in %s, then systemctl restart relay", r.o.Config)
	if conf == "" {
		if where := bounceCaps(r.cfg); where != "" {
			r.add(check, Warn, setFix, "not set, but %s has bounce caps: they never trip", where)
			return
		}
		r.ok(check, "not set: bounces and deferrals are not counted")
		return
	}
	path := signals.LogPath(conf)
	st, err := statPath(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		r.add(check, Warn, setFix, "%s does not exist: relay warns and looks for it every half second; no bounce is counted until it is there", path)
		return
	case errors.Is(err, fs.ErrPermission) && !r.root():
		r.notChecked(check, fmt.Sprintf("%s cannot be reached: %v", path, unwrapPath(err)))
		return
	case err != nil:
		r.add(check, Fail, setFix, "%s: %v", path, unwrapPath(err))
		return
	case st.dir:
		r.add(check, Fail, setFix, "%s is a directory without a current file: name qmail-send's multilog directory or file", path)
		return
	}
	var v verdict
	if c, who, ok := r.daemonCred(); ok {
		if err := c.reach(path, 4); err != nil {
			v.bad(Fail, fmt.Sprintf("let %s read it: chmod o+r %s and o+x on its directories (multilog's files are 0644), or setfacl -m u:%s:r %s and a default ACL on its directory", userName(c.uid), path, userName(c.uid), path),
				"%s cannot read %s (%v): no bounce is counted", who, path, err)
		}
	}
	s, err := signals.SampleLog(path, sampleBytes)
	if err != nil {
		if errors.Is(err, fs.ErrPermission) && !r.root() {
			r.notChecked(check, fmt.Sprintf("%s cannot be read: %v", path, unwrapPath(err)))
			return
		}
		v.bad(Fail, "", "reading %s: %v", path, unwrapPath(err))
		r.emit(check, &v, "")
		return
	}
	switch {
	case s.Lines == 0:
		v.note("%s is empty: qmail-send has logged nothing yet", path)
	case s.QmailSend == 0 && s.Status > 0:
		v.note("%s: qmail-send's (%d status lines), no message logged in the last %d lines", path, s.Status, s.Lines)
	case s.QmailSend == 0:
		v.bad(Warn, "point [signals] qmail_send_log at qmail-send's own log (multilog: /var/log/qmail/current; syslog: the file splogger's qmail lines go to)",
			"none of the last %d lines of %s is one the follower reads (new msg, info msg, starting delivery, delivery, end msg): is it qmail-send's log?", s.Lines, path)
	default:
		format := "multilog, tai64n stamps"
		if s.Syslog > s.Multilog {
			format = "syslog (any local user can write qmail lines to it; qmail-send's multilog is safer)"
		}
		d := fmt.Sprintf("%s: %d of the last %d lines are qmail-send's (%s)", path, s.QmailSend, s.Lines, format)
		if !s.Last.IsZero() {
			d += fmt.Sprintf(", newest %s (%s ago)", s.Last.UTC().Format(time.RFC3339), r.o.Now.Sub(s.Last).Round(time.Second))
		}
		v.note("%s", d)
		if n := s.QmailSend - s.Stamped; n > 0 {
			v.note("%d carry no stamp the follower reads: they count at the time they are read", n)
		}
	}
	if s.Malformed > 0 {
		v.note("%d malformed (skipped)", s.Malformed)
	}
	if s.Long > 0 {
		v.note("%d over 16 KiB (skipped)", s.Long)
	}
	r.emit(check, &v, "")
}

// bounceCaps names the first limits section or allow entry with bounce
// caps, "" when none has.
func bounceCaps(cfg *config.Config) string {
	for _, kind := range config.IdentityKinds() {
		if l := cfg.Policy.Limits.ForKind(kind); l != nil && (len(l.Bounces) > 0 || l.MaxBounceRatio > 0) {
			return "[policy.limits." + kind + "]"
		}
	}
	for i, a := range cfg.Policy.Allow {
		if len(a.Bounces) > 0 || a.MaxBounceRatio > 0 {
			return fmt.Sprintf("[[policy.allow]] %d (%s)", i+1, a.Match)
		}
	}
	return ""
}
