package local

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"relay/internal/fakeqq"
)

func tryBuildRelay(t testing.TB, tags ...string) (string, error) {
	return tryBuild(t, "./cmd/relay", tags...)
}

// tryBuild builds the command in pkg (relative to the module root) into a
// world-readable directory.
func tryBuild(t testing.TB, pkg string, tags ...string) (string, error) {
	root, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		return "", fmt.Errorf("go list -m: %v", err)
	}
	bin := filepath.Join(worldDir(t), filepath.Base(pkg))
	args := []string{"build", "-o", bin}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	cmd := exec.Command("go", append(args, pkg)...)
	cmd.Dir = strings.TrimSpace(string(root))
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building relay: %v\n%s", err, out)
	}
	return bin, nil
}

// The relay binary, and its small build relay-local, installed as
// /var/qmail/bin/qmail-queue and as /usr/sbin/sendmail: symlinks, no
// wrapper, config from $RELAY_CONFIG.
func TestRelayBinaryUnderQmailNames(t *testing.T) {
	for _, pkg := range []string{"./cmd/relay", "./cmd/relay-local"} {
		t.Run(pkg, func(t *testing.T) {
			bin, err := tryBuild(t, pkg)
			if err != nil {
				t.Fatal(err)
			}
			testBinaryUnderQmailNames(t, bin)
		})
	}
}

func testBinaryUnderQmailNames(t *testing.T, bin string) {
	dir := filepath.Dir(bin)
	for _, name := range []string{"qmail-queue", "sendmail"} {
		if err := os.Symlink(bin, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	d := startDaemon(t, daemonScript{})
	cfg := writeConfig(t, d.socket, "defer", []string{"qmails"})

	t.Run("qmail-queue", func(t *testing.T) {
		calls := worldDir(t)
		cmd := exec.Command(filepath.Join(dir, "qmail-queue"))
		cmd.Env = append(os.Environ(), "RELAY_CONFIG="+cfg, "FAKEQQ_DIR="+calls)
		code, _, stderr := runProcess(t, cmd, testMessage, testEnvelope)
		if code != 0 {
			t.Fatalf("exit %d; stderr %s", code, stderr)
		}
		got := fakeqq.Calls(t, calls)
		if len(got) != 1 || !bytes.Equal(got[0].Message, testMessage) || !bytes.Equal(got[0].Envelope, testEnvelope) {
			t.Fatalf("not passed through unchanged (%d calls)", len(got))
		}
		if s := d.session(t); s.kind != "check" || !s.committed {
			t.Errorf("session %s committed %v", s.kind, s.committed)
		}
	})
	t.Run("qmail-queue with a broken config", func(t *testing.T) {
		broken := filepath.Join(worldDir(t), "relay.toml")
		os.WriteFile(broken, []byte("[local]\non_daemon_down = \"maybe\"\n"), 0o644)
		cmd := exec.Command(filepath.Join(dir, "qmail-queue"))
		cmd.Env = append(os.Environ(), "RELAY_CONFIG="+broken)
		if code, _, stderr := runProcess(t, cmd, testMessage, testEnvelope); code != ExitConfigError || !strings.Contains(stderr, "on_daemon_down") {
			t.Errorf("exit %d, stderr %q; want 55 naming the bad key", code, stderr)
		}
	})
	t.Run("sendmail -t -i", func(t *testing.T) {
		cmd := exec.Command(filepath.Join(dir, "sendmail"), "-t", "-i", "-fshop@example.com")
		cmd.Env = append(os.Environ(), "RELAY_CONFIG="+cfg)
		cmd.Stdin = strings.NewReader("To: a@example.com\nSubject: x\n\nhello\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		s := d.session(t)
		if s.kind != "smtp" || s.helo != "localhost" || s.from != "shop@example.com" || strings.Join(s.rcpts, ",") != "a@example.com" {
			t.Errorf("session %+v", s)
		}
	})
	t.Run("relay sendmail usage error", func(t *testing.T) {
		cmd := exec.Command(bin, "sendmail", "--config", cfg, "-bp")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		if cmd.ProcessState.ExitCode() != ExUsage || strings.Count(stderr.String(), "\n") != 1 {
			t.Errorf("%v, stderr %q: want exit 64 and one line", err, stderr.String())
		}
	})
}
