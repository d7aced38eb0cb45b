package local

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"relay/internal/fakeqq"
)

// realDaemon is `relay serve` from the built binary, with a local socket,
// a Maildir hand-off, the admin API and a uid cap.
type realDaemon struct {
	bin, config, socket, admin, token, dir string
}

// startRealDaemon builds relay and runs `relay serve`; it skips the test
// while relay does not build or serve is not wired up yet (the socket
// never appears). dkimBlock replaces the config's [dkim] section ("": no
// keys, no DMARC lookups).
func startRealDaemon(t *testing.T, dkimBlock string) *realDaemon {
	t.Helper()
	bin, err := tryBuildRelay(t)
	if err != nil {
		t.Skipf("the relay daemon cannot be built yet: %v", err)
	}
	if dkimBlock == "" {
		dkimBlock = "[dkim]\nforeign_dmarc = \"accept\" # no DNS lookups outside loopback\n"
	}
	d := &realDaemon{bin: bin, dir: worldDir(t), token: "e2e-test-token-0123456789abcdef"}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d.admin = l.Addr().String()
	l.Close()
	tokenFile := filepath.Join(d.dir, "admin.token")
	os.WriteFile(tokenFile, []byte(d.token+"\n"), 0o600)
	d.socket = filepath.Join(d.dir, "submit.sock")
	d.config = filepath.Join(d.dir, "relay.toml")
	os.WriteFile(d.config, []byte(fmt.Sprintf(`hostname = "mail.example.test"
data_dir = %q

[[listen]]
addr = %q
mode = "local"

[delivery]
method = "maildir"
maildir = %q

[local]
qmail_queue = %q

[admin]
listen = %q
token_file = %q

[policy.limits.uid]
msgs = ["100/1h"]

%s
`, filepath.Join(d.dir, "data"), d.socket, filepath.Join(d.dir, "maildir"), fakeQQ, d.admin, tokenFile, dkimBlock)), 0o644)

	ctx, cancel := context.WithCancel(context.Background())
	serve := exec.CommandContext(ctx, d.bin, "serve", "--config", d.config)
	var serveLog bytes.Buffer
	serve.Stdout, serve.Stderr = &serveLog, &serveLog
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { serve.Wait(); close(exited) }()
	t.Cleanup(func() { cancel(); <-exited })
	if !waitFor(10*time.Second, exited, func() bool { _, err := os.Stat(d.socket); return err == nil }) {
		t.Skipf("relay serve is not ready yet (no local socket); its output:\n%s", serveLog.String())
	}
	return d
}

// sender fetches GET /api/senders/{id} from the admin API.
func (d *realDaemon) sender(t *testing.T, id string) (int, string) {
	t.Helper()
	return d.get(t, "/api/senders/"+url.PathEscape(id))
}

// get fetches path from the admin API.
func (d *realDaemon) get(t *testing.T, path string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+d.admin+path, nil)
	req.Header.Set("Authorization", "Bearer "+d.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("admin API: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// PHP's mail() through relay sendmail into the real daemon: the message is
// counted against uid:local:<uid> and carries the script's name. Needs
// php-cli (installed by .ci/run) and a relay binary whose serve works; it
// skips until both are there.
func TestPHPMailCountedAgainstUIDAndScript(t *testing.T) {
	php, err := exec.LookPath("php")
	if err != nil {
		t.Skip("php-cli not installed")
	}
	d := startRealDaemon(t, "")
	script := filepath.Join(d.dir, "contact-form.php")
	os.WriteFile(script, []byte(`<?php
exit(mail("customer@example.com", "order", "thank you\n", "From: shop@example.test") ? 0 : 1);
`), 0o644)
	cmd := exec.Command(php, "-n",
		"-d", "sendmail_path="+d.bin+" sendmail --config "+d.config+" -t -i",
		"-d", "mail.add_x_header=1", script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("php mail() failed: %v\n%s", err, out)
	}
	id := fmt.Sprintf("uid:local:%d", os.Getuid())
	if code, body := d.sender(t, id); code != 200 || !strings.Contains(body, id) || !strings.Contains(body, "contact-form.php") {
		t.Errorf("GET /api/senders/%s: %d %s\nwant the uid counted with the script's name", id, code, body)
	}
}

// relay qq, both builds, against the real daemon's check: the real
// qmail-queue gets the message unchanged and the uid is charged once per
// message. relay-qq takes everything from the qq.settings the daemon wrote
// (its relay-local fallback would find no config: RELAY_CONFIG is empty).
func TestQQAgainstRealDaemon(t *testing.T) {
	d := startRealDaemon(t, "")
	id := fmt.Sprintf("uid:local:%d", os.Getuid())
	settings := filepath.Join(d.dir, "data", SettingsFile)
	for i, bin := range []string{d.bin, testCQQ(t).bin} {
		calls := worldDir(t)
		newCmd := func() *exec.Cmd {
			cmd := exec.Command(bin)
			cmd.Env = append(os.Environ(), "FAKEQQ_DIR="+calls, "RELAY_QQ_SETTINGS="+settings, "RELAY_CONFIG=/nonexistent/relay.toml")
			if bin == d.bin {
				cmd.Args = []string{bin, "qq", "--config", d.config}
			}
			return cmd
		}
		for _, envelope := range [][]byte{testEnvelope, []byte("Fa@example.com\x00Tb@example.net\x00\x00")} {
			code, _, stderr := runProcess(t, newCmd(), testMessage, envelope)
			if code != 0 {
				t.Fatalf("%s: exit %d; stderr %s", bin, code, stderr)
			}
		}
		got := fakeqq.Calls(t, calls)
		if len(got) != 2 || !bytes.Equal(got[0].Message, testMessage) || !bytes.Equal(got[0].Envelope, testEnvelope) {
			t.Fatalf("%s: not passed through unchanged (%d calls)", bin, len(got))
		}
		want := fmt.Sprintf(`"metric":"msgs","window":"1h","limit":100,"used":%d}`, 2*(i+1))
		if !waitFor(3*time.Second, nil, func() bool { _, body := d.sender(t, id); return strings.Contains(body, want) }) {
			code, body := d.sender(t, id)
			t.Errorf("%s: GET /api/senders/%s: %d %s\nwant %s", bin, id, code, body, want)
		}
	}
}

// waitFor polls cond every 20ms until it holds, stop closes, or d passes.
func waitFor(d time.Duration, stop <-chan struct{}, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		select {
		case <-stop:
			return cond()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return false
}
