package local

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/emersion/go-smtp"

	"relay/config"
	"relay/internal/fakeqq"
)

// cmd/relay-qq is relay qq in C, the build installed for speed; the Go
// code in this package is the reference. These tests hold the C build to
// it: the same config values (or "unsure", and then it runs relay-local),
// and the same exit codes, daemon conversation and hand-off as relay-local
// for the same scenarios.

// cqqBuild is relay-qq compiled for the tests: the binary, the same code
// under AddressSanitizer and UndefinedBehaviorSanitizer (empty where the
// compiler has none), and the relay-local both fall back to.
type cqqBuild struct {
	bin, sanitized, relayLocal string
}

var cqqOnce struct {
	sync.Once
	build cqqBuild
	err   error
}

// cCompiler returns musl-gcc (static binaries that start fastest) or cc.
// Without either the C tests skip, unless RELAY_REQUIRE_CC is set (as
// .ci/run does), when they fail.
func cCompiler(t testing.TB) string {
	for _, cc := range []string{"musl-gcc", "cc", "gcc"} {
		if p, err := exec.LookPath(cc); err == nil {
			return p
		}
	}
	if os.Getenv("RELAY_REQUIRE_CC") != "" {
		t.Fatal("no C compiler (musl-gcc, cc) for cmd/relay-qq")
	}
	t.Skip("no C compiler for cmd/relay-qq")
	return ""
}

// compileCQQ compiles cmd/relay-qq/relay-qq.c with defines (NAME=value,
// strings already quoted) into dir.
func compileCQQ(t testing.TB, dir string, defines ...string) (string, error) {
	return compileCQQWith(t, cCompiler(t), filepath.Join(dir, "relay-qq"),
		[]string{"-std=c11", "-O2", "-static", "-Wall", "-Wextra", "-Werror"}, defines...)
}

func compileCQQWith(t testing.TB, cc, bin string, flags []string, defines ...string) (string, error) {
	root, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		return "", err
	}
	args := append(append([]string{}, flags...), "-o", bin)
	for _, d := range defines {
		args = append(args, "-D"+d)
	}
	args = append(args, filepath.Join(strings.TrimSpace(string(root)), "cmd", "relay-qq", "relay-qq.c"))
	if out, err := exec.Command(cc, args...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("%s %s: %v\n%s", cc, strings.Join(args, " "), err, out)
	}
	return bin, nil
}

// testCQQ is relay-qq built for tests: replies wait at most 500ms, more
// than 4 KiB of message goes to the spool file, and the fallback is a
// freshly built relay-local.
func testCQQ(t testing.TB) cqqBuild {
	t.Helper()
	cCompiler(t)
	cqqOnce.Do(func() {
		dir, err := os.MkdirTemp("", "relay-qq-bin-")
		if err != nil {
			cqqOnce.err = err
			return
		}
		os.Chmod(dir, 0o755)
		local, err := tryBuild(t, "./cmd/relay-local")
		if err != nil {
			cqqOnce.err = err
			return
		}
		// tryBuild's directory goes with the test that made it; keep a copy.
		keep := filepath.Join(dir, "relay-local")
		if out, err := exec.Command("cp", local, keep).CombinedOutput(); err != nil {
			cqqOnce.err = fmt.Errorf("%v %s", err, out)
			return
		}
		defines := []string{"RELAY_QQ_TIMEOUT_MS=500", "RELAY_QQ_SPOOL_MEMORY=4096", fmt.Sprintf("RELAY_LOCAL_PATH=%q", keep)}
		bin, err := compileCQQ(t, dir, defines...)
		cqqOnce.build, cqqOnce.err = cqqBuild{bin: bin, relayLocal: keep}, err
		// gcc's sanitizers, with every block from malloc so that
		// AddressSanitizer sees each one's bounds.
		if gcc, err := exec.LookPath("gcc"); err == nil {
			san, err := compileCQQWith(t, gcc, filepath.Join(dir, "relay-qq-sanitized"),
				[]string{"-std=c11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror"},
				append(defines, "RELAY_QQ_ARENA=16")...)
			if err != nil {
				cqqOnce.err = err
				return
			}
			cqqOnce.build.sanitized = san
		}
	})
	if cqqOnce.err != nil {
		t.Fatal(cqqOnce.err)
	}
	return cqqOnce.build
}

