package doctor

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"relay/config"
	"relay/dkim"
	"relay/internal/dnstest"
	"relay/local"
)

func TestParseNetTCP(t *testing.T) {
	text := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 217 1 0000000079adba2c 100 0 0 10 0
   1: 0100007F:0019 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 4711 1 0000000079adba2c 100 0 0 10 0
   2: 0100007F:B2CE 0100007F:991F 06 00000000:00000000 03:00000374 00000000     0        0 0 3 000000004a40531b
   3: 00000000000000000000000000000000:024B 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 99 1 0
   4: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  0        0 98 1 0
   5: 0000000000000000FFFF00000100007F:0019 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  0        0 97 1 0
   6: garbage
`
	got := parseNetTCP(text)
	want := []listenSock{
		{netip.MustParseAddrPort("0.0.0.0:2024"), 0, 217},
		{netip.MustParseAddrPort("127.0.0.1:25"), 1002, 4711},
		{netip.MustParseAddrPort("[::]:587"), 1002, 99},
		{netip.MustParseAddrPort("[::1]:8081"), 0, 98},
		{netip.MustParseAddrPort("127.0.0.1:25"), 0, 97}, // IPv4-mapped
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got %v\nwant %v", got, want)
	}
}

func TestParseLocks(t *testing.T) {
	text := `1: FLOCK  ADVISORY  WRITE 17517 fe:00:10002503 0 EOF
1: -> FLOCK  ADVISORY  WRITE 17600 fe:00:10002503 0 EOF
2: POSIX  ADVISORY  WRITE 15409 08:01:2868 0 EOF
3: OFDLCK ADVISORY  READ  -1 00:05:123 0 EOF
4: FLOCK  ADVISORY  WRITE 1 zz:00:5 0 EOF
`
	got := parseLocks(text)
	want := []fileLock{{17517, 10002503}, {15409, 2868}, {-1, 123}}
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestParseStatus(t *testing.T) {
	text := "Name:\trelay\nUmask:\t0022\nState:\tS (sleeping)\nPPid:\t41\nUid:\t0\t1002\t1002\t1002\nGid:\t1\t1001\t1001\t1001\nGroups:\t1001 1003 \nNoNewPrivs:\t1\n"
	p, err := parseStatus(text)
	if err != nil {
		t.Fatal(err)
	}
	if p.name != "relay" || p.ppid != 41 || p.uid != 1002 || p.gid != 1001 || !slices.Equal(p.groups, []int{1001, 1003}) || !p.noNewPrivs {
		t.Fatalf("%+v", p)
	}
	if !p.inGroup(1003) || p.inGroup(5) {
		t.Error("inGroup")
	}
	if _, err := parseStatus("Name:\tx\nPPid:\t1\n"); err == nil {
		t.Error("a status without Uid parsed")
	}
	if p, err := parseStatus("Name:\tx\nPPid:\t1\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n"); err != nil || p.groups != nil || p.noNewPrivs {
		t.Errorf("%+v %v", p, err)
	}
}

func TestParseTCPServer(t *testing.T) {
	for _, c := range []struct {
		argv       string
		host, port string
		prog       string
	}{
		{"tcpserver -v -R -l 0 -x /etc/tcp.smtp.cdb -c 100 -u 1002 -g 1001 0 smtp /var/qmail/bin/qmail-smtpd", "0", "smtp", "/var/qmail/bin/qmail-smtpd"},
		{"/usr/bin/tcpserver -RHl0 -c400 127.0.0.1 25 rblsmtpd -r zen qmail-smtpd", "127.0.0.1", "25", "rblsmtpd -r zen qmail-smtpd"},
		{"tcpserver -- 0 587 qmail-smtpd", "0", "587", "qmail-smtpd"},
		{"sslserver -e -vR -l mail -c 50 -u 1 -g 2 0 465 qmail-smtpd", "0", "465", "qmail-smtpd"},
		{"tcpserver -R 0 25", "", "", ""},
		{"tcpserver", "", "", ""},
		{"tcpserver -c", "", "", ""},
		{"qmail-smtpd", "", "", ""},
	} {
		host, port, prog, ok := parseTCPServer(strings.Fields(c.argv))
		if c.prog == "" {
			if ok {
				t.Errorf("%q: parsed as %q %q %q", c.argv, host, port, prog)
			}
			continue
		}
		if !ok || host != c.host || port != c.port || strings.Join(prog, " ") != c.prog {
			t.Errorf("%q: %q %q %q %v", c.argv, host, port, prog, ok)
		}
	}
	if !runsQmailSMTPD(strings.Fields("tcpserver 0 25 rblsmtpd /var/qmail/bin/qmail-smtpd")) || runsQmailSMTPD([]string{"tcpserver", "0", "25", "exim"}) {
		t.Error("runsQmailSMTPD")
	}
}

func TestIdentifyC(t *testing.T) {
	relayQQ := []byte("\x7fELF junk\x00relay qq\x00/usr/local/bin/relay-local\x00relay-qq-message\x00relay daemon at %s: %s\x00/var/lib/relay/qq.settings\x00")
	p := identifyC(relayQQ)
	if p.kind != binRelayQQ || p.localPath != "/usr/local/bin/relay-local" || p.settingsPath != "/var/lib/relay/qq.settings" {
		t.Errorf("%+v", p)
	}
	// qmail's own qmail-queue, and a program that only names relay-local.
	for _, b := range [][]byte{[]byte("\x7fELF\x00qmail-queue\x00/var/qmail\x00"), []byte("\x00/usr/local/bin/relay-local\x00")} {
		if p := identifyC(b); p.kind != binOther {
			t.Errorf("%q: %+v", b, p)
		}
	}
	// The real binaries: qmail's, and this test's own (a Go build of
	// another package).
	if p, err := identify("/var/qmail/bin/qmail-queue"); err == nil && p.kind != binOther {
		t.Errorf("qmail's qmail-queue: %+v", p)
	}
	exe, _ := os.Executable()
	if p, err := identify(exe); err != nil || p.kind != binOther {
		t.Errorf("the test binary: %+v %v", p, err)
	}
}

func TestCredMay(t *testing.T) {
	realQQ := fileStat{mode: 0o4710, uid: 1005, gid: 1010}
	for _, c := range []struct {
		c    cred
		bit  uint32
		want bool
	}{
		{cred{uid: 1002, gids: []int{1001, 1010}}, 1, true}, // qmaild in relayqq
		{cred{uid: 1002, gids: []int{1001}}, 1, false},      // qmaild without it
		{others, 1, false}, // anyone
		{cred{uid: 1005, gids: []int{1002}}, 1, true},        // the owner
		{cred{uid: 1005, gids: []int{1002}}, 4, true},        // the owner reads
		{cred{uid: 1002, gids: []int{1010}}, 4, false},       // the group does not read
		{cred{uid: 0}, 1, true},                              // root runs what someone may
		{cred{uid: 0}, 4, true},                              // and reads anything
		{cred{uid: 1002, gids: []int{1005, 1010}}, 1, true},  // supplementary group
		{cred{uid: 1002, gids: []int{1010, 1001}}, 2, false}, // nobody writes
	} {
		if got := c.c.may(realQQ, c.bit); got != c.want {
			t.Errorf("%+v bit %d: %v", c.c, c.bit, got)
		}
	}
	if (cred{uid: 0}).may(fileStat{mode: 0o644}, 1) {
		t.Error("root may not execute a file nobody may")
	}
}

func TestReach(t *testing.T) {
	dir := t.TempDir()
	closed := filepath.Join(dir, "closed")
	os.Mkdir(closed, 0o700)
	f := filepath.Join(closed, "f")
	os.WriteFile(f, nil, 0o644)
	err := others.reach(f, 4)
	if err == nil || reachFix(err, 4) != "chmod o+x "+closed {
		t.Errorf("%v: %q", err, reachFix(err, 4))
	}
	os.Chmod(closed, 0o711)
	os.Chmod(dir, 0o755)
	if err := others.reach(f, 4); err != nil && !strings.Contains(err.Error(), filepath.Dir(dir)) {
		t.Error(err) // only t.TempDir's parent may stop others
	}
	if err := others.reach(f, 2); err == nil {
		t.Error("others may write a 0644 file")
	} else if got := reachFix(err, 2); got != "chmod o+w "+f && !strings.HasPrefix(got, "chmod o+x") {
		t.Errorf("fix %q", got)
	}
}

func TestSettingsDiff(t *testing.T) {
	want := local.Settings{Socket: "/run/relay/submit.sock", QmailQueue: "/var/qmail/bin/qmail-queue.orig", OnDaemonDown: "accept", ExemptUIDs: []uint32{1002, 1005}}
	same, err := want.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if d := settingsDiff(same, want); d != "" {
		t.Errorf("same file: %q", d)
	}
	old := bytes.Replace(same, []byte("on_daemon_down=accept"), []byte("on_daemon_down=defer"), 1)
	old = append(old, "extra=1\n"...)
	if d := settingsDiff(old, want); d != "on_daemon_down=defer, want accept, unknown key extra" {
		t.Errorf("diff %q", d)
	}
}

func TestWrite(t *testing.T) {
	rs := []Result{
		{Check: "config", Status: OK, Detail: "loads"},
		{Check: "real qmail-queue", Status: Fail, Detail: "mode 4711", Fix: "chmod 4710 x"},
	}
	var b bytes.Buffer
	WriteText(&b, rs)
	if b.String() != "ok    config            loads\nFAIL  real qmail-queue  mode 4711  fix: chmod 4710 x\n" {
		t.Errorf("%q", b.String())
	}
	b.Reset()
	WriteJSON(&b, rs)
	var back []map[string]string
	if err := json.Unmarshal(b.Bytes(), &back); err != nil || len(back) != 2 || back[0]["fix"] != "" || back[1]["status"] != "FAIL" || back[1]["check"] != "real qmail-queue" {
		t.Errorf("%v %s", err, b.String())
	}
	if !Failed(rs) || Failed(rs[:1]) {
		t.Error("Failed")
	}
}

// The doctor sees this process's own listeners as any process's: the
// local socket's listener by SO_PEERCRED, a TCP port's by /proc.
func TestSeesListeners(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	ul, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	go func() {
		for {
			c, err := ul.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("220 test ESMTP\r\n"))
			c.Read(make([]byte, 64))
			c.Write([]byte("221 bye\r\n"))
			c.Close()
		}
	}()
	p := probeUnix(context.Background(), sock, 5*time.Second)
	if p.err != nil || p.pid != os.Getpid() || p.uid != os.Geteuid() || p.greeting != "220 test ESMTP" {
		t.Fatalf("%+v", p)
	}
	if p := probeUnix(context.Background(), filepath.Join(dir, "none"), time.Second); p.err == nil {
		t.Fatal("no socket, no error")
	}

	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	r := &run{procs: newProcTable("/proc"), euid: os.Geteuid()}
	hs := r.holders(tl.Addr().String())
	if len(hs) != 1 || hs[0].sock.uid != os.Geteuid() {
		t.Fatalf("%+v", hs)
	}
	if hs[0].p == nil || hs[0].p.pid != os.Getpid() {
		t.Fatalf("the holder of %s: %+v", tl.Addr(), hs[0].p)
	}
	r.daemon = hs[0].p
	var v verdict
	r.judgeHolders(&v, tl.Addr().String(), "x")
	if v.st != "" || len(v.details) != 1 {
		t.Errorf("%+v", v)
	}
}

func FuzzParseNetTCPLine(f *testing.F) {
	f.Add("   1: 0100007F:0019 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 4711 1 0")
	f.Add("   3: 00000000000000000000000000000000:024B 00000000000000000000000000000000:0000 0A 0 0 0 1002 0 99 1 0")
	f.Fuzz(func(t *testing.T, line string) {
		s, ok := parseNetTCPLine(line)
		if ok && (!s.addr.IsValid() || s.addr.Addr().Is4In6()) {
			t.Fatalf("%q: %+v", line, s)
		}
	})
}

func FuzzParseLockLine(f *testing.F) {
	f.Add("1: FLOCK  ADVISORY  WRITE 17517 fe:00:10002503 0 EOF")
	f.Add("1: -> FLOCK  ADVISORY  WRITE 17600 fe:00:10002503 0 EOF")
	f.Fuzz(func(t *testing.T, line string) {
		if l, ok := parseLockLine(line); ok && strings.Contains(line, "->") && strings.Fields(line)[1] == "->" {
			t.Fatalf("a waiter parsed: %+v", l)
		}
	})
}

func FuzzParseStatus(f *testing.F) {
	f.Add("Name:\trelay\nPPid:\t41\nUid:\t0\t1002\t1002\t1002\nGid:\t1\t1001\t1001\t1001\nGroups:\t1001 1003 \nNoNewPrivs:\t1\n")
	f.Fuzz(func(t *testing.T, text string) {
		parseStatus(text)
	})
}

func FuzzParseTCPServer(f *testing.F) {
	f.Add("tcpserver -v -R -l 0 -x /etc/tcp.smtp.cdb -c 100 -u 1002 -g 1001 0 smtp /var/qmail/bin/qmail-smtpd")
	f.Add("tcpserver -RHl0 -c400 127.0.0.1 25 qmail-smtpd")
	f.Fuzz(func(t *testing.T, cmdline string) {
		argv := strings.Split(cmdline, " ")
		if _, _, prog, ok := parseTCPServer(argv); ok && len(prog) == 0 {
			t.Fatalf("%q: no program", cmdline)
		}
	})
}

func FuzzIdentifyC(f *testing.F) {
	f.Add([]byte("relay-qq-message\x00/usr/local/bin/relay-local\x00/var/lib/relay/qq.settings\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p := identifyC(b)
		if p.kind == binOther && (p.localPath != "" || p.settingsPath != "") {
			t.Fatalf("%+v", p)
		}
		for _, s := range []string{p.localPath, p.settingsPath} {
			if s != "" && (s[0] != '/' || !bytes.Contains(b, []byte(s))) {
				t.Fatalf("%q is not a string of the file", s)
			}
		}
	})
}

// Each DKIM key gets its line; with --dns, dkim.CheckDNS judges the
// published record.
func TestCheckDKIM(t *testing.T) {
	dir := t.TempDir()
	k, err := dkim.GenerateKey(dir, "example.test", "s1", dkim.AlgoEd25519)
	if err != nil {
		t.Fatal(err)
	}
	dns := dnstest.New(t)
	cfg := config.Default()
	cfg.DKIM.KeysDir, cfg.DKIM.DNS = dir, dns.Addr
	check := func(withDNS bool) Result {
		r := &run{o: Options{DNS: withDNS, Now: time.Now()}, ctx: context.Background(), euid: os.Geteuid(), cfg: cfg, procs: newProcTable("/proc")}
		r.daemon = &proc{pid: os.Getpid(), uid: os.Geteuid(), gid: os.Getegid()}
		r.checkDKIM()
		if len(r.results) != 1 || r.results[0].Check != "dkim s1._domainkey.example.test" {
			t.Fatalf("%+v", r.results)
		}
		return r.results[0]
	}
	if r := check(false); r.Status != OK || !strings.Contains(r.Detail, "DNS not checked") {
		t.Errorf("%+v", r)
	}
	if r := check(true); r.Status != Fail || !strings.Contains(r.Fix, k.ZoneLine()) || strings.Contains(r.Detail, "publish:") {
		t.Errorf("%+v", r)
	}
	dns.SetTXT(k.Name(), k.Record())
	if r := check(true); r.Status != OK || !strings.Contains(r.Detail, "DNS matches") {
		t.Errorf("%+v", r)
	}
	cfg.DKIM.KeysDir = ""
	r := &run{o: Options{Now: time.Now()}, ctx: context.Background(), cfg: cfg, procs: newProcTable("/proc")}
	r.checkDKIM()
	if len(r.results) != 1 || r.results[0].Status != OK {
		t.Errorf("%+v", r.results)
	}
}

// qmail_send_log: unset (a warning only with bounce caps), missing,
// unreadable by the daemon, not qmail-send's, and a good multilog and
// syslog file, classified by the follower's own parser.
func TestCheckSignalsLog(t *testing.T) {
	dir := t.TempDir()
	now := time.Unix(1772445600, 0)
	tai := func(t time.Time, s string) string {
		return fmt.Sprintf("@%016x%08x %s", uint64(1<<62+10+t.Unix()), 0, s)
	}
	check := func(cfg *config.Config, daemonUID int) Result {
		t.Helper()
		r := &run{o: Options{Now: now, Config: "/etc/relay/relay.toml"}, ctx: context.Background(), euid: os.Geteuid(), cfg: cfg, procs: newProcTable("/proc")}
		r.daemon = &proc{pid: os.Getpid(), uid: daemonUID, gid: daemonUID}
		r.checkSignalsLog()
		if len(r.results) != 1 || r.results[0].Check != "qmail_send_log" {
			t.Fatalf("%+v", r.results)
		}
		return r.results[0]
	}
	me := os.Geteuid()
	cfg := config.Default()
	if r := check(cfg, me); r.Status != OK || !strings.Contains(r.Detail, "not set") {
		t.Errorf("unset: %+v", r)
	}
	cfg.Policy.Limits.User = &config.Limits{Bounces: []config.Rate{{N: 20, Window: time.Hour}}}
	if r := check(cfg, me); r.Status != Warn || !strings.Contains(r.Detail, "[policy.limits.user] has bounce caps") || !strings.Contains(r.Fix, "qmail_send_log = ") {
		t.Errorf("unset with bounce caps: %+v", r)
	}

	logDir := filepath.Join(dir, "log")
	os.Mkdir(logDir, 0o755)
	cfg.Signals.QmailSendLog = logDir // a multilog directory: its current
	if r := check(cfg, me); r.Status != Warn || !strings.Contains(r.Detail, filepath.Join(logDir, "current")+" does not exist") {
		t.Errorf("missing: %+v", r)
	}
	current := filepath.Join(logDir, "current")
	os.WriteFile(current, nil, 0o644)
	if r := check(cfg, me); r.Status != OK || !strings.Contains(r.Detail, "is empty") {
		t.Errorf("empty: %+v", r)
	}
	os.WriteFile(current, []byte(strings.Join([]string{
		"cut off by the sample? no: the file is small",
		tai(now.Add(-time.Hour), "status: local 0/10 remote 0/20"),
		tai(now.Add(-time.Hour), "new msg 12345"),
		tai(now.Add(-time.Hour), "info msg 12345: bytes 300 from <bob@example.com> qp 4242 uid 1000"),
		tai(now.Add(-time.Hour), "starting delivery 7: msg 12345 to remote a@example.net"),
		tai(now.Add(-time.Minute), "delivery 7: failure: 550_no_such_user/"),
		tai(now.Add(-time.Minute), "delivery 8: victory: nonsense"),
		tai(now.Add(-time.Minute), "end msg 12345"),
		"an incomplete last line",
	}, "\n")), 0o644)
	r := check(cfg, me)
	if r.Status != OK || !strings.Contains(r.Detail, "5 of the last 8 lines are qmail-send's (multilog") ||
		!strings.Contains(r.Detail, "(1m0s ago)") || !strings.Contains(r.Detail, "1 malformed") {
		t.Errorf("multilog: %+v", r)
	}
	if me == 0 { // a daemon user that may not read it
		os.Chmod(current, 0o600)
		if r := check(cfg, 65534); r.Status != Fail || !strings.Contains(r.Detail, "cannot read "+current) || !strings.Contains(r.Fix, "chmod o+r") {
			t.Errorf("unreadable: %+v", r)
		}
		os.Chmod(current, 0o644)
	}

	os.WriteFile(current, []byte("status: local 0/10 remote 0/20\n"), 0o644) // qmail-send just started, as cat logs it
	if r := check(cfg, me); r.Status != OK || !strings.Contains(r.Detail, "qmail-send's (1 status lines), no message logged") {
		t.Errorf("status only: %+v", r)
	}

	other := filepath.Join(dir, "smtpd.log")
	os.WriteFile(other, []byte(tai(now, "tcpserver: status: 1/40\n")+tai(now, "tcpserver: end 123 status 0\n")), 0o644)
	cfg.Signals.QmailSendLog = other
	if r := check(cfg, me); r.Status != Warn || !strings.Contains(r.Detail, "none of the last 2 lines") {
		t.Errorf("not qmail-send's: %+v", r)
	}

	syslog := filepath.Join(dir, "mail.log")
	os.WriteFile(syslog, []byte("Mar  2 10:00:00 mail qmail: 1772445540.250000 delivery 5: success: did_0+0+1/\n"+
		"Mar  2 10:00:00 mail qmail: delivery 6: deferral: x/\n"), 0o644)
	cfg.Signals.QmailSendLog = syslog
	if r := check(cfg, me); r.Status != OK || !strings.Contains(r.Detail, "2 of the last 2 lines are qmail-send's (syslog") || !strings.Contains(r.Detail, "1 carry no stamp") {
		t.Errorf("syslog: %+v", r)
	}
}
