package local

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"relay/config"
	"relay/internal/fakeqq"
)

// A message as qmail-inject hands it to qmail-queue: LF line ends, lines a
// DotWriter must stuff, a lone CR, 8-bit bytes and no final newline.
var testMessage = []byte("Received: (qmail 1 invoked by uid 1001); 1 Jan 2026 00:00:00 -0000\n" +
	"From: a@example.com\nSubject: test\n\n" +
	".leading dot\n.\n..two dots\nbare\rcr\n\xe4\xf6\xfc 8bit\nno final newline")

var testEnvelope = []byte("Fa@example.com\x00Tb@example.net\x00Tc@example.org\x00\x00")

// newTestQQ is relay qq against d with the fake qmail-queue recording into
// a fresh FAKEQQ_DIR, which it returns.
func newTestQQ(t *testing.T, socket string) (*QQ, *bytes.Buffer, string) {
	t.Helper()
	calls := t.TempDir()
	t.Setenv("FAKEQQ_DIR", calls)
	stderr := &bytes.Buffer{}
	return &QQ{
		Socket:       socket,
		QmailQueue:   fakeQQ,
		OnDaemonDown: DaemonDownAccept,
		Timeout:      5 * time.Second,
		UID:          os.Getuid(),
		Stderr:       stderr,
	}, stderr, calls
}

func TestQQPassesMessageAndEnvelopeThrough(t *testing.T) {
	d := startDaemon(t, daemonScript{})
	q, stderr, calls := newTestQQ(t, d.socket)
	if code := q.Filter(bytes.NewReader(testMessage), bytes.NewReader(testEnvelope)); code != 0 {
		t.Fatalf("exit %d, want 0; stderr: %s", code, stderr)
	}
	got := fakeqq.Calls(t, calls)
	if len(got) != 1 {
		t.Fatalf("real qmail-queue ran %d times, want 1", len(got))
	}
	if !bytes.Equal(got[0].Message, testMessage) {
		t.Errorf("message changed on the way:\n got %q\nwant %q", got[0].Message, testMessage)
	}
	if !bytes.Equal(got[0].Envelope, testEnvelope) {
		t.Errorf("envelope changed: got %q want %q", got[0].Envelope, testEnvelope)
	}
	if want := fmt.Sprintf("uid=%d ", os.Getuid()); !strings.HasPrefix(got[0].Info, want) {
		t.Errorf("real qmail-queue ran as %q, want %q", got[0].Info, want)
	}
	s := d.session(t)
	if s.kind != "check" || s.from != "a@example.com" || strings.Join(s.rcpts, ",") != "b@example.net,c@example.org" {
		t.Errorf("daemon saw a %s from %q rcpts %q", s.kind, s.from, s.rcpts)
	}
	// The header only (through its empty line), and the size.
	if want := "Received: (qmail 1 invoked by uid 1001); 1 Jan 2026 00:00:00 -0000\nFrom: a@example.com\nSubject: test\n\n"; string(s.head) != want || s.size != int64(len(testMessage)) {
		t.Errorf("daemon got header %q size %d, want %q and %d", s.head, s.size, want, len(testMessage))
	}
	if !s.committed {
		t.Error("queued message was not committed")
	}
	if s.uid != os.Getuid() {
		t.Errorf("daemon saw uid %d, want %d", s.uid, os.Getuid())
	}
}