// qqSettings is what relay qq takes from a config, as relay-qq --settings
// prints it.
type qqSettings struct {
	Socket, QmailQueue, OnDaemonDown, ExemptUsers string
}

func goSettings(path string) (qqSettings, error) {
	cfg, err := config.LoadFile(path)
	if err != nil {
		return qqSettings{}, err
	}
	q, err := NewQQ(cfg, nil)
	if err != nil {
		return qqSettings{}, err
	}
	return qqSettings{q.Socket, q.QmailQueue, q.OnDaemonDown, strings.Join(q.ExemptUsers, ",")}, nil
}

// cSettings runs relay-qq --settings; sure is false when it would leave
// the config to relay-local.
func cSettings(t testing.TB, bin, path string) (s qqSettings, sure bool) {
	t.Helper()
	cmd := exec.Command(bin, "--config", path, "--settings")
	cmd.Dir = filepath.Dir(path)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("relay-qq --settings: %v", err)
	}
	if string(out) == "unsure\n" {
		return s, false
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		k, v, _ := strings.Cut(line, "=")
		switch k {
		case "socket":
			s.Socket = v
		case "qmail_queue":
			s.QmailQueue = v
		case "on_daemon_down":
			s.OnDaemonDown = v
		case "exempt_users":
			s.ExemptUsers = v
		case "account": // the caller's passwd name, checked by TestCQQAccountName
		default:
			t.Fatalf("relay-qq --settings printed %q", line)
		}
	}
	return s, true
}

// checkSettings holds relay-qq's reading of the config doc to Go's: when
// it is sure, Go must read the same values (or reject the file, which the
// daemon then refuses too). It returns whether relay-qq was sure.
func checkSettings(t testing.TB, bin string, doc []byte) bool {
	t.Helper()
	path := filepath.Join(t.TempDir(), "relay.toml")
	if err := os.WriteFile(path, doc, 0o644); err != nil {
		t.Fatal(err)
	}
	c, sure := cSettings(t, bin, path)
	g, err := goSettings(path)
	if sure && err == nil && c != g {
		t.Errorf("%s read\n%+v\nrelay-local read\n%+v\nfrom:\n%s", filepath.Base(bin), c, g, doc)
	}
	return sure
}

func TestCQQSettingsMatchGo(t *testing.T) {
	for _, bin := range cBinaries(t) {
		t.Run(filepath.Base(bin), func(t *testing.T) { testCQQSettings(t, bin) })
	}
}

func testCQQSettings(t *testing.T, bin string) {
	root, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(strings.TrimSpace(string(root)), "config", "testdata", "*", "*.toml"))
	files = append(files, filepath.Join(strings.TrimSpace(string(root)), "relay.example.toml"))
	for _, f := range files {
		doc, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Run(filepath.Base(f), func(t *testing.T) { checkSettings(t, bin, doc) })
	}
	if !checkSettings(t, bin, mustRead(t, filepath.Join(strings.TrimSpace(string(root)), "relay.example.toml"))) {
		t.Error("relay-qq is unsure of relay.example.toml: every installation would run relay-local")
	}

	for _, tc := range cqqSettingsCases {
		t.Run(tc.name, func(t *testing.T) {
			if sure := checkSettings(t, bin, []byte(tc.doc)); sure != tc.sure {
				t.Errorf("sure = %v, want %v for:\n%s", sure, tc.sure, tc.doc)
			}
		})
	}
}

