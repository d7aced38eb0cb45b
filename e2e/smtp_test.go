package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestHandOffToQmailQueue: a relay client's message reaches qmail-queue
// exactly as qmail-smtpd would store it, and 250 carries qmail's qp.
func TestHandOffToQmailQueue(t *testing.T) {
	d := newDaemon(t, daemonOpts{})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	got := s.send("alice@example.com", []string{"bob@remote.example", "carol@remote.example"},
		"Subject: hi\r\n\r\nline one\r\n..dot line\r\n")
	m := regexp.MustCompile(`^250 ok (\d+) qp (\d+)$`).FindStringSubmatch(got)
	if m == nil {
		t.Fatalf("DATA reply %q, want 250 ok <time> qp <pid>", got)
	}
	calls := d.queued()
	if len(calls) != 1 {
		t.Fatalf("qmail-queue called %d times, want 1", len(calls))
	}
	c := calls[0]
	if want := "Falice@example.com\x00Tbob@remote.example\x00Tcarol@remote.example\x00\x00"; string(c.Envelope) != want {
		t.Errorf("envelope %q, want %q", c.Envelope, want)
	}
	if !strings.Contains(c.Info, "pid="+m[2]) {
		t.Errorf("qp %s is not the pid of qmail-queue (%s)", m[2], c.Info)
	}
	msg := string(c.Message)
	lines := strings.SplitN(msg, "\n", 3)
	if !regexp.MustCompile(`^Received: from unknown \(HELO client\.example\.test\) \(127\.0\.0\.1\)$`).MatchString(lines[0]) {
		t.Errorf("Received line 1 %q", lines[0])
	}
	if !regexp.MustCompile(`^  by mail\.example\.test with E?SMTP; \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000$`).MatchString(lines[1]) {
		t.Errorf("Received line 2 %q", lines[1])
	}
	if !strings.HasSuffix(msg, "Subject: hi\n\nline one\n.dot line\n") {
		t.Errorf("stored message not LF / dot-unstuffed:\n%q", msg)
	}
	if strings.Contains(msg, "\r") {
		t.Errorf("CR left in the stored message: %q", msg)
	}
	// One log line per transaction with stable keys, for multilog and grep.
	logLine := regexp.MustCompile(`msg=transaction cid=\d+ remote=127\.0\.0\.1 helo=client\.example\.test user="" from=alice@example\.com rcpts=2 size=\d+ code=250 qp=` + m[2] + ` ms=\d+`)
	deadline := time.Now().Add(5 * time.Second)
	for !logLine.MatchString(d.logs()) {
		if time.Now().After(deadline) {
			t.Fatalf("no transaction log line matching %s in:\n%s", logLine, d.logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestQmailQueueExitCodes: every qmail-queue failure reaches the client with
// qmail's text, and never as 250.
func TestQmailQueueExitCodes(t *testing.T) {
	cases := []struct {
		exit  string
		reply string
	}{
		{"11", "554 5.1.3 envelope address too long for qq (#5.1.3)"},
		{"31", "554 5.3.0 mail server permanently rejected message (#5.3.0)"},
		{"53", "451 4.3.0 qq write error or disk full (#4.3.0)"},
		{"71", "451 4.3.0 mail server temporarily rejected message (#4.3.0)"},
		{"91", "451 4.3.0 qq internal bug (#4.3.0)"},
	}
	d := newDaemon(t, daemonOpts{})
	for _, c := range cases {
		d.stop()
		d.env = append(d.env, "FAKEQQ_EXIT="+c.exit)
		d.start()
		s := dialSMTP(t, d.smtp)
		s.expect("HELO x", "250")
		if got := s.send("a@example.com", []string{"b@remote.example"}, "Subject: x\r\n\r\nx\r\n"); got != c.reply {
			t.Errorf("exit %s: reply %q, want %q", c.exit, got, c.reply)
		}
	}
}

// TestRelayControl: the internet may send to local domains only; relay
// clients anywhere.
func TestRelayControl(t *testing.T) {
	d := newDaemon(t, daemonOpts{relay: `[relay]
local_domains = ["example.com"]
relay_networks = ["10.9.9.0/24"]
`})
	s := dialSMTP(t, d.smtp)
	s.expect("HELO x", "250")
	s.expect("MAIL FROM:<x@internet.example>", "250")
	s.expect("RCPT TO:<user@example.com>", "250")
	for _, rc := range []string{"user@evil.example", "user%evil.example@example.com", "evil.example!user@example.com",
		"@example.com:user@evil.example", `"user@evil.example"@example.com`, "user@evil.example@example.com", "user@example.com."} {
		got := s.cmd("RCPT TO:<" + rc + ">")
		if strings.HasPrefix(got, "2") {
			t.Errorf("RCPT %s from a non-relay client: %q", rc, got)
		}
	}
}

// TestSwaks drives relay with a real SMTP client outside Go.
func TestSwaks(t *testing.T) {
	if _, err := exec.LookPath("swaks"); err != nil {
		t.Skip("swaks not installed (.ci/run installs it)")
	}
	d := newDaemon(t, daemonOpts{})
	host, port, _ := net.SplitHostPort(d.smtp)
	out, err := exec.Command("swaks", "--server", host, "--port", port, "--from", "alice@example.com",
		"--to", "bob@remote.example", "--helo", "swaks.example", "--header", "Subject: from swaks",
		"--body", "hello from swaks").CombinedOutput()
	if err != nil {
		t.Fatalf("swaks: %v\n%s", err, out)
	}
	if !regexp.MustCompile(`<-\s+250 ok \d+ qp \d+`).Match(out) {
		t.Errorf("swaks did not see 250 ok <time> qp <pid>:\n%s", out)
	}
	calls := d.queued()
	if len(calls) != 1 || !bytes.Contains(calls[0].Message, []byte("hello from swaks")) {
		t.Fatalf("swaks message not queued: %d calls", len(calls))
	}
}

// TestReloadOnSIGHUP: a changed file takes effect; a bad one keeps the old.
func TestReloadOnSIGHUP(t *testing.T) {
	d := newDaemon(t, daemonOpts{relay: `[relay]
local_domains = ["example.com"]
relay_networks = ["10.9.9.0/24"]
`})
	s := dialSMTP(t, d.smtp)
	s.expect("HELO x", "250")
	s.expect("MAIL FROM:<x@internet.example>", "250")
	s.expect("RCPT TO:<user@other.example>", "553")

	cfg, _ := os.ReadFile(d.config)
	good := strings.Replace(string(cfg), `local_domains = ["example.com"]`, `local_domains = ["example.com", "other.example"]`, 1)
	os.WriteFile(d.config, []byte(good), 0o644)
	d.signal(syscall.SIGHUP)
	d.waitLog("config reloaded")
	s = dialSMTP(t, d.smtp)
	s.expect("HELO x", "250")
	s.expect("MAIL FROM:<x@internet.example>", "250")
	s.expect("RCPT TO:<user@other.example>", "250")

	os.WriteFile(d.config, []byte(good+"\n[relay]\nbogus = 1\n"), 0o644)
	d.signal(syscall.SIGHUP)
	d.waitLog("reload failed")
	s = dialSMTP(t, d.smtp)
	s.expect("HELO x", "250")
	s.expect("MAIL FROM:<x@internet.example>", "250")
	s.expect("RCPT TO:<user@other.example>", "250")
}

// TestSIGTERMDrainsTransactionInFlight: a message whose hand-off is under way
// at SIGTERM still gets its 250, and relay exits 0.
func TestSIGTERMDrainsTransactionInFlight(t *testing.T) {
	d := newDaemon(t, daemonOpts{env: []string{"FAKEQQ_SLEEP=2s"}})
	s := dialSMTP(t, d.smtp)
	s.expect("HELO x", "250")
	s.expect("MAIL FROM:<a@example.com>", "250")
	s.expect("RCPT TO:<b@remote.example>", "250")
	s.expect("DATA", "354")
	fmt.Fprint(s.c, "Subject: slow\r\n\r\nbody\r\n.\r\n")
	time.Sleep(500 * time.Millisecond) // the fake qmail-queue is now sleeping
	d.signal(syscall.SIGTERM)
	if got := s.reply(); !strings.HasPrefix(got, "250 ok ") {
		t.Fatalf("in-flight transaction got %q", got)
	}
	select {
	case <-d.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("relay did not exit after SIGTERM")
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
	if _, err := net.DialTimeout("tcp", d.smtp, time.Second); err == nil {
		t.Error("still accepting after shutdown")
	}
}

// TestExampleConfigQuickstart runs the shipped relay.example.toml as the
// README says (only its loopback ports moved to free ones) and delivers into
// its Maildir, with no root and no qmail.
func TestExampleConfigQuickstart(t *testing.T) {
	dir := t.TempDir()
	example, err := os.ReadFile("../relay.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	smtpAddr, adminAddr := freePort(t), freePort(t)
	cfg := strings.NewReplacer(`"127.0.0.1:2525"`, strconv.Quote(smtpAddr), `"127.0.0.1:2587"`, strconv.Quote(freePort(t)),
		`"127.0.0.1:8025"`, strconv.Quote(adminAddr)).Replace(string(example))
	path := filepath.Join(dir, "relay.toml")
	os.WriteFile(path, []byte(cfg), 0o644)
	if out, err := exec.Command(bins.relay, "check-config", "--config", path).CombinedOutput(); err != nil {
		t.Fatalf("check-config on the example: %v\n%s", err, out)
	}
	cmd := exec.Command(bins.relay, "serve", "--config", path)
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("relay log:\n%s", log.String())
		}
	}()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", smtpAddr, 200*time.Millisecond); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("relay on the example config did not come up")
		}
		time.Sleep(50 * time.Millisecond)
	}
	s := dialSMTP(t, smtpAddr)
	s.expect("EHLO client.example", "250")
	if got := s.send("alice@example.com", []string{"bob@example.net"}, "Subject: quickstart\r\n\r\nhello\r\n"); !strings.HasPrefix(got, "250 ok ") {
		t.Fatalf("DATA: %q", got)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "relay-data", "maildir", "new", "*"))
	if len(files) != 1 {
		t.Fatalf("%d files in relay-data/maildir/new, want 1", len(files))
	}
	msg, _ := os.ReadFile(files[0])
	for _, want := range []string{"Return-Path: <alice@example.com>\n", "Delivered-To: bob@example.net\n", "\nSubject: quickstart\n\nhello\n"} {
		if !strings.Contains(string(msg), want) {
			t.Errorf("delivered message lacks %q:\n%s", want, msg)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "relay-data", "admin.token")); err != nil {
		t.Errorf("no admin token made in data_dir: %v", err)
	}
}

// TestTimeout: relay.timeout (qmail's timeoutsmtpd) bounds every read; a
// client that stalls in the middle of DATA is dropped and nothing of its
// message is queued.
func TestTimeout(t *testing.T) {
	d := newDaemon(t, daemonOpts{relay: `[relay]
local_domains = ["example.com"]
relay_networks = ["127.0.0.0/8"]
timeout = "1s"
`})
	idle := dialSMTP(t, d.smtp)
	stalled := dialSMTP(t, d.smtp)
	stalled.expect("HELO x", "250")
	stalled.expect("MAIL FROM:<a@example.com>", "250")
	stalled.expect("RCPT TO:<b@remote.example>", "250")
	stalled.expect("DATA", "354")
	fmt.Fprint(stalled.c, "Subject: half\r\n\r\nthe first half of a body")

	for name, s := range map[string]*smtpConn{"idle after the greeting": idle, "stalled in DATA": stalled} {
		s.c.SetReadDeadline(time.Now().Add(15 * time.Second))
		rest, err := io.ReadAll(s.r)
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Errorf("%s: relay never dropped the connection", name)
			continue
		}
		if bytes.HasPrefix(rest, []byte("2")) {
			t.Errorf("%s: got %q before the close", name, rest)
		}
	}
	if n := len(d.queued()); n != 0 {
		t.Errorf("%d messages queued from a stalled DATA", n)
	}
}