// qqDecisions is the decision table both builds are held to: what the
// daemon answers, and what relay qq does.
var qqDecisions = []struct {
	name       string
	script     daemonScript
	realExit   string // FAKEQQ_EXIT
	wantCode   int
	wantQueued bool // the real qmail-queue ran
	wantCommit bool
	wantWhole  bool // the daemon got the message whole (to hold or to sign)
	wantSigned bool // the real qmail-queue got testSignatures on top
	wantStderr string
}{
	{name: "reserved and queued", wantCode: 0, wantQueued: true, wantCommit: true},
	// The charge is committed before the real qmail-queue runs (relay
	// qq execs it), so a failing one is charged too.
	{name: "real qmail-queue fails temporarily", realExit: "53", wantCode: 53, wantQueued: true, wantCommit: true},
	{name: "real qmail-queue fails permanently", realExit: "31", wantCode: 31, wantQueued: true, wantCommit: true},
	{name: "exempt on the daemon", script: daemonScript{verdict: 'X'}, wantCode: 0, wantQueued: true},
	{name: "held", script: daemonScript{verdict: 'Q'}, wantCode: 0, wantWhole: true},
	{name: "hold spool fails", script: daemonScript{verdict: 'Q', held: &frameReply{'D', "451 4.3.0 temporary local problem, try again later (#4.3.0)"}}, wantCode: 71, wantWhole: true, wantStderr: "deferred: 451 4.3.0"},
	{name: "A after a hold", script: daemonScript{verdict: 'Q', held: &frameReply{'A', ""}}, wantCode: 71, wantWhole: true, wantStderr: "not understood"},
	// Signing: the message goes to the daemon, its signatures on top of
	// what the real qmail-queue gets.
	{name: "signed", script: daemonScript{verdict: 'G'}, wantCode: 0, wantQueued: true, wantCommit: true, wantWhole: true, wantSigned: true},
	{name: "signing failed", script: daemonScript{verdict: 'G', signed: &frameReply{'A', ""}}, wantCode: 0, wantQueued: true, wantCommit: true, wantWhole: true},
	{name: "signed, commit refused", script: daemonScript{verdict: 'G', commitFail: true}, wantCode: 71, wantWhole: true, wantStderr: "deferred: the daemon did not take the commit"},
	{name: "deferred after the message", script: daemonScript{verdict: 'G', signed: &frameReply{'D', "451 4.3.0 temporary local problem"}}, wantCode: 71, wantWhole: true, wantStderr: "deferred: 451 4.3.0"},
	{name: "signatures that are not fields", script: daemonScript{verdict: 'G', signed: &frameReply{'A', "DKIM-Signature: v=1\n\nX-Injected: 1\n"}}, wantCode: 71, wantWhole: true, wantStderr: "not understood"},
	{name: "K after a message to sign", script: daemonScript{verdict: 'G', signed: &frameReply{'K', "committed"}}, wantCode: 71, wantWhole: true, wantStderr: "not understood"},
	{name: "suspended", script: daemonScript{verdict: 'R', text: "550 5.7.1 uid:local:1001 is suspended"}, wantCode: 31, wantStderr: "rejected: 550 5.7.1 uid:local:1001 is suspended"},
	{name: "over a rate", script: daemonScript{verdict: 'D', text: "451 4.7.1 uid:local:1001 is over 100 recipients/1m"}, wantCode: 71, wantStderr: "deferred: 451 4.7.1"},
	{name: "too many recipients", script: daemonScript{verdict: 'D', text: "452 4.5.3 too many recipients"}, wantCode: 71},
	{name: "verdict not understood", script: daemonScript{verdict: 'Z', text: "ok queued as 12"}, wantCode: 71, wantStderr: "not understood"},
	// Without the commit the message would go out uncounted.
	{name: "commit refused", script: daemonScript{commitFail: true}, wantCode: 71, wantStderr: "deferred: the daemon did not take the commit"},
	{name: "not a check listener", script: daemonScript{notCheck: true}, wantCode: 71, wantStderr: "does not speak the check protocol"},
}

// wantQueued is what the real qmail-queue gets of testMessage: with the
// fake daemon's signatures on top when it signed.
func wantQueued(signed bool) []byte {
	if signed {
		return append([]byte(testSignatures), testMessage...)
	}
	return testMessage
}