func mustRead(t testing.TB, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// cqqSettingsCases are configs written in the ways TOML allows: relay-qq
// reads those it can be sure of and leaves the rest to relay-local.
var cqqSettingsCases = []struct {
	name string
	doc  string
	sure bool
}{
	{"plain", "[[listen]]\naddr = \"/run/relay/submit.sock\"\nmode = \"local\"\n\n[local]\nqmail_queue = \"/var/qmail/bin/qmail-queue.orig\"\non_daemon_down = \"defer\"\nexempt_users = [\"qmaild\"]\n", true},
	{"no listen: the default socket", "[local]\non_daemon_down = \"accept\"\n", true},
	{"nothing at all", "", true},
	{"relative socket", "[[listen]]\naddr = \"../run/./x/../submit.sock\"\nmode = \"local\"\n", true},
	{"second listener is the local one", "[[listen]]\naddr = \"127.0.0.1:25\"\n\n[[listen]]\nmode = \"local\"\naddr = '/run/q.sock'\n", true},
	{"no local listener", "[[listen]]\naddr = \"127.0.0.1:25\"\nmode = \"smtp\"\n", false},
	{"dotted keys at the root", "local.qmail_queue = \"/q\"\nlocal.on_daemon_down = 'defer'\n", true},
	{"quoted key parts", "\"local\".'qmail_queue' = \"/q\"\n[\"local\"]\non_daemon_down = \"defer\"\n", true},
	{"a dot inside a quoted key", "\"local.qmail_queue\" = \"/q\"\n", false},
	{"local as an inline table", "local = { qmail_queue = \"/q\", on_daemon_down = \"defer\" }\n", false},
	{"listen as an inline array", "listen = [{ addr = \"/s.sock\", mode = \"local\" }]\n", false},
	{"[local] sub-table", "[local.more]\nx = 1\n", false},
	{"escapes in a value", "[local]\nqmail_queue = \"/var/qmail/bin/q\\u0071\"\n", false},
	{"multi-line value", "[local]\nqmail_queue = \"\"\"/q\"\"\"\n", false},
	{"relative qmail_queue", "[local]\nqmail_queue = \"qmail-queue\"\n", false},
	{"bad on_daemon_down", "[local]\non_daemon_down = \"maybe\"\n", false},
	{"duplicate key", "[local]\non_daemon_down = \"defer\"\non_daemon_down = \"accept\"\n", false},
	{"byte order mark", "\xef\xbb\xbf[local]\non_daemon_down = \"defer\"\n", false},
	{"capitals in a key", "[local]\nOn_Daemon_Down = \"defer\"\n", true},
	{"capitals in a table name", "[LOCAL]\non_daemon_down = \"defer\"\n", false},
	{"two listen arrays by case", "[[listen]]\naddr = \"/a.sock\"\nmode = \"local\"\n[[LISTEN]]\naddr = \"/b.sock\"\nmode = \"local\"\n", false},
	{"CRLF and comments", "# relay\r\n[local] # the local section\r\nexempt_users = [ # who\r\n  \"qmaild\", # bounces\r\n  'qmails',\r\n] # end\r\non_daemon_down = \"defer\"\r\n", true},
	{"a multi-line string hiding a [local] table",
		"hostname = \"\"\"\n[local]\non_daemon_down = \"defer\"\n\"\"\"\n[local]\nqmail_queue = \"/q\"\n", true},
	{"a literal multi-line string with quotes",
		"hostname = '''x''y'''\n[[listen]]\naddr = \"/s.sock\"\nmode = \"local\"\n", true},
	{"arrays of tables elsewhere", "[[policy.allow]]\nmatch = \"sender:list-*@example.com\"\nrcpts = [\"5000/24h\"]\n[[webserver]]\nname = \"web1\"\naddr = \"10.0.0.5\"\n[local]\non_daemon_down = \"defer\"\n", true},
	{"nested values skipped", "[policy.limits.user]\nrcpts = [ [\"1\"], { a = [1, 2] } ]\n[local]\non_daemon_down = \"defer\"\n", true},
	{"unterminated string", "hostname = \"x\n[local]\n", false},
	{"empty on_daemon_down", "[local]\non_daemon_down = \"\"\n", false},
	{"an empty key part", "\"\".local.qmail_queue = \"/evil\"\n", false},
	{"an empty table name", "[\"\"]\nlocal.qmail_queue = \"/evil\"\n", false},
	{"non-ASCII in a value", "[local]\nqmail_queue = \"/q\xff\"\n", false},
	{"absolute socket with dots, as written", "[[listen]]\naddr = \"/run/a/../b//s.sock\"\nmode = \"local\"\n", true},
	{"garbage after a value", "[local]\non_daemon_down = \"defer\" x\n", false},
}

// FuzzCQQSettings holds relay-qq's config reader to Go's on any input:
// when relay-qq is sure of a file Go reads without error, both read the
// same values. (Each input runs relay-qq once: fuzz it by hand.)
func FuzzCQQSettings(f *testing.F) {
	b := testCQQ(f)
	for _, tc := range cqqSettingsCases {
		f.Add([]byte(tc.doc))
	}
	f.Fuzz(func(t *testing.T, doc []byte) {
		if bytes.IndexByte(doc, 0) >= 0 {
			return
		}
		checkSettings(t, b.bin, doc)
	})
}

// qqBinaries are the builds of relay qq run as processes: relay-local,
// relay-qq, and relay-qq under the sanitizers.
func qqBinaries(t *testing.T) map[string]string {
	b := testCQQ(t)
	m := map[string]string{"relay-local": b.relayLocal, "relay-qq": b.bin}
	if b.sanitized != "" {
		m["relay-qq-sanitized"] = b.sanitized
	}
	return m
}

// cBinaries are relay-qq and its sanitized build.
func cBinaries(t testing.TB) []string {
	b := testCQQ(t)
	if b.sanitized != "" {
		return []string{b.bin, b.sanitized}
	}
	return []string{b.bin}
}

func qqCmd(bin, cfg, calls string, env ...string) *exec.Cmd {
	cmd := exec.Command(bin)
	if filepath.Base(bin) == "relay-local" {
		cmd.Args = append(cmd.Args, "qq")
	}
	cmd.Args = append(cmd.Args, "--config", cfg)
	cmd.Env = append(append(os.Environ(), "FAKEQQ_DIR="+calls, "RELAY_CONFIG="), env...)
	return cmd
}

// The decisions of TestQQDecisions, for both builds as processes.
func TestQQBuildsDecideAlike(t *testing.T) {
	rcptFails := func(which int, err error) func(int, string) error {
		return func(n int, _ string) error {
			if n == which {
				return err
			}
			return nil
		}
	}
	tests := []struct {
		name       string
		script     daemonScript
		realExit   string
		wantCode   int
		wantQueued bool
		wantCommit bool
		wantStderr string
	}{
		{name: "reserved and queued", wantCode: 0, wantQueued: true, wantCommit: true},
		{name: "real qmail-queue fails", realExit: "53", wantCode: 53, wantQueued: true, wantCommit: true},
		{name: "exempt on the daemon", script: daemonScript{data: replyExempt}, wantCode: 0, wantQueued: true},
		{name: "held", script: daemonScript{data: replyHeld}, wantCode: 0},
		{name: "suspended at MAIL", script: daemonScript{mail: replyRejected}, wantCode: 31, wantStderr: "550 5.7.1 uid:local:1001 is suspended"},
		{name: "second recipient over a rate", script: daemonScript{rcpt: rcptFails(1, replyOverLimit)}, wantCode: 71, wantStderr: "451 4.7.1"},
		{name: "recipient rejected", script: daemonScript{rcpt: rcptFails(0, replyRejected)}, wantCode: 31},
		{name: "deferred at DATA", script: daemonScript{data: replyOverLimit}, wantCode: 71},
		{name: "rejected at DATA", script: daemonScript{data: reply(554, smtp.EnhancedCode{5, 7, 1}, "no")}, wantCode: 31},
		{name: "reply not understood", script: daemonScript{data: reply(250, smtp.NoEnhancedCode, "ok queued as 12")}, wantCode: 71, wantStderr: "not understood"},
		{name: "commit refused", script: daemonScript{commitFail: true}, wantCode: 71, wantStderr: "did not take the commit"},
		{name: "not a check listener", script: daemonScript{noCommit: true}, wantCode: 71, wantStderr: "does not speak the check protocol"},
	}
	for name, bin := range qqBinaries(t) {
		for _, tc := range tests {
			for _, envelope := range [][]byte{testEnvelope, []byte("Fa@example.com\x00Tb@example.net\x00\x00")} {
				t.Run(fmt.Sprintf("%s/%s/%d", name, tc.name, bytes.Count(envelope, []byte("\x00T"))), func(t *testing.T) {
					if tc.script.rcpt != nil && bytes.Count(envelope, []byte("\x00T")) < 2 && tc.name == "second recipient over a rate" {
						t.Skip("one recipient")
					}
					d := startDaemon(t, tc.script)
					calls := worldDir(t)
					// accept: whatever goes wrong once connected must
					// still defer, never pass the message uncounted.
					cfg := writeConfig(t, d.socket, "accept", nil)
					code, pid, stderr := runProcess(t, qqCmd(bin, cfg, calls, "FAKEQQ_EXIT="+tc.realExit), testMessage, envelope)
					if code != tc.wantCode {
						t.Errorf("exit %d, want %d; stderr: %s", code, tc.wantCode, stderr)
					}
					got := fakeqq.Calls(t, calls)
					if (len(got) == 1) != tc.wantQueued || len(got) > 1 {
						t.Fatalf("real qmail-queue ran %d times, want queued=%v", len(got), tc.wantQueued)
					}
					if tc.wantQueued {
						if !bytes.Equal(got[0].Message, testMessage) || !bytes.Equal(got[0].Envelope, envelope) {
							t.Error("not passed through unchanged")
						}
						if want := fmt.Sprintf("pid=%d", pid); !strings.HasSuffix(got[0].Info, want) {
							t.Errorf("real qmail-queue ran as %q, not exec'd in place (%s)", got[0].Info, want)
						}
					}
					s := d.session(t)
					if s.committed != tc.wantCommit {
						t.Errorf("committed = %v, want %v", s.committed, tc.wantCommit)
					}
					// The commit names the pid the exec keeps: the qp
					// qmail-send logs for the message (issue 16).
					if tc.wantCommit && s.commitPID != strconv.Itoa(pid) {
						t.Errorf("commit with %q, want the pid %d", s.commitPID, pid)
					}
					if s.helo != CheckHelo || s.uid != os.Getuid() {
						t.Errorf("session helo %q uid %d", s.helo, s.uid)
					}
					if tc.wantCode == 0 && !bytes.Equal(s.data, crlf(testMessage)) && tc.script.mail == nil {
						t.Errorf("daemon got %q", s.data)
					}
					if !strings.Contains(stderr, tc.wantStderr) {
						t.Errorf("stderr %q does not contain %q", stderr, tc.wantStderr)
					}
				})
			}
		}
	}
}

func TestQQBuildsRefuseMalformedInputAlike(t *testing.T) {
	long := strings.Repeat("x", 1003)
	tests := []struct {
		name, envelope string
		want           int
	}{
		{"empty", "", 54},
		{"no F", "Ta@b\x00\x00", 91},
		{"record not T", "Fa@b\x00Xc@d\x00\x00", 91},
		{"no final NUL", "Fa@b\x00Tc@d\x00", 54},
		{"sender too long", "F" + long + "\x00Tc@d\x00\x00", 11},
		{"recipient too long, no NUL", "Fa@b\x00T" + long, 11},
		{"line break in an address", "Fa@b\x00Tc@d\r\nRCPT TO:<e@f>\x00\x00", 31},
	}
	for name, bin := range qqBinaries(t) {
		d := startDaemon(t, daemonScript{})
		cfg := writeConfig(t, d.socket, "defer", nil)
		for _, tc := range tests {
			t.Run(name+"/"+tc.name, func(t *testing.T) {
				calls := worldDir(t)
				if code, _, stderr := runProcess(t, qqCmd(bin, cfg, calls), testMessage, []byte(tc.envelope)); code != tc.want {
					t.Errorf("exit %d, want %d; stderr %s", code, tc.want, stderr)
				}
				if n := len(fakeqq.Calls(t, calls)); n != 0 {
					t.Errorf("real qmail-queue ran %d times", n)
				}
			})
		}
		if n := d.connections(); n != 0 {
			t.Errorf("%s: daemon was asked %d times about malformed input", name, n)
		}
	}
}

// Without recipients, and for an exempt account, nothing is counted and
// the daemon is not asked; a missing daemon follows on_daemon_down.
func TestQQBuildsPassUncountedAlike(t *testing.T) {
	me := accountName(os.Getuid())
	if me == "" {
		t.Skip("no passwd entry for the current user")
	}
	for name, bin := range qqBinaries(t) {
		t.Run(name+"/no recipients", func(t *testing.T) {
			d := startDaemon(t, daemonScript{mail: replyRejected})
			calls := worldDir(t)
			code, _, stderr := runProcess(t, qqCmd(bin, writeConfig(t, d.socket, "defer", nil), calls), testMessage, []byte("F\x00\x00"))
			if n := len(fakeqq.Calls(t, calls)); code != 0 || n != 1 || d.connections() != 0 {
				t.Errorf("exit %d (%s), queued %d times, daemon asked %d times", code, stderr, n, d.connections())
			}
		})
		t.Run(name+"/exempt", func(t *testing.T) {
			d := startDaemon(t, daemonScript{mail: replyRejected})
			calls := worldDir(t)
			code, pid, stderr := runProcess(t, qqCmd(bin, writeConfig(t, d.socket, "defer", []string{"qmails", me}), calls), testMessage, testEnvelope)
			got := fakeqq.Calls(t, calls)
			if code != 0 || len(got) != 1 || d.connections() != 0 || !strings.HasSuffix(got[0].Info, fmt.Sprintf("pid=%d", pid)) {
				t.Errorf("exit %d (%s), %d calls, daemon asked %d times", code, stderr, len(got), d.connections())
			}
		})
		for _, mode := range []string{DaemonDownAccept, DaemonDownDefer} {
			t.Run(name+"/no daemon/"+mode, func(t *testing.T) {
				calls := worldDir(t)
				cfg := writeConfig(t, filepath.Join(worldDir(t), "missing.sock"), mode, nil)
				code, _, stderr := runProcess(t, qqCmd(bin, cfg, calls), testMessage, testEnvelope)
				want, wantCalls := 0, 1
				if mode == DaemonDownDefer {
					want, wantCalls = 71, 0
				}
				if n := len(fakeqq.Calls(t, calls)); code != want || n != wantCalls {
					t.Errorf("exit %d with %d runs, want %d and %d", code, n, want, wantCalls)
				}
				if !strings.Contains(stderr, "on_daemon_down = "+mode) || strings.Count(stderr, "\n") != 1 {
					t.Errorf("want one line naming on_daemon_down = %s, got %q", mode, stderr)
				}
			})
		}
	}
}

// relay-qq's own edges: a daemon that accepts and never speaks is down
// after the reply timeout; one that refuses at the greeting is a deferral;
// a large message goes through the spool file; fd 6 reaches the real
// qmail-queue.
func TestCQQEdges(t *testing.T) {
	for _, bin := range cBinaries(t) {
		t.Run(filepath.Base(bin), func(t *testing.T) { testCQQEdges(t, cqqBuild{bin: bin}) })
	}
}

func testCQQEdges(t *testing.T, b cqqBuild) {
	t.Run("silent daemon", func(t *testing.T) {
		silent := filepath.Join(worldDir(t), "silent.sock")
		l, err := net.Listen("unix", silent)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		code, _, stderr := runProcess(t, qqCmd(b.bin, writeConfig(t, silent, "defer", nil), worldDir(t)), testMessage, testEnvelope)
		if code != 71 || !strings.Contains(stderr, "timeout") {
			t.Errorf("exit %d, stderr %q; want 71 after a timeout", code, stderr)
		}
	})
	t.Run("421 at the greeting", func(t *testing.T) {
		sock := filepath.Join(worldDir(t), "busy.sock")
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			c, err := l.Accept()
			if err == nil {
				c.Write([]byte("421 4.3.2 too many connections from uid 0\r\n"))
				c.Close()
			}
		}()
		calls := worldDir(t)
		code, _, stderr := runProcess(t, qqCmd(b.bin, writeConfig(t, sock, "accept", nil), calls), testMessage, testEnvelope)
		if code != 71 || len(fakeqq.Calls(t, calls)) != 0 || !strings.Contains(stderr, "421 4.3.2") {
			t.Errorf("exit %d, stderr %q; want 71 and nothing queued, whatever on_daemon_down says", code, stderr)
		}
	})
	t.Run("large message", func(t *testing.T) {
		d := startDaemon(t, daemonScript{})
		calls := worldDir(t)
		var msg bytes.Buffer
		msg.WriteString("Subject: big\n\n")
		for i := 0; msg.Len() < 300<<10; i++ {
			fmt.Fprintf(&msg, ".line %d of a large message\n", i)
		}
		tmp := worldDir(t)
		code, _, stderr := runProcess(t, qqCmd(b.bin, writeConfig(t, d.socket, "defer", nil), calls, "TMPDIR="+tmp), msg.Bytes(), testEnvelope)
		if code != 0 {
			t.Fatalf("exit %d; stderr %s", code, stderr)
		}
		if got := fakeqq.Calls(t, calls); len(got) != 1 || !bytes.Equal(got[0].Message, msg.Bytes()) {
			t.Fatal("large message not passed through unchanged")
		}
		if s := d.session(t); !bytes.Equal(s.data, crlf(msg.Bytes())) || !s.committed {
			t.Errorf("daemon got %d bytes (want %d), committed %v", len(s.data), len(crlf(msg.Bytes())), s.committed)
		}
		if left, _ := os.ReadDir(tmp); len(left) != 0 {
			t.Errorf("spool left %d files behind", len(left))
		}
	})
	t.Run("arguments", func(t *testing.T) {
		code, _, stderr := runProcess(t, exec.Command(b.bin, "--config", "/nonexistent", "extra"), testMessage, testEnvelope)
		if code != ExitBadEnvelope || !strings.Contains(stderr, "takes no arguments") {
			t.Errorf("exit %d, stderr %q", code, stderr)
		}
	})
}

