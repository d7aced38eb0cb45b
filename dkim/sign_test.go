package dkim

import (
	"bytes"
	"crypto"
	"errors"
	"io"
	"regexp"
	"strings"
	"testing"
	"testing/iotest"

	"relay/config"
	"relay/internal/dkimtest"
)

// sign runs a message (stored form) through a Signing with every key of
// domain and returns what would be handed off.
func sign(t *testing.T, s *Set, domain string, msg []byte, memMax int) []byte {
	t.Helper()
	g, err := s.NewSigning(s.DomainKeys(domain), t.TempDir(), memMax)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	// in odd-sized pieces, as storeReader hands them over
	for rest := msg; len(rest) > 0; {
		n := min(len(rest), 7919)
		if _, err := g.Write(rest[:n]); err != nil {
			t.Fatal(err)
		}
		rest = rest[n:]
	}
	out, signErr, err := g.Finish()
	if err != nil || signErr != nil {
		t.Fatalf("Finish: %v, %v", err, signErr)
	}
	b, err := io.ReadAll(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasSuffix(b, msg) {
		t.Fatalf("the message changed under the signatures")
	}
	return b
}

const plainMsg = "Received: (relay invoked by uid 1001); 28 Nov 2026 02:41:53 -0000\n" +
	"From: Alice <alice@example.com>\nTo: bob@example.net\nSubject: hello\n" +
	"Date: Sat, 28 Nov 2026 02:41:53 +0000\nMessage-ID: <1@example.com>\n\nHello Bob.\n"

var sigField = regexp.MustCompile(`(?m)^DKIM-Signature:.*(\n[ \t].*)*\n`)

// tagsOf returns the tags of the n-th DKIM-Signature field of msg.
func tagsOf(t *testing.T, msg []byte, n int) map[string]string {
	t.Helper()
	fields := sigField.FindAll(msg, -1)
	if len(fields) <= n {
		t.Fatalf("no signature %d in\n%s", n, msg)
	}
	v := strings.TrimPrefix(string(fields[n]), "DKIM-Signature:")
	return keyTags(strings.Join(strings.Fields(v), ""))
}

func TestSignVerifiesRSAAndEd25519(t *testing.T) {
	for _, tc := range []struct {
		name string
		key  crypto.Signer
		algo string
	}{{"rsa", rsaKey(), "rsa-sha256"}, {"ed25519", ed25519Key(), "ed25519-sha256"}} {
		t.Run(tc.name, func(t *testing.T) {
			s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"s1@example.com": tc.key})
			out := sign(t, s, "example.com", []byte(plainMsg), 0)
			if !bytes.HasPrefix(out, []byte("DKIM-Signature: ")) {
				t.Fatalf("the signature is not the first field:\n%s", out)
			}
			if bytes.Contains(out, []byte("\r")) {
				t.Fatal("a CR in the stored form")
			}
			sigs := dkimtest.Verify(t, out, records(s))
			if len(sigs) != 1 || sigs[0].Domain != "example.com" {
				t.Fatalf("verified %+v", sigs)
			}
			tags := tagsOf(t, out, 0)
			if tags["a"] != tc.algo || tags["c"] != "relaxed/relaxed" || tags["d"] != "example.com" || tags["s"] != "s1" {
				t.Errorf("tags %v", tags)
			}
			if n := countFrom(tags["h"]); n < 2 {
				t.Errorf("h=%s does not sign From twice", tags["h"])
			}
		})
	}
}

// TestSignedFromTwiceStopsASecondFrom: adding a From: after signing breaks
// the signature (h= names from twice).
func TestSignedFromTwiceStopsASecondFrom(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"s1@example.com": ed25519Key()})
	out := sign(t, s, "example.com", []byte(plainMsg), 0)
	forged := bytes.Replace(out, []byte("From: Alice"), []byte("From: <ceo@example.com>\nFrom: Alice"), 1)
	vs := verifyGo(t, forged, records(s))
	if len(vs) != 1 || vs[0] == nil {
		t.Fatalf("a second From: still verifies")
	}
}