func TestQQDecisions(t *testing.T) {
	for _, tc := range qqDecisions {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, tc.script)
			q, stderr, calls := newTestQQ(t, d.socket)
			t.Setenv("FAKEQQ_EXIT", tc.realExit)
			code := q.Filter(bytes.NewReader(testMessage), bytes.NewReader(testEnvelope))
			if code != tc.wantCode {
				t.Errorf("exit %d, want %d; stderr: %s", code, tc.wantCode, stderr)
			}
			got := fakeqq.Calls(t, calls)
			if n := len(got); (n == 1) != tc.wantQueued || n > 1 {
				t.Fatalf("real qmail-queue ran %d times, want queued=%v", n, tc.wantQueued)
			}
			if tc.wantQueued && !bytes.Equal(got[0].Message, wantQueued(tc.wantSigned)) {
				t.Errorf("real qmail-queue got\n%q\nwant\n%q", got[0].Message, wantQueued(tc.wantSigned))
			}
			if tc.script.notCheck {
				return // an SMTP server: no check session to look at
			}
			s := d.session(t)
			if s.committed != tc.wantCommit {
				t.Errorf("committed = %v, want %v", s.committed, tc.wantCommit)
			}
			if whole := bytes.Equal(s.data, testMessage); whole != tc.wantWhole {
				t.Errorf("daemon got the message whole: %v, want %v", whole, tc.wantWhole)
			}
			if !strings.Contains(stderr.String(), tc.wantStderr) {
				t.Errorf("stderr %q does not contain %q", stderr, tc.wantStderr)
			}
		})
	}
}

func TestQQMalformedInputNeverReachesDaemon(t *testing.T) {
	long := strings.Repeat("x", 1003)
	tests := []struct {
		name     string
		envelope string
		want     int
	}{
		{"empty", "", 54},
		{"no F", "Ta@b\x00\x00", 91},
		{"record not T", "Fa@b\x00Xc@d\x00\x00", 91},
		{"no final NUL", "Fa@b\x00Tc@d\x00", 54},
		{"cut in an address", "Fa@b\x00Tc@", 54},
		{"sender too long", "F" + long + "\x00Tc@d\x00\x00", 11},
		{"recipient too long", "Fa@b\x00T" + long + "\x00\x00", 11},
		{"recipient too long, no NUL", "Fa@b\x00T" + long, 11},
	}
	d := startDaemon(t, daemonScript{})
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q, _, calls := newTestQQ(t, d.socket)
			if code := q.Filter(bytes.NewReader(testMessage), strings.NewReader(tc.envelope)); code != tc.want {
				t.Errorf("exit %d, want %d", code, tc.want)
			}
			if n := len(fakeqq.Calls(t, calls)); n != 0 {
				t.Errorf("real qmail-queue ran %d times", n)
			}
		})
	}
	t.Run("message read error", func(t *testing.T) {
		q, _, _ := newTestQQ(t, d.socket)
		if code := q.Filter(iotest.ErrReader(errors.New("boom")), bytes.NewReader(testEnvelope)); code != 54 {
			t.Errorf("exit %d, want 54", code)
		}
	})
	t.Run("line break in an address", func(t *testing.T) {
		q, _, _ := newTestQQ(t, d.socket)
		env := "Fa@b\x00Tc@d\r\nRCPT TO:<e@f>\x00\x00"
		if code := q.Filter(bytes.NewReader(testMessage), strings.NewReader(env)); code != 31 {
			t.Errorf("exit %d, want 31", code)
		}
	})
	if n := d.connections(); n != 0 {
		t.Errorf("daemon was asked %d times about malformed input", n)
	}
}

func TestQQNoRecipientsPassesWithoutDaemon(t *testing.T) {
	d := startDaemon(t, daemonScript{})
	q, _, calls := newTestQQ(t, d.socket)
	if code := q.Filter(bytes.NewReader(testMessage), strings.NewReader("F\x00\x00")); code != 0 {
		t.Fatalf("exit %d, want 0", code)
	}
	if n := len(fakeqq.Calls(t, calls)); n != 1 || d.connections() != 0 {
		t.Errorf("queued %d times, daemon asked %d times; want 1 and 0", n, d.connections())
	}
}

