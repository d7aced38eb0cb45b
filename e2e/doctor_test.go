package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"relay/dkim"
	"relay/internal/dnstest"
	"relay/internal/qmailtest"
	"relay/internal/testcert"
)

// installation is relay installed as the README says, on a copy of the
// real qmail (cp -a, so modes and owners are real): relay-qq in
// qmail-queue's place, the real one 4710 to a group of its own,
// /usr/sbin/sendmail linked, the daemon running as qmaild with that group
// and the right to bind port 25, and a qmail-send running on the copy's
// queue (in a mount namespace where the copy is /var/qmail, since qmail's
// programs have that path built in).
type installation struct {
	t        *testing.T
	root     string // everything lives under it
	qmail    string // the copy of /var/qmail
	sendmail string // root/usr/sbin/sendmail
	bin      string // root/usr/local/bin: relay-qq, relay-local
	config   string
	data     string
	me       string // control/me
	cert     string
	key      string
	group    string
	gid      int
	dkimDir  string
	dns      *dnstest.Server
	smtp     string // 127.0.0.1:25
	svc      *service
	slowest  time.Duration // of the relay doctor runs
	send     *exec.Cmd
	sendDone chan struct{}
}

// installSteps is the README's step 2 (Installing on a qmail server), with
// the group, qmail's directory and /usr/local/bin as parameters.
const installSteps = `set -e
mv $Q/bin/qmail-queue $Q/bin/qmail-queue.orig
chgrp $G $Q/bin/qmail-queue.orig
chmod 4710 $Q/bin/qmail-queue.orig
chgrp $G $B/relay-qq $B/relay-local
chmod 2755 $B/relay-qq $B/relay-local
ln -s $B/relay-qq $Q/bin/qmail-queue
`