func TestSignTwoKeysSideBySide(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"rsa1@example.com": rsaKey(), "ed1@example.com": ed25519Key()})
	out := sign(t, s, "example.com", []byte(plainMsg), 0)
	sigs := dkimtest.Verify(t, out, records(s))
	if len(sigs) != 2 {
		t.Fatalf("%d signatures verified, want 2", len(sigs))
	}
	if a, b := tagsOf(t, out, 0), tagsOf(t, out, 1); a["s"] != "ed1" || b["s"] != "rsa1" {
		t.Errorf("selectors %s, %s; want ed1, rsa1 (selector order)", a["s"], b["s"])
	}
}

// TestSignLargeMessageFromSpool: a 2 MB message is kept in a file, not in
// memory, and its signature verifies.
func TestSignLargeMessageFromSpool(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"rsa1@example.com": rsaKey(), "ed1@example.com": ed25519Key()})
	var b strings.Builder
	b.WriteString("From: alice@example.com\nSubject: big\n\n")
	for b.Len() < 2<<20 {
		b.WriteString("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tem  \n")
	}
	msg := []byte(b.String())
	g, err := s.NewSigning(s.DomainKeys("example.com"), t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	// As relay does: ReadFrom a reader without WriteTo, in small reads.
	if _, err := g.ReadFrom(iotest.HalfReader(struct{ io.Reader }{bytes.NewReader(msg)})); err != nil {
		t.Fatal(err)
	}
	if !g.Spilled() || len(g.mem) != 0 {
		t.Fatalf("a 2 MB message kept in memory (spilled %v, %d bytes)", g.Spilled(), len(g.mem))
	}
	r, signErr, err := g.Finish()
	if err != nil || signErr != nil {
		t.Fatal(err, signErr)
	}
	out, _ := io.ReadAll(r)
	if !bytes.HasSuffix(out, msg) {
		t.Fatal("spooled message differs")
	}
	if sigs := dkimtest.Verify(t, out, records(s)); len(sigs) != 2 {
		t.Fatalf("%d signatures", len(sigs))
	}
}

// TestSignFoldedHeadersAndEightBit: folded fields, tabs, trailing blanks
// and raw 8-bit bytes in header and body pass unchanged and verify.
func TestSignFoldedHeadersAndEightBit(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"rsa1@example.com": rsaKey(), "ed1@example.com": ed25519Key()})
	msg := "Received: from unknown (HELO x) (192.0.2.1)\n  by mail.example.com with ESMTPA; 28 Nov 2026 02:41:53 -0000\n" +
		"From: =?utf-8?q?J=C3=B6rg?=\n\t<joerg@example.com>\n" +
		"To: a@example.net,\n   b@example.net,\n\tc@example.net\n" +
		"Subject: Gr\xc3\xbc\xc3\x9fe   aus\t \n M\xc3\xbcnchen  \n" +
		"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" +
		"Gr\xfc\xdfe \xe9t\xe9 \x80\xff\n  trailing blanks  \t\n\n\n\n"
	out := sign(t, s, "example.com", []byte(msg), 0)
	if !bytes.HasSuffix(out, []byte(msg)) {
		t.Fatal("bytes changed")
	}
	if sigs := dkimtest.Verify(t, out, records(s)); len(sigs) != 2 {
		t.Fatalf("%d signatures", len(sigs))
	}
}