func TestQQExemptUserSkipsDaemon(t *testing.T) {
	me, err := user.Current()
	if err != nil {
		t.Skip("no passwd entry for the current user:", err)
	}
	d := startDaemon(t, daemonScript{verdict: 'R', text: "550 5.7.1 suspended"})
	cfg, err := config.LoadFile(writeConfig(t, d.socket, "defer", []string{"qmails", me.Username}))
	if err != nil {
		t.Fatal(err)
	}
	// exempt_users names accounts; relay qq (and the daemon) compare uids.
	q, err := NewQQ(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(q.ExemptUIDs, uint32(os.Getuid())) {
		t.Fatalf("exempt uids %v lack %s's %d", q.ExemptUIDs, me.Username, os.Getuid())
	}
	calls := t.TempDir()
	t.Setenv("FAKEQQ_DIR", calls)
	if code := q.Filter(bytes.NewReader(testMessage), bytes.NewReader(testEnvelope)); code != 0 {
		t.Fatalf("exit %d, want 0", code)
	}
	got := fakeqq.Calls(t, calls)
	if len(got) != 1 || !bytes.Equal(got[0].Message, testMessage) || !bytes.Equal(got[0].Envelope, testEnvelope) {
		t.Errorf("exempt message not passed through unchanged: %d calls", len(got))
	}
	if d.connections() != 0 {
		t.Error("exempt user's message was sent to the daemon")
	}
}

// Only a daemon that is not there at all (no socket, nothing behind it)
// falls under on_daemon_down. Once connected, a daemon that says nothing,
// or does not speak the check protocol, or refuses at the greeting, is a
// deferral whatever on_daemon_down says: "down" would pass mail uncounted.
func TestQQDaemonDown(t *testing.T) {
	silent := filepath.Join(worldDir(t), "silent.sock")
	l, err := net.Listen("unix", silent) // accepts, never says a word
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	notCheck := startDaemon(t, daemonScript{notCheck: true})
	full := filepath.Join(worldDir(t), "full.sock")
	lf, err := net.Listen("unix", full) // the daemon's connection limit
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	go func() {
		for {
			c, err := lf.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("421 4.7.0 too many connections\r\n"))
			c.Close()
		}
	}()
	sockets := map[string]struct {
		socket string
		down   bool
	}{
		"no socket":            {filepath.Join(t.TempDir(), "missing.sock"), true},
		"silent daemon":        {silent, false},
		"not a check listener": {notCheck.socket, false},
		"421 at the greeting":  {full, false},
	}
	for name, tc := range sockets {
		for _, mode := range []string{DaemonDownAccept, DaemonDownDefer} {
			t.Run(name+"/"+mode, func(t *testing.T) {
				q, stderr, calls := newTestQQ(t, tc.socket)
				q.OnDaemonDown = mode
				q.Timeout = 300 * time.Millisecond
				code := q.Filter(bytes.NewReader(testMessage), bytes.NewReader(testEnvelope))
				n := len(fakeqq.Calls(t, calls))
				want, wantCalls, wantText := 71, 0, "deferred: "
				if tc.down {
					wantText = "on_daemon_down = " + mode
					if mode == DaemonDownAccept {
						want, wantCalls = 0, 1
					}
				}
				if code != want || n != wantCalls {
					t.Errorf("exit %d with %d real qmail-queue runs, want %d and %d", code, n, want, wantCalls)
				}
				if !strings.Contains(stderr.String(), wantText) || strings.Count(stderr.String(), "\n") != 1 {
					t.Errorf("want one line with %q, got %q", wantText, stderr)
				}
			})
		}
	}
}