// What relay-qq is unsure of, relay-local decides, on the same fds: a
// config in a form relay-qq does not read still works, a broken one exits
// 55 naming the key, and without relay-local relay-qq exits 55 itself.
func TestCQQFallsBackToRelayLocal(t *testing.T) {
	b := testCQQ(t)
	d := startDaemon(t, daemonScript{})
	dir := worldDir(t)
	inline := filepath.Join(dir, "inline.toml")
	os.WriteFile(inline, []byte(fmt.Sprintf("listen = [{ addr = %q, mode = \"local\" }]\nlocal = { qmail_queue = %q, on_daemon_down = \"defer\" }\n", d.socket, fakeQQ)), 0o644)
	calls := worldDir(t)
	code, _, stderr := runProcess(t, qqCmd(b.bin, inline, calls), testMessage, testEnvelope)
	if got := fakeqq.Calls(t, calls); code != 0 || len(got) != 1 || !bytes.Equal(got[0].Message, testMessage) {
		t.Fatalf("exit %d (%s), %d calls", code, stderr, len(got))
	}
	if s := d.session(t); !s.committed {
		t.Error("not committed")
	}

	broken := filepath.Join(dir, "broken.toml")
	os.WriteFile(broken, []byte("[local]\non_daemon_down = \"maybe\"\n"), 0o644)
	if code, _, stderr := runProcess(t, qqCmd(b.bin, broken, worldDir(t)), testMessage, testEnvelope); code != ExitConfigError || !strings.Contains(stderr, "on_daemon_down") {
		t.Errorf("exit %d, stderr %q; want 55 naming the bad key", code, stderr)
	}

	alone, err := compileCQQ(t, worldDir(t), `RELAY_LOCAL_PATH="/nonexistent/relay-local"`)
	if err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runProcess(t, qqCmd(alone, broken, worldDir(t)), testMessage, testEnvelope); code != ExitConfigError || !strings.Contains(stderr, "/nonexistent/relay-local") {
		t.Errorf("exit %d, stderr %q; want 55 naming the missing relay-local", code, stderr)
	}
}