// TestSignBareCRGoesUnsigned: a CR in the stored message goes out as a
// bare CR, on which verifiers disagree (what PHP 8's mail() hands
// qmail-inject: CRLF header lines, of which qmail-inject keeps the CR of
// the Subject and the body's): such a message is handed back unsigned and
// whole, ErrBareCR, kept or detached, in memory or streamed; signed anyway
// it would verify with go-msgauth and fail with python3-dkim.
func TestSignBareCRGoesUnsigned(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"ed1@example.com": ed25519Key()})
	msg := "Message-ID: <1@example.com>\nTo: customer@example.net\nSubject: your order\r\n" +
		"From: Shop <shop@example.com>\n\n\r\nthank you\n\r\n"
	big := "From: Shop <shop@example.com>\n\n" + strings.Repeat("a line\n", 40000) + "thank you\r\n"
	for _, m := range []string{msg, big} {
		g, err := s.NewSigning(s.DomainKeys("example.com"), t.TempDir(), 64<<10)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(g, m)
		r, signErr, err := g.Finish()
		if err != nil || !errors.Is(signErr, ErrBareCR) {
			t.Fatalf("err %v, signErr %v", err, signErr)
		}
		if b, _ := io.ReadAll(r); string(b) != m {
			t.Fatalf("not handed back whole")
		}
		g.Close()
		g, err = s.NewDetachedSigning(s.DomainKeys("example.com"), 64<<10)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(g, m)
		if fields, signErr := g.Fields(); fields != "" || !errors.Is(signErr, ErrBareCR) {
			t.Fatalf("detached: %q, %v", fields, signErr)
		}
		g.Close()
	}
}

// TestSignOverClientSignature: a message that already carries a
// DKIM-Signature (the client's own, or an earlier hop's) gets ours on top;
// ours verifies.
func TestSignOverClientSignature(t *testing.T) {
	other := testSet(t, config.DKIM{}, map[string]crypto.Signer{"x@client.example": ed25519Key()})
	clientSigned := sign(t, other, "client.example", []byte("From: alice@example.com\nSubject: hi\n\nbody\n"), 0)
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"rsa1@example.com": rsaKey()})
	out := sign(t, s, "example.com", clientSigned, 0)
	if tags := tagsOf(t, out, 0); tags["d"] != "example.com" {
		t.Fatalf("the topmost signature is d=%s", tags["d"])
	}
	recs := records(s)
	for k, v := range records(other) {
		recs[k] = v
	}
	if sigs := dkimtest.Verify(t, out, recs); len(sigs) != 2 || sigs[0].Domain != "example.com" {
		t.Fatalf("%+v", sigs)
	}
}

// TestSignHeaderOnlyMessageGoesUnsigned: go-msgauth needs the blank line
// that ends a header; without it the message is handed back unsigned and
// whole.
func TestSignHeaderOnlyMessageGoesUnsigned(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"ed1@example.com": ed25519Key()})
	g, err := s.NewSigning(s.DomainKeys("example.com"), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	msg := "From: alice@example.com\nSubject: no body"
	io.WriteString(g, msg)
	r, signErr, err := g.Finish()
	if err != nil || signErr == nil {
		t.Fatalf("err %v, signErr %v", err, signErr)
	}
	if b, _ := io.ReadAll(r); string(b) != msg {
		t.Fatalf("got %q", b)
	}
}

func TestSpoolFailureIsAnError(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"ed1@example.com": ed25519Key()})
	g, err := s.NewSigning(s.DomainKeys("example.com"), "/nonexistent/dir", 16)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if _, err := io.WriteString(g, "From: alice@example.com\n\nmore than sixteen bytes\n"); err == nil {
		t.Fatal("a spool file in a missing directory worked")
	}
	if _, _, err := g.Finish(); err == nil {
		t.Fatal("Finish after a spool failure succeeded")
	}
}

