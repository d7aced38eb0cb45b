package config

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

const sampleRules = `# tcp.smtp
127.:allow,RELAYCLIENT=""
10.1.2.:allow,RELAYCLIENT="",DATABYTES='0'
10.1.2.3:deny
10.1.2.10-20:allow,RANGE="yes"
10.:allow,TEN="1"
=mail.example.test:allow,RELAYCLIENT=""
ident@10.9.9.9:deny
2001:db8::1:allow,RELAYCLIENT=""
2001:db8:5::deny
2001:db8::/32:allow,NET6="32"
192.168.0.0/23:allow,CIDR="23"
10.1.2.3:allow,DUP="later lines lose"
:allow,DEFAULT=/x/
`

func TestTCPRulesMatch(t *testing.T) {
	rules, err := ParseTCPRules("tcp.smtp", strings.NewReader(sampleRules))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ip    string
		allow bool
		env   map[string]string
		line  int
	}{
		{"127.0.0.1", true, map[string]string{"RELAYCLIENT": ""}, 2},
		{"::ffff:127.0.0.1", true, map[string]string{"RELAYCLIENT": ""}, 2},
		{"10.1.2.3", false, nil, 4}, // exact beats 10.1.2.; first line for an address wins
		{"10.1.2.4", true, map[string]string{"RELAYCLIENT": "", "DATABYTES": "0"}, 3},
		{"10.1.2.10", true, map[string]string{"RANGE": "yes"}, 5},
		{"10.1.2.20", true, map[string]string{"RANGE": "yes"}, 5},
		{"10.1.2.21", true, map[string]string{"RELAYCLIENT": "", "DATABYTES": "0"}, 3},
		{"10.200.0.1", true, map[string]string{"TEN": "1"}, 6},
		{"10.9.9.9", true, map[string]string{"TEN": "1"}, 6}, // ident@ never matches
		{"2001:db8::1", true, map[string]string{"RELAYCLIENT": ""}, 9},
		{"2001:db8:5::7", false, nil, 10},
		{"2001:db8:6::7", true, map[string]string{"NET6": "32"}, 11},
		{"192.168.1.255", true, map[string]string{"CIDR": "23"}, 12},
		{"192.168.2.1", true, map[string]string{"DEFAULT": "x"}, 14},
		{"2002::1", true, map[string]string{"DEFAULT": "x"}, 14},
	} {
		r, ok := rules.Match(mustAddr(t, tc.ip))
		if !ok || r.Allow != tc.allow || !reflect.DeepEqual(r.Env, tc.env) || r.Line != tc.line {
			t.Errorf("Match(%s) = %+v %v, want allow=%v env=%v line %d", tc.ip, r, ok, tc.allow, tc.env, tc.line)
		}
	}

	noDefault, err := ParseTCPRules("x", strings.NewReader("1.2.3.4:deny\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := noDefault.Match(mustAddr(t, "1.2.3.5")); ok {
		t.Error("no rule should match 1.2.3.5")
	}
	if r, ok := noDefault.Match(mustAddr(t, "1.2.3.4")); !ok || r.Allow {
		t.Error("1.2.3.4 should be denied")
	}
	var none *TCPRules
	if _, ok := none.Match(mustAddr(t, "1.2.3.4")); ok {
		t.Error("nil rules matched")
	}
}

func TestTCPRulesErrors(t *testing.T) {
	in := `# every line below is bad
1.2.3.4
1.2.3.4:permit
1.2.3:allow
1.2.3.4:allow,RELAYCLIENT
1.2.3.4:allow,X="unterminated
1.2.3.4:allow junk
1.2.3.20-10:allow
256.1.1.:deny
01.2.3.4:deny
2001:db8:zz::deny
1.2.3.4:allow,X=
`
	_, err := ParseTCPRules("tcp.smtp", strings.NewReader(in))
	var errs Errors
	if !errors.As(err, &errs) {
		t.Fatalf("err = %v", err)
	}
	want := `tcp.smtp:2:1: want address:allow or address:deny
tcp.smtp:3:9: instruction must be allow or deny, not "permit"
tcp.smtp:4:1: "1.2.3" is not an IPv4 address, a prefix ending in '.' or a range like 1.2.3.10-20
tcp.smtp:5:14: want ,VAR="value", not ",RELAYCLIENT"
tcp.smtp:6:14: X: value has no closing "
tcp.smtp:7:14: want ,VAR="value" after the instruction, not " junk"
tcp.smtp:8:1: "1.2.3.20-10" is not an IPv4 address, a prefix ending in '.' or a range like 1.2.3.10-20
tcp.smtp:9:1: "256.1.1." is not an IPv4 address, a prefix ending in '.' or a range like 1.2.3.10-20
tcp.smtp:10:1: "01.2.3.4" is not an IPv4 address, a prefix ending in '.' or a range like 1.2.3.10-20
tcp.smtp:11:1: "2001:db8:zz:" is not an IPv6 address or a prefix of whole groups ending in ':'
tcp.smtp:12:14: X: missing quoted value`
	if err.Error() != want {
		t.Errorf("got:\n%s\nwant:\n%s", err, want)
	}
}

