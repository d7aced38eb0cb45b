package dkim

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	msgdkim "github.com/emersion/go-msgauth/dkim"
)

// CheckDNS looks up a key's TXT record through r and reports whether it
// publishes this key: a DKIM record, k= the key's algorithm, p= its public
// key, and a message signed with the key verifies against it (go-msgauth's
// verifier). It returns nil when DNS matches, else what is wrong.
func CheckDNS(ctx context.Context, r *net.Resolver, k *Key) error {
	txts, err := r.LookupTXT(ctx, k.Name()+".")
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		return fmt.Errorf("no TXT record at %s; publish: %s", k.Name(), k.ZoneLine())
	case err != nil:
		return fmt.Errorf("looking up %s: %v", k.Name(), err)
	}
	var recs []string
	for _, t := range txts {
		if _, ok := keyTags(t)["p"]; ok {
			recs = append(recs, t)
		}
	}
	switch len(recs) {
	case 0:
		return fmt.Errorf("no DKIM record among the TXT records at %s; publish: %s", k.Name(), k.ZoneLine())
	case 1:
	default:
		return fmt.Errorf("%d DKIM records at %s: receivers take either; keep only: %s", len(recs), k.Name(), k.Record())
	}
	if err := matchRecord(k, recs[0]); err != nil {
		return fmt.Errorf("%s differs from %s: %v; publish: %s", k.Name(), k.Path, err, k.ZoneLine())
	}
	if err := roundTrip(k, recs[0]); err != nil {
		return fmt.Errorf("%s: a message signed with %s does not verify: %v", k.Name(), k.Path, err)
	}
	return nil
}

// keyTags reads a DKIM key record's tag list (RFC 6376 §3.2): "tag=value"
// separated by ';', whitespace around them ignored, and inside p= too.
func keyTags(rec string) map[string]string {
	tags := map[string]string{}
	for _, part := range strings.Split(rec, ";") {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			continue
		}
		tags[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	return tags
}

// matchRecord compares a record's v=, k= and p= with the key.
func matchRecord(k *Key, rec string) error {
	tags := keyTags(rec)
	if v, ok := tags["v"]; ok && v != "DKIM1" {
		return fmt.Errorf("v=%s, want DKIM1", v)
	}
	algo := tags["k"]
	if algo == "" {
		algo = AlgoRSA
	}
	if algo != k.Algo {
		return fmt.Errorf("k=%s, the key is %s", algo, k.Algo)
	}
	p := strings.Join(strings.Fields(tags["p"]), "")
	if p == "" {
		return errors.New("p= is empty: the record revokes the key")
	}
	pub, err := base64.StdEncoding.DecodeString(p)
	if err != nil {
		return fmt.Errorf("p= is not base64: %v", err)
	}
	if !samePublicKey(k, pub) {
		return errors.New("p= is another key")
	}
	return nil
}

// samePublicKey compares p='s bytes with the key: an RSA key as
// SubjectPublicKeyInfo or bare PKCS#1, an Ed25519 key as its 32 bytes.
func samePublicKey(k *Key, pub []byte) bool {
	switch want := k.signer.Public().(type) {
	case ed25519.PublicKey:
		return bytes.Equal(pub, want)
	case *rsa.PublicKey:
		if got, err := x509.ParsePKIXPublicKey(pub); err == nil {
			r, ok := got.(*rsa.PublicKey)
			return ok && r.Equal(want)
		}
		if got, err := x509.ParsePKCS1PublicKey(pub); err == nil {
			return got.Equal(want)
		}
	}
	return false
}

// roundTrip signs a small message with k and verifies it against rec.
func roundTrip(k *Key, rec string) error {
	s := &Set{headers: signedHeaders(nil)}
	g, err := s.NewSigning([]*Key{k}, "", 0)
	if err != nil {
		return err
	}
	defer g.Close()
	io.WriteString(g, "From: <check@"+k.Domain+">\nSubject: relay dkim check\n\nchecking "+k.Name()+"\n")
	msg, signErr, err := g.Finish()
	if err == nil {
		err = signErr
	}
	if err != nil {
		return err
	}
	vs, err := msgdkim.VerifyWithOptions(msg, &msgdkim.VerifyOptions{
		LookupTXT: func(string) ([]string, error) { return []string{rec}, nil },
	})
	if err != nil {
		return err
	}
	if len(vs) != 1 {
		return fmt.Errorf("%d signatures verified, want 1", len(vs))
	}
	return vs[0].Err
}
