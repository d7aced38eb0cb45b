// Package dkim signs outgoing mail and keeps the From: header honest
// (docs/design.md §11): the keys in [dkim] keys_dir, who owns each signing
// domain, signing a message while it is stored (go-msgauth), and DMARC
// lookups of foreign From: domains with their cache and resolver. It also
// counts what it did per domain for the admin page and /metrics.
package dkim

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"relay/config"
)

// Key algorithms (the k= of the DNS record).
const (
	AlgoRSA     = "rsa"
	AlgoEd25519 = "ed25519"
)

// RSA key sizes: RFC 8301 has signers use 2048 bits or more and verifiers
// accept up to 4096; a longer key would not verify everywhere.
const (
	minRSABits     = 2048
	maxRSABits     = 4096
	defaultRSABits = 2048
)

// keyExt names key files in <keys_dir>/<domain>/.
const keyExt = ".key"

// Key is one signing key: <keys_dir>/<Domain>/<Selector>.key.
type Key struct {
	Domain   string
	Selector string
	Path     string
	Algo     string // AlgoRSA or AlgoEd25519
	Bits     int    // RSA modulus size; 256 for Ed25519
	signer   crypto.Signer
}

// ParseKey reads a PEM private key: PKCS#8 ("PRIVATE KEY") holding RSA or
// Ed25519, or PKCS#1 ("RSA PRIVATE KEY"). RSA keys must have 2048 to 4096
// bits.
func ParseKey(data []byte) (crypto.Signer, error) {
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, errors.New("no PEM private key in the file")
		}
		var key any
		var err error
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("the key is encrypted; relay needs it unencrypted (openssl pkey -in K -out K2)")
		case "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "DSA PRIVATE KEY":
			return nil, fmt.Errorf("a %s is not a DKIM key: want RSA or Ed25519 in PKCS#8 or PKCS#1 PEM", block.Type)
		default:
			continue // parameters, certificates, comments in PEM form
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %v", block.Type, err)
		}
		switch k := key.(type) {
		case *rsa.PrivateKey:
			if bits := k.N.BitLen(); bits < minRSABits || bits > maxRSABits {
				return nil, fmt.Errorf("RSA key of %d bits: want %d to %d", bits, minRSABits, maxRSABits)
			}
			return k, nil
		case ed25519.PrivateKey:
			return k, nil
		}
		return nil, fmt.Errorf("a %T is not a DKIM key: want RSA or Ed25519", key)
	}
}

func newKey(domain, selector, path string, s crypto.Signer) *Key {
	k := &Key{Domain: domain, Selector: selector, Path: path, signer: s, Algo: AlgoEd25519, Bits: 256}
	if r, ok := s.(*rsa.PrivateKey); ok {
		k.Algo, k.Bits = AlgoRSA, r.N.BitLen()
	}
	return k
}

// publicBytes is what p= carries: the SubjectPublicKeyInfo DER of an RSA
// key (RFC 6376 §3.6.1), the raw 32 bytes of an Ed25519 one (RFC 8463).
func publicBytes(s crypto.Signer) []byte {
	switch pub := s.Public().(type) {
	case ed25519.PublicKey:
		return []byte(pub)
	default:
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			panic("dkim: marshalling a public key we parsed: " + err.Error())
		}
		return der
	}
}

// Name is the DNS name of the key's record: <selector>._domainkey.<domain>.
func (k *Key) Name() string { return k.Selector + "._domainkey." + k.Domain }

// Record is the TXT record to publish: "v=DKIM1; k=rsa; p=...".
func (k *Key) Record() string {
	return "v=DKIM1; k=" + k.Algo + "; p=" + base64.StdEncoding.EncodeToString(publicBytes(k.signer))
}

// ZoneLine is the record as one zone-file line, its text cut into
// character-strings of at most 255 bytes (RFC 1035 §3.3.14):
//
//	s1._domainkey.example.com. 3600 IN TXT "v=DKIM1; k=rsa; p=MIIB..." "..."
func (k *Key) ZoneLine() string {
	var b strings.Builder
	b.WriteString(k.Name())
	b.WriteString(". 3600 IN TXT")
	for rec := k.Record(); rec != ""; {
		n := min(len(rec), 255)
		b.WriteString(` "`)
		b.WriteString(rec[:n])
		b.WriteString(`"`)
		rec = rec[n:]
	}
	return b.String()
}

