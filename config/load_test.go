package config

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

var update = flag.Bool("update", false, "rewrite testdata/bad/*.err from the current output")

// TestBadConfigs loads every testdata/bad/NAME.toml and compares the error
// text with NAME.err (absolute paths of this directory written as "./").
func TestBadConfigs(t *testing.T) {
	files, err := filepath.Glob("testdata/bad/*.toml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), ".toml")
		t.Run(name, func(t *testing.T) {
			_, err := Load(file)
			if err == nil {
				t.Fatalf("Load(%s) succeeded", file)
			}
			var errs Errors
			if !errors.As(err, &errs) || len(errs) == 0 {
				t.Fatalf("error is %T, not Errors: %v", err, err)
			}
			got := strings.ReplaceAll(err.Error(), wd+string(filepath.Separator), "./") + "\n"
			golden := strings.TrimSuffix(file, ".toml") + ".err"
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./config -run TestBadConfigs -update)", err)
			}
			if got != string(want) {
				t.Errorf("Load(%s) errors:\n%s\nwant:\n%s", file, got, want)
			}
		})
	}
}

// tomlFields copies the TOML-visible part of a config (drops Path,
// Control, TCPRules) so two configs can be compared field by field.
func tomlFields(c *Config) Config {
	out := *c
	out.Path, out.Control, out.TCPRules, out.Warnings = "", nil, nil, nil
	return out
}

// TestWarnings: configs that load but hold a setting that can never work
// (a submission listener that can never offer AUTH) get warnings at the
// listener's line, golden files in testdata/warn; a good one gets none.
func TestWarnings(t *testing.T) {
	files, err := filepath.Glob("testdata/warn/*.toml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), ".toml")
		t.Run(name, func(t *testing.T) {
			c, err := Load(file)
			if err != nil {
				t.Fatalf("Load(%s): %v", file, err)
			}
			if len(c.Warnings) == 0 {
				t.Fatal("no warning")
			}
			got := strings.ReplaceAll(c.Warnings.Error(), wd+string(filepath.Separator), "./") + "\n"
			golden := strings.TrimSuffix(file, ".toml") + ".warn"
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./config -run TestWarnings -update)", err)
			}
			if got != string(want) {
				t.Errorf("Load(%s) warnings:\n%s\nwant:\n%s", file, got, want)
			}
		})
	}
	path := writeFile(t, filepath.Join(t.TempDir(), "relay.toml"), "[[listen]]\naddr = \"127.0.0.1:587\"\nmode = \"submission\"\n[auth]\nrequire_tls = false\ncheckpassword = \"/bin/false\"\n")
	if c, err := Load(path); err != nil || len(c.Warnings) != 0 {
		t.Errorf("a submission listener that can offer AUTH: %v, warnings %v", err, c.Warnings)
	}
}