func install(t *testing.T, q *qmailtest.Qmail) *installation {
	t.Helper()
	for _, tool := range []string{"groupadd", "unshare", "mount", "tcpserver", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("NOTQMAIL") != "" {
				t.Fatalf("%s is needed", tool)
			}
			t.Skipf("%s not installed", tool)
		}
	}
	in := &installation{t: t, root: worldTempDir(t), smtp: "127.0.0.1:25"}
	in.qmail = filepath.Join(in.root, "qmail")
	in.bin = filepath.Join(in.root, "usr", "local", "bin")
	in.sendmail = filepath.Join(in.root, "usr", "sbin", "sendmail")
	in.data = filepath.Join(in.root, "var", "lib", "relay")
	for _, d := range []string{in.bin, filepath.Dir(in.sendmail), filepath.Join(in.root, "etc", "relay", "tls"), filepath.Join(in.root, "run", "relay"), in.data} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	run(t, "cp", "-a", q.Home, in.qmail)
	// Only the installation is copied, not mail other tests left queued
	// or their mailboxes' .qmail files.
	run(t, "find", filepath.Join(in.qmail, "queue"), "-type", "f", "!", "-path", "*/lock/*", "-delete")
	aliases, _ := filepath.Glob(filepath.Join(in.qmail, "alias", ".qmail-rqt-*"))
	for _, a := range aliases {
		os.Remove(a)
	}
	me, err := os.ReadFile(filepath.Join(in.qmail, "control", "me"))
	if err != nil {
		t.Fatal(err)
	}
	in.me = strings.TrimSpace(string(me))

	in.group = "rdoc" + strconv.Itoa(os.Getpid()%100000)
	run(t, "groupadd", in.group)
	t.Cleanup(func() { exec.Command("groupdel", in.group).Run() })
	g, err := user.LookupGroup(in.group)
	if err != nil {
		t.Fatal(err)
	}
	in.gid, _ = strconv.Atoi(g.Gid)

	// The programs, built as the README builds them.
	settings := filepath.Join(in.data, "qq.settings")
	buildRelayQQ(t, filepath.Join(in.bin, "relay-qq"), fmt.Sprintf("RELAY_LOCAL_PATH=%q", filepath.Join(in.bin, "relay-local")), fmt.Sprintf("RELAY_QQ_SETTINGS=%q", settings))
	build := exec.Command("go", "build", "-o", filepath.Join(in.bin, "relay-local"), "./cmd/relay-local")
	build.Dir, build.Env = moduleRoot(t), append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building relay-local: %v\n%s", err, out)
	}
	cmd := exec.Command("sh", "-c", installSteps)
	cmd.Env = append(os.Environ(), "Q="+in.qmail, "B="+in.bin, "G="+in.group)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("README step 2: %v\n%s", err, out)
	}
	if err := os.Symlink(filepath.Join(in.qmail, "bin", "sendmail"), in.sendmail); err != nil {
		t.Fatal(err)
	}

	// What systemd's StateDirectory= and RuntimeDirectory= make, and the
	// certificate, readable by the daemon's user only.
	uid, gid := lookupID(t, "qmaild")
	os.Chown(in.data, uid, gid)
	os.Chown(filepath.Join(in.root, "run", "relay"), uid, gid)
	in.cert, in.key = filepath.Join(in.root, "etc", "relay", "tls", "fullchain.pem"), filepath.Join(in.root, "etc", "relay", "tls", "privkey.pem")
	in.writeCert(time.Now().Add(-time.Hour), time.Now().Add(90*24*time.Hour))
	tcprules := filepath.Join(in.root, "etc", "tcp.smtp")
	os.WriteFile(tcprules, []byte("127.:allow,RELAYCLIENT=\"\"\n:allow\n"), 0o644)

	in.config = filepath.Join(in.root, "etc", "relay", "relay.toml")
	in.dkimDir = filepath.Join(in.root, "etc", "relay", "dkim")
	in.dns = dnstest.New(t)
	in.writeConfig(fmt.Sprintf(`method = "qmail-queue"
command = %q`, filepath.Join(in.qmail, "bin", "qmail-queue.orig")))
	// README step 6: a key, readable by relay only.
	if out, err := exec.Command(bins.relay, "dkim", "--config", in.config, "keygen", "--domain", in.me, "--selector", "s1", "--algo", "ed25519").CombinedOutput(); err != nil {
		t.Fatalf("relay dkim keygen: %v\n%s", err, out)
	}
	run(t, "chown", "-R", "qmaild", in.dkimDir)
	in.svc = startService(t, in.config, serviceOpts{cred: in.daemonCred()})
	in.startQmailSend()
	return in
}

// writeConfig writes relay.toml with the README's settings and delivery
// as the [delivery] section's body.
func (in *installation) writeConfig(delivery string) {
	in.t.Helper()
	cfg := fmt.Sprintf(`hostname = ""
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

[tls]
cert = %q
key = %q

[relay]
qmail_control_dir = %q
tcprules = %q

[auth]
checkpassword = "/bin/false"

[delivery]
%s

[local]
qmail_queue = %q

[admin]
listen = %q

[dkim]
keys_dir = %q
dns = %q

[signals]
qmail_send_log = %q
`, in.data, in.smtp, freePort(in.t), filepath.Join(in.root, "run", "relay", "submit.sock"), in.cert, in.key,
		filepath.Join(in.qmail, "control"), filepath.Join(in.root, "etc", "tcp.smtp"), delivery,
		filepath.Join(in.qmail, "bin", "qmail-queue.orig"), freePort(in.t), in.dkimDir, in.dns.Addr, filepath.Join(in.root, "qmail-send.log"))
	if err := os.WriteFile(in.config, []byte(cfg), 0o644); err != nil {
		in.t.Fatal(err)
	}
}

// daemonCred is the unit's User=qmaild, Group=nofiles,
// SupplementaryGroups=<the group>.
func (in *installation) daemonCred() *syscall.Credential {
	uid, gid := lookupID(in.t, "qmaild")
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{uint32(in.gid)}}
}

