package local

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"relay/internal/fakeqq"
)

// The back door a local script could use is the real qmail-queue itself.
// Installed as the README says (the real one executable by a group only,
// relay-qq and relay-local setgid to that group), a user cannot run the
// real one directly, relay qq still can, and settings or a config of the
// caller's choosing are ignored.
func TestQQSetgidClosesTheBackDoor(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to create a user and a group")
	}
	for _, tool := range []string{"useradd", "groupadd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skip(tool + " not installed")
		}
	}
	suffix := strconv.Itoa(os.Getpid() % 100000)
	group, name := "rqqg"+suffix, "rqqs"+suffix
	if out, err := exec.Command("groupadd", group).CombinedOutput(); err != nil {
		t.Fatalf("groupadd: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("groupdel", group).Run() })
	if out, err := exec.Command("useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name).CombinedOutput(); err != nil {
		t.Fatalf("useradd: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("userdel", name).Run() })
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	ugid, _ := strconv.Atoi(u.Gid)
	qqgid, _ := strconv.Atoi(g.Gid)

	dir := worldDir(t)
	secure := filepath.Join(dir, "relay.toml")
	real := filepath.Join(dir, "qmail-queue.orig")
	if out, err := exec.Command("cp", fakeQQ, real).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	// Both builds of relay qq, each told at build time which config (Go)
	// or settings file (C) is the secure one; relay-qq falls back to this
	// relay-local.
	builds := map[string]string{}
	root, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		t.Fatal(err)
	}
	goDir := worldDir(t)
	builds["relay-local"] = filepath.Join(goDir, "qmail-queue")
	build := exec.Command("go", "build", "-o", builds["relay-local"], "-ldflags", "-X relay/local.secureConfigPath="+secure, "./cmd/relay-local")
	build.Dir = strings.TrimSpace(string(root))
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building relay-local: %v\n%s", err, out)
	}
	cDir := worldDir(t)
	secureSettings := filepath.Join(dir, SettingsFile)
	if builds["relay-qq"], err = compileCQQ(t, cDir, fmt.Sprintf("RELAY_QQ_SETTINGS=%q", secureSettings), fmt.Sprintf("RELAY_LOCAL_PATH=%q", builds["relay-local"])); err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		path string
		mode os.FileMode
	}{{real, 0o750}, {builds["relay-local"], 0o755 | os.ModeSetgid}, {builds["relay-qq"], 0o755 | os.ModeSetgid}} {
		if err := os.Chown(f.path, 0, qqgid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(f.path, f.mode); err != nil {
			t.Fatal(err)
		}
	}

	d := startDaemon(t, daemonScript{})
	toml := fmt.Sprintf("[[listen]]\naddr = %q\nmode = \"local\"\n\n[local]\nqmail_queue = %q\non_daemon_down = \"defer\"\n", d.socket, real)
	if err := os.WriteFile(secure, []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	writeSettings(t, secure)
	// The caller's own config and settings: another daemon, which must
	// never be asked.
	other := startDaemon(t, daemonScript{})
	own := writeConfig(t, other.socket, "accept", nil)
	asUser := func(cmd *exec.Cmd, calls string) *exec.Cmd {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(ugid)}}
		cmd.Dir = "/"
		cmd.Env = append(os.Environ(), "FAKEQQ_DIR="+calls, "RELAY_CONFIG="+own, "RELAY_QQ_SETTINGS="+settingsBeside(own))
		return cmd
	}

	direct := asUser(exec.Command(real), worldDir(t))
	if err := direct.Start(); err == nil {
		direct.Process.Kill()
		direct.Wait()
		t.Fatal("the user could run the real qmail-queue directly")
	}

	run := func(t *testing.T, name, bin string) {
		calls := worldDir(t)
		code, _, stderr := runProcess(t, asUser(exec.Command(bin, "--config", own), calls), testMessage, testEnvelope)
		if code != 0 {
			t.Fatalf("relay qq as %s: exit %d; stderr %s", name, code, stderr)
		}
		if s := d.session(t); s.uid != uid || !s.committed {
			t.Errorf("daemon saw uid %d (want %d), committed %v", s.uid, uid, s.committed)
		}
		if n := other.connections(); n != 0 {
			t.Errorf("the caller's own daemon was asked %d times", n)
		}
		got := fakeqq.Calls(t, calls)
		if len(got) != 1 || !bytes.Equal(got[0].Message, testMessage) || !strings.HasPrefix(got[0].Info, fmt.Sprintf("uid=%d ", uid)) {
			t.Fatalf("real qmail-queue calls: %+v, want one as uid %d", got, uid)
		}
	}
	for name, bin := range builds {
		t.Run(name, func(t *testing.T) { run(t, name, bin) })
	}
	// Without the secure settings, relay-qq hands over to the setgid
	// relay-local, which reads only the secure config.
	t.Run("relay-qq without its settings", func(t *testing.T) {
		if err := os.Remove(secureSettings); err != nil {
			t.Fatal(err)
		}
		run(t, "relay-qq", builds["relay-qq"])
	})

	// Installed setuid by mistake, relay qq would make every caller look
	// like its owner to the daemon (SO_PEERCRED gives the effective uid):
	// both builds refuse to run.
	for name, bin := range builds {
		t.Run(name+" setuid", func(t *testing.T) {
			if err := os.Chown(bin, uid, qqgid); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(bin, 0o755|os.ModeSetuid); err != nil {
				t.Fatal(err)
			}
			calls := worldDir(t)
			cmd := exec.Command(bin, "--config", own)
			cmd.Env = append(os.Environ(), "FAKEQQ_DIR="+calls)
			code, _, stderr := runProcess(t, cmd, testMessage, testEnvelope)
			if code != ExitConfigError || !strings.Contains(stderr, "must not run setuid") || len(fakeqq.Calls(t, calls)) != 0 {
				t.Errorf("exit %d, stderr %q: want 55 and nothing queued", code, stderr)
			}
		})
	}
}
