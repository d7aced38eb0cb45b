package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"relay/internal/dnstest"
)

// runRelay runs the command line in-process.
func runRelay(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := dispatch(append([]string{"relay"}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

// txtOf turns a printed zone-file line back into the record's text.
func txtOf(t *testing.T, line string) (name, text string) {
	t.Helper()
	m := regexp.MustCompile(`^(\S+)\. 3600 IN TXT((?: "[^"]*")+)$`).FindStringSubmatch(strings.TrimSpace(line))
	if m == nil {
		t.Fatalf("not a zone-file line: %q", line)
	}
	for _, s := range regexp.MustCompile(`"([^"]*)"`).FindAllStringSubmatch(m[2], -1) {
		text += s[1]
	}
	return m[1], text
}

func TestDKIMCommands(t *testing.T) {
	dns := dnstest.New(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "relay.toml")
	os.WriteFile(cfg, []byte("[dkim]\nkeys_dir = \"keys\"\ndns = \""+dns.Addr+"\"\n"), 0o644)

	code, out, errs := runRelay(t, "dkim", "--config", cfg, "keygen", "--domain", "Example.com", "--selector", "ed1", "--algo", "ed25519")
	if code != 0 || !strings.Contains(errs, filepath.Join(dir, "keys", "example.com", "ed1.key")) {
		t.Fatalf("keygen: %d %q %q", code, out, errs)
	}
	name, rec := txtOf(t, out)
	if name != "ed1._domainkey.example.com" || !strings.HasPrefix(rec, "v=DKIM1; k=ed25519; p=") {
		t.Fatalf("%s %q", name, rec)
	}
	// --config after the command, and $RELAY_CONFIG.
	code, rsaOut, errs := runRelay(t, "dkim", "keygen", "--domain", "example.com", "--selector", "rsa1", "--config", cfg)
	if code != 0 || !strings.Contains(rsaOut, "k=rsa; p=") {
		t.Fatalf("rsa keygen: %d %q", code, errs)
	}
	t.Setenv("RELAY_CONFIG", cfg)
	if code, _, errs := runRelay(t, "dkim", "keygen", "--domain", "example.com", "--selector", "ed1", "--algo", "ed25519"); code != 1 || !strings.Contains(errs, "never overwrites") {
		t.Fatalf("second keygen: %d %q", code, errs)
	}
	fi, _ := os.Stat(filepath.Join(dir, "keys", "example.com", "ed1.key"))
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode())
	}

	// dns prints one line per key, the same p= keygen printed.
	code, dnsOut, _ := runRelay(t, "dkim", "dns", "--domain", "example.com")
	lines := strings.Split(strings.TrimSpace(dnsOut), "\n")
	if code != 0 || len(lines) != 2 || lines[0] != strings.TrimSpace(out) || lines[1] != strings.TrimSpace(rsaOut) {
		t.Fatalf("dns: %d\n%s", code, dnsOut)
	}

	// check: nothing published, then both, then one wrong.
	code, out, _ = runRelay(t, "dkim", "check", "--domain", "example.com")
	if code != 1 || strings.Count(out, "no TXT record") != 2 {
		t.Fatalf("check before publishing: %d %q", code, out)
	}
	for _, l := range lines {
		n, r := txtOf(t, l)
		dns.SetTXT(n, r)
	}
	if code, out, _ = runRelay(t, "dkim", "check", "--domain", "example.com"); code != 0 || strings.Count(out, ": ok") != 2 {
		t.Fatalf("check: %d %q", code, out)
	}
	dns.TruncateUDP(true) // the RSA record over TCP
	if code, out, _ = runRelay(t, "dkim", "check", "--domain", "example.com"); code != 0 {
		t.Fatalf("check over TCP: %d %q", code, out)
	}
	dns.TruncateUDP(false)
	dns.SetTXT("rsa1._domainkey.example.com", "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAtest")
	if code, out, _ = runRelay(t, "dkim", "check", "--domain", "example.com"); code != 1 || !strings.Contains(out, "rsa1._domainkey.example.com differs") || !strings.Contains(out, "ed1._domainkey.example.com: ok") {
		t.Fatalf("check with a wrong record: %d %q", code, out)
	}

	for _, bad := range [][]string{
		{"dkim"}, {"dkim", "keygen"}, {"dkim", "keygen", "--domain", "example.com"}, {"dkim", "frobnicate", "--domain", "x.example"},
		{"dkim", "dns", "--domain", "x.example", "--selector", "s"},
	} {
		if code, _, _ := runRelay(t, bad...); code != exitUsage {
			t.Errorf("%q: exit %d, want %d", bad, code, exitUsage)
		}
	}
	if code, _, errs := runRelay(t, "dkim", "dns", "--domain", "example.org"); code != 1 || !strings.Contains(errs, "no keys for example.org") {
		t.Errorf("dns for a domain without keys: %d %q", code, errs)
	}
}

// TestCheckConfigNamesBadKey: check-config stops at a key that does not
// load, naming its file.
func TestCheckConfigNamesBadKey(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "relay.toml")
	os.WriteFile(cfg, []byte("data_dir = \"data\"\n[dkim]\nkeys_dir = \"keys\"\n"), 0o644)
	os.MkdirAll(filepath.Join(dir, "keys", "example.com"), 0o700)
	if code, out, errs := runRelay(t, "check-config", "--config", cfg); code != 0 {
		t.Fatalf("an empty keys_dir: %d %q %q", code, out, errs)
	}
	bad := filepath.Join(dir, "keys", "example.com", "s1.key")
	os.WriteFile(bad, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), 0o600)
	if code, _, errs := runRelay(t, "check-config", "--config", cfg); code != 1 || !strings.Contains(errs, bad+": PRIVATE KEY:") {
		t.Fatalf("a bad key: %d %q", code, errs)
	}
}
