package scan

import (
	"bytes"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func TestFirewallGolden(t *testing.T) {
	tests := []struct {
		golden string
		fw     Firewall
	}{
		{"firewall_v4.golden", Firewall{MailServers: []netip.Prefix{
			netip.MustParsePrefix("192.0.2.25/32"), netip.MustParsePrefix("192.0.2.26/32"),
		}}},
		{"firewall_dual_remote_user.golden", Firewall{
			MailServers: []netip.Prefix{
				netip.MustParsePrefix("192.0.2.25/32"), netip.MustParsePrefix("2001:db8::25/128"), netip.MustParsePrefix("198.51.100.0/28"),
			},
			RemoteUser: "qmailr2",
		}},
		{"firewall_port587.golden", Firewall{MailServers: []netip.Prefix{netip.MustParsePrefix("2001:db8::25/128")}, Port: 587}},
	}
	for _, tc := range tests {
		var out bytes.Buffer
		if err := WriteFirewall(&out, tc.fw); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join("testdata", tc.golden)
		if *update {
			if err := os.WriteFile(path, out.Bytes(), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), want) {
			t.Errorf("%s differs (go test ./scan -run Golden -update to accept):\n%s", tc.golden, out.String())
		}
	}
}

func TestFirewallRefuses(t *testing.T) {
	one := []netip.Prefix{netip.MustParsePrefix("192.0.2.25/32")}
	for _, fw := range []Firewall{
		{},
		{MailServers: one, RemoteUser: "root; rm -rf /"},
		{MailServers: one, RemoteUser: "$(id)"},
		{MailServers: one, RemoteUser: "-x"},
		{MailServers: []netip.Prefix{{}}},
	} {
		var out bytes.Buffer
		if err := WriteFirewall(&out, fw); err == nil || out.Len() != 0 {
			t.Errorf("%+v: err %v, wrote %q", fw, err, out.String())
		}
	}
	for in, want := range map[string]string{
		"192.0.2.25":       "192.0.2.25/32",
		"::ffff:192.0.2.1": "192.0.2.1/32",
		"2001:db8::25":     "2001:db8::25/128",
		"192.0.2.77/24":    "192.0.2.0/24",
	} {
		p, err := ParseMailServer(in)
		if err != nil || p.String() != want {
			t.Errorf("ParseMailServer(%q) = %v, %v; want %s", in, p, err, want)
		}
	}
	for _, bad := range []string{"mail.example.com", "fe80::1%eth0", "1.2.3.4/33", ""} {
		if _, err := ParseMailServer(bad); err == nil || !strings.Contains(err.Error(), "mail server") {
			t.Errorf("ParseMailServer(%q): err %v", bad, err)
		}
	}
}