// TestQmailReplies: <Postmaster> is accepted from anyone as a recipient
// (RFC 5321 §4.5.1), never as a sender; commands out of order are refused.
func TestQmailReplies(t *testing.T) {
	d := newDaemon(t, daemonOpts{relay: `[relay]
local_domains = ["example.com"]
relay_networks = ["10.9.9.0/24"]
`})
	s := dialSMTP(t, d.smtp)
	s.expect("HELO client.example", "250")
	s.expect("RCPT TO:<user@example.com>", "50")
	s.expect("DATA", "50")
	s.expect("MAIL FROM:<Postmaster>", "501")
	s.expect("MAIL FROM:<someone@internet.example>", "250")
	s.expect("DATA", "50")
	s.expect("RSET", "250")
	if got := s.send("someone@internet.example", []string{"Postmaster"}, "Subject: hi\r\n\r\nfor the postmaster\r\n"); !strings.HasPrefix(got, "250 ok ") {
		t.Fatalf("mail to <Postmaster>: %q", got)
	}
	if calls := d.queued(); len(calls) != 1 || strings.Join(calls[0].To(), ",") != "postmaster" {
		t.Fatalf("queued %+v", calls)
	}
}

// TestControlFilesFollowSIGHUP: the greeting comes from
// control/smtpgreeting and EHLO's SIZE from control/databytes, and both
// follow a SIGHUP, as qmail-smtpd reads them for every connection.
func TestControlFilesFollowSIGHUP(t *testing.T) {
	ctl := t.TempDir()
	write := func(name, text string) {
		if err := os.WriteFile(filepath.Join(ctl, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("smtpgreeting", "mx1.example.test first greeting\n")
	write("databytes", "20000\n")
	d := newDaemon(t, daemonOpts{relay: fmt.Sprintf(`[relay]
local_domains = ["example.com"]
relay_networks = ["127.0.0.0/8"]
qmail_control_dir = %q
`, ctl)})
	greetAndSize := func() (string, string) {
		c, err := net.DialTimeout("tcp", d.smtp, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		r := bufio.NewReader(c)
		greeting, _ := r.ReadString('\n')
		fmt.Fprint(c, "EHLO client.example\r\n")
		size := ""
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("EHLO: %v", err)
			}
			l = strings.TrimRight(l, "\r\n")
			if strings.HasPrefix(l[4:], "SIZE") {
				size = l[4:]
			}
			if len(l) < 4 || l[3] != '-' {
				break
			}
		}
		return strings.TrimRight(greeting, "\r\n"), size
	}
	if g, size := greetAndSize(); g != "220 mx1.example.test first greeting ESMTP Service Ready" || size != "SIZE 20000" {
		t.Fatalf("greeting %q, %q", g, size)
	}
	write("smtpgreeting", "mx2.example.test second\n")
	write("databytes", "30000\n")
	d.signal(syscall.SIGHUP)
	d.waitLog("config reloaded")
	if g, size := greetAndSize(); g != "220 mx2.example.test second ESMTP Service Ready" || size != "SIZE 30000" {
		t.Fatalf("after SIGHUP: greeting %q, %q", g, size)
	}
}

// TestSubmissionWithoutAUTHWarned: a submission listener that can never
// offer AUTH (auth.require_tls without a certificate, and no login
// backend) is named, at its line, by check-config and in serve's log.
func TestSubmissionWithoutAUTHWarned(t *testing.T) {
	d := newDaemon(t, daemonOpts{}) // the harness's submission listener has neither
	out, err := exec.Command(bins.relay, "check-config", "--config", d.config).CombinedOutput()
	line := regexp.MustCompile(`warning: \S*relay\.toml:\d+:1: listen\[1\]\.mode: submission listener \S+ can never offer AUTH.*no \[tls\] certificate for STARTTLS`)
	if err != nil || !line.Match(out) {
		t.Errorf("check-config: %v\n%s", err, out)
	}
	if logs := d.logs(); !strings.Contains(logs, "level=WARN") || !strings.Contains(logs, "listen[1].mode: submission listener "+d.sub+" can never offer AUTH") {
		t.Errorf("serve did not log the warning:\n%s", logs)
	}
}
