package e2e

// Issue 16 end to end: first-time recipients, and bounces and deferrals
// read from qmail-send's log (multilog and syslog, across rotations and
// restarts), joined by the qp of relay's own "250 ok ... qp N" replies and
// of relay qq's pid.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"relay/admin"
	"relay/internal/qmailtest"
)

const taiOffset = 1<<62 + 10

// multilogStamp is multilog's tai64n label for t.
func multilogStamp(t time.Time) string {
	return fmt.Sprintf("@%016x%08x", uint64(t.Unix())+taiOffset, t.Nanosecond())
}

// qmailLog writes qmail-send's lines the way its logger does.
type qmailLog struct {
	t      *testing.T
	path   string
	syslog bool
	mu     sync.Mutex
	msg    int // qmail message numbers (inodes) handed out
	del    int // delivery numbers
}

func (l *qmailLog) write(lines ...string) {
	l.t.Helper()
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		l.t.Fatal(err)
	}
	defer f.Close()
	var b strings.Builder
	for _, s := range lines {
		now := time.Now()
		if l.syslog {
			fmt.Fprintf(&b, "%s mail qmail: %d.%06d %s\n", now.Format("Jan _2 15:04:05"), now.Unix(), now.Nanosecond()/1000, s)
		} else {
			fmt.Fprintf(&b, "%s %s\n", multilogStamp(now), s)
		}
	}
	if _, err := f.WriteString(b.String()); err != nil {
		l.t.Fatal(err)
	}
}

// message logs one message queued by qmail-queue process qp and returns
// the lines of its deliveries, one per outcome, for the caller to write.
func (l *qmailLog) message(qp int, from string, outcomes ...string) (queued, delivered []string) {
	l.mu.Lock()
	l.msg++
	n := 500000 + l.msg
	l.mu.Unlock()
	queued = []string{fmt.Sprintf("new msg %d", n), fmt.Sprintf("info msg %d: bytes 456 from <%s> qp %d uid 0", n, from, qp)}
	for i, o := range outcomes {
		l.mu.Lock()
		l.del++
		d := l.del
		l.mu.Unlock()
		queued = append(queued, fmt.Sprintf("starting delivery %d: msg %d to remote r%d@remote.example", d, n, i))
		delivered = append(delivered, fmt.Sprintf("delivery %d: %s: %s", d, o, "Remote_host_said:_whatever/"))
	}
	delivered = append(delivered, fmt.Sprintf("end msg %d", n))
	return queued, delivered
}

var qpReply = regexp.MustCompile(`^250 ok \d+ qp (\d+)$`)