func TestQQSpoolsLargeMessages(t *testing.T) {
	d := startDaemon(t, daemonScript{})
	q, stderr, calls := newTestQQ(t, d.socket)
	q.SpoolMemory = 1024
	q.TempDir = t.TempDir()
	var msg bytes.Buffer
	msg.WriteString("Subject: big\n\n")
	for i := 0; msg.Len() < 300<<10; i++ {
		fmt.Fprintf(&msg, ".line %d of a large message\n", i)
	}
	if code := q.Filter(bytes.NewReader(msg.Bytes()), bytes.NewReader(testEnvelope)); code != 0 {
		t.Fatalf("exit %d; stderr %s", code, stderr)
	}
	if got := fakeqq.Calls(t, calls); len(got) != 1 || !bytes.Equal(got[0].Message, msg.Bytes()) {
		t.Fatal("large message not passed through unchanged")
	}
	if s := d.session(t); string(s.head) != "Subject: big\n\n" || s.size != int64(msg.Len()) || !s.committed {
		t.Errorf("daemon got header %q, size %d (want %d), committed %v", s.head, s.size, msg.Len(), s.committed)
	}
	if left, _ := os.ReadDir(q.TempDir); len(left) != 0 {
		t.Errorf("spool left %d files behind", len(left))
	}
}

// A held message goes to the daemon whole, from the spool file.
func TestQQHoldsLargeMessages(t *testing.T) {
	d := startDaemon(t, daemonScript{verdict: 'Q'})
	q, stderr, calls := newTestQQ(t, d.socket)
	q.SpoolMemory = 1024
	q.TempDir = t.TempDir()
	msg := "Subject: big\n\n" + strings.Repeat("a line of a large held message\n", 10000)
	if code := q.Filter(strings.NewReader(msg), bytes.NewReader(testEnvelope)); code != 0 {
		t.Fatalf("exit %d; stderr %s", code, stderr)
	}
	if n := len(fakeqq.Calls(t, calls)); n != 0 {
		t.Fatalf("the real qmail-queue ran %d times for a held message", n)
	}
	if s := d.session(t); string(s.data) != msg || s.committed {
		t.Errorf("daemon got %d bytes to hold (want %d), committed %v", len(s.data), len(msg), s.committed)
	}
}

func TestReadEnvelope(t *testing.T) {
	addr1002 := strings.Repeat("y", 1002)
	env, err := ReadEnvelope(strings.NewReader("F\x00T" + addr1002 + "\x00Tx@y\x00\x00trailing"))
	if err != nil {
		t.Fatal(err)
	}
	if env.Sender != "" || len(env.Recipients) != 2 || env.Recipients[0] != addr1002 || env.Recipients[1] != "x@y" {
		t.Errorf("parsed %q %d recipients", env.Sender, len(env.Recipients))
	}
	if want := "F\x00T" + addr1002 + "\x00Tx@y\x00\x00"; string(env.Raw) != want {
		t.Error("Raw is not the envelope through its final NUL")
	}
}

func FuzzReadEnvelope(f *testing.F) {
	for _, s := range []string{"", "F\x00\x00", "Fa@b\x00Tc@d\x00\x00", "Fa\x00Tb\x00", "X", "Fa\x00Q\x00\x00", "F" + strings.Repeat("z", 1010)} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		env, err := ReadEnvelope(bytes.NewReader(in))
		if err != nil {
			var ee *EnvelopeError
			if !errors.As(err, &ee) || (ee.Code != 11 && ee.Code != 54 && ee.Code != 91) {
				t.Fatalf("error %v is not a qmail-queue envelope error", err)
			}
			return
		}
		// Rebuild the envelope from what was parsed: it must be Raw exactly.
		var b bytes.Buffer
		b.WriteString("F" + env.Sender + "\x00")
		for _, r := range env.Recipients {
			if len(r) >= 1003 || strings.IndexByte(r, 0) >= 0 {
				t.Fatalf("recipient %q passed the length/NUL rules", r)
			}
			b.WriteString("T" + r + "\x00")
		}
		b.WriteByte(0)
		if !bytes.Equal(b.Bytes(), env.Raw) || !bytes.HasPrefix(in, env.Raw) {
			t.Fatalf("Raw %q does not match the parse %q or the input", env.Raw, b.Bytes())
		}
	})
}

