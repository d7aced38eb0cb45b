package dkim

import (
	"bytes"
	"errors"

	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	msgdkim "github.com/emersion/go-msgauth/dkim"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"relay/config"
)

// testKeys makes one RSA-2048 and one Ed25519 key per test binary (RSA
// generation is slow on a loaded machine).
var testKeys = sync.OnceValues(func() (crypto.Signer, crypto.Signer) {
	r, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	_, e, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	return r, e
})

func rsaKey() crypto.Signer     { r, _ := testKeys(); return r }
func ed25519Key() crypto.Signer { _, e := testKeys(); return e }

func pkcs8PEM(t testing.TB, k crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// writeKey puts a key file at <dir>/<domain>/<selector>.key, mode 0600.
func writeKey(t testing.TB, dir, domain, selector string, pemBytes []byte) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, domain), 0o700); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, domain, selector+".key")
	if err := os.WriteFile(p, pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// testSet loads a Set with an RSA key "rsa1" and an Ed25519 key "ed1" for
// example.com (as asked) and owners from domains.
func testSet(t testing.TB, c config.DKIM, keys map[string]crypto.Signer) *Set {
	t.Helper()
	if c.KeysDir == "" {
		c.KeysDir = t.TempDir()
	}
	for name, k := range keys {
		domain, sel := splitKeyName(name)
		writeKey(t, c.KeysDir, domain, sel, pkcs8PEM(t, k))
	}
	s, err := Load(c)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// splitKeyName splits "selector@domain".
func splitKeyName(name string) (domain, selector string) {
	for i := 0; i < len(name); i++ {
		if name[i] == '@' {
			return name[i+1:], name[:i]
		}
	}
	return name, "s1"
}

// records is the DNS of every key of s.
func records(s *Set) map[string]string {
	m := map[string]string{}
	for _, k := range s.Keys() {
		m[k.Name()] = k.Record()
	}
	return m
}

// msgdkimVerify verifies msg (wire form) with go-msgauth and returns each
// signature's error.
func msgdkimVerify(wire []byte, recs map[string]string) ([]error, error) {
	vs, err := msgdkim.VerifyWithOptions(bytes.NewReader(wire), &msgdkim.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) {
			if r, ok := recs[name]; ok {
				return []string{r}, nil
			}
			return nil, errors.New("no record")
		},
	})
	var errs []error
	for _, v := range vs {
		errs = append(errs, v.Err)
	}
	return errs, err
}