// Once connected, every failure defers, whatever on_daemon_down says: a
// daemon that closes at once, or never speaks, is up (only a missing
// socket or nothing behind it is "down").
func TestQQBuildsFailClosedOnceConnected(t *testing.T) {
	closing := filepath.Join(worldDir(t), "closing.sock")
	l, err := net.Listen("unix", closing)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	for name, bin := range qqBinaries(t) {
		t.Run(name, func(t *testing.T) {
			calls := worldDir(t)
			code, _, stderr := runProcess(t, qqCmd(bin, writeConfig(t, closing, "accept", nil), calls), testMessage, testEnvelope)
			if n := len(fakeqq.Calls(t, calls)); code != 71 || n != 0 {
				t.Errorf("exit %d with %d runs (stderr %q); want 71 and none", code, n, stderr)
			}
		})
	}
}

// relay-qq finds the caller's account in passwd as Go's os/user does
// without cgo: blank space around a line ignored, comments skipped, the
// uid field compared as a string, at least six colons, no name starting
// with + or -, a numeric gid, and long lines read whole.
func TestCQQAccountName(t *testing.T) {
	cCompiler(t)
	dir := worldDir(t)
	uid := strconv.Itoa(os.Getuid())
	passwd := filepath.Join(dir, "passwd")
	lines := "# me0:x:" + uid + ":0::/:/bin/sh\n" +
		"long:x:99999:0:" + strings.Repeat("g", 5000) + ":x:" + uid + ":0::/:/bin/sh\n" + // its tail is no line of its own
		"zero:x:0" + uid + ":0::/:/bin/sh\n" + // a leading zero is another string
		"+plus:x:" + uid + ":0::/:/bin/sh\n" +
		"few:x:" + uid + ":0:\n" +
		"badgid:x:" + uid + ":g::/:/bin/sh\n" +
		"  me:x:" + uid + ":0::/:/bin/sh  \n" +
		"later:x:" + uid + ":0::/:/bin/sh"
	if err := os.WriteFile(passwd, []byte(lines), 0o644); err != nil {
		t.Fatal(err)
	}
	bin, err := compileCQQ(t, dir, fmt.Sprintf("RELAY_PASSWD=%q", passwd))
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "relay.toml")
	os.WriteFile(cfg, []byte("[local]\non_daemon_down = \"defer\"\n"), 0o644)
	out, err := exec.Command(bin, "--config", cfg, "--settings").Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "\naccount=me\n") {
		t.Errorf("--settings: %q, want account=me", out)
	}
}

// notqmail's fd 6 reaches the real qmail-queue, which both builds exec in
// their place, and its exit 82 comes back.
func TestQQBuildsPassFD6(t *testing.T) {
	for name, bin := range qqBinaries(t) {
		t.Run(name, func(t *testing.T) {
			d := startDaemon(t, daemonScript{})
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			cmd := qqCmd(bin, writeConfig(t, d.socket, "defer", nil), worldDir(t), "FAKEQQ_EXIT=82", "FAKEQQ_FD6=Dno such domain (#5.1.2)")
			cmd.ExtraFiles = []*os.File{nil, nil, nil, w}
			code, _, _ := runProcess(t, cmd, testMessage, testEnvelope)
			w.Close()
			buf := make([]byte, 100)
			n, _ := r.Read(buf)
			if code != 82 || string(buf[:n]) != "Dno such domain (#5.1.2)" {
				t.Errorf("exit %d, fd 6 %q", code, buf[:n])
			}
		})
	}
}
