package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"relay/scan"
)

// A fake /proc (copied in short from scan's tests): net/tcp lines as the
// kernel prints them, and processes holding the sockets.

// procAddr writes ap as /proc/net/tcp does: each 32-bit word of the address
// in the machine's byte order, then the port.
func procAddr(ap netip.AddrPort) string {
	raw := ap.Addr().AsSlice()
	var b strings.Builder
	for i := 0; i < len(raw); i += 4 {
		fmt.Fprintf(&b, "%08X", binary.NativeEndian.Uint32(raw[i:i+4]))
	}
	fmt.Fprintf(&b, ":%04X", ap.Port())
	return b.String()
}

const procTCPHeader = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"

func procTCPLine(n int, local, remote string, state, uid int, inode uint64) string {
	return fmt.Sprintf("%4d: %s %s %02X 00000000:00000000 00:00000000 00000000 %5d        0 %d 1 0000000000000000 20 4 30 10 -1\n",
		n, procAddr(netip.MustParseAddrPort(local)), procAddr(netip.MustParseAddrPort(remote)), state, uid, inode)
}

// fakeProcTree makes a /proc with one PHP process of uid 1001 connected to
// 192.0.2.25:25 and an apache listening on 25 (not outgoing).
func fakeProcTree(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	mkdirAll(t, filepath.Join(dir, "net"))
	writeTestFile(t, filepath.Join(dir, "net", "tcp"), procTCPHeader+
		procTCPLine(0, "0.0.0.0:25", "0.0.0.0:0", 0x0A, 0, 100)+
		procTCPLine(1, "10.0.0.11:40001", "192.0.2.25:25", 0x01, 1001, 101))
	for _, p := range []struct {
		pid, uid     int
		cmdline, cwd string
		socket       uint64
	}{
		{4242, 1001, "php-cgi\x00/home/alice/www/mailer.php\x00", "/home/alice/www", 101},
		{4545, 33, "apache2\x00-k\x00start\x00", "/", 100},
	} {
		pd := filepath.Join(dir, strconv.Itoa(p.pid))
		mkdirAll(t, filepath.Join(pd, "fd"))
		writeTestFile(t, filepath.Join(pd, "status"), fmt.Sprintf("Name:\tx\nUid:\t%d\t%d\t%d\t%d\n", p.uid, p.uid, p.uid, p.uid))
		writeTestFile(t, filepath.Join(pd, "cmdline"), p.cmdline)
		if err := os.Symlink(p.cwd, filepath.Join(pd, "cwd")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("socket:["+strconv.FormatUint(p.socket, 10)+"]", filepath.Join(pd, "fd", "3")); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func runScanArgs(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := runScan(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestScanCommandFindsSender(t *testing.T) {
	proc := fakeProcTree(t)
	passwd := filepath.Join(t.TempDir(), "passwd")
	writeTestFile(t, passwd, "alice:x:1001:1001::/home/alice:/bin/sh\n")

	// Exit 1: something talks SMTP.
	code, out, errs := runScanArgs("--config", "/nonexistent/relay.toml", "--proc", proc, "--passwd", passwd, "--home", "/home")
	if code != 1 || errs != "" {
		t.Fatalf("exit %d, stderr %q\n%s", code, errs, out)
	}
	for _, want := range []string{"1001", "alice", "4242", "192.0.2.25:25", "/home/alice/www", "php-cgi /home/alice/www/mailer.php"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "apache2") {
		t.Errorf("a listening socket reported as outgoing:\n%s", out)
	}

	code, out, _ = runScanArgs("--proc", proc, "--passwd", passwd, "--json")
	var rep scan.Report
	if err := json.Unmarshal([]byte(out), &rep); code != 1 || err != nil {
		t.Fatalf("--json: %d %v\n%s", code, err, out)
	}
	if len(rep.ByUID) != 1 || rep.ByUID[0].UID != 1001 || rep.ByUID[0].Account != "alice" || len(rep.ByUID[0].Processes) != 1 ||
		rep.ByUID[0].Processes[0].PID != 4242 || rep.ByUID[0].Processes[0].Conns[0].Remote != "192.0.2.25:25" {
		t.Errorf("--json report: %+v", rep)
	}

	// Exit 0: nothing on another port.
	code, out, _ = runScanArgs("--proc", proc, "--passwd", passwd, "--port", "587")
	if code != 0 || out != "no connections to port 587\n" {
		t.Errorf("--port 587: %d %q", code, out)
	}
}

func TestScanCommandFirewall(t *testing.T) {
	code, out, errs := runScanArgs("--firewall", "--mail-server", "192.0.2.25", "192.0.2.26")
	if code != 0 || errs != "" {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	for _, want := range []string{
		"tcp dport 25 ip daddr { 192.0.2.25, 192.0.2.26 } meta skuid qmailr accept",
		"tcp dport 25 ip daddr { 192.0.2.25, 192.0.2.26 } meta skuid root accept",
		"tcp dport 25 reject with tcp reset",
		"iptables -A RELAY_SMTP -d 192.0.2.26 -m owner --uid-owner qmailr -j ACCEPT",
		"iptables -I OUTPUT -p tcp --dport 25 -j RELAY_SMTP",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("rules lack %q:\n%s", want, out)
		}
	}
	// Every rule that lets traffic through names its owner: qmailr or root.
	for _, line := range strings.Split(out, "\n") {
		if accepts := strings.HasSuffix(line, " accept") || strings.HasSuffix(line, "-j ACCEPT"); !accepts {
			continue
		}
		if !strings.Contains(line, "meta skuid qmailr ") && !strings.Contains(line, "meta skuid root ") &&
			!strings.Contains(line, "--uid-owner qmailr ") && !strings.Contains(line, "--uid-owner root ") {
			t.Errorf("an accepting rule without its owner: %q", line)
		}
	}
	code, out, _ = runScanArgs("--firewall", "--mail-server", "192.0.2.25", "--remote-user", "qmailr2")
	if code != 0 || !strings.Contains(out, "meta skuid qmailr2 accept") || strings.Contains(out, "skuid qmailr accept") {
		t.Errorf("--remote-user: %d\n%s", code, out)
	}
	code, out, _ = runScanArgs("--firewall", "--port", "587", "--mail-server", "192.0.2.25,2001:db8::25")
	if code != 0 || !strings.Contains(out, "tcp dport 587") || !strings.Contains(out, "2001:db8::25") {
		t.Errorf("--port 587 with a comma list: %d\n%s", code, out)
	}
}

func TestScanCommandErrors(t *testing.T) {
	proc := fakeProcTree(t)
	for _, c := range []struct {
		args []string
		code int
		err  string
	}{
		{[]string{"--proc", proc, "--port", "0"}, 64, "not a TCP port"},
		{[]string{"--proc", proc, "--port", "70000"}, 64, "not a TCP port"},
		{[]string{"--proc", proc, "192.0.2.25"}, 64, `unexpected argument "192.0.2.25"`},
		{[]string{"--bogus"}, 64, "usage: relay scan"},
		{[]string{"--firewall"}, 64, "relay scan: "},
		{[]string{"--firewall", "--mail-server", "mail.example.com"}, 64, ""},
		{[]string{"--firewall", "--mail-server", "192.0.2.25", "--remote-user", "root; rm -rf /"}, 64, "relay scan: "},
		{[]string{"--firewall", "--mail-server", "192.0.2.25", "--allow-user", "root"}, 64, "usage: relay scan"},
		{[]string{"--proc", t.TempDir()}, 2, "relay scan: "},
	} {
		code, out, errs := runScanArgs(c.args...)
		if code != c.code || !strings.Contains(errs, c.err) {
			t.Errorf("%q: exit %d stderr %q, want %d and %q", c.args, code, errs, c.code, c.err)
		}
		if out != "" {
			t.Errorf("%q: failed but printed %q", c.args, out)
		}
	}
}
