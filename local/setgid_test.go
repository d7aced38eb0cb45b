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
// relay-local setgid to that group), a user cannot run the real one
// directly, relay qq still can, and a config of the caller's choosing is
// ignored.
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
	// Both builds of relay qq, each told at build time which config is
	// the secure one.
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
	if builds["relay-qq"], err = compileCQQ(t, cDir, fmt.Sprintf("RELAY_SECURE_CONFIG=%q", secure)); err != nil {
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
	// The caller's own config: no daemon, and "accept" would pass mail on.
	own := writeConfig(t, filepath.Join(dir, "nobody-listens.sock"), "accept", nil)
	asUser := func(cmd *exec.Cmd, calls string) *exec.Cmd {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(ugid)}}
		cmd.Dir = "/"
		cmd.Env = append(os.Environ(), "FAKEQQ_DIR="+calls, "RELAY_CONFIG="+own)
		return cmd
	}

	direct := asUser(exec.Command(real), worldDir(t))
	if err := direct.Start(); err == nil {
		direct.Process.Kill()
		direct.Wait()
		t.Fatal("the user could run the real qmail-queue directly")
	}

	for name, bin := range builds {
		t.Run(name, func(t *testing.T) {
			calls := worldDir(t)
			code, _, stderr := runProcess(t, asUser(exec.Command(bin, "--config", own), calls), testMessage, testEnvelope)
			if code != 0 {
				t.Fatalf("relay qq as %s: exit %d; stderr %s", name, code, stderr)
			}
			if s := d.session(t); s.uid != uid || !s.committed {
				t.Errorf("daemon saw uid %d (want %d), committed %v", s.uid, uid, s.committed)
			}
			got := fakeqq.Calls(t, calls)
			if len(got) != 1 || !bytes.Equal(got[0].Message, testMessage) || !strings.HasPrefix(got[0].Info, fmt.Sprintf("uid=%d ", uid)) {
				t.Fatalf("real qmail-queue calls: %+v, want one as uid %d", got, uid)
			}
		})
	}

	// relay-qq's --settings (for the tests) would show a setgid caller
	// what the secure config says: refused.
	t.Run("relay-qq --settings", func(t *testing.T) {
		cmd := asUser(exec.Command(builds["relay-qq"], "--settings"), worldDir(t))
		out, err := cmd.CombinedOutput()
		if cmd.ProcessState.ExitCode() != ExitConfigError || strings.Contains(string(out), "socket=") {
			t.Errorf("%v: %q; want exit 55 and nothing of the config", err, out)
		}
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
