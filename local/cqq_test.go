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

	"relay/internal/fakeqq"
)

// cmd/relay-qq is relay qq in C, the build installed for speed. It reads
// qq.settings, which the daemon writes (Settings), and falls back to
// relay-local when that file is not as the daemon writes it. These tests
// run both builds as processes through the same scenarios: the same exit
// codes, the same check conversation, the same hand-off.

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
// than 4 KiB of message goes to the spool file, the fallback is a freshly
// built relay-local, and the settings file is $RELAY_QQ_SETTINGS (its
// built-in path does not exist).
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
		defines := []string{"RELAY_QQ_TIMEOUT_MS=500", "RELAY_QQ_SPOOL_MEMORY=4096", fmt.Sprintf("RELAY_LOCAL_PATH=%q", keep), `RELAY_QQ_SETTINGS="/nonexistent/qq.settings"`}
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

// qqCmd runs a build of relay qq on the config cfg and the qq.settings
// beside it (writeConfig writes both).
func qqCmd(bin, cfg, calls string, env ...string) *exec.Cmd {
	cmd := exec.Command(bin)
	if filepath.Base(bin) == "relay-local" {
		cmd.Args = append(cmd.Args, "qq")
	}
	cmd.Args = append(cmd.Args, "--config", cfg)
	cmd.Env = append(append(os.Environ(), "FAKEQQ_DIR="+calls, "RELAY_CONFIG=", "RELAY_QQ_SETTINGS="+settingsBeside(cfg)), env...)
	return cmd
}

