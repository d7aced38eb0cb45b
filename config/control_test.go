package config

import (
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func mustAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestParseControlList(t *testing.T) {
	in := "# comment\nExample.COM  \n\n   \n.Sub.Example.com\t\r\n #not a comment\n@Bad.test"
	got, err := ParseControlList(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"example.com", ".sub.example.com", " #not a comment", "@bad.test"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
}

func testControl(rcpthosts, badmailfrom []string) *Control {
	c := NewControl(&Config{})
	for _, h := range rcpthosts {
		c.rcptHosts[h] = true
	}
	for _, b := range badmailfrom {
		c.badMailFrom[b] = true
	}
	return c
}

func TestRcptHostAllowed(t *testing.T) {
	c := testControl([]string{"example.test", ".dots.test", "sub.only.test"}, nil)
	for d, want := range map[string]bool{
		"example.test":      true,
		"EXAMPLE.Test":      true,
		"example.test.":     false, // qmail does not strip a trailing dot
		"a.example.test":    false, // no leading-dot entry for it
		"dots.test":         false, // ".dots.test" is only the subdomains
		"a.dots.test":       true,
		"a.b.DOTS.test":     true,
		"sub.only.test":     true,
		"only.test":         false,
		"":                  false,
		"xexample.test":     false,
		".example.test":     false,
		"evil-example.test": false,
	} {
		if got := c.RcptHostAllowed(d); got != want {
			t.Errorf("RcptHostAllowed(%q) = %v, want %v", d, got, want)
		}
	}
}

func TestBadMailFrom(t *testing.T) {
	c := testControl(nil, []string{"bad@example.test", "@spam.test"})
	for s, want := range map[string]bool{
		"bad@example.test":      true,
		"BAD@Example.TEST":      true,
		"good@example.test":     false,
		"x@spam.test":           true,
		"x@y@SPAM.test":         true, // from the last '@'
		"x@sub.spam.test":       false,
		"spam.test":             false,
		"":                      false,
		"bad@example.test.":     false,
		"@spam.test@other.test": false,
	} {
		if got := c.BadMailFrom(s); got != want {
			t.Errorf("BadMailFrom(%q) = %v, want %v", s, got, want)
		}
	}
	if testControl(nil, nil).BadMailFrom("a@b") {
		t.Error("empty badmailfrom matched")
	}
}

func TestReadControlFallbacks(t *testing.T) {
	dir := t.TempDir()
	cfg := defaults()
	cfg.Hostname = ""
	cfg.Relay.QmailControlDir = dir
	writeFile(t, filepath.Join(dir, "me"), "me.example.test\n")
	writeFile(t, filepath.Join(dir, "timeoutsmtpd"), "30\n")
	c, err := ReadControl(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// No smtpgreeting: greeting is me. No databytes: relay.toml's value.
	// No rcpthosts: only local_domains, never an open relay.
	if c.Me != "me.example.test" || c.Greeting != "me.example.test" || c.Databytes != 10485760 || c.TimeoutSMTPD != 30*time.Second {
		t.Errorf("control = %+v", c)
	}
	if !c.RcptHostAllowed("example.com") || c.RcptHostAllowed("anything.test") {
		t.Error("absent rcpthosts must mean local_domains only")
	}
	writeFile(t, filepath.Join(dir, "timeoutsmtpd"), "-5\n")
	writeFile(t, filepath.Join(dir, "databytes"), "0\n")
	if c, err = ReadControl(cfg); err != nil {
		t.Fatal(err)
	}
	if c.TimeoutSMTPD != time.Second || c.Databytes != 0 {
		t.Errorf("timeout %v databytes %d, want 1s and 0 (unlimited)", c.TimeoutSMTPD, c.Databytes)
	}

	cfg.Relay.QmailControlDir = filepath.Join(dir, "missing")
	if _, err := ReadControl(cfg); err == nil {
		t.Error("missing control dir accepted")
	}
	if os.Getuid() != 0 { // root reads anything
		writeFile(t, filepath.Join(dir, "rcpthosts"), "x.test\n")
		os.Chmod(filepath.Join(dir, "rcpthosts"), 0)
		cfg.Relay.QmailControlDir = dir
		if _, err := ReadControl(cfg); err == nil {
			t.Error("unreadable rcpthosts accepted")
		}
	}
}

func FuzzControlList(f *testing.F) {
	f.Add("example.com\n.example.com\n# c\n\n")
	f.Add("@bad.test\r\nUser@Example.COM \t\n")
	f.Add("\x00\n#\n \n")
	f.Fuzz(func(t *testing.T, in string) {
		list, err := ParseControlList(strings.NewReader(in))
		if err != nil {
			return
		}
		for _, e := range list {
			if e == "" || e[0] == '#' || e != strings.ToLower(e) || strings.TrimRight(e, " \t\r") != e || strings.Contains(e, "\n") {
				t.Fatalf("bad entry %q", e)
			}
		}
		c := testControl(list, list)
		for _, e := range list {
			if !c.RcptHostAllowed(e) || !c.BadMailFrom(e) {
				t.Fatalf("listed entry %q does not match itself", e)
			}
		}
	})
}

func BenchmarkRcptHostAllowed(b *testing.B) {
	c := testControl([]string{"example.test", ".dots.test", "a.test", "b.test"}, nil)
	b.ReportAllocs()
	for b.Loop() {
		c.RcptHostAllowed("deep.sub.Dots.test")
		c.RcptHostAllowed("nowhere.example.org")
	}
}

// ControlFiles names exactly what ReadControl reads: each, made
// unreadable (a directory in its place), fails the read, naming it.
func TestControlFilesAreRead(t *testing.T) {
	for _, name := range ControlFiles() {
		dir := t.TempDir()
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		_, err := ReadControl(&Config{Relay: Relay{QmailControlDir: dir}})
		if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, name)) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
