package scan

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// hexAddrPort writes ap the way the kernel does in /proc/net/tcp: each
// 32-bit word of the address as a hex number in the machine's byte order.
func hexAddrPort(ap netip.AddrPort) string {
	raw := ap.Addr().AsSlice()
	var b strings.Builder
	for i := 0; i < len(raw); i += 4 {
		fmt.Fprintf(&b, "%08X", binary.NativeEndian.Uint32(raw[i:i+4]))
	}
	fmt.Fprintf(&b, ":%04X", ap.Port())
	return b.String()
}

const tcpHeader = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"

func tcpLine(n int, local, remote string, state, uid int, inode uint64) string {
	l, r := netip.MustParseAddrPort(local), netip.MustParseAddrPort(remote)
	return fmt.Sprintf("%4d: %s %s %02X 00000000:00000000 00:00000000 00000000 %5d        0 %d 1 0000000000000000 20 4 30 10 -1\n",
		n, hexAddrPort(l), hexAddrPort(r), state, uid, inode)
}

func TestParseNetTCP(t *testing.T) {
	// A line exactly as a little-endian kernel prints it: 127.0.0.1:25
	// listening, and 10.0.0.11:41234 -> 192.0.2.25:25 established.
	le := tcpHeader +
		"   0: 0100007F:0019 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4711 1 0000000000000000 100 0 0 10 0\n" +
		"   1: 0B00000A:A112 190200C0:0019 01 00000000:00000000 02:000A7D3A 00000000  1001        0 4712 2 0000000000000000 20 4 30 10 -1\n" +
		"   2: garbage\n"
	got := ParseNetTCP([]byte(le))
	if binary.NativeEndian.Uint16([]byte{1, 0}) == 1 { // little-endian host
		want := []Socket{
			{Local: netip.MustParseAddrPort("127.0.0.1:25"), Remote: netip.MustParseAddrPort("0.0.0.0:0"), State: "a", UID: 0, Inode: 4711},
			{Local: netip.MustParseAddrPort("10.0.0.11:41234"), Remote: netip.MustParseAddrPort("192.0.2.25:25"), State: "established", UID: 1001, Inode: 4712},
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("got %+v\nwant %+v", got, want)
		}
	}
	// IPv6 as the kernel prints 2001:db8::1 -> 2001:db8::25 in SYN_SENT.
	v6 := tcpHeader + tcpLine(0, "[2001:db8::1]:50000", "[2001:db8::25]:25", 2, 33, 99)
	got = ParseNetTCP([]byte(v6))
	if len(got) != 1 || got[0].Remote != netip.MustParseAddrPort("[2001:db8::25]:25") || got[0].State != "syn-sent" || got[0].UID != 33 || !got[0].Open() {
		t.Errorf("IPv6: %+v", got)
	}
}

// fakeProc builds a /proc tree: net/tcp{,6} and the given processes.
type fakeProcess struct {
	pid     int
	uid     int
	cmdline string // NUL-separated
	cwd     string
	sockets []uint64
}

func fakeProc(t *testing.T, tcp, tcp6 string, procs []fakeProcess) string {
	t.Helper()
	dir := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(dir, "net"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "net", "tcp"), []byte(tcp), 0o644))
	if tcp6 != "" {
		must(os.WriteFile(filepath.Join(dir, "net", "tcp6"), []byte(tcp6), 0o644))
	}
	for _, p := range procs {
		pd := filepath.Join(dir, strconv.Itoa(p.pid))
		must(os.MkdirAll(filepath.Join(pd, "fd"), 0o755))
		must(os.WriteFile(filepath.Join(pd, "status"), fmt.Appendf(nil, "Name:\tphp\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t%d\t%d\t%d\t%d\nGid:\t100\t100\t100\t100\n", p.uid, p.uid+1, p.uid, p.uid), 0o644))
		must(os.WriteFile(filepath.Join(pd, "cmdline"), []byte(p.cmdline), 0o644))
		must(os.Symlink(p.cwd, filepath.Join(pd, "cwd")))
		must(os.Symlink("/dev/null", filepath.Join(pd, "fd", "0")))
		must(os.Symlink("pipe:[12]", filepath.Join(pd, "fd", "1")))
		for i, ino := range p.sockets {
			must(os.Symlink("socket:["+strconv.FormatUint(ino, 10)+"]", filepath.Join(pd, "fd", strconv.Itoa(3+i))))
		}
	}
	// Not processes: ignored.
	must(os.MkdirAll(filepath.Join(dir, "sys"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "uptime"), []byte("1 1\n"), 0o644))
	return dir
}