// writeConfig writes a relay.toml for relay qq and relay sendmail, readable
// by anyone.
func writeConfig(t testing.TB, socket, onDown string, exempt []string) string {
	t.Helper()
	var quoted []string
	for _, u := range exempt {
		quoted = append(quoted, strconv.Quote(u))
	}
	toml := fmt.Sprintf(`hostname = "mail.example.test"

[[listen]]
addr = %q
mode = "local"

[local]
qmail_queue = %q
on_daemon_down = %q
exempt_users = [%s]
`, socket, fakeQQ, onDown, strings.Join(quoted, ", "))
	path := filepath.Join(worldDir(t), "relay.toml")
	if err := os.WriteFile(path, []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	writeSettings(t, path)
	return path
}

// writeSettings writes the qq.settings the daemon would write for the
// config at path, beside it (settingsBeside).
func writeSettings(t testing.TB, path string) {
	t.Helper()
	cfg, err := config.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	accounts, err := config.ReadPasswdFile("/etc/passwd")
	if err != nil {
		t.Fatal(err)
	}
	st, err := NewSettings(cfg, accounts)
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteSettings(settingsBeside(path), st); err != nil {
		t.Fatal(err)
	}
}

func settingsBeside(config string) string { return filepath.Join(filepath.Dir(config), SettingsFile) }

// runProcess runs bin as qmail-inject would run qmail-queue: the message
// on fd 0, the envelope written to fd 1 only after the message pipe is
// closed. It returns the exit code, the pid and stderr.
func runProcess(t testing.TB, cmd *exec.Cmd, msg, envelope []byte) (int, int, string) {
	t.Helper()
	msgR, msgW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	envR, envW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = msgR, envR, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	msgR.Close()
	envR.Close()
	msgW.Write(msg)
	msgW.Close()
	envW.Write(envelope)
	envW.Close()
	cmd.Wait()
	return cmd.ProcessState.ExitCode(), cmd.Process.Pid, stderr.String()
}

func helperCmd(t testing.TB, bin, config string, calls string) *exec.Cmd {
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), helperEnv+"=qq", "RELAY_CONFIG="+config, "FAKEQQ_DIR="+calls)
	return cmd
}

func TestQQProcess(t *testing.T) {
	d := startDaemon(t, daemonScript{})
	calls := worldDir(t)
	cfg := writeConfig(t, d.socket, "defer", []string{"qmails"})
	code, pid, stderr := runProcess(t, helperCmd(t, os.Args[0], cfg, calls), testMessage, testEnvelope)
	if code != 0 {
		t.Fatalf("exit %d; stderr %s", code, stderr)
	}
	got := fakeqq.Calls(t, calls)
	if len(got) != 1 || !bytes.Equal(got[0].Message, testMessage) || !bytes.Equal(got[0].Envelope, testEnvelope) {
		t.Fatalf("not passed through unchanged (%d calls)", len(got))
	}
	// docs/design.md §7: the real qmail-queue is exec'd in place, so the caller
	// waits for it and gets its exit code.
	if want := fmt.Sprintf("pid=%d", pid); !strings.HasSuffix(got[0].Info, want) {
		t.Errorf("real qmail-queue ran as %q, want relay qq's own process (%s)", got[0].Info, want)
	}
	if s := d.session(t); !s.committed || s.uid != os.Getuid() {
		t.Errorf("committed %v, uid %d", s.committed, s.uid)
	}
}