func (in *installation) writeCert(notBefore, notAfter time.Time) {
	in.t.Helper()
	c, _ := testcert.NewValid(in.t, in.me, notBefore, notAfter)
	dir := in.t.TempDir()
	cert, key := testcert.WriteCert(in.t, dir, c)
	for _, f := range [][2]string{{cert, in.cert}, {key, in.key}} {
		b, err := os.ReadFile(f[0])
		if err != nil {
			in.t.Fatal(err)
		}
		if err := os.WriteFile(f[1], b, 0o600); err != nil {
			in.t.Fatal(err)
		}
	}
	os.Chmod(in.cert, 0o644)
	uid, _ := lookupID(in.t, "qmaild")
	os.Chown(in.key, uid, -1)
}

// startQmailSend runs qmail-start in a mount namespace where the copy is
// /var/qmail: qmail-send then holds the copy's queue/lock/sendmutex.
func (in *installation) startQmailSend() {
	in.t.Helper()
	log := filepath.Join(in.root, "qmail-send.log")
	os.WriteFile(log, nil, 0o644)
	if uid, _ := lookupID(in.t, "qmaill"); uid > 0 {
		os.Chown(log, uid, -1)
	}
	script := fmt.Sprintf(`mount --bind %s /var/qmail && cd / && exec env - PATH=/var/qmail/bin:/usr/bin:/bin qmail-start ./Maildir/ /bin/sh -c 'exec cat >>%s'`, in.qmail, log)
	in.send = exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script)
	in.send.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := in.send.Start(); err != nil {
		in.t.Fatal(err)
	}
	in.sendDone = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { c.Wait(); close(done) }(in.send, in.sendDone)
	in.t.Cleanup(in.stopQmailSend)
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, _ := os.ReadFile(log)
		if strings.Contains(string(b), "status: local 0/") {
			return
		}
		select {
		case <-in.sendDone:
			in.t.Fatalf("qmail-start exited: %s", b)
		default:
		}
		if time.Now().After(deadline) {
			in.t.Fatalf("qmail-send did not start on the copy: %s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stopQmailSend stops the copy's qmail-send (qmail-start became it).
func (in *installation) stopQmailSend() {
	select {
	case <-in.sendDone:
		return
	default:
	}
	in.send.Process.Signal(syscall.SIGTERM)
	select {
	case <-in.sendDone:
	case <-time.After(30 * time.Second):
		in.send.Process.Kill()
		<-in.sendDone
	}
}

// doctor runs relay doctor on the installation (as root unless cred says
// otherwise), once as text and once as JSON, and checks that the two say
// the same; it returns the results and the exit code.
func (in *installation) doctor(cred *syscall.Credential, extra ...string) (map[string]doctorResult, string, int) {
	in.t.Helper()
	args := append([]string{"doctor", "--config", in.config, "--qmail", in.qmail, "--sendmail", in.sendmail}, extra...)
	cmd := exec.Command(bins.relay, append(args, "--json")...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	cmd.Dir = "/"
	start := time.Now()
	out, err := cmd.Output()
	took := time.Since(start)
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		in.t.Fatal(err)
	}
	code := cmd.ProcessState.ExitCode()
	var list []doctorResult
	if err := json.Unmarshal(out, &list); err != nil {
		in.t.Fatalf("relay doctor --json: %v\n%s", err, out)
	}
	text := exec.Command(bins.relay, args...)
	text.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	text.Dir = "/"
	textOut, _ := text.Output()
	if text.ProcessState.ExitCode() != code {
		in.t.Errorf("text exit %d, JSON exit %d", text.ProcessState.ExitCode(), code)
	}
	lines := strings.Split(strings.TrimRight(string(textOut), "\n"), "\n")
	if len(lines) != len(list) {
		in.t.Errorf("%d text lines, %d JSON results:\n%s", len(lines), len(list), textOut)
	}
	byCheck := map[string]doctorResult{}
	for i, r := range list {
		if _, dup := byCheck[r.Check]; dup {
			in.t.Errorf("check %q twice", r.Check)
		}
		byCheck[r.Check] = r
		if i < len(lines) && (!strings.HasPrefix(lines[i], r.Status+" ") || !strings.Contains(lines[i], r.Detail) || !strings.Contains(lines[i], r.Fix)) {
			in.t.Errorf("text line %q is not JSON's %+v", lines[i], r)
		}
		if (r.Status == "ok") != (r.Fix == "") {
			in.t.Errorf("%+v: a fix goes with warn and FAIL only", r)
		}
	}
	in.slowest = max(in.slowest, took)
	if took > 10*time.Second {
		// Not a timing assertion: a doctor this slow has a bug (a probe
		// without its timeout).
		in.t.Errorf("relay doctor took %v", took)
	}
	return byCheck, string(textOut), code
}

type doctorResult struct {
	Check  string `json:"check"`
	Status string `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix"`
}

// expectAllOK runs relay doctor and wants exit 0 with every check ok.
func (in *installation) expectAllOK(what string, extra ...string) {
	in.t.Helper()
	rs, text, code := in.doctor(nil, extra...)
	bad := false
	for _, r := range rs {
		bad = bad || r.Status != "ok"
	}
	if code != 0 || bad {
		in.t.Fatalf("%s: relay doctor exit %d, want 0 and every check ok:\n%s", what, code, text)
	}
}

// expectFail runs relay doctor and wants exit 1 with check FAILing, its
// detail and fix containing the given strings.
func (in *installation) expectFail(check, detail, fix string, extra ...string) map[string]doctorResult {
	in.t.Helper()
	rs, text, code := in.doctor(nil, extra...)
	r, ok := rs[check]
	if code != 1 || !ok || r.Status != "FAIL" || !strings.Contains(r.Detail, detail) || !strings.Contains(r.Fix, fix) {
		in.t.Fatalf("relay doctor exit %d; want 1 with %q FAIL, detail with %q, fix with %q:\n%s", code, check, detail, fix, text)
	}
	return rs
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// buildRelayQQ compiles cmd/relay-qq as the README does (musl-gcc, or cc).
func buildRelayQQ(t *testing.T, out string, defines ...string) {
	t.Helper()
	cc := ""
	for _, c := range []string{"musl-gcc", "cc", "gcc"} {
		if p, err := exec.LookPath(c); err == nil {
			cc = p
			break
		}
	}
	if cc == "" {
		if os.Getenv("RELAY_REQUIRE_CC") != "" {
			t.Fatal("no C compiler for cmd/relay-qq")
		}
		t.Skip("no C compiler for cmd/relay-qq")
	}
	args := []string{"-O2", "-static", "-o", out}
	for _, d := range defines {
		args = append(args, "-D"+d)
	}
	args = append(args, filepath.Join(moduleRoot(t), "cmd", "relay-qq", "relay-qq.c"))
	if b, err := exec.Command(cc, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", cc, strings.Join(args, " "), err, b)
	}
}

// waitListening waits until addr accepts connections.
func waitListening(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Installed as the README says, relay doctor finds everything ok; each
// thing broken on its own makes it exit 1 with a FAIL line that names the
// thing and its fix, and restoring it brings back all ok.
func TestDoctorOnAnInstallation(t *testing.T) {
	q := qmailtest.Require(t) // held while the copy is taken and port 25 is used
	in := install(t, q)
	defer func() { t.Logf("the slowest relay doctor run took %v", in.slowest) }()
	in.expectAllOK("installed")
	realQQ := filepath.Join(in.qmail, "bin", "qmail-queue.orig")

	{
		t.Log("DKIM: the key's record, with --dns")
		keys, err := dkim.LoadKeys(in.dkimDir)
		if err != nil || len(keys[in.me]) != 1 {
			t.Fatalf("%v %v", keys, err)
		}
		k := keys[in.me][0]
		check := "dkim " + k.Name()
		rs, _, _ := in.doctor(nil)
		if !strings.Contains(rs[check].Detail, "DNS not checked (relay doctor --dns)") {
			t.Errorf("%+v", rs[check])
		}
		in.expectFail(check, "no TXT record at "+k.Name(), "publish "+k.ZoneLine(), "--dns")
		in.dns.SetTXT(k.Name(), k.Record())
		in.expectAllOK("published", "--dns")
		if rs, _, _ := in.doctor(nil, "--dns"); !strings.Contains(rs[check].Detail, "DNS matches") {
			t.Errorf("%+v", rs[check])
		}
		in.dns.SetTXT(k.Name(), "v=DKIM1; k=ed25519; p=bm90IHRoaXMga2V5IGF0IGFsbCBub3QgdGhpcyBrZXkgYXQgYWxsIQ==")
		in.expectFail(check, "differs from "+k.Path, "publish "+k.ZoneLine(), "--dns")
		in.dns.SetTXT(k.Name(), k.Record())

		t.Log("break and restore: DKIM keys unreadable by the daemon")
		run(t, "chown", "-R", "root", in.dkimDir)
		in.expectFail(check, "the daemon (qmaild) cannot read "+k.Path, "chown -R qmaild "+in.dkimDir)
		run(t, "chown", "-R", "qmaild", in.dkimDir)
		in.expectAllOK("restored")
	}
	{
		t.Log("break and restore: real qmail-queue runnable by anyone")
		run(t, "chmod", "4711", realQQ)
		in.expectFail("real qmail-queue", "any user may run it", "chmod 4710 "+realQQ)
		run(t, "chmod", "4710", realQQ)
		in.expectAllOK("restored")
	}

	{
		t.Log("break and restore: relay-qq not setgid")
		qq := filepath.Join(in.bin, "relay-qq")
		run(t, "chmod", "0755", qq)
		in.expectFail("qmail-queue", "is not setgid", "chgrp "+in.group+" "+qq+" && chmod 2755 "+qq)
		run(t, "chmod", "2755", qq)
		in.expectAllOK("restored")
	}

	{
		t.Log("break and restore: sendmail not linked")
		os.Remove(in.sendmail)
		in.expectFail("sendmail", "PHP's mail()", "ln -sf "+filepath.Join(in.qmail, "bin", "sendmail")+" "+in.sendmail)
		os.Symlink(filepath.Join(in.qmail, "bin", "sendmail"), in.sendmail)
		in.expectAllOK("restored")
	}

	{
		t.Log("break and restore: daemon stopped")
		in.svc.stop()
		rs := in.expectFail("daemon", "no relay serve runs", "systemctl start relay")
		if r := rs["listen "+in.smtp]; r.Status != "FAIL" || !strings.Contains(r.Detail, "nothing listens") {
			t.Errorf("listener: %+v", r)
		}
		in.svc.start()
		in.expectAllOK("restarted")
	}

	{
		t.Log("break and restore: tcpserver left on the SMTP port")
		in.svc.stop()
		smtpd := filepath.Join(in.qmail, "bin", "qmail-smtpd")
		ts := exec.Command("tcpserver", "-R", "-H", "127.0.0.1", "25", smtpd)
		if err := ts.Start(); err != nil {
			t.Fatal(err)
		}
		stopped := false
		stop := func() {
			if !stopped {
				ts.Process.Kill()
				ts.Wait()
				stopped = true
			}
		}
		defer stop()
		waitListening(t, in.smtp)
		in.expectFail("listen "+in.smtp, fmt.Sprintf("tcpserver pid %d running %s holds 127.0.0.1:25", ts.Process.Pid, smtpd), fmt.Sprintf("kill %d", ts.Process.Pid))
		stop()
		in.svc.start()
		in.expectAllOK("restored")

		t.Log("break and restore: a second tcpserver, on port 587")
		ts587 := exec.Command("tcpserver", "-R", "-H", "-l", "0", "127.0.0.1", "587", smtpd)
		if err := ts587.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { ts587.Process.Kill(); ts587.Wait() }()
		waitListening(t, "127.0.0.1:587")
		in.expectFail("port 587", fmt.Sprintf("tcpserver pid %d running %s answers on port 587", ts587.Process.Pid, smtpd), fmt.Sprintf("kill %d", ts587.Process.Pid))
		ts587.Process.Kill()
		ts587.Wait()
		in.expectAllOK("restored")
	}

	{
		t.Log("break and restore: expired certificate")
		in.writeCert(time.Now().Add(-60*24*time.Hour), time.Now().Add(-24*time.Hour))
		in.expectFail("tls", in.cert+" expired on", "put a renewed certificate in "+in.cert)
		in.writeCert(time.Now().Add(-time.Hour), time.Now().Add(90*24*time.Hour))
		in.expectAllOK("restored")
	}

	{
		t.Log("break and restore: NoNewPrivileges")
		in.svc.stop()
		in.svc.opts.wrap = []string{"setpriv", "--no-new-privs"}
		in.svc.start()
		in.expectFail("hand-off", "NoNewPrivs: 1", "delete NoNewPrivileges=yes")
		in.svc.stop()
		in.svc.opts.wrap = nil
		in.svc.start()
		in.expectAllOK("restored")
	}

	{
		t.Log("break and restore: qmail-send's log unreadable by the daemon")
		log := filepath.Join(in.root, "qmail-send.log")
		if rs, _, _ := in.doctor(nil); !strings.Contains(rs["qmail_send_log"].Detail, "qmail-send's (") {
			t.Errorf("%+v", rs["qmail_send_log"])
		}
		run(t, "chmod", "0600", log)
		in.expectFail("qmail_send_log", "the daemon (qmaild) cannot read "+log, "chmod o+r "+log)
		run(t, "chmod", "0644", log)
		in.expectAllOK("restored")
	}

	{
		t.Log("break and restore: qmail-send stopped")
		in.stopQmailSend()
		in.expectFail("qmail-send", "no qmail-send runs on "+filepath.Join(in.qmail, "queue"), "start qmail")
		in.startQmailSend()
		in.expectAllOK("restored")
	}

	// Not root: what needs root is said not to be checked, nothing FAILs.
	{
		t.Log("break and restore: as another user")
		rs, text, code := in.doctor(&syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}})
		notChecked := 0
		for _, r := range rs {
			if r.Status == "FAIL" {
				t.Errorf("FAIL as nobody: %+v", r)
			}
			if strings.Contains(r.Detail, "not checked as uid 65534") {
				notChecked++
				if r.Status != "warn" || r.Fix != "run relay doctor as root" {
					t.Errorf("%+v", r)
				}
			}
		}
		for _, c := range []string{"config", "qmail-send", "tls"} {
			if !strings.Contains(rs[c].Detail, "not checked as uid 65534") {
				t.Errorf("%s as nobody: %+v", c, rs[c])
			}
		}
		if code != 0 || notChecked == 0 {
			t.Fatalf("as nobody: exit %d, %d checks not made:\n%s", code, notChecked, text)
		}
	}

	// Method qmail-direct: relay serve started as root supervises the
	// daemon (qmaild) and the queue writer (qmailq).
	{
		t.Log("break and restore: qmail-direct")
		in.svc.stop()
		in.writeConfig(fmt.Sprintf(`method = "qmail-direct"
queue_dir = %q`, filepath.Join(in.qmail, "queue")))
		in.svc.opts.cred = nil
		in.svc.opts.ready = []string{"relay started", "queue writer started"}
		in.svc.start()
		in.expectAllOK("qmail-direct")
		rs, _, _ := in.doctor(nil)
		qmailq, _ := lookupID(t, "qmailq")
		if d := rs["hand-off"].Detail; !strings.Contains(d, "runs as qmailq") || !strings.Contains(rs["daemon"].Detail, fmt.Sprintf("child of the root supervisor pid %d", in.svc.pid())) {
			t.Errorf("qmailq is %d; hand-off %q, daemon %q", qmailq, d, rs["daemon"].Detail)
		}
	}
}
