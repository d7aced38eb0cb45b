// Package e2e runs the real relay binary on loopback and talks to it the way
// clients, scripts and admins do.
package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"relay/internal/fakeqq"
)

// binaries built once for the whole package (TestMain).
type binaries struct {
	relay  string
	fakeqq string
}

var bins binaries // set once in TestMain, read-only afterwards

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "relay-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755)
	bins.relay = filepath.Join(dir, "relay")
	bins.fakeqq = filepath.Join(dir, "fakeqq")
	for _, b := range []struct{ out, pkg string }{{bins.relay, "relay/cmd/relay"}, {bins.fakeqq, "relay/internal/fakeqq/cmd/fakeqq"}} {
		if out, err := exec.Command("go", "build", "-o", b.out, b.pkg).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", b.pkg, err, out)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// freePort returns a loopback TCP address that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// daemon is one running `relay serve`.
type daemon struct {
	t      *testing.T
	dir    string // data_dir and config live here
	config string
	smtp   string // smtp listener (relay_networks include 127.0.0.0/8 unless the test changes them)
	sub    string // submission listener
	sock   string // local socket
	admin  string
	qqDir  string // FAKEQQ_DIR
	cmd    *exec.Cmd
	logMu  sync.Mutex
	log    bytes.Buffer
	exited chan struct{}
	env    []string
}

// options for newDaemon: extra TOML appended to the base config, and env.
type daemonOpts struct {
	extraTOML string   // appended after the base config
	policy    string   // replaces the default [policy] block
	relay     string   // replaces the default [relay] block
	command   string   // delivery.command (qmail-queue); default the fake
	dkim      string   // replaces the default [dkim] block
	env       []string // e.g. FAKEQQ_EXIT=71
}

func newDaemon(t *testing.T, o daemonOpts) *daemon {
	t.Helper()
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	d := &daemon{t: t, dir: dir, smtp: freePort(t), sub: freePort(t), admin: freePort(t),
		sock: filepath.Join(dir, "submit.sock"), qqDir: filepath.Join(dir, "qq"), exited: make(chan struct{})}
	os.Mkdir(d.qqDir, 0o777)
	os.Chmod(d.qqDir, 0o777)
	relayBlock := o.relay
	if relayBlock == "" {
		relayBlock = `[relay]
local_domains = ["example.com"]
relay_networks = ["127.0.0.0/8"]
timeout = "30s"
`
	}
	command := o.command
	if command == "" {
		command = bins.fakeqq
	}
	policyBlock := o.policy
	if policyBlock == "" {
		policyBlock = `[policy]
mode = "enforce"
over_limit = "defer"
suspend_after = 0
`
	}
	dkimBlock := o.dkim
	if dkimBlock == "" {
		// No DMARC lookups: tests talk to loopback only (DESIGN: network
		// tests on loopback); the DKIM tests bring their own DNS server.
		dkimBlock = "[dkim]\nforeign_dmarc = \"accept\"\n"
	}
	cfg := fmt.Sprintf(`hostname = "mail.example.test"
data_dir = %q

[[listen]]
addr = %q
mode = "smtp"

[[listen]]
addr = %q
mode = "submission"

[[listen]]
addr = %q
mode = "local"

%s
[delivery]
method = "qmail-queue"
command = %q
timeout = "20s"

[local]
qmail_queue = %q

[admin]
listen = %q

%s
%s
%s
`, filepath.Join(dir, "data"), d.smtp, d.sub, d.sock, relayBlock, command, bins.fakeqq, d.admin, policyBlock, dkimBlock, o.extraTOML)
	d.config = filepath.Join(dir, "relay.toml")
	if err := os.WriteFile(d.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	d.env = append(append(os.Environ(), "FAKEQQ_DIR="+d.qqDir), o.env...)
	d.start()
	t.Cleanup(d.stop)
	return d
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (d *daemon) start() {
	d.t.Helper()
	for attempt := 1; ; attempt++ {
		err := d.tryStart()
		if err == nil {
			return
		}
		// A port picked by freePort can be taken by another test process
		// before relay binds it: move the daemon's ports and try again.
		// freePort can also hand out one port twice (the kernel reuses
		// the port just closed): the config then names it twice.
		if attempt < 5 && (strings.Contains(d.logs(), "address already in use") || strings.Contains(d.logs(), "is already used by listen")) {
			d.movePorts()
			continue
		}
		d.t.Fatalf("%v:\n%s", err, d.logs())
	}
}

// tryStart starts relay serve and waits until it has said that every
// listener is bound.
func (d *daemon) tryStart() error {
	d.logMu.Lock()
	d.log.Reset()
	d.logMu.Unlock()
	d.exited = make(chan struct{})
	d.cmd = exec.Command(bins.relay, "serve", "--config", d.config, "--grace", "10s")
	d.cmd.Env = d.env
	w := lockedWriter{&d.logMu, &d.log}
	d.cmd.Stdout, d.cmd.Stderr = w, w
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	go func(c *exec.Cmd, done chan struct{}) { c.Wait(); close(done) }(d.cmd, d.exited)
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-d.exited:
			return fmt.Errorf("relay exited at start")
		default:
		}
		if strings.Contains(d.logs(), "relay started") {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	d.cmd.Process.Kill()
	<-d.exited
	return fmt.Errorf("relay did not come up")
}

// movePorts gives the daemon new free ports, in its config file too (which
// a test may have edited: only the addresses are replaced).
func (d *daemon) movePorts() {
	b, err := os.ReadFile(d.config)
	if err != nil {
		d.t.Fatal(err)
	}
	cfg := string(b)
	for _, addr := range []*string{&d.smtp, &d.sub, &d.admin} {
		next := freePort(d.t)
		cfg = strings.Replace(cfg, strconv.Quote(*addr), strconv.Quote(next), 1) // once: two may share a port
		*addr = next
	}
	if err := os.WriteFile(d.config, []byte(cfg), 0o644); err != nil {
		d.t.Fatal(err)
	}
}

// stop sends SIGTERM and waits; a daemon already stopped is left alone.
func (d *daemon) stop() {
	select {
	case <-d.exited:
		return
	default:
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
	}
	if d.t.Failed() {
		d.t.Logf("relay log:\n%s", d.logs())
	}
}

// kill9 kills the daemon without letting it flush anything.
func (d *daemon) kill9() {
	d.cmd.Process.Kill()
	<-d.exited
}

func (d *daemon) signal(s os.Signal) { d.cmd.Process.Signal(s) }

func (d *daemon) logs() string {
	d.logMu.Lock()
	defer d.logMu.Unlock()
	return d.log.String()
}

// waitLog waits until the log contains s.
func (d *daemon) waitLog(s string) {
	d.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if strings.Contains(d.logs(), s) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	d.t.Fatalf("log never said %q:\n%s", s, d.logs())
}

// token reads the admin token the daemon made in data_dir.
func (d *daemon) token() string {
	d.t.Helper()
	b, err := os.ReadFile(filepath.Join(d.dir, "data", "admin.token"))
	if err != nil {
		d.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// api calls the admin API with the token and returns status and body.
func (d *daemon) api(method, path string) (int, string) {
	d.t.Helper()
	req, _ := http.NewRequest(method, "http://"+d.admin+path, nil)
	req.Header.Set("Authorization", "Bearer "+d.token())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}

// queued returns what reached the fake qmail-queue.
func (d *daemon) queued() []fakeqq.Call { return fakeqq.Calls(d.t, d.qqDir) }

// smtpConn is a raw SMTP conversation: every reply is checked by the caller.
type smtpConn struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dialSMTP(t *testing.T, addr string) *smtpConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	s := &smtpConn{t: t, c: c, r: bufio.NewReader(c)}
	t.Cleanup(func() { c.Close() })
	if got := s.reply(); !strings.HasPrefix(got, "220 ") {
		t.Fatalf("greeting %q", got)
	}
	return s
}

// reply reads one (possibly multi-line) reply and returns its last line.
func (s *smtpConn) reply() string {
	s.t.Helper()
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			s.t.Fatalf("reading reply: %v (got %q)", err, line)
		}
		line = strings.TrimRight(line, "\r\n")
		if len(line) < 4 || line[3] != '-' {
			return line
		}
	}
}

// cmd sends one command line and returns the reply's last line.
func (s *smtpConn) cmd(line string) string {
	s.t.Helper()
	fmt.Fprintf(s.c, "%s\r\n", line)
	return s.reply()
}

// expect sends a command and fails unless the reply starts with prefix.
func (s *smtpConn) expect(line, prefix string) string {
	s.t.Helper()
	got := s.cmd(line)
	if !strings.HasPrefix(got, prefix) {
		s.t.Fatalf("%s: got %q, want %q...", line, got, prefix)
	}
	return got
}

// send runs one transaction and returns the final reply to DATA (or the
// first refusal before it).
func (s *smtpConn) send(from string, to []string, body string) string {
	s.t.Helper()
	if r := s.cmd("MAIL FROM:<" + from + ">"); !strings.HasPrefix(r, "250") {
		return r
	}
	ok := 0
	var last string
	for _, rc := range to {
		last = s.cmd("RCPT TO:<" + rc + ">")
		if strings.HasPrefix(last, "250") {
			ok++
		}
	}
	if ok == 0 {
		s.cmd("RSET")
		return last
	}
	if r := s.cmd("DATA"); !strings.HasPrefix(r, "354") {
		return r
	}
	body = strings.ReplaceAll(body, "\r\n", "\n")
	body = strings.ReplaceAll(body, "\n", "\r\n")
	if !strings.HasSuffix(body, "\r\n") {
		body += "\r\n"
	}
	fmt.Fprintf(s.c, "%s.\r\n", body)
	return s.reply()
}