// An exempt caller gets the real qmail-queue exec'd in place: same pid,
// the original fds, and no word to the daemon.
func TestQQProcessExemptExecsInPlace(t *testing.T) {
	me, err := user.Current()
	if err != nil {
		t.Skip("no passwd entry for the current user:", err)
	}
	d := startDaemon(t, daemonScript{verdict: 'R', text: "550 5.7.1 suspended"})
	calls := worldDir(t)
	cfg := writeConfig(t, d.socket, "defer", []string{me.Username})
	code, pid, stderr := runProcess(t, helperCmd(t, os.Args[0], cfg, calls), testMessage, testEnvelope)
	if code != 0 {
		t.Fatalf("exit %d; stderr %s", code, stderr)
	}
	got := fakeqq.Calls(t, calls)
	if len(got) != 1 || !bytes.Equal(got[0].Message, testMessage) || !bytes.Equal(got[0].Envelope, testEnvelope) {
		t.Fatalf("not passed through unchanged (%d calls)", len(got))
	}
	if want := fmt.Sprintf("pid=%d", pid); !strings.HasSuffix(got[0].Info, want) {
		t.Errorf("real qmail-queue ran as %q, want the same process (%s)", got[0].Info, want)
	}
	if d.connections() != 0 {
		t.Error("exempt caller talked to the daemon")
	}
}

// The uid the daemon counts is the caller's, from SO_PEERCRED, and qmail's
// own "invoked by uid" stays true: the real qmail-queue runs as the caller.
func TestQQAttributesCallerUID(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to create a user")
	}
	if _, err := exec.LookPath("useradd"); err != nil {
		t.Skip("useradd not installed")
	}
	name := fmt.Sprintf("rqq%d", os.Getpid()%100000)
	if out, err := exec.Command("useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name).CombinedOutput(); err != nil {
		t.Fatalf("useradd: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("userdel", name).Run() })
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)

	bin := filepath.Join(worldDir(t), "relay-qq-helper")
	if out, err := exec.Command("cp", os.Args[0], bin).CombinedOutput(); err != nil {
		t.Fatalf("copying the test binary: %v %s", err, out)
	}
	os.Chmod(bin, 0o755)
	d := startDaemon(t, daemonScript{})
	calls := worldDir(t)
	cfg := writeConfig(t, d.socket, "defer", []string{"qmails"})
	cmd := helperCmd(t, bin, cfg, calls)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	cmd.Dir = "/"
	code, _, stderr := runProcess(t, cmd, testMessage, testEnvelope)
	if code != 0 {
		t.Fatalf("exit %d; stderr %s", code, stderr)
	}
	if s := d.session(t); s.uid != uid || !s.committed {
		t.Errorf("daemon saw uid %d (want %d), committed %v", s.uid, uid, s.committed)
	}
	got := fakeqq.Calls(t, calls)
	if len(got) != 1 || !strings.HasPrefix(got[0].Info, fmt.Sprintf("uid=%d ", uid)) {
		t.Fatalf("real qmail-queue calls: %+v, want one as uid %d", got, uid)
	}
}

// notqmail's exit 82 carries its text on fd 6: relay qq hands its own fd 6
// to the real qmail-queue and passes the 82 back.
func TestQQPassesErrorTextFD(t *testing.T) {
	d := startDaemon(t, daemonScript{})
	q, _, _ := newTestQQ(t, d.socket)
	t.Setenv("FAKEQQ_EXIT", "82")
	t.Setenv("FAKEQQ_FD6", "Dno such domain (#5.1.2)")
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	q.ErrFD = w
	code := q.Filter(bytes.NewReader(testMessage), bytes.NewReader(testEnvelope))
	w.Close()
	text, _ := io.ReadAll(r)
	if code != 82 || string(text) != "Dno such domain (#5.1.2)" {
		t.Errorf("exit %d, fd 6 %q", code, text)
	}
	if s := d.session(t); !s.committed {
		t.Error("not committed: the charge is committed before the real qmail-queue runs")
	}
}