func TestExampleEqualsDefault(t *testing.T) {
	got, err := Load("../relay.example.toml")
	if err != nil {
		t.Fatalf("relay.example.toml: %v", err)
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	want := defaults()
	want.resolvePaths(root)
	want.Hostname = got.Hostname // "" in both, resolved the same way
	if host, _ := os.Hostname(); got.Hostname != host {
		t.Errorf("hostname = %q, want os.Hostname %q", got.Hostname, host)
	}
	if g, w := tomlFields(got), tomlFields(want); !reflect.DeepEqual(g, w) {
		t.Errorf("relay.example.toml differs from Default():\n got %+v\nwant %+v", g, w)
	}
	if got.Control == nil || got.Control.Databytes != 10485760 || got.Control.TimeoutSMTPD != 1200*time.Second {
		t.Errorf("Control = %+v", got.Control)
	}
	if got.Control.Greeting != got.Hostname || !got.Control.RcptHostAllowed("example.com") {
		t.Errorf("Control greeting %q / rcpthosts wrong", got.Control.Greeting)
	}
}

// TestExampleDocumentsEveryKey checks that relay.example.toml writes every
// TOML key of the schema (as a key or in a commented-out example).
func TestExampleDocumentsEveryKey(t *testing.T) {
	doc, err := os.ReadFile("../relay.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	var walk func(reflect.Type)
	walk = func(typ reflect.Type) {
		for typ.Kind() == reflect.Pointer || typ.Kind() == reflect.Slice {
			typ = typ.Elem()
		}
		if typ.Kind() != reflect.Struct || typ == reflect.TypeFor[Duration]() || typ == reflect.TypeFor[Rate]() {
			return
		}
		for f := range typ.Fields() {
			tag := f.Tag.Get("toml")
			if tag == "" || tag == "-" {
				continue
			}
			if !strings.Contains(string(doc), tag+" =") && !strings.Contains(string(doc), "["+tag+"]") &&
				!strings.Contains(string(doc), "."+tag+"]") {
				t.Errorf("relay.example.toml does not document %s.%s (toml %q)", typ.Name(), f.Name, tag)
			}
			walk(f.Type)
		}
	}
	walk(reflect.TypeFor[Config]())
}

func TestDefaultIsValid(t *testing.T) {
	v := &validator{file: "default", pos: mapPositions(nil)}
	v.config(defaults())
	if len(v.errs) > 0 {
		t.Fatalf("defaults do not validate:\n%v", v.errs)
	}
	d := Default()
	if !filepath.IsAbs(d.DataDir) || !filepath.IsAbs(d.Listen[1].Addr) || d.Listen[0].Addr != "127.0.0.1:2525" {
		t.Errorf("Default paths not resolved: %q %q %q", d.DataDir, d.Listen[1].Addr, d.Listen[0].Addr)
	}
	if d.Hostname == "" || d.Control == nil || d.Control.Me != d.Hostname {
		t.Errorf("Default hostname %q control %+v", d.Hostname, d.Control)
	}
}

func writeFile(t *testing.T, path, text string) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestOmittedKeysKeepDefaults(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, filepath.Join(dir, "relay.toml"), `
hostname = "mail.example.net"
[relay]
max_recipients = 7
relay_networks = ["10.0.0.0/8"]
`)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.Relay.MaxRecipients != 7 || c.Relay.MaxConnections != 1000 || c.Relay.Timeout.Duration != 1200*time.Second {
		t.Errorf("relay = %+v", c.Relay)
	}
	if !reflect.DeepEqual(c.Relay.RelayNetworks, []string{"10.0.0.0/8"}) {
		t.Errorf("relay_networks = %v, want the file's list only", c.Relay.RelayNetworks)
	}
	if c.Policy.Limits.User == nil || c.Policy.Limits.IP == nil || len(c.Listen) != 2 {
		t.Errorf("default limits or listeners lost: %+v %d", c.Policy.Limits, len(c.Listen))
	}
	if c.Hostname != "mail.example.net" || c.Control.Me != "mail.example.net" || c.Control.Greeting != "mail.example.net" {
		t.Errorf("hostname %q control %+v", c.Hostname, c.Control)
	}
	if c.Path != path {
		t.Errorf("Path = %q", c.Path)
	}
}

// A file that writes [policy.limits.*] says all of what is capped: the
// other kinds and the keys it leaves out are not capped.
func TestPolicyLimitsReplaceDefaults(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, filepath.Join(dir, "relay.toml"), `
[policy.limits.user]
msgs = ["10/1h"]
`)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	l := c.Policy.Limits
	if l.UID != nil || l.Sender != nil || l.Domain != nil || l.IP != nil {
		t.Errorf("kinds not in the file are capped: %+v", l)
	}
	want := &Limits{Msgs: []Rate{{10, time.Hour}}}
	if !reflect.DeepEqual(l.User, want) {
		t.Errorf("user limits = %+v, want %+v", l.User, want)
	}

	path = writeFile(t, filepath.Join(dir, "none.toml"), "[policy.limits]\n")
	if c, err = Load(path); err != nil {
		t.Fatal(err)
	}
	if c.Policy.Limits != (KindLimits{}) {
		t.Errorf("empty [policy.limits] kept caps: %+v", c.Policy.Limits)
	}
}