// qpOf reads N from "250 ok <time> qp N".
func qpOf(t *testing.T, reply string) int {
	t.Helper()
	m := qpReply.FindStringSubmatch(reply)
	if m == nil {
		t.Fatalf("reply %q, want 250 ok <time> qp <pid>", reply)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// waitSender polls GET /api/senders/{id} until cond holds (new log lines
// must take effect within seconds; a loaded machine gets 25).
func waitSender(t *testing.T, d *daemon, id, what string, cond func(admin.Sender) bool) admin.Sender {
	t.Helper()
	deadline := time.Now().Add(25 * time.Second)
	for {
		code, body := d.api("GET", "/api/senders/"+pathID(id))
		if code == 200 {
			if s := decodeJSON[admin.Sender](t, body); cond(s) {
				return s
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never showed %s: %d %s\nrelay log:\n%s", id, what, code, body, d.logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func usedOf(s admin.Sender, metric, window string) int64 {
	for _, u := range s.Usage {
		if u.Metric == metric && u.Window == window {
			return u.Used
		}
	}
	return -1
}

func deliveries(s admin.Sender) admin.Deliveries {
	if s.Deliveries == nil {
		return admin.Deliveries{}
	}
	return *s.Deliveries
}

// TestBouncesFromMultilog: relay's own hand-offs, joined by the qp of its
// 250 reply, count their failures as bounces; other qp values do not,
// whatever their sender; deferrals are shown apart; over the cap the
// sender's next mail is deferred and the event names the signal. The log
// is followed across a multilog rotation and a restart.
func TestBouncesFromMultilog(t *testing.T) {
	logDir := filepath.Join(t.TempDir(), "log")
	os.MkdirAll(logDir, 0o755)
	current := filepath.Join(logDir, "current")
	os.WriteFile(current, nil, 0o644)
	d := newDaemon(t, daemonOpts{
		policy:    policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"1000/1h\"]\nbounces = [\"3/1h\"]\n"),
		extraTOML: fmt.Sprintf("[signals]\nqmail_send_log = %q\n", logDir),
	})
	lg := &qmailLog{t: t, path: current}
	bob := "sender:bob@example.com"

	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	qp := qpOf(t, s.send("bob@example.com", rcpts("a", 3), "Subject: 1\r\n\r\nx\r\n"))
	// Another program's message with bob's address and another qp.
	q, dl := lg.message(qp+100000, "bob@example.com", "failure", "failure", "failure", "failure")
	lg.write(append(q, dl...)...)
	q, dl = lg.message(qp, "bob@example.com", "failure", "deferral", "success")
	lg.write(q...)
	lg.write(dl[:2]...) // failure, deferral
	got := waitSender(t, d, bob, "a bounce and a deferral", func(s admin.Sender) bool {
		return usedOf(s, "bounces", "1h") == 1 && deliveries(s).Deferrals == 1
	})
	if dv := deliveries(got); dv.Failures != 1 || dv.Successes != 0 || dv.Window != "1h" {
		t.Fatalf("deliveries %+v", dv)
	}
	// The raw JSON has the deferrals under a key that says so.
	if _, body := d.api("GET", "/api/senders/"+pathID(bob)); !strings.Contains(body, `"deferrals":1`) {
		t.Fatalf("JSON: %s", body)
	}

	// The message's last delivery comes after a multilog rotation.
	if err := os.Rename(current, filepath.Join(logDir, multilogStamp(time.Now())+".s")); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(current, nil, 0o644)
	lg.write(dl[2:]...)
	waitSender(t, d, bob, "the success after the rotation", func(s admin.Sender) bool { return deliveries(s).Successes == 1 })

	// A restart, with lines logged while relay was down.
	qp2 := qpOf(t, s.send("bob@example.com", rcpts("b", 3), "Subject: 2\r\n\r\nx\r\n"))
	q, dl = lg.message(qp2, "bob@example.com", "failure", "failure", "failure")
	lg.write(q...)
	d.stop()
	lg.write(dl...)
	d.start()
	got = waitSender(t, d, bob, "4 bounces", func(s admin.Sender) bool { return usedOf(s, "bounces", "1h") == 4 })
	if dv := deliveries(got); dv.Failures != 4 || dv.Deferrals != 1 || dv.Successes != 1 {
		t.Fatalf("after the restart: %+v (lines counted twice or lost)", dv)
	}

	// Over 3 bounces/1h: the next mail is deferred, naming the identity.
	s = dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.expect("MAIL FROM:<bob@example.com>", "250")
	r := s.cmd("RCPT TO:<c@remote.example>")
	if !regexp.MustCompile(`^451 4\.7\.1 sender:bob@example\.com is over 3 bounces/1h; try again in `).MatchString(r) {
		t.Fatalf("RCPT over the bounce cap: %q", r)
	}
	found := false
	for _, ev := range d.events("over_limit") {
		found = found || ev.Identity == bob && strings.Contains(ev.Detail, "over 3 bounces/1h")
	}
	if !found {
		t.Fatalf("no over_limit event names the bounce signal: %+v", d.events(""))
	}
	// relay ctl shows it next to the caps.
	_, out, _ := ctlRun(t, d, "sender", bob)
	if !strings.Contains(out, "bounces 4/3 per 1h") || !strings.Contains(out, "1 deferred") {
		t.Fatalf("relay ctl sender:\n%s", out)
	}
}

// TestBouncesFromSyslogAndRelayQQ: mail a local script injects through
// relay qq joins by relay qq's pid (which the exec of qmail-queue keeps),
// in a syslog file that logrotate renames; the ratio cap applies once the
// sample is reached.
func TestBouncesFromSyslogAndRelayQQ(t *testing.T) {
	logDir := t.TempDir()
	maillog := filepath.Join(logDir, "mail.log")
	os.WriteFile(maillog, []byte("Mar  2 09:00:00 mail sshd[1]: session opened\n"), 0o644)
	d := newDaemon(t, daemonOpts{
		policy:    policyWith("defer", 0, "[policy.limits.uid]\nrcpts = [\"1000/1h\"]\nmax_bounce_ratio = 0.5\nmin_bounce_sample = 4\n"),
		extraTOML: fmt.Sprintf("[signals]\nqmail_send_log = %q\n", maillog),
	})
	lg := &qmailLog{t: t, path: maillog, syslog: true}
	id := "uid:local:" + strconv.Itoa(os.Getuid())

	qq := func(to string) (int, int, string) {
		cmd := exec.Command(bins.relay, "qq", "--config", d.config)
		cmd.Env = d.env
		msg := []byte("From: www@example.com\nSubject: hi\n\nbody\n")
		env := []byte("Fwww@example.com\x00T" + to + "\x00\x00")
		msgR, msgW, _ := os.Pipe()
		envR, envW, _ := os.Pipe()
		var stderr bytes.Buffer
		cmd.Stdin, cmd.Stdout, cmd.Stderr = msgR, envR, &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		msgR.Close()
		envR.Close()
		msgW.Write(msg)
		msgW.Close()
		envW.Write(env)
		envW.Close()
		cmd.Wait()
		return cmd.ProcessState.ExitCode(), cmd.Process.Pid, stderr.String()
	}
	code, pid, stderr := qq("x@remote.example")
	if code != 0 {
		t.Fatalf("relay qq exit %d: %s", code, stderr)
	}
	calls := d.queued()
	if len(calls) != 1 || !strings.HasSuffix(calls[0].Info, fmt.Sprintf("pid=%d", pid)) {
		t.Fatalf("qmail-queue ran as %+v, want pid %d (the exec keeps relay qq's pid)", calls, pid)
	}
	q, dl := lg.message(pid, "www@example.com", "success", "failure")
	lg.write(append(q, dl...)...)
	waitSender(t, d, id, "one failure of two", func(s admin.Sender) bool {
		dv := deliveries(s)
		return dv.Failures == 1 && dv.Successes == 1
	})

	// logrotate: the file is renamed and a new one started.
	if err := os.Rename(maillog, maillog+".1"); err != nil {
		t.Fatal(err)
	}
	code, pid, stderr = qq("y@remote.example")
	if code != 0 {
		t.Fatalf("relay qq exit %d: %s", code, stderr)
	}
	q, dl = lg.message(pid, "www@example.com", "failure", "failure")
	lg.write(append(q, dl...)...)
	got := waitSender(t, d, id, "3 failures of 4", func(s admin.Sender) bool { return deliveries(s).Failures == 3 })
	if dv := deliveries(got); dv.BounceRate != 0.75 || dv.MaxBounceRatio != 0.5 || dv.MinBounceSample != 4 {
		t.Fatalf("deliveries %+v", dv)
	}
	// Over the ratio: relay qq defers (exit 71) and says why.
	code, _, stderr = qq("z@remote.example")
	if code != 71 || !strings.Contains(stderr, "is over 50% bounces/1h") {
		t.Fatalf("relay qq over the ratio: exit %d, %q", code, stderr)
	}
	if len(d.queued()) != 2 {
		t.Fatal("a deferred message reached qmail-queue")
	}
}

// TestNewRcptsEndToEnd: first-time recipients per identity; two sessions
// racing to the same new address count it once; the memory survives
// kill -9 once flushed.
func TestNewRcptsEndToEnd(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, "[policy.limits.sender]\nnew_rcpts = [\"3/1h\"]\n")})
	alice := "sender:alice@example.com"
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("alice@example.com", []string{"a@remote.example", "b@remote.example"}, "Subject: 1\r\n\r\nx\r\n")
	for range 3 {
		s.mustSend("alice@example.com", []string{"A@remote.example", "b@REMOTE.example"}, "Subject: again\r\n\r\nx\r\n")
	}
	// Three sessions at once: two to the same new address, one to
	// another; with one slot left, the shared address takes it once.
	conns := make([]*smtpConn, 3)
	for i := range conns {
		conns[i] = dialSMTP(t, d.smtp)
		conns[i].expect("EHLO client.example.test", "250")
		conns[i].expect("MAIL FROM:<alice@example.com>", "250")
	}
	conns[0].expect("RCPT TO:<c@remote.example>", "250")
	conns[1].expect("RCPT TO:<c@remote.example>", "250")
	wantReply(t, "a 4th new recipient", conns[2].cmd("RCPT TO:<d@remote.example>"),
		regexp.MustCompile(`^451 4\.7\.1 sender:alice@example\.com is over 3 new recipients/1h; try again in `))
	for i := range 2 {
		conns[i].expect("DATA", "354")
		fmt.Fprintf(conns[i].c, "Subject: race\r\n\r\nx\r\n.\r\n")
		if r := conns[i].reply(); !strings.HasPrefix(r, "250 ok") {
			t.Fatal(r)
		}
	}
	if got := usedOf(getSender(t, d, alice), "new_rcpts", "1h"); got != 3 {
		t.Fatalf("new_rcpts used %d, want 3 (c counted once)", got)
	}

	// kill -9 once the daemon has flushed (its database stops changing).
	waitQuiet(t, filepath.Join(d.dir, "data", "relay.db"))
	d.kill9()
	d.start()
	s = dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	// The window is full, so only remembered addresses can pass.
	s.mustSend("alice@example.com", []string{"a@remote.example", "b@remote.example", "c@remote.example"}, "Subject: known\r\n\r\nx\r\n")
	if got := usedOf(getSender(t, d, alice), "new_rcpts", "1h"); got != 3 {
		t.Fatalf("after kill -9 new_rcpts used %d, want 3", got)
	}
}

// waitQuiet waits until path has been written and then stays unchanged
// for 3 flush intervals: whatever was counted is on disk.
func waitQuiet(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(25 * time.Second)
	var last time.Time
	stable := time.Now()
	for time.Now().Before(deadline) {
		st, err := os.Stat(path)
		if err == nil && !st.ModTime().Equal(last) {
			last, stable = st.ModTime(), time.Now()
		}
		if !last.IsZero() && time.Since(stable) > 3*time.Second {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s never stopped changing", path)
}

// TestBouncesFromRealQmailSend: relay hands off to the real qmail-queue
// and the real qmail-send delivers, bounces and logs; relay joins that log
// (no stamps: qmail-send's own output) by the qp of its 250 and counts a
// success and a failure for the sender, whose next mail is then over
// bounces = ["1/1h"] once a second failure comes.
func TestBouncesFromRealQmailSend(t *testing.T) {
	q := qmailtest.Require(t)
	q.StartSend()
	good, sender := q.Mailbox(), q.Mailbox() // the bounces go back to sender's mailbox
	dead := "rqt-nobody-" + strconv.FormatInt(time.Now().UnixNano(), 36) + "@" + q.Me
	d := newDaemon(t, daemonOpts{
		command:   filepath.Join(q.Home, "bin", "qmail-queue"),
		relay:     fmt.Sprintf("[relay]\nlocal_domains = [%q]\nrelay_networks = [\"127.0.0.0/8\"]\ntimeout = \"30s\"\n", q.Me),
		policy:    policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"1000/1h\"]\nbounces = [\"1/1h\"]\n"),
		extraTOML: fmt.Sprintf("[signals]\nqmail_send_log = %q\n", q.LogPath()),
	})
	id := "sender:" + strings.ToLower(sender.Addr)
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	qp := qpOf(t, s.send(sender.Addr, []string{good.Addr, dead}, "Subject: real qmail\r\n\r\nx\r\n"))
	q.Wait(good, 1, 60*time.Second)
	q.Wait(sender, 1, 60*time.Second) // the bounce of dead
	if log := q.Log(); !strings.Contains(log, fmt.Sprintf("qp %d ", qp)) {
		t.Fatalf("qmail-send never logged qp %d:\n%s", qp, log)
	}
	got := waitSender(t, d, id, "a success and a failure", func(s admin.Sender) bool {
		dv := deliveries(s)
		return dv.Successes == 1 && dv.Failures == 1
	})
	if usedOf(got, "bounces", "1h") != 1 {
		t.Fatalf("usage %+v", got.Usage)
	}
	qpOf(t, s.send(sender.Addr, []string{dead}, "Subject: real qmail 2\r\n\r\nx\r\n"))
	q.Wait(sender, 2, 60*time.Second)
	waitSender(t, d, id, "2 failures", func(s admin.Sender) bool { return deliveries(s).Failures == 2 })
	s.expect("MAIL FROM:<"+sender.Addr+">", "250")
	if r := s.cmd("RCPT TO:<" + good.Addr + ">"); !strings.HasPrefix(r, "451 4.7.1 "+id+" is over 1 bounce/1h") {
		t.Fatalf("RCPT over the bounce cap: %q", r)
	}
}

// TestSignalsExactAcrossKill9: kill -9 at the worst moments loses no
// hand-off and counts no delivery line twice. First, right after the 250s
// of a batch of messages (their hand-offs are not yet in relay.db); then,
// round after round, while qmail-send's lines are being read: right after
// a flush carried counts of lines just read, and right after lines were
// written, before relay read them. In the end every delivery is counted
// exactly once.
func TestSignalsExactAcrossKill9(t *testing.T) {
	logDir := filepath.Join(t.TempDir(), "log")
	os.MkdirAll(logDir, 0o755)
	current := filepath.Join(logDir, "current")
	os.WriteFile(current, nil, 0o644)
	d := newDaemon(t, daemonOpts{
		policy:    policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"100000/1h\"]\nbounces = [\"100000/1h\"]\n"),
		extraTOML: fmt.Sprintf("[signals]\nqmail_send_log = %q\n", logDir),
	})
	lg := &qmailLog{t: t, path: current}
	bob := "sender:bob@example.com"
	db := filepath.Join(d.dir, "data", "relay.db")
	send := func(n int) []int {
		s := dialSMTP(t, d.smtp)
		s.expect("EHLO client.example.test", "250")
		qps := make([]int, n)
		for i := range qps {
			qps[i] = qpOf(t, s.send("bob@example.com", []string{fmt.Sprintf("r%d@remote.example", i)}, "Subject: x\r\n\r\nx\r\n"))
		}
		return qps
	}
	var failures, successes int64
	logDeliveries := func(qps []int) {
		for i, qp := range qps {
			outcome := "failure"
			if i%2 == 1 {
				outcome = "success"
			}
			q, dl := lg.message(qp, "bob@example.com", outcome, outcome)
			lg.write(append(q, dl...)...)
			if outcome == "failure" {
				failures += 2
			} else {
				successes += 2
			}
		}
	}
	counted := func(s admin.Sender) bool {
		dv := deliveries(s)
		return dv.Failures == failures && dv.Successes == successes
	}

	// 1. kill -9 at once after the last 250.
	qps := send(6)
	d.kill9()
	d.start()
	logDeliveries(qps)
	waitSender(t, d, bob, "the deliveries of the messages sent just before kill -9", counted)

	// 2. Rounds of lines read, each ended by a kill -9.
	for round := range 6 {
		qps := send(5)
		if round%2 == 0 {
			// Around the flush that carries the counts of lines just read
			// (relay.db starts to change once they are counted: the kill
			// may come before, during or after its commit).
			logDeliveries(qps)
			waitSender(t, d, bob, fmt.Sprintf("round %d's deliveries", round), counted)
			st, _ := os.Stat(db)
			waitChange(t, db, st.ModTime())
		} else {
			// Lines written, maybe read, maybe counted, not flushed.
			logDeliveries(qps)
		}
		d.kill9()
		d.start()
	}
	waitSender(t, d, bob, "every delivery", counted)
	// Nothing counted twice: the counts stay put.
	st, _ := os.Stat(db)
	waitChange(t, db, st.ModTime())
	if got := getSender(t, d, bob); !counted(got) || usedOf(got, "bounces", "1h") != failures {
		t.Fatalf("deliveries %+v, bounces %d; want %d failures and %d successes, each once", deliveries(got), usedOf(got, "bounces", "1h"), failures, successes)
	}
	// A clean stop leaves no hand-off journal behind.
	d.stop()
	if ents, _ := os.ReadDir(filepath.Join(d.dir, "data", "signals")); len(ents) != 0 {
		t.Errorf("data_dir/signals after a clean stop: %v", ents)
	}
}

// waitChange waits (bounded) until path's mtime is no longer old: the
// daemon flushed.
func waitChange(t *testing.T, path string, old time.Time) {
	t.Helper()
	deadline := time.Now().Add(25 * time.Second)
	for time.Now().Before(deadline) {
		if st, err := os.Stat(path); err == nil && !st.ModTime().Equal(old) {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("%s never changed", path)
}

// TestSignalsMetrics: /metrics has the follower's series after real
// traffic: hand-offs, joined and unjoined messages, deliveries by result,
// garbage skipped, the place in the log, and first-time recipients.
func TestSignalsMetrics(t *testing.T) {
	logDir := filepath.Join(t.TempDir(), "log")
	current := filepath.Join(logDir, "current")
	d := newDaemon(t, daemonOpts{
		policy:    policyWith("defer", 0, "[policy.limits.sender]\nnew_rcpts = [\"100/1h\"]\n"),
		extraTOML: fmt.Sprintf("[signals]\nqmail_send_log = %q\n", current),
	})
	if v, _ := sum(scrape(t, d), "relay_signals_log_missing", nil); v != 1 {
		t.Errorf("relay_signals_log_missing = %v while the log is missing", v)
	}
	os.MkdirAll(logDir, 0o755)
	lg := &qmailLog{t: t, path: current}
	lg.write("status: local 0/10 remote 0/20")
	bob := "sender:bob@example.com"
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	qp1 := qpOf(t, s.send("bob@example.com", []string{"a@remote.example"}, "Subject: 1\r\n\r\nx\r\n"))
	qp2 := qpOf(t, s.send("bob@example.com", []string{"b@remote.example", "a@remote.example"}, "Subject: 2\r\n\r\nx\r\n"))
	start := time.Now()
	q, dl := lg.message(qp1, "bob@example.com", "failure", "success")
	lg.write(append(q, dl...)...)
	q, dl = lg.message(qp2+100000, "bob@example.com", "failure") // not relay's
	lg.write(append(q, dl...)...)
	lg.write("delivery 77: victory: nothing of the sort", strings.Repeat("x", 20<<10))
	q, dl = lg.message(qp2, "bob@example.com", "deferral")
	lg.write(append(q, dl...)...)
	waitSender(t, d, bob, "the deliveries", func(s admin.Sender) bool { return deliveries(s).Deferrals == 1 })

	st, err := os.Stat(current)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Count(string(must(os.ReadFile(current))), "\n")
	var series []metricSeries
	deadline := time.Now().Add(25 * time.Second)
	for { // the gauges follow the follower's next look
		series = scrape(t, d)
		if v, _ := sum(series, "relay_signals_position_bytes", nil); v == float64(st.Size()) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"relay_signals_lines_total", nil, float64(lines)},
		{"relay_signals_lines_skipped_total", map[string]string{"reason": "malformed"}, 1},
		{"relay_signals_lines_skipped_total", map[string]string{"reason": "long"}, 1},
		{"relay_signals_handoffs_total", nil, 2},
		{"relay_signals_messages_joined_total", nil, 2},
		{"relay_signals_messages_unjoined_total", nil, 0}, // the other message waits 2 minutes for a hand-off
		{"relay_signals_pending", map[string]string{"what": "tentative"}, 1},
		{"relay_signals_deliveries_total", map[string]string{"result": "failure"}, 1},
		{"relay_signals_deliveries_total", map[string]string{"result": "success"}, 1},
		{"relay_signals_deliveries_total", map[string]string{"result": "deferral"}, 1},
		{"relay_signals_errors_total", nil, 0},
		{"relay_signals_position_bytes", nil, float64(st.Size())},
		{"relay_signals_behind_bytes", nil, 0},
		{"relay_signals_log_missing", nil, 0},
		{"relay_signals_pending", map[string]string{"what": "handoffs"}, 0},
		{"relay_signals_pending", map[string]string{"what": "messages"}, 0},
		{"relay_signals_new_recipients_total", map[string]string{"kind": "sender"}, 2},
	} {
		if v, ok := sum(series, c.name, c.labels); !ok || v != c.want {
			t.Errorf("%s%v = %v (present %v), want %v", c.name, c.labels, v, ok, c.want)
		}
	}
	if v, _ := sum(series, "relay_signals_last_line_timestamp_seconds", nil); v < float64(start.Unix()-1) || v > float64(time.Now().Unix()+1) {
		t.Errorf("relay_signals_last_line_timestamp_seconds = %v, want about now", v)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