func TestScanFakeProc(t *testing.T) {
	tcp := tcpHeader +
		tcpLine(0, "0.0.0.0:25", "0.0.0.0:0", 0x0A, 0, 100) + // listening: not outgoing
		tcpLine(1, "10.0.0.11:40001", "192.0.2.25:25", 0x02, 1001, 101) + // in progress
		tcpLine(2, "10.0.0.11:40002", "192.0.2.80:80", 0x01, 1001, 102) + // not port 25
		tcpLine(3, "10.0.0.11:40003", "192.0.2.25:25", 0x06, 1001, 0) + // TIME_WAIT, no inode
		tcpLine(4, "10.0.0.11:40004", "198.51.100.1:25", 0x01, 1003, 104) // process gone
	tcp6 := tcpHeader +
		tcpLine(0, "[2001:db8::11]:40005", "[2001:db8::25]:25", 0x01, 1001, 105) +
		tcpLine(1, "[::ffff:10.0.0.11]:40006", "[::ffff:192.0.2.26]:25", 0x01, 1002, 106)
	proc := fakeProc(t, tcp, tcp6, []fakeProcess{
		{pid: 4242, uid: 1001, cmdline: "php-cgi\x00/home/alice/www/mailer.php\x00", cwd: "/home/alice/www", sockets: []uint64{101, 105, 102}},
		{pid: 4343, uid: 1002, cmdline: "perl\x00x.pl\x00", cwd: "/home/bob", sockets: []uint64{106}},
		{pid: 4444, uid: 1001, cmdline: "php-cgi\x00", cwd: "/home/alice/www/sub", sockets: nil},
		{pid: 4545, uid: 33, cmdline: "apache2\x00-k\x00start\x00", cwd: "/", sockets: []uint64{100}},
	})
	rep, err := Scan(Options{Proc: proc, Port: 25, HomePrefix: "/home/", Accounts: map[uint32]string{1001: "alice"}})
	if err != nil {
		t.Fatal(err)
	}
	want := Report{
		Port: 25,
		ByUID: []UIDGroup{
			{UID: 1001, Account: "alice", Conns: 2, Processes: []Process{{
				PID: 4242, UID: 1001, Account: "alice", Cmdline: []string{"php-cgi", "/home/alice/www/mailer.php"}, Cwd: "/home/alice/www",
				Conns: []Conn{
					{Local: "10.0.0.11:40001", Remote: "192.0.2.25:25", State: "syn-sent"},
					{Local: "[2001:db8::11]:40005", Remote: "[2001:db8::25]:25", State: "established"},
				},
			}}},
			{UID: 1002, Conns: 1, Processes: []Process{{
				PID: 4343, UID: 1002, Cmdline: []string{"perl", "x.pl"}, Cwd: "/home/bob",
				Conns: []Conn{{Local: "10.0.0.11:40006", Remote: "192.0.2.26:25", State: "established"}},
			}}},
		},
		Unowned: []Socket{{Local: netip.MustParseAddrPort("10.0.0.11:40004"), Remote: netip.MustParseAddrPort("198.51.100.1:25"), State: "established", UID: 1003, Inode: 104}},
		Homes: []HomeCount{
			{Home: "/home/alice", Processes: 2, SMTP: 1},
			{Home: "/home/bob", Processes: 1, SMTP: 1},
		},
	}
	if !reflect.DeepEqual(rep, want) {
		t.Errorf("got  %+v\nwant %+v", rep, want)
	}
	if !rep.Found() {
		t.Error("Found() = false")
	}

	var out bytes.Buffer
	if err := WriteReport(&out, &rep); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", out.String())
	for _, s := range []string{
		"1001  alice    4242  2      192.0.2.25:25(syn-sent),[2001:db8::25]:25  /home/alice/www  php-cgi /home/alice/www/mailer.php",
		"1003  -        -     1      198.51.100.1:25",
		"uid 1001 (alice): processes=1 connections=2",
		"/home/alice  2          1",
	} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("report lacks %q", s)
		}
	}

	// Port 587: nothing there.
	rep, err = Scan(Options{Proc: proc, Port: 587})
	if err != nil || rep.Found() {
		t.Errorf("port 587: %+v, %v", rep, err)
	}
	out.Reset()
	WriteReport(&out, &rep)
	if out.String() != "no connections to port 587\n" {
		t.Errorf("empty report = %q", out.String())
	}
	if _, err := Scan(Options{Proc: t.TempDir()}); err == nil {
		t.Error("a directory without net/tcp scanned without error")
	}
}

// TestHelperProcess is not a test: it is the process TestScanRealProcess
// starts. It connects to SCAN_HELPER_DIAL, says so, and holds the connection
// until its stdin closes.
func TestHelperProcess(t *testing.T) {
	addr := os.Getenv("SCAN_HELPER_DIAL")
	if addr == "" {
		return
	}
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		fmt.Println("dial:", err)
		os.Exit(2)
	}
	fmt.Println("connected")
	io.Copy(io.Discard, os.Stdin)
	c.Close()
	os.Exit(0)
}