func TestRelativePathsFollowConfigDir(t *testing.T) {
	dir := t.TempDir()
	hash, err := bcrypt.GenerateFromPassword([]byte("secret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "etc", "users"), "# test users\nbob:"+string(hash)+"\n")
	path := writeFile(t, filepath.Join(dir, "etc", "relay.toml"), `
data_dir = "data"
[[listen]]
addr = "sock/submit.sock"
mode = "local"
[[listen]]
addr = "127.0.0.1:0"
mode = "smtp"
[auth]
users_file = "users"
[delivery]
maildir = "/abs/maildir"
`)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	etc := filepath.Join(dir, "etc")
	if c.DataDir != filepath.Join(etc, "data") || c.Listen[0].Addr != filepath.Join(etc, "sock/submit.sock") ||
		c.Listen[1].Addr != "127.0.0.1:0" || c.Delivery.Maildir != "/abs/maildir" || c.Auth.UsersFile != filepath.Join(etc, "users") {
		t.Errorf("paths: data %q listen %q %q maildir %q users %q", c.DataDir, c.Listen[0].Addr, c.Listen[1].Addr, c.Delivery.Maildir, c.Auth.UsersFile)
	}
	if len(c.Auth.Users) != 1 || c.Auth.Users["bob"] == nil {
		t.Errorf("users = %v", c.Auth.Users)
	}
}

func TestLoadReadsExternalFiles(t *testing.T) {
	dir := t.TempDir()
	ctl := filepath.Join(dir, "control")
	writeFile(t, filepath.Join(ctl, "me"), "mail.example.test  \n")
	writeFile(t, filepath.Join(ctl, "smtpgreeting"), "mx.example.test hello\t \nsecond line\n")
	writeFile(t, filepath.Join(ctl, "rcpthosts"), "# hosts\nExample.TEST\n\n.sub.example.test\n")
	writeFile(t, filepath.Join(ctl, "morercpthosts"), "more.test\n")
	writeFile(t, filepath.Join(ctl, "databytes"), "1000\n")
	writeFile(t, filepath.Join(ctl, "timeoutsmtpd"), "0\n")
	writeFile(t, filepath.Join(ctl, "badmailfrom"), "bad@example.test\n@BadDomain.test\n")
	writeFile(t, filepath.Join(dir, "tcp.smtp"), "127.:allow,RELAYCLIENT=\"\"\n10.9.9.9:deny\n")
	writeFile(t, filepath.Join(dir, "web1.passwd"), "root:x:0:0:root:/root:/bin/sh\nalice:x:1001:1001::/home/alice:/bin/sh\n")
	path := writeFile(t, filepath.Join(dir, "relay.toml"), `
[relay]
local_domains = ["local.test"]
qmail_control_dir = "control"
tcprules = "tcp.smtp"
[[webserver]]
name = "web1"
addr = "10.0.0.11"
passwd = "web1.passwd"
`)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	ct := c.Control
	if c.Hostname != "mail.example.test" || ct.Me != "mail.example.test" || ct.Greeting != "mx.example.test hello" {
		t.Errorf("hostname %q me %q greeting %q", c.Hostname, ct.Me, ct.Greeting)
	}
	if ct.Databytes != 1000 || ct.TimeoutSMTPD != time.Second {
		t.Errorf("databytes %d timeout %v", ct.Databytes, ct.TimeoutSMTPD)
	}
	for _, d := range []string{"example.test", "EXAMPLE.test", "a.sub.example.test", "more.test", "local.test"} {
		if !ct.RcptHostAllowed(d) {
			t.Errorf("RcptHostAllowed(%q) = false", d)
		}
	}
	for _, d := range []string{"sub.example.test", "other.test", "example.test.", "x.example.test"} {
		if ct.RcptHostAllowed(d) {
			t.Errorf("RcptHostAllowed(%q) = true", d)
		}
	}
	if !ct.BadMailFrom("BAD@example.test") || !ct.BadMailFrom("x@baddomain.test") || ct.BadMailFrom("good@example.test") {
		t.Error("badmailfrom not applied")
	}
	if r, ok := c.TCPRules.Match(mustAddr(t, "127.0.0.1")); !ok || !r.Allow || r.Env["RELAYCLIENT"] != "" {
		t.Errorf("tcprules 127.0.0.1: %+v %v", r, ok)
	}
	if c.Webservers[0].Accounts[1001] != "alice" {
		t.Errorf("passwd accounts = %v", c.Webservers[0].Accounts)
	}

	// An explicit hostname beats control/me; smtpgreeting still names the greeting.
	path = writeFile(t, filepath.Join(dir, "named.toml"), "hostname = \"relay.example.test\"\n[relay]\nqmail_control_dir = \"control\"\n")
	if c, err = Load(path); err != nil {
		t.Fatal(err)
	}
	if c.Hostname != "relay.example.test" || c.Control.Me != "relay.example.test" {
		t.Errorf("hostname %q me %q", c.Hostname, c.Control.Me)
	}
}

// Problems in named files are reported at their own line, or at the key
// naming a file that cannot be read; LoadFile reads none of them.
func TestExternalErrors(t *testing.T) {
	dir := t.TempDir()
	ctl := filepath.Join(dir, "control")
	writeFile(t, filepath.Join(ctl, "databytes"), "lots\n")
	writeFile(t, filepath.Join(dir, "tcp.smtp"), "# rules\n127.:allow\n1.2.3:allow\n")
	writeFile(t, filepath.Join(dir, "users"), "bob:plaintext\n")
	path := writeFile(t, filepath.Join(dir, "relay.toml"), `[relay]
qmail_control_dir = "control"
tcprules = "tcp.smtp"

[auth]
users_file = "users"

[[webserver]]
name = "web1"
addr = "10.0.0.11"
passwd = "missing.passwd"
`)
	_, err := Load(path)
	var errs Errors
	if !errors.As(err, &errs) {
		t.Fatalf("Load: %v", err)
	}
	want := []string{
		filepath.Join(ctl, "databytes") + `:1:1: relay.qmail_control_dir: "lots" is not a whole number`,
		filepath.Join(dir, "tcp.smtp") + `:3:1: relay.tcprules: "1.2.3" is not an IPv4 address, a prefix ending in '.' or a range like 1.2.3.10-20`,
		filepath.Join(dir, "users") + `:1:5: auth.users_file: login "bob": not a bcrypt hash`,
		path + `:11:1: webserver[0].passwd: open ` + filepath.Join(dir, "missing.passwd") + `: no such file or directory`,
	}
	if len(errs) != len(want) {
		t.Fatalf("got %d errors:\n%v", len(errs), err)
	}
	for i, w := range want {
		if got := errs[i].Error(); !strings.HasPrefix(got, w) {
			t.Errorf("error %d:\n got %s\nwant %s", i, got, w)
		}
	}

	c, err := LoadFile(path)
	if err != nil {
		t.Fatalf("LoadFile read external files: %v", err)
	}
	if c.TCPRules != nil || c.Auth.Users != nil || c.Control == nil || c.Control.Databytes != 10485760 {
		t.Errorf("LoadFile: tcprules %v users %v control %+v", c.TCPRules, c.Auth.Users, c.Control)
	}
}

func TestErrorFormat(t *testing.T) {
	es := Errors{
		{File: "a.toml", Line: 3, Col: 2, Key: "relay.timeout", Msg: "bad"},
		{File: "b", Msg: "no position"},
	}
	want := "a.toml:3:2: relay.timeout: bad\nb:1:1: no position"
	if es.Error() != want {
		t.Errorf("got %q, want %q", es.Error(), want)
	}
}

func TestPositions(t *testing.T) {
	doc := []byte(`top = 1
[[listen]]
addr = "a"
[[listen]]
  mode = "smtp"
[policy.limits.user]
rcpts = ["1/1m",
  "2/1h"]
[[policy.allow]]
match = "x"
[[policy.allow]]
inline = { a = 1, b = [1, 2] }
`)
	p := mapPositions(doc)
	for path, want := range map[string][2]int{
		"top":                         {1, 1},
		"listen[0]":                   {2, 3},
		"listen[0].addr":              {3, 1},
		"listen[1].mode":              {5, 3},
		"policy.limits.user.rcpts[1]": {8, 3},
		"policy.allow[0].match":       {10, 1},
		"policy.allow[1].inline.b[1]": {12, 27},
		"policy.allow[1].nothing":     {11, 3},
		"no.such.key":                 {1, 1},
	} {
		if l, c := p.pos(path); l != want[0] || c != want[1] {
			t.Errorf("pos(%s) = %d:%d, want %d:%d", path, l, c, want[0], want[1])
		}
	}
}

func FuzzLoad(f *testing.F) {
	for _, name := range []string{"../relay.example.toml", "testdata/bad/unknown_keys.toml", "testdata/bad/allow_rules.toml", "testdata/bad/syntax_error.toml"} {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("[[a]]\n[[a.b]]\n[a.b.c]\nx=[{y=[1,{z=2}]}]\n"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		// decode never panics, and reports problems only as positioned Errors.
		_, errs, _ := decode("fuzz.toml", doc)
		for _, e := range errs {
			if e.File != "fuzz.toml" || e.Line < 1 || e.Col < 1 {
				t.Fatalf("bad error position: %+v", e)
			}
		}
	})
}

// TestLoadFileTakesMe: relay qq and relay sendmail qualify bare user names
// with the hostname, which with an empty hostname is control/me, as for
// the daemon; an unreadable control/me falls back to the system's name.
func TestLoadFileTakesMe(t *testing.T) {
	dir := t.TempDir()
	ctl := filepath.Join(dir, "control")
	writeFile(t, filepath.Join(ctl, "me"), "me.example.test \n")
	writeFile(t, filepath.Join(ctl, "databytes"), "lots\n") // never read by LoadFile
	path := writeFile(t, filepath.Join(dir, "relay.toml"), "[relay]\nqmail_control_dir = \"control\"\n")
	c, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.Hostname != "me.example.test" || c.Control.Me != "me.example.test" {
		t.Errorf("hostname %q, Control.Me %q; want control/me", c.Hostname, c.Control.Me)
	}
	named := writeFile(t, filepath.Join(dir, "named.toml"), "hostname = \"relay.example.test\"\n[relay]\nqmail_control_dir = \"control\"\n")
	if c, err = LoadFile(named); err != nil || c.Hostname != "relay.example.test" {
		t.Errorf("explicit hostname: %v %v", c, err)
	}
	os.Remove(filepath.Join(ctl, "me"))
	host, _ := os.Hostname()
	if c, err = LoadFile(path); err != nil || c.Hostname != host {
		t.Errorf("without control/me: hostname %q, want the system's %q (%v)", c.Hostname, host, err)
	}
}

// TestAdminListenRules: a non-loopback admin listen needs the admin's own
// token_file, and HTTPS (tls_cert, tls_key) or insecure_plain_http.
func TestAdminListenRules(t *testing.T) {
	for _, c := range []struct {
		admin string
		ok    bool
	}{
		{`listen = "127.0.0.1:8025"`, true},
		{`listen = "[::1]:8025"`, true},
		{`listen = "localhost:8025"`, true},
		{`listen = "127.1.2.3:8025"`, true},
		{`listen = "0.0.0.0:8025"`, false},
		{`listen = ":8025"`, false},
		{`listen = "[::]:8025"`, false},
		{`listen = "[::ffff:10.0.0.5]:8025"`, false},
		{`listen = "admin.example.com:8025"`, false},
		{"listen = \"10.0.0.5:8025\"\ntoken_file = \"/etc/relay/admin.token\"", false},
		{"listen = \"10.0.0.5:8025\"\ninsecure_plain_http = true", false},
		{"listen = \"10.0.0.5:8025\"\ntoken_file = \"/t\"\ninsecure_plain_http = true", true},
		{"listen = \"0.0.0.0:8025\"\ntoken_file = \"/t\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"", true},
		{"listen = \"0.0.0.0:8025\"\ntoken_file = \"/t\"\ntls_cert = \"/c.pem\"", false},
		{"listen = \"127.0.0.1:8025\"\ntls_key = \"/k.pem\"", false},
	} {
		_, errs, fatal := decode("relay.toml", []byte("[admin]\n"+c.admin+"\n"))
		if fatal || (len(errs) == 0) != c.ok {
			t.Errorf("[admin] %q: %v, want ok=%v", c.admin, errs, c.ok)
		}
	}
}

// Issue 12's relay hole: with qmail's control files named, the built-in
// local_domains and relay_networks are not added to them unless the file
// writes those keys; [[webserver]] require_uid is true unless written.
func TestDefaultsThatDependOnTheFile(t *testing.T) {
	dir := t.TempDir()
	ctl := filepath.Join(dir, "control")
	writeFile(t, filepath.Join(ctl, "rcpthosts"), "mail.test\n")
	writeFile(t, filepath.Join(dir, "tcp.smtp"), "10.1.:allow,RELAYCLIENT=\"\"\n")
	path := writeFile(t, filepath.Join(dir, "relay.toml"), `
[relay]
qmail_control_dir = "control"
tcprules = "tcp.smtp"
[[webserver]]
name = "web1"
addr = "10.0.0.11"
[[webserver]]
name = "web2"
addr = "10.0.0.12"
require_uid = false
`)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Relay.LocalDomains) != 0 || c.Control.RcptHostAllowed("example.com") || !c.Control.RcptHostAllowed("mail.test") {
		t.Errorf("local_domains %q: example.com must not be added to control/rcpthosts", c.Relay.LocalDomains)
	}
	if len(c.Relay.RelayNetworks) != 0 {
		t.Errorf("relay_networks %q: 127.0.0.0/8 must not be added to tcprules", c.Relay.RelayNetworks)
	}
	if !c.Webservers[0].RequireUID || c.Webservers[1].RequireUID {
		t.Errorf("require_uid = %v, %v; want true (left out), false (written)", c.Webservers[0].RequireUID, c.Webservers[1].RequireUID)
	}

	// Written out, they are added; without control dir or tcprules the
	// defaults stay.
	path = writeFile(t, filepath.Join(dir, "more.toml"), `
[relay]
qmail_control_dir = "control"
tcprules = "tcp.smtp"
local_domains = ["extra.test"]
relay_networks = ["192.0.2.0/24"]
`)
	if c, err = Load(path); err != nil {
		t.Fatal(err)
	}
	if !c.Control.RcptHostAllowed("extra.test") || !c.Control.RcptHostAllowed("mail.test") || !reflect.DeepEqual(c.Relay.RelayNetworks, []string{"192.0.2.0/24"}) {
		t.Errorf("written keys lost: %q %q", c.Relay.LocalDomains, c.Relay.RelayNetworks)
	}
	path = writeFile(t, filepath.Join(dir, "plain.toml"), "hostname = \"mx.test\"\n")
	if c, err = Load(path); err != nil {
		t.Fatal(err)
	}
	if !c.Control.RcptHostAllowed("example.com") || len(c.Relay.RelayNetworks) != 2 {
		t.Errorf("defaults lost without control dir: %q %q", c.Relay.LocalDomains, c.Relay.RelayNetworks)
	}
}

func TestIdentityKindsAreOneList(t *testing.T) {
	kinds := IdentityKinds()
	if len(kinds) != NumKinds {
		t.Fatalf("%d kinds, NumKinds %d", len(kinds), NumKinds)
	}
	for i, k := range kinds {
		if KindRank(k) != i {
			t.Errorf("KindRank(%q) = %d, want %d", k, KindRank(k), i)
		}
		if (KindLimits{}).ForKind(k) != nil {
			t.Errorf("ForKind(%q) on empty limits", k)
		}
	}
	if KindRank("mailbox") != NumKinds {
		t.Error("unknown kind has a rank")
	}
	if got := DefaultSuspendKinds(); !reflect.DeepEqual(got, []string{KindUser, KindUID, KindScript, KindIP}) {
		t.Errorf("DefaultSuspendKinds = %q", got)
	}
	// ForKind knows every kind: each field of KindLimits answers for one.
	all := KindLimits{}
	v := reflect.ValueOf(&all).Elem()
	for i := 0; i < v.NumField(); i++ {
		v.Field(i).Set(reflect.ValueOf(&Limits{MaxRcptsPerMsg: i + 1}))
	}
	for i, k := range kinds {
		if l := all.ForKind(k); l == nil {
			t.Errorf("ForKind(%q) = nil", k)
		} else if tag := v.Type().Field(l.MaxRcptsPerMsg - 1).Tag.Get("toml"); tag != k {
			t.Errorf("ForKind(%q) answers with field %q (kind %d)", k, tag, i)
		}
	}
}

// TestSmoothingKeys: the keys of issue 15 load with their defaults, ""
// turns an optional rate off, and an allow entry takes pace and action.
func TestSmoothingKeys(t *testing.T) {
	d := defaults()
	if d.Relay.ConnRatePerIP.String() != "60/1m" || d.Auth.FailLimit.String() != "10/10m" || d.Policy.QueueMax != 10000 {
		t.Fatalf("defaults: conn_rate_per_ip %q fail_limit %q queue_max %d", d.Relay.ConnRatePerIP, d.Auth.FailLimit, d.Policy.QueueMax)
	}
	path := writeFile(t, filepath.Join(t.TempDir(), "relay.toml"), `
[relay]
conn_rate_per_ip = ""
[auth]
fail_limit = "3/1m"
[policy]
over_limit = "queue"
queue_max = 7
[policy.limits.sender]
msgs = ["3/10s"]
pace = "20/1s"
[[policy.allow]]
match = "sender:list@example.com"
unlimited = true
pace = "5/1s"
action = "hold"
`)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.Relay.ConnRatePerIP.On() || c.Auth.FailLimit.Rate != (Rate{3, time.Minute}) {
		t.Errorf("conn_rate_per_ip %+v fail_limit %+v", c.Relay.ConnRatePerIP, c.Auth.FailLimit)
	}
	if c.Policy.OverLimit != OverLimitQueue || c.Policy.QueueMax != 7 || c.Policy.Limits.Sender.Pace.Rate != (Rate{20, time.Second}) {
		t.Errorf("policy %+v", c.Policy)
	}
	if a := c.Policy.Allow[0]; a.Pace.Rate != (Rate{5, time.Second}) || a.Action != OverLimitHold || !a.Unlimited {
		t.Errorf("allow %+v", a)
	}
}