func FuzzParseTCPRules(f *testing.F) {
	f.Add(sampleRules)
	f.Add("1.2.3.0-255:allow\n:deny\n")
	f.Add("::1:allow,A=\"b\"\n::ffff:1.2.3.4:deny\nfe80::/10:allow\n")
	f.Add("1.2.3.4:allow,X=|a\"b|,Y=''\r\n")
	f.Fuzz(func(t *testing.T, in string) {
		rules, err := ParseTCPRules("f", strings.NewReader(in))
		if err != nil {
			var errs Errors
			if !errors.As(err, &errs) || len(errs) == 0 {
				t.Fatalf("error %T %v is not Errors", err, err)
			}
			for _, e := range errs {
				if e.File != "f" || e.Line < 1 || e.Col < 1 {
					t.Fatalf("bad position %+v", e)
				}
			}
			return
		}
		for _, ip := range []string{"127.0.0.1", "10.1.2.3", "::1", "2001:db8::1", "255.255.255.255"} {
			a := netip.MustParseAddr(ip)
			r, ok := rules.Match(a)
			if ok && r.Line < 1 {
				t.Fatalf("match without a line: %+v", r)
			}
		}
	})
}

func TestReadPasswd(t *testing.T) {
	in := "root:x:0:0:root:/root:/bin/bash\n\n# comment\n+::::::\nalice:x:1001:1001:Alice:/home/alice:/bin/sh\nalias:x:1001:1001::/:/bin/false\n"
	got, err := ReadPasswd(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if want := map[uint32]string{0: "root", 1001: "alice"}; !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	_, err = ReadPasswd(strings.NewReader("ok:x:1:1::/:/bin/sh\nbroken\nbad:x:uid:1::/:\n"))
	if err == nil || err.Error() != ":2:1: want name:password:uid:gid:...\n:3:7: uid \"uid\" is not a number" {
		t.Errorf("err = %v", err)
	}
}

func TestReadUsers(t *testing.T) {
	const hash = "$2a$04$0123456789012345678901uJ1oAbdDl2Ur8YEb2N2xE0NYFq2w3zG"
	got, err := ReadUsers(strings.NewReader("# users\nbob:" + hash + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if string(got["bob"]) != hash {
		t.Errorf("got %q", got)
	}
	_, err = ReadUsers(strings.NewReader("bob:" + hash + "\nbob:" + hash + "\nnocolon\neve:$2a$99$" + hash[7:] + "\n"))
	var errs Errors
	if !errors.As(err, &errs) || len(errs) != 3 || errs[0].Line != 2 || errs[1].Line != 3 || errs[2].Line != 4 {
		t.Errorf("err = %v", err)
	}
}

func TestParseRate(t *testing.T) {
	for s, want := range map[string]Rate{
		"100/1m":   {100, time.Minute},
		"2000/24h": {2000, 24 * time.Hour},
		"3/10s":    {3, 10 * time.Second},
		"10/h":     {10, time.Hour},
		" 5/2d ":   {5, 48 * time.Hour},
	} {
		got, err := ParseRate(s)
		if err != nil || got != want {
			t.Errorf("ParseRate(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	for _, s := range []string{"", "100", "0/1m", "-1/1m", "1/0m", "1/1x", "1/", "1/367d", "x/1m", "1/1.5h"} {
		if _, err := ParseRate(s); err == nil {
			t.Errorf("ParseRate(%q) accepted", s)
		}
	}
}

func FuzzParseRate(f *testing.F) {
	for _, s := range []string{"100/1m", "2000/24h", "3/10s", "10/h", "1/366d", "9223372036854775807/1s", "1/0s", "/", "1/-1h"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRate(s)
		if err != nil {
			return
		}
		if r.N <= 0 || r.Window <= 0 || r.Window > maxWindow {
			t.Fatalf("ParseRate(%q) = %+v", s, r)
		}
		back, err := ParseRate(r.String())
		if err != nil || back != r {
			t.Fatalf("round trip %q -> %q -> %+v, %v", s, r.String(), back, err)
		}
	})
}

func BenchmarkTCPRulesMatch(b *testing.B) {
	rules, err := ParseTCPRules("tcp.smtp", strings.NewReader(sampleRules))
	if err != nil {
		b.Fatal(err)
	}
	ips := []netip.Addr{netip.MustParseAddr("10.1.2.15"), netip.MustParseAddr("203.0.113.9"), netip.MustParseAddr("2001:db8:6::7")}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		rules.Match(ips[i%len(ips)])
	}
}
