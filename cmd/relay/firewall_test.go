package main

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The rules `relay scan --firewall` prints, loaded into nftables in a
// network namespace of the test's own, tried the way a script on a web
// server would: connecting to the mail server's port 25 as itself.

// fwRemoteUID stands for qmailr (a number, so nft needs no passwd entry).
const fwRemoteUID = 64011

func TestFirewallRulesHold(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	for _, tool := range []string{"nft", "unshare", "setpriv", "ip", "bash"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	code, out, errs := runScanArgs("--firewall", "--mail-server", "127.0.0.25", "--remote-user", strconv.Itoa(fwRemoteUID))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	nftRules, _, ok := strings.Cut(out, "# iptables")
	if !ok {
		t.Fatalf("no nftables part:\n%s", out)
	}
	rules := filepath.Join(t.TempDir(), "rules.nft")
	writeTestFile(t, rules, nftRules)
	cmd := exec.Command("unshare", "--net", os.Args[0], "-test.run=^TestFirewallInNamespace$", "-test.v")
	cmd.Env = append(os.Environ(), "RELAY_FW_RULES="+rules)
	got, err := cmd.CombinedOutput()
	if strings.Contains(string(got), "cannot load the rules") || strings.Contains(string(got), "unshare failed") {
		t.Skipf("no nftables in this kernel or no namespaces:\n%s", got)
	}
	if err != nil || !strings.Contains(string(got), "--- PASS: TestFirewallInNamespace") {
		t.Fatalf("in the namespace: %v\n%s", err, got)
	}
}

// TestFirewallInNamespace runs inside the namespace TestFirewallRulesHold
// makes (as root).
func TestFirewallInNamespace(t *testing.T) {
	rules := os.Getenv("RELAY_FW_RULES")
	if rules == "" {
		t.Skip("run by TestFirewallRulesHold")
	}
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link: %v %s", err, out)
	}
	if out, err := exec.Command("nft", "-f", rules).CombinedOutput(); err != nil {
		t.Fatalf("cannot load the rules: %v %s", err, out)
	}
	for _, addr := range []string{"127.0.0.25:25", "127.0.0.26:25", "127.0.0.25:587"} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}
	for _, c := range []struct {
		who  string
		uid  int
		addr string
		want bool
	}{
		{"qmail-remote's user", fwRemoteUID, "127.0.0.25:25", true},
		{"root", 0, "127.0.0.25:25", true},
		{"a customer's script", 65534, "127.0.0.25:25", false},
		{"another customer's script", 1001, "127.0.0.25:25", false},
		{"root, to another host", 0, "127.0.0.26:25", false},
		{"qmail-remote's user, to another host", fwRemoteUID, "127.0.0.26:25", false},
		{"a customer's script, to port 587", 65534, "127.0.0.25:587", true},
	} {
		host, port, _ := strings.Cut(c.addr, ":")
		id := strconv.Itoa(c.uid)
		cmd := exec.Command("setpriv", "--reuid="+id, "--regid="+id, "--clear-groups", "--",
			"bash", "-c", "exec 3<>/dev/tcp/"+host+"/"+port)
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatalf("%s: %v", c.who, err)
		}
		if connected := err == nil; connected != c.want {
			t.Errorf("%s (uid %d) to %s: connected %v, want %v (%s)", c.who, c.uid, c.addr, connected, c.want, out)
		}
	}
}