// TestScanRealProcess starts a process that holds a TCP connection to a
// loopback listener and finds it through the real /proc, by pid, uid and
// working directory. As root the process runs as nobody (65534), to prove
// the uid comes from the process and not from the scanner.
func TestScanRealProcess(t *testing.T) {
	for _, network := range []string{"127.0.0.1", "[::1]"} {
		t.Run(network, func(t *testing.T) {
			ln, err := net.Listen("tcp", network+":0")
			if err != nil {
				t.Skipf("no %s loopback: %v", network, err)
			}
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					defer c.Close()
				}
			}()
			port := uint16(ln.Addr().(*net.TCPAddr).Port)

			exe, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			cwd := t.TempDir()
			cmd := exec.Command(exe, "-test.run=^TestHelperProcess$")
			cmd.Env = append(os.Environ(), "SCAN_HELPER_DIAL="+ln.Addr().String())
			cmd.Dir = cwd
			wantUID := os.Getuid()
			if wantUID == 0 {
				wantUID = 65534
				exe = copyExecutable(t, exe)
				cmd.Path = exe
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
				for _, d := range []string{cwd, filepath.Dir(cwd)} {
					if err := os.Chmod(d, 0o755); err != nil {
						t.Fatal(err)
					}
				}
			}
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() {
				stdin.Close()
				cmd.Wait()
			}()
			line, err := bufio.NewReader(stdout).ReadString('\n')
			if err != nil || line != "connected\n" {
				t.Fatalf("helper said %q, %v", line, err)
			}

			rep, err := Scan(Options{Port: port, Accounts: map[uint32]string{65534: "nobody"}})
			if err != nil {
				t.Fatal(err)
			}
			var found *Process
			for _, g := range rep.ByUID {
				for i := range g.Processes {
					if g.Processes[i].PID == cmd.Process.Pid {
						found = &g.Processes[i]
						if g.UID != wantUID {
							t.Errorf("grouped under uid %d, want %d", g.UID, wantUID)
						}
					}
				}
			}
			if found == nil {
				t.Fatalf("helper pid %d not found in %+v", cmd.Process.Pid, rep)
			}
			if found.UID != wantUID || found.Cwd != cwd || len(found.Conns) != 1 ||
				found.Conns[0].Remote != ln.Addr().String() || found.Conns[0].State != "established" ||
				len(found.Cmdline) != 2 || found.Cmdline[1] != "-test.run=^TestHelperProcess$" {
				t.Errorf("found %+v, want uid %d cwd %s remote %s", found, wantUID, cwd, ln.Addr())
			}
			if wantUID == 65534 && found.Account != "nobody" {
				t.Errorf("account = %q", found.Account)
			}
			// The accepting side has the port as its local port, not remote: not listed.
			for _, g := range rep.ByUID {
				for _, p := range g.Processes {
					if p.PID == os.Getpid() {
						t.Errorf("the listener's own process was listed: %+v", p)
					}
				}
			}
		})
	}
}

// copyExecutable copies the test binary where another user can run it.
func copyExecutable(t *testing.T, exe string) string {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "scan.test")
	if err := os.WriteFile(dst, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// FuzzParseNetTCP feeds arbitrary text to the /proc/net/tcp parser: no
// panic, at most one socket per line, and each socket written back the
// kernel's way parses to itself.
func FuzzParseNetTCP(f *testing.F) {
	f.Add([]byte(tcpHeader + tcpLine(0, "10.0.0.1:1234", "192.0.2.1:25", 1, 1000, 42)))
	f.Add([]byte(tcpHeader + tcpLine(0, "[2001:db8::1]:1234", "[2001:db8::2]:25", 2, 0, 43)))
	f.Add([]byte("   0: 0100007F:0019 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4711 1\n"))
	f.Add([]byte("0: 0:0 0:0 0 0 0 0 0 0 0\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		socks := ParseNetTCP(data)
		if len(socks) > bytes.Count(data, []byte("\n"))+1 {
			t.Fatalf("%d sockets from %d lines", len(socks), bytes.Count(data, []byte("\n"))+1)
		}
		for i, s := range socks {
			st, _ := strconv.ParseUint(s.State, 16, 8)
			switch s.State {
			case "established":
				st = 1
			case "syn-sent":
				st = 2
			}
			line := tcpLine(i, s.Local.String(), s.Remote.String(), int(st), s.UID, s.Inode)
			back := ParseNetTCP([]byte(line))
			if len(back) != 1 || back[0] != s {
				t.Errorf("%+v written as %q parses to %+v", s, line, back)
			}
		}
	})
}