// LoadKeys reads every <dir>/<domain>/<selector>.key. Directory names are
// the signing domains (lower case), file names without ".key" the
// selectors; other files and hidden ones are left alone. Every problem is
// reported, each naming its file. A key must not be readable or writable
// by other users.
func LoadKeys(dir string) (map[string][]*Key, error) {
	keys := map[string][]*Key{}
	if dir == "" {
		return keys, nil
	}
	domains, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("dkim.keys_dir: %v", err)
	}
	var errs []error
	for _, d := range domains {
		name := d.Name()
		path := filepath.Join(dir, name)
		if strings.HasPrefix(name, ".") || !isDir(path) {
			continue
		}
		if !config.IsDomainName(name) {
			errs = append(errs, fmt.Errorf("%s: the directory name must be a domain name in lower case", path))
			continue
		}
		files, err := os.ReadDir(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, f := range files {
			selector, ok := strings.CutSuffix(f.Name(), keyExt)
			if !ok || strings.HasPrefix(f.Name(), ".") {
				continue
			}
			k, err := readKeyFile(name, selector, filepath.Join(path, f.Name()))
			if err != nil {
				errs = append(errs, err)
				continue
			}
			keys[name] = append(keys[name], k)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	for _, ks := range keys {
		slices.SortFunc(ks, func(a, b *Key) int { return strings.Compare(a.Selector, b.Selector) })
	}
	return keys, nil
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

// readKeyFile reads one key; errors name the file.
func readKeyFile(domain, selector, path string) (*Key, error) {
	if !isSelector(selector) {
		return nil, fmt.Errorf("%s: the selector %q must be letters, digits, '-' and '.'", path, selector)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o007 != 0 {
		return nil, fmt.Errorf("%s: mode %#o lets other users at the private key; chmod 0600 (or 0640 for a group)", path, perm)
	}
	data, err := readAtMost(f, 64<<10)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	s, err := ParseKey(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return newKey(domain, selector, path, s), nil
}

func readAtMost(r io.Reader, max int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, max+1))
	if err == nil && int64(len(data)) > max {
		err = fmt.Errorf("larger than %d bytes: not a key", max)
	}
	return data, err
}

// isSelector: RFC 6376 §3.1 selectors are dot-separated sub-domains
// (letters, digits, '-').
func isSelector(s string) bool {
	return config.IsDomainName(strings.ToLower(s))
}

// GenerateKey writes a new key to <keysDir>/<domain>/<selector>.key (0600;
// the directory is made 0700 if needed) and returns it. It never
// overwrites a file. algo is AlgoRSA (2048 bits) or AlgoEd25519.
func GenerateKey(keysDir, domain, selector, algo string) (*Key, error) {
	domain = strings.ToLower(strings.TrimSuffix(domain, "."))
	if keysDir == "" {
		return nil, errors.New("dkim.keys_dir is empty in the config: set it to where keys live")
	}
	if !config.IsDomainName(domain) {
		return nil, fmt.Errorf("%q is not a domain name", domain)
	}
	if !isSelector(selector) {
		return nil, fmt.Errorf("selector %q: want letters, digits, '-' and '.'", selector)
	}
	var s crypto.Signer
	var err error
	switch algo {
	case AlgoRSA:
		s, err = rsa.GenerateKey(rand.Reader, defaultRSABits)
	case AlgoEd25519:
		_, s, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, fmt.Errorf("algorithm %q: rsa or ed25519", algo)
	}
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(s)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(keysDir, domain)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, selector+keyExt)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("%s exists; relay never overwrites a key (pick another selector, or remove it first)", path)
	}
	if err != nil {
		return nil, err
	}
	err = pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der})
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return newKey(domain, selector, path, s), nil
}