// The decisions of TestQQDecisions, for both builds as processes, with one
// recipient and with two.
func TestQQBuildsDecideAlike(t *testing.T) {
	for name, bin := range qqBinaries(t) {
		for _, tc := range qqDecisions {
			for _, envelope := range [][]byte{testEnvelope, []byte("Fa@example.com\x00Tb@example.net\x00\x00")} {
				t.Run(fmt.Sprintf("%s/%s/%d", name, tc.name, bytes.Count(envelope, []byte("\x00T"))), func(t *testing.T) {
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
						if !bytes.Equal(got[0].Message, wantQueued(tc.wantSigned)) || !bytes.Equal(got[0].Envelope, envelope) {
							t.Errorf("not passed through unchanged: %q", got[0].Message)
						}
						if want := fmt.Sprintf("pid=%d", pid); !strings.HasSuffix(got[0].Info, want) {
							t.Errorf("real qmail-queue ran as %q, not exec'd in place (%s)", got[0].Info, want)
						}
					}
					if !strings.Contains(stderr, tc.wantStderr) {
						t.Errorf("stderr %q does not contain %q", stderr, tc.wantStderr)
					}
					if tc.script.notCheck {
						return
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
					if s.kind != "check" || s.uid != os.Getuid() || s.from != "a@example.com" || len(s.rcpts) != bytes.Count(envelope, []byte("\x00T")) {
						t.Errorf("session %s uid %d from %q rcpts %q", s.kind, s.uid, s.from, s.rcpts)
					}
					if string(s.head) != string(headerOf(testMessage)) || s.size != int64(len(testMessage)) {
						t.Errorf("daemon got header %q, size %d", s.head, s.size)
					}
					if whole := bytes.Equal(s.data, testMessage); whole != tc.wantWhole {
						t.Errorf("daemon got the message whole: %v, want %v", whole, tc.wantWhole)
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
			d := startDaemon(t, daemonScript{verdict: 'R', text: "550 5.7.1 suspended"})
			calls := worldDir(t)
			code, _, stderr := runProcess(t, qqCmd(bin, writeConfig(t, d.socket, "defer", nil), calls), testMessage, []byte("F\x00\x00"))
			if n := len(fakeqq.Calls(t, calls)); code != 0 || n != 1 || d.connections() != 0 {
				t.Errorf("exit %d (%s), queued %d times, daemon asked %d times", code, stderr, n, d.connections())
			}
		})
		t.Run(name+"/exempt", func(t *testing.T) {
			d := startDaemon(t, daemonScript{verdict: 'R', text: "550 5.7.1 suspended"})
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

// A message past memory (relay-qq's test build spools from 4 KiB on,
// relay-local from 1 MiB) goes to the daemon whole from the spool file and
// to the real qmail-queue from there too, the signatures written into the
// room in front of it; nothing is left behind.
func TestQQBuildsSignLargeMessagesAlike(t *testing.T) {
	var msg bytes.Buffer
	msg.WriteString("From: a@example.com\nSubject: big\n\n")
	for i := 0; msg.Len() < DefaultSpoolMemory+100<<10; i++ {
		fmt.Fprintf(&msg, ".line %d of a large message to sign\n", i)
	}
	for name, bin := range qqBinaries(t) {
		t.Run(name, func(t *testing.T) {
			d := startDaemon(t, daemonScript{verdict: 'G'})
			calls, tmp := worldDir(t), worldDir(t)
			code, _, stderr := runProcess(t, qqCmd(bin, writeConfig(t, d.socket, "defer", nil), calls, "TMPDIR="+tmp), msg.Bytes(), testEnvelope)
			if code != 0 {
				t.Fatalf("exit %d; stderr %s", code, stderr)
			}
			got := fakeqq.Calls(t, calls)
			if len(got) != 1 || !bytes.Equal(got[0].Message, append([]byte(testSignatures), msg.Bytes()...)) {
				t.Fatalf("the real qmail-queue did not get the signatures and the message (%d calls)", len(got))
			}
			if s := d.session(t); !bytes.Equal(s.data, msg.Bytes()) || string(s.head) != "From: a@example.com\nSubject: big\n\n" || !s.committed {
				t.Errorf("daemon got %d bytes (want %d), header %q, committed %v", len(s.data), msg.Len(), s.head, s.committed)
			}
			if left, _ := os.ReadDir(tmp); len(left) != 0 {
				t.Errorf("spool left %d files behind", len(left))
			}
		})
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
		if s := d.session(t); string(s.head) != "Subject: big\n\n" || s.size != int64(msg.Len()) || !s.committed {
			t.Errorf("daemon got header %q, size %d (want %d), committed %v", s.head, s.size, msg.Len(), s.committed)
		}
		if left, _ := os.ReadDir(tmp); len(left) != 0 {
			t.Errorf("spool left %d files behind", len(left))
		}
	})
	t.Run("large message held", func(t *testing.T) {
		d := startDaemon(t, daemonScript{verdict: 'Q'})
		calls := worldDir(t)
		var msg bytes.Buffer
		msg.WriteString("Subject: big\n\n")
		for i := 0; msg.Len() < 300<<10; i++ {
			fmt.Fprintf(&msg, ".line %d of a large message\n", i)
		}
		code, _, stderr := runProcess(t, qqCmd(b.bin, writeConfig(t, d.socket, "defer", nil), calls), msg.Bytes(), testEnvelope)
		if code != 0 || len(fakeqq.Calls(t, calls)) != 0 {
			t.Fatalf("exit %d, stderr %s; want 0 and the real qmail-queue not run", code, stderr)
		}
		if s := d.session(t); !bytes.Equal(s.data, msg.Bytes()) || string(s.head) != "Subject: big\n\n" {
			t.Errorf("daemon got %d bytes to hold (want %d), header %q", len(s.data), msg.Len(), s.head)
		}
	})
	t.Run("arguments", func(t *testing.T) {
		code, _, stderr := runProcess(t, exec.Command(b.bin, "--config", "/nonexistent", "extra"), testMessage, testEnvelope)
		if code != ExitBadEnvelope || !strings.Contains(stderr, "takes no arguments") {
			t.Errorf("exit %d, stderr %q", code, stderr)
		}
	})
}

// A qq.settings relay-qq cannot be sure of (missing, not a file, not
// exactly as the daemon writes it) hands over to relay-local, on the same
// fds, which reads relay.toml: here the settings name daemon a, the
// config daemon b, and the daemon that gets the check tells which build
// decided. Without relay-local relay-qq exits 55.
func TestCQQReadsSettings(t *testing.T) {
	a, b := startDaemon(t, daemonScript{}), startDaemon(t, daemonScript{})
	cfg := writeConfig(t, b.socket, "defer", nil)
	uid := strconv.Itoa(os.Getuid())
	valid := func(edit func(string) string) string {
		doc := "# written by relay serve\nsocket=" + a.socket + "\nqmail_queue=" + fakeQQ + "\non_daemon_down=accept\nexempt_uids=1,2\n"
		if edit != nil {
			doc = edit(doc)
		}
		return doc
	}
	replace := func(old, new string) func(string) string {
		return func(doc string) string { return strings.Replace(doc, old, new, 1) }
	}
	// The sanitized build runs the same files as FuzzCQQSettingsFile's
	// seeds.
	bin := testCQQ(t).bin
	for _, tc := range cqqSettingsCases(valid, replace, a.socket, uid) {
		t.Run(tc.name, func(t *testing.T) {
			settings := filepath.Join(worldDir(t), "qq.settings")
			if tc.doc == "<dir>" {
				os.Mkdir(settings, 0o755)
			} else if tc.doc != "<missing>" {
				os.WriteFile(settings, []byte(tc.doc), 0o644)
			}
			calls := worldDir(t)
			cmd := qqCmd(bin, cfg, calls)
			cmd.Env = append(cmd.Env, "RELAY_QQ_SETTINGS="+settings)
			code, _, stderr := runProcess(t, cmd, testMessage, testEnvelope)
			if n := len(fakeqq.Calls(t, calls)); code != 0 || n != 1 {
				t.Fatalf("exit %d with %d runs; stderr %s", code, n, stderr)
			}
			switch tc.want {
			case "a", "b":
				asked, other := a, b
				if tc.want == "b" {
					asked, other = b, a
				}
				if s := asked.session(t); !s.committed {
					t.Errorf("daemon %s: not committed", tc.want)
				}
				if n := other.connections(); n != 0 {
					t.Errorf("the other daemon was asked too")
				}
			case "exempt":
				if a.connections()+b.connections() != 0 {
					t.Error("an exempt caller's message was checked")
				}
			}
			a.reset()
			b.reset()
		})
	}

	// relay-local reads the whole config: one the daemon would refuse is
	// refused (55, naming the key).
	broken := filepath.Join(worldDir(t), "relay.toml")
	os.WriteFile(broken, []byte("[local]\non_daemon_down = \"maybe\"\n"), 0o644)
	cmd := qqCmd(bin, broken, worldDir(t))
	cmd.Env = append(cmd.Env, "RELAY_QQ_SETTINGS=/nonexistent/qq.settings")
	if code, _, stderr := runProcess(t, cmd, testMessage, testEnvelope); code != ExitConfigError || !strings.Contains(stderr, "on_daemon_down") {
		t.Errorf("exit %d, stderr %q; want 55 naming the bad key", code, stderr)
	}

	alone, err := compileCQQ(t, worldDir(t), `RELAY_LOCAL_PATH="/nonexistent/relay-local"`, `RELAY_QQ_SETTINGS="/nonexistent/qq.settings"`)
	if err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runProcess(t, exec.Command(alone), testMessage, testEnvelope); code != ExitConfigError || !strings.Contains(stderr, "/nonexistent/relay-local") {
		t.Errorf("exit %d, stderr %q; want 55 naming the missing relay-local", code, stderr)
	}
}

type cqqSettingsCase struct {
	name, doc string
	want      string // "a": the settings were used; "b": relay-local decided; "exempt"
}

func cqqSettingsCases(valid func(func(string) string) string, replace func(string, string) func(string) string, socket, uid string) []cqqSettingsCase {
	return []cqqSettingsCase{
		{"as written", valid(nil), "a"},
		{"blank lines and comments", valid(replace("\n", "\n\n# more\n\n")), "a"},
		{"no exempt uids", valid(replace("exempt_uids=1,2", "exempt_uids=")), "a"},
		{"caller exempt", valid(replace("exempt_uids=1,2", "exempt_uids=1,"+uid+",2")), "exempt"},
		{"missing", "<missing>", "b"},
		{"a directory", "<dir>", "b"},
		{"empty", "", "b"},
		{"no final newline", strings.TrimSuffix(valid(nil), "\n"), "b"},
		{"a key missing", valid(replace("on_daemon_down=accept\n", "")), "b"},
		{"a key twice", valid(replace("on_daemon_down=accept", "on_daemon_down=accept\non_daemon_down=accept")), "b"},
		{"an unknown key", valid(replace("# written", "hostname=x\n# written")), "b"},
		{"a line without =", valid(replace("# written", "socket\n# written")), "b"},
		{"spaces around =", valid(replace("on_daemon_down=accept", "on_daemon_down = accept")), "b"},
		{"relative socket", valid(replace("socket=/", "socket=")), "b"},
		{"socket path too long", valid(replace("socket="+socket, "socket=/"+strings.Repeat("s", 120))), "b"},
		{"relative qmail_queue", valid(replace("qmail_queue=/", "qmail_queue=")), "b"},
		{"other on_daemon_down", valid(replace("=accept", "=maybe")), "b"},
		{"uid not a number", valid(replace("1,2", "1,x")), "b"},
		{"empty uid", valid(replace("1,2", "1,,2")), "b"},
		{"trailing comma", valid(replace("1,2", "1,2,")), "b"},
		{"uid over 32 bits", valid(replace("1,2", "1,4294967296")), "b"},
		{"uid with a sign", valid(replace("1,2", "+1,2")), "b"},
		{"CRLF", valid(replace("\n", "\r\n")), "b"},
		{"a control character", valid(replace("accept", "accept\x01")), "b"},
		{"a NUL", valid(replace("# written", "#\x00 written")), "b"},
	}
}

// FuzzCQQSettingsFile runs relay-qq under ASan and UBSan (the plain build
// without a sanitizing compiler) on any settings file: it must not crash,
// and it must queue the message one way or another. (Each input runs
// relay-qq once: fuzz it by hand.)
func FuzzCQQSettingsFile(f *testing.F) {
	bins := cBinaries(f)
	bin := bins[len(bins)-1]
	a, b := startDaemon(f, daemonScript{}), startDaemon(f, daemonScript{})
	cfg := writeConfig(f, b.socket, "defer", nil)
	valid := func(edit func(string) string) string {
		doc := "socket=" + a.socket + "\nqmail_queue=" + fakeQQ + "\non_daemon_down=accept\nexempt_uids=1,2\n"
		if edit != nil {
			doc = edit(doc)
		}
		return doc
	}
	replace := func(old, new string) func(string) string {
		return func(doc string) string { return strings.Replace(doc, old, new, 1) }
	}
	for _, tc := range cqqSettingsCases(valid, replace, a.socket, "0") {
		if !strings.HasPrefix(tc.doc, "<") {
			f.Add([]byte(tc.doc))
		}
	}
	settings := filepath.Join(worldDir(f), "qq.settings")
	f.Fuzz(func(t *testing.T, doc []byte) {
		if err := os.WriteFile(settings, doc, 0o644); err != nil {
			t.Fatal(err)
		}
		calls := worldDir(t)
		cmd := qqCmd(bin, cfg, calls)
		cmd.Env = append(cmd.Env, "RELAY_QQ_SETTINGS="+settings)
		code, _, stderr := runProcess(t, cmd, testMessage, testEnvelope)
		if strings.Contains(stderr, "Sanitizer") || strings.Contains(stderr, "runtime error") {
			t.Fatalf("relay-qq on %q:\n%s", doc, stderr)
		}
		// A file naming another socket or qmail-queue may defer, or fail
		// to run what it names; nothing else.
		if code != 0 && code != ExitDeferred {
			t.Fatalf("relay-qq on %q: exit %d; stderr %s", doc, code, stderr)
		}
		a.reset()
		b.reset()
	})
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
