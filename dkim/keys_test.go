package dkim

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func TestParseKey(t *testing.T) {
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalECPrivateKey(ec)
	ec8, _ := x509.MarshalPKCS8PrivateKey(ec)
	pkcs1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey().(*rsa.PrivateKey))})
	for _, tc := range []struct {
		name string
		pem  []byte
		want string // "" ok, else part of the error
	}{
		{"pkcs8 rsa", pkcs8PEM(t, rsaKey()), ""},
		{"pkcs1 rsa", pkcs1, ""},
		{"pkcs8 ed25519", pkcs8PEM(t, ed25519Key()), ""},
		{"params first", append([]byte("-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"), pkcs8PEM(t, ed25519Key())...), ""},
		{"rsa 1024", pkcs8PEM(t, small), "RSA key of 1024 bits"},
		{"ec", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: ecDER}), "not a DKIM key"},
		{"ec pkcs8", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: ec8}), "not a DKIM key"},
		{"encrypted", pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1}}), "encrypted"},
		{"garbage", []byte("hello"), "no PEM private key"},
		{"bad der", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1, 2, 3}}), "PRIVATE KEY:"},
		{"public key", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: []byte{1}}), "no PEM private key"},
	} {
		_, err := ParseKey(tc.pem)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestLoadKeysReportsEveryBadFile(t *testing.T) {
	dir := t.TempDir()
	good := writeKey(t, dir, "example.com", "s1", pkcs8PEM(t, ed25519Key()))
	writeKey(t, dir, "example.com", "s2", pkcs8PEM(t, rsaKey()))
	bad := writeKey(t, dir, "example.org", "s1", []byte("not a key"))
	open := writeKey(t, dir, "example.net", "s1", pkcs8PEM(t, ed25519Key()))
	os.Chmod(open, 0o644)
	os.WriteFile(filepath.Join(dir, "example.com", "s1.txt"), []byte("a DNS note"), 0o644) // not a key: ignored
	os.WriteFile(filepath.Join(dir, "README"), []byte("notes"), 0o644)
	os.Mkdir(filepath.Join(dir, "Bad_Domain"), 0o700)

	_, err := LoadKeys(dir)
	if err == nil {
		t.Fatal("bad keys loaded")
	}
	msg := err.Error()
	for _, want := range []string{bad + ": no PEM private key", open + ": mode 0644", filepath.Join(dir, "Bad_Domain") + ": the directory name"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error does not say %q:\n%s", want, msg)
		}
	}
	if strings.Contains(msg, good) {
		t.Errorf("the good key is blamed:\n%s", msg)
	}

	os.Remove(bad)
	os.Chmod(open, 0o640)
	os.Remove(filepath.Join(dir, "Bad_Domain"))
	keys, err := LoadKeys(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys["example.com"]) != 2 || keys["example.com"][0].Selector != "s1" || keys["example.com"][1].Algo != AlgoRSA || len(keys["example.net"]) != 1 {
		t.Fatalf("keys %v", keys)
	}
	if _, err := LoadKeys(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "dkim.keys_dir") {
		t.Fatalf("a missing keys_dir: %v", err)
	}
}

func TestGenerateKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	for _, algo := range []string{AlgoEd25519, AlgoRSA} {
		k, err := GenerateKey(dir, "Example.COM.", "s-"+algo, algo)
		if err != nil {
			t.Fatal(err)
		}
		if k.Path != filepath.Join(dir, "example.com", "s-"+algo+".key") || k.Algo != algo {
			t.Fatalf("%+v", k)
		}
		fi, err := os.Stat(k.Path)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("mode %v, %v", fi.Mode(), err)
		}
		if _, err := GenerateKey(dir, "example.com", "s-"+algo, algo); err == nil || !strings.Contains(err.Error(), "never overwrites") {
			t.Fatalf("overwrote: %v", err)
		}
		rec := k.Record()
		if !strings.HasPrefix(rec, "v=DKIM1; k="+algo+"; p=") {
			t.Fatalf("record %q", rec)
		}
		p, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(rec, "v=DKIM1; k="+algo+"; p="))
		if algo == AlgoEd25519 && len(p) != 32 {
			t.Fatalf("Ed25519 p= is %d bytes, want the raw 32 (RFC 8463)", len(p))
		}
		if _, err := exec.LookPath("openssl"); err == nil {
			if out, err := exec.Command("openssl", "pkey", "-in", k.Path, "-noout").CombinedOutput(); err != nil {
				t.Fatalf("openssl pkey: %v\n%s", err, out)
			}
		}
	}
	keys, err := LoadKeys(dir)
	if err != nil || len(keys["example.com"]) != 2 {
		t.Fatalf("%v %v", keys, err)
	}
	for _, bad := range [][3]string{{"", "s1", AlgoRSA}, {"exa mple.com", "s1", AlgoRSA}, {"example.com", "../x", AlgoRSA}, {"example.com", "s1", "dsa"}} {
		if _, err := GenerateKey(dir, bad[0], bad[1], bad[2]); err == nil {
			t.Errorf("GenerateKey(%q) worked", bad)
		}
	}
	if _, err := GenerateKey("", "example.com", "s1", AlgoRSA); err == nil {
		t.Error("no keys_dir worked")
	}
}

func TestZoneLineSplitsLongRecords(t *testing.T) {
	dir := t.TempDir()
	writeKey(t, dir, "example.com", "s1", pkcs8PEM(t, rsaKey()))
	keys, err := LoadKeys(dir)
	if err != nil {
		t.Fatal(err)
	}
	k := keys["example.com"][0]
	line := k.ZoneLine()
	if !strings.HasPrefix(line, "s1._domainkey.example.com. 3600 IN TXT \"v=DKIM1; k=rsa; p=") || strings.Contains(line, "\n") {
		t.Fatalf("%s", line)
	}
	parts := regexp.MustCompile(`"([^"]*)"`).FindAllStringSubmatch(line, -1)
	var joined string
	for _, p := range parts {
		s := p[1]
		if len(s) > 255 {
			t.Fatalf("a character-string of %d bytes", len(s))
		}
		joined += s
	}
	if len(parts) < 2 || joined != k.Record() {
		t.Fatalf("parts %d, joined %q", len(parts), joined)
	}
}

func FuzzParseKey(f *testing.F) {
	f.Add(pkcs8PEM(f, ed25519Key()))
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey().(*rsa.PrivateKey))}))
	f.Add([]byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	f.Add([]byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\n-----END ENCRYPTED PRIVATE KEY-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseKey(data)
		if err == nil {
			// Whatever parses can sign and be published.
			k := newKey("example.com", "s1", "fuzz", s)
			if !strings.HasPrefix(k.Record(), "v=DKIM1; k=") {
				t.Fatalf("record %q", k.Record())
			}
		}
	})
}
