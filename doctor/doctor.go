// Package doctor inspects a live relay installation read-only and says, one
// line per check, what it found and, for anything not ok, the exact
// command or config line that fixes it (`relay doctor`): the config, the
// running daemon and its sockets, qmail-queue and relay qq in their
// places with their modes, /usr/sbin/sendmail, qmail-send and its log
// ([signals] qmail_send_log), the SMTP
// ports, qmail's control files, certificates and DKIM keys.
//
// It never changes anything. It reads files, /proc, and talks to the
// daemon on its own sockets as any client may (the local socket's
// greeting, the admin API's /healthz). Run as root it sees everything;
// as another user, the checks it cannot make say so.
package doctor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"relay/config"
)

// Status is a check's outcome.
type Status string

// The three outcomes. Only Fail makes `relay doctor` exit 1; a check that
// could not be made (not root) is a Warn that says so.
const (
	OK   Status = "ok"
	Warn Status = "warn"
	Fail Status = "FAIL"
)

// Result is one check.
type Result struct {
	Check  string `json:"check"`  // what was checked ("sendmail", "listen 0.0.0.0:25")
	Status Status `json:"status"` // ok, warn or FAIL
	Detail string `json:"detail"` // what was found
	Fix    string `json:"fix"`    // for warn and FAIL: the command or config line that fixes it
}

// Options says where the installation is. The zero value of each path
// field is the real location.
type Options struct {
	// Config is relay.toml.
	Config string
	// QmailHome is qmail's directory (/var/qmail): bin/qmail-queue,
	// bin/sendmail, queue/lock/sendmutex.
	QmailHome string
	// Sendmail is where PHP's mail() runs sendmail (/usr/sbin/sendmail).
	Sendmail string
	// DNS looks each DKIM key's record up and compares it.
	DNS bool
	// Now is the time certificates are judged at (time.Now()).
	Now time.Time
	// Timeout bounds each conversation with the daemon (2s).
	Timeout time.Duration
	// AdminHealth asks the daemon's admin listener for /healthz, as
	// `relay ctl health` does; nil skips the check. cmd/relay wires it
	// to the admin package's client, so that doctor speaks to the admin
	// API exactly as ctl does without depending on the daemon's code.
	AdminHealth func(ctx context.Context, cfg *config.Config) error
}

// Defaults for Options.
const (
	DefaultQmailHome = "/var/qmail"
	DefaultSendmail  = "/usr/sbin/sendmail"
	defaultTimeout   = 2 * time.Second
	// certMinValidity is how long a certificate must still be valid.
	certMinValidity = 14 * 24 * time.Hour
)

// Run makes every check and returns the results in the order they were
// made.
func Run(ctx context.Context, o Options) []Result {
	if o.QmailHome == "" {
		o.QmailHome = DefaultQmailHome
	}
	if o.Sendmail == "" {
		o.Sendmail = DefaultSendmail
	}
	if o.Now.IsZero() {
		o.Now = time.Now()
	}
	if o.Timeout <= 0 {
		o.Timeout = defaultTimeout
	}
	r := &run{o: o, ctx: ctx, euid: os.Geteuid(), procs: newProcTable("/proc")}
	r.checkConfig()
	if r.cfg != nil {
		r.findDaemon()
		r.checkDaemon()
		r.checkListeners()
		r.checkAdmin()
		r.checkHandoff()
	}
	r.checkOtherSMTP()
	r.checkQQ()
	if r.cfg != nil {
		r.checkRealQmailQueue()
		r.checkQQSettings()
	}
	r.checkSendmail()
	r.checkQmailSend()
	if r.cfg != nil {
		r.checkSignalsLog()
		r.checkControl()
		r.checkTLS()
		r.checkDKIM()
		// Issue 18 (several relays over Redis) adds its check here: Redis
		// is reachable and this node sees the others ([cluster] redis).
	}
	return r.results
}

// Failed reports whether any result is a FAIL (exit 1).
func Failed(rs []Result) bool {
	for _, x := range rs {
		if x.Status == Fail {
			return true
		}
	}
	return false
}

// WriteText writes one line per result: status, check, what was found
// and, when not ok, "fix:" and the fix.
func WriteText(w io.Writer, rs []Result) error {
	width := 0
	for _, x := range rs {
		width = max(width, len(x.Check))
	}
	for _, x := range rs {
		line := fmt.Sprintf("%-4s  %-*s  %s", x.Status, width, x.Check, x.Detail)
		if x.Fix != "" {
			line += "  fix: " + x.Fix
		}
		line = strings.ReplaceAll(line, "\n", " ") // one line per check, whatever an error said
		if _, err := fmt.Fprintln(w, strings.TrimRight(line, " ")); err != nil {
			return err
		}
	}
	return nil
}

// WriteJSON writes the results as a JSON list of objects with the keys
// check, status, detail and fix.
func WriteJSON(w io.Writer, rs []Result) error {
	if rs == nil {
		rs = []Result{}
	}
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(rs)
}

// run is one doctor run: what it has found so far.
type run struct {
	o       Options
	ctx     context.Context
	euid    int
	cfg     *config.Config
	procs   *procTable
	results []Result

	probes        map[string]socketProbe // local listeners, by path
	daemon        *proc                  // the relay serve answering on the config's sockets
	daemonHow     string                 // how it was found
	supervisor    *proc                  // its root parent (method qmail-direct started as root)
	writers       []*proc
	qq            program // what is in qmail-queue's place
	qqStillQmails bool    // ... and it is still qmail's own qmail-queue
}

func (r *run) add(check string, st Status, fix string, format string, args ...any) {
	r.results = append(r.results, Result{Check: check, Status: st, Detail: fmt.Sprintf(format, args...), Fix: fix})
}

func (r *run) ok(check, format string, args ...any) { r.add(check, OK, "", format, args...) }

// notChecked records a check that needs more than this user may read.
func (r *run) notChecked(check, why string) {
	r.add(check, Warn, "run relay doctor as root", "not checked as uid %d: %s", r.euid, why)
}

func (r *run) root() bool { return r.euid == 0 }