// TestDetachedSigning: a detached signing gives only the fields, which
// verify once put on top of the message; past memory it keeps nothing
// (no file, no buffer) and still signs all of it.
func TestDetachedSigning(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"rsa1@example.com": rsaKey(), "ed1@example.com": ed25519Key()})
	big := "From: alice@example.com\nSubject: big\n\n" + strings.Repeat("a line of a large message, signed as it streams  \n", 40000)
	for _, tc := range []struct {
		name    string
		msg     string
		spilled bool
	}{{"small", plainMsg, false}, {"2 MB", big, true}} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := s.NewDetachedSigning(s.DomainKeys("example.com"), 64<<10)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			if _, err := g.ReadFrom(iotest.HalfReader(strings.NewReader(tc.msg))); err != nil {
				t.Fatal(err)
			}
			if g.Spilled() != tc.spilled || g.file != nil || (tc.spilled && g.mem != nil) {
				t.Fatalf("spilled %v, file %v, %d bytes in memory", g.Spilled(), g.file, len(g.mem))
			}
			fields, signErr := g.Fields()
			if signErr != nil {
				t.Fatal(signErr)
			}
			if strings.Count(fields, "DKIM-Signature: ") != 2 || !strings.HasSuffix(fields, "\n") || strings.Contains(fields, "\r") {
				t.Fatalf("fields %q", fields)
			}
			if sigs := dkimtest.Verify(t, []byte(fields+tc.msg), records(s)); len(sigs) != 2 {
				t.Fatalf("%d signatures", len(sigs))
			}
			if _, _, err := g.Finish(); err == nil {
				t.Fatal("Finish of a detached signing gave a message")
			}
		})
	}
}

// TestSigningBuffersAreNotShared: message buffers come from a pool, but
// only once their Signing closed: two signings open together keep their
// own messages, and a buffer used again holds nothing of its last message.
func TestSigningBuffersAreNotShared(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"ed1@example.com": ed25519Key()})
	keys := s.DomainKeys("example.com")
	open := func(msg string) (*Signing, io.Reader) {
		g, err := s.NewSigning(keys, "", 0)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(g, msg)
		r, signErr, err := g.Finish()
		if err != nil || signErr != nil {
			t.Fatal(err, signErr)
		}
		return g, r
	}
	a, b := "From: a@example.com\n\n"+strings.Repeat("a", 3000)+"\n", "From: b@example.com\n\nb\n"
	for range 3 {
		ga, ra := open(a)
		gb, rb := open(b)
		outA, _ := io.ReadAll(ra)
		outB, _ := io.ReadAll(rb)
		if !bytes.HasSuffix(outA, []byte(a)) || !bytes.HasSuffix(outB, []byte(b)) {
			t.Fatalf("messages mixed:\n%s\n%s", outA, outB)
		}
		if len(dkimtest.Verify(t, outA, records(s))) != 1 || len(dkimtest.Verify(t, outB, records(s))) != 1 {
			t.Fatal("not signed")
		}
		ga.Close()
		gb.Close()
	}
}

func verifyGo(t *testing.T, msg []byte, recs map[string]string) []error {
	t.Helper()
	vs, err := msgdkimVerify(dkimtest.CRLF(msg), recs)
	if err != nil {
		t.Fatal(err)
	}
	return vs
}

// countFrom counts "from" in an h= list.
func countFrom(h string) int {
	n := 0
	for _, f := range strings.Split(h, ":") {
		if strings.EqualFold(strings.TrimSpace(f), "from") {
			n++
		}
	}
	return n
}

// TestVerifiersCatchTampering: both verifiers of the tests fail a signed
// message whose body or signed header changed, so their passes mean
// something.
func TestVerifiersCatchTampering(t *testing.T) {
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"rsa1@example.com": rsaKey(), "ed1@example.com": ed25519Key()})
	out := sign(t, s, "example.com", []byte(plainMsg), 0)
	for _, tamper := range [][2]string{{"Hello Bob.", "Hello Eve."}, {"Subject: hello", "Subject: hallo"}} {
		bad := bytes.Replace(out, []byte(tamper[0]), []byte(tamper[1]), 1)
		for i, r := range dkimtest.Check(t, bad, records(s)) {
			if r.Go == nil || r.Python == "ok" {
				t.Errorf("%q: signature %d passed: go %v, python %q", tamper[1], i, r.Go, r.Python)
			}
		}
	}
}
