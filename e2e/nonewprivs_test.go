package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"relay/doctor"
	"relay/internal/qmailtest"
)

// The daemon's hand-off runs qmail's real qmail-queue, which becomes
// qmailq through its setuid bit to enter the queue. Under no_new_privs
// (systemd's NoNewPrivileges=yes, which the README's unit once had) the
// kernel ignores that bit: qmail-queue stays qmaild, cannot chdir into the
// queue and exits 62, and every message gets 451. Without it the same
// daemon delivers. So the unit must not set the flag, and relay doctor
// says so when it is set.
func TestHandoffUnderNoNewPrivs(t *testing.T) {
	q := qmailtest.Require(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	q.StartSend()
	box := q.Mailbox()
	uid, gid := lookupID(t, "qmaild")
	qq := filepath.Join(q.Home, "bin", "qmail-queue")
	if st, err := os.Stat(qq); err != nil || st.Mode()&os.ModeSetuid == 0 {
		t.Fatalf("%s is not qmail's setuid qmail-queue: %v %v", qq, st.Mode(), err)
	}

	for _, nnp := range []bool{true, false} {
		t.Run(fmt.Sprintf("no_new_privs=%v", nnp), func(t *testing.T) {
			dir := worldTempDir(t)
			data := filepath.Join(dir, "data")
			os.Mkdir(data, 0o711)
			os.Chown(data, uid, gid)
			smtp := freePort(t)
			cfg := filepath.Join(dir, "relay.toml")
			os.WriteFile(cfg, fmt.Appendf(nil, `hostname = "relay.example.test"
data_dir = %q

[[listen]]
addr = %q
mode = "smtp"

[relay]
local_domains = [%q]
relay_networks = ["127.0.0.0/8"]

[delivery]
method = "qmail-queue"
command = %q
timeout = "20s"

[admin]
listen = %q

[policy.limits]
`, data, smtp, q.Me, qq, freePort(t)), 0o644)
			o := serviceOpts{cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
			if nnp {
				o.wrap = []string{setpriv, "--no-new-privs"}
			}
			s := startService(t, cfg, o)
			if got := noNewPrivs(t, s.pid()); got != nnp {
				t.Fatalf("the daemon's NoNewPrivs is %v, want %v", got, nnp)
			}

			marker := fmt.Sprintf("nnp-%v-%d", nnp, time.Now().UnixNano())
			c := dialSMTP(t, smtp)
			c.expect("EHLO client.example.test", "250")
			reply := c.send("sender@example.test", []string{box.Addr}, "Subject: hand-off\nX-Marker: "+marker+"\n\nbody\n")
			if nnp {
				if !strings.HasPrefix(reply, "451 ") || !strings.Contains(reply, "qq trouble creating files in queue") {
					t.Fatalf("under no_new_privs: %q, want qmail-queue's exit 62 as 451; log:\n%s", reply, s.logs())
				}
				// The log line may follow the reply.
				for deadline := time.Now().Add(10 * time.Second); !strings.Contains(s.logs(), `status="exit status 62"`); time.Sleep(20 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatalf("the log does not say qmail-queue exited 62:\n%s", s.logs())
					}
				}
				// relay doctor names the cause and the fix.
				out, code := doctorRun(t, cfg, "--qmail", q.Home)
				line := doctorLine(out, "hand-off")
				if code != 1 || !strings.HasPrefix(line, "FAIL") || !strings.Contains(line, "NoNewPrivs: 1") ||
					!strings.Contains(line, qq) || !strings.Contains(line, "fix: delete NoNewPrivileges=yes") {
					t.Fatalf("relay doctor exit %d, hand-off line %q:\n%s", code, line, out)
				}
				return
			}
			if !strings.HasPrefix(reply, "250 ok ") {
				t.Fatalf("without no_new_privs: %q, want 250", reply)
			}
			deadline := time.Now().Add(60 * time.Second)
			for {
				msgs, _ := box.Messages()
				if len(msgs) == 1 && bytes.Contains(msgs[0], []byte("X-Marker: "+marker)) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("not delivered; mailbox holds %d messages; qmail-send log:\n%s", len(msgs), q.Log())
				}
				time.Sleep(50 * time.Millisecond)
			}
			out, _ := doctorRun(t, cfg, "--qmail", q.Home)
			if line := doctorLine(out, "hand-off"); !strings.HasPrefix(line, "ok") {
				t.Fatalf("relay doctor's hand-off line %q:\n%s", line, out)
			}
		})
	}
}

// doctorRun runs relay doctor on config with args and returns its output
// and exit code.
func doctorRun(t *testing.T, config string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(bins.relay, append([]string{"doctor", "--config", config}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatal(err)
	}
	return out.String(), cmd.ProcessState.ExitCode()
}

// doctorLine is relay doctor's line for check, "" if there is none.
func doctorLine(out, check string) string {
	for line := range strings.Lines(out) {
		status, rest, _ := strings.Cut(line, " ")
		if status != "" && strings.HasPrefix(strings.TrimLeft(rest, " "), check+" ") {
			return strings.TrimRight(line, "\n")
		}
	}
	return ""
}

// The README's unit sets none of the settings that give the daemon
// no_new_privs (the list is relay doctor's).
func TestREADMEUnitKeepsSetuid(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(moduleRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, unit, ok := strings.Cut(string(b), "# /etc/systemd/system/relay.service\n")
	unit, _, ok2 := strings.Cut(unit, "```")
	if !ok || !ok2 || !strings.Contains(unit, "ExecStart=/usr/local/bin/relay serve") {
		t.Fatal("the README's systemd unit was not found")
	}
	for line := range strings.Lines(unit) {
		key, _, isSetting := strings.Cut(strings.TrimSpace(line), "=")
		if isSetting && slices.Contains(doctor.NoNewPrivsSettings(), key) {
			t.Errorf("the README's unit sets %s", strings.TrimSpace(line))
		}
	}
}
