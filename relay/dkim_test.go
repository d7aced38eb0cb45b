package relay

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"relay/config"
	"relay/dkim"
	"relay/internal/dkimtest"
	"relay/internal/dnstest"
	"relay/policy"
)

// testKeyPEMs are one RSA-2048 and one Ed25519 key for the whole test
// binary (RSA generation is slow on a loaded machine).
var testKeyPEMs = sync.OnceValues(func() ([]byte, []byte) {
	r, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	_, e, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	enc := func(k any) []byte {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			panic(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	}
	return enc(r), enc(e)
})

func putKey(t *testing.T, dir, domain, selector string, pemBytes []byte) {
	t.Helper()
	os.MkdirAll(filepath.Join(dir, domain), 0o700)
	if err := os.WriteFile(filepath.Join(dir, domain, selector+".key"), pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
}

// logins is an Authenticator with several accounts.
type logins map[string]string

func (l logins) Authenticate(_ context.Context, login, password string, _ netip.Addr) error {
	if p, ok := l[login]; ok && p == password {
		return nil
	}
	return ErrAuthBad
}
func (l logins) Enabled() bool { return true }

// dkimFixture is a server that signs for example.com (keys rsa1 and ed1;
// its logins own it) and shop.example (key s1; owned by our uid on the
// local socket and uid 1001 on web server web1 = 127.0.0.7), with a
// loopback DNS server for DMARC.
type dkimFixture struct {
	srv     *Server
	h       *fakeHandoff
	hold    *fakeHold
	dns     *dnstest.Server
	reg     *prometheus.Registry
	log     *lockedBuffer
	sock    string
	keysDir string
	cfg     *config.Config
}

func newDKIMFixture(t *testing.T, edit func(*config.DKIM), checker ...policy.Checker) *dkimFixture {
	t.Helper()
	f := &dkimFixture{h: &fakeHandoff{}, hold: &fakeHold{}, dns: dnstest.New(t), reg: prometheus.NewRegistry(),
		log: &lockedBuffer{}, sock: sockPath(t), keysDir: t.TempDir()}
	rsaPEM, edPEM := testKeyPEMs()
	putKey(t, f.keysDir, "example.com", "rsa1", rsaPEM)
	putKey(t, f.keysDir, "example.com", "ed1", edPEM)
	putKey(t, f.keysDir, "shop.example", "s1", edPEM)
	cfg := testConfig(config.Listener{Addr: "127.0.0.1:0", Mode: config.ModeSMTP}, config.Listener{Addr: f.sock, Mode: config.ModeLocal})
	cfg.DataDir = t.TempDir()
	cfg.Auth.RequireTLS = false
	cfg.Webservers = []config.Webserver{{Name: "web1", Addr: "127.0.0.7"}}
	cfg.DKIM = config.DKIM{
		KeysDir:      f.keysDir,
		Headers:      config.DefaultDKIMHeaders(),
		UnownedFrom:  config.FromAccept,
		ForeignDMARC: config.FromReject,
		DNS:          f.dns.Addr,
		Domains:      []config.DKIMDomain{{Name: "shop.example", Owners: []string{"uid:local:" + uidString(), "uid:web1:1001"}}},
	}
	if edit != nil {
		edit(&cfg.DKIM)
	}
	f.cfg = cfg
	logger := slog.New(slog.NewTextHandler(f.log, nil))
	deps := Deps{Handoff: f.h, Hold: f.hold, Registerer: f.reg, Logger: logger,
		Auth: logins{"alice@example.com": "pw", "bob@other.test": "pw", "carol@mail.example.com": "pw"}}
	if len(checker) > 0 {
		deps.Policy = checker[0]
	}
	f.srv = testServer(t, cfg, deps, nil)
	return f
}

// records is the DNS of every key the server loaded.
func (f *dkimFixture) records() map[string]string {
	m := map[string]string{}
	for _, k := range f.srv.settings.Load().dkim.Keys() {
		m[k.Name()] = k.Record()
	}
	return m
}

// authed opens an SMTP session logged in as login.
func (f *dkimFixture) authed(t *testing.T, login string) *rawClient {
	t.Helper()
	c := dialRawFrom(t, "tcp", tcpAddr(f.srv, 0), "127.0.0.9")
	c.hello("client")
	c.expect("AUTH PLAIN "+base64.StdEncoding.EncodeToString([]byte("\x00"+login+"\x00pw")), "235")
	return c
}

// last is the newest delivery.
func (f *dkimFixture) last(t *testing.T) []byte {
	t.Helper()
	d := f.h.deliveries()
	if len(d) == 0 {
		t.Fatal("nothing handed off")
	}
	return d[len(d)-1].msg
}

func message(from, extra string) string {
	return "From: " + from + "\r\nTo: x@far.test\r\nSubject: hi\r\n" + extra + "\r\nHello.\r\n.\r\n"
}

func signatures(msg []byte) int {
	return bytes.Count(msg, []byte("\nDKIM-Signature:")) + boolInt(bytes.HasPrefix(msg, []byte("DKIM-Signature:")))
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func TestDKIMSignsOwnersOverAuth(t *testing.T) {
	f := newDKIMFixture(t, nil)
	c := f.authed(t, "alice@example.com")
	if got := c.mail("alice@example.com", []string{"x@far.test"}, message("Alice <alice@example.com>", "")); !strings.HasPrefix(got, "250 ok") {
		t.Fatal(got)
	}
	msg := f.last(t)
	if !bytes.HasPrefix(msg, []byte("DKIM-Signature: ")) {
		t.Fatalf("the signature is not the first field:\n%s", msg)
	}
	sigs := dkimtest.Verify(t, msg, f.records())
	if len(sigs) != 2 || sigs[0].Domain != "example.com" {
		t.Fatalf("verified %+v", sigs)
	}
	// Under the signatures: exactly what relay hands off unsigned, its
	// Received line included.
	rest := msg[bytes.Index(msg, []byte("\nReceived: "))+1:]
	if !bytes.HasPrefix(rest, []byte("Received: from unknown (HELO client) (alice@example.com@127.0.0.9)\n  by mail.example.test with ESMTPA;")) ||
		!bytes.HasSuffix(rest, []byte("From: Alice <alice@example.com>\nTo: x@far.test\nSubject: hi\n\nHello.\n")) {
		t.Fatalf("handed off:\n%s", msg)
	}
	// A login in a subdomain owns its own From: domain, signed by the parent's keys.
	c = f.authed(t, "carol@mail.example.com")
	c.mail("carol@mail.example.com", []string{"x@far.test"}, message("carol@mail.example.com", ""))
	if sigs := dkimtest.Verify(t, f.last(t), f.records()); len(sigs) != 2 {
		t.Fatalf("subdomain: %d signatures", len(sigs))
	}
	c.expect("NOOP", "250") // the transaction has ended: counted and logged
	if !strings.Contains(f.log.String(), "dkim=sign:example.com") {
		t.Errorf("the transaction log line does not say it was signed:\n%s", f.log.String())
	}
	if v := f.srv.DKIMReport().Domains[0].Signed; v != 2 {
		t.Errorf("tally: %v signed", v)
	}
	want := "\n# HELP relay_dkim_signed_total Messages signed, by signing domain.\n# TYPE relay_dkim_signed_total counter\nrelay_dkim_signed_total{domain=\"example.com\"} 2\n"
	if err := testutil.GatherAndCompare(f.reg, strings.NewReader(want), "relay_dkim_signed_total"); err != nil {
		t.Error(err)
	}
}

func TestDKIMUnownedFrom(t *testing.T) {
	for _, action := range []string{config.FromAccept, config.FromHold, config.FromReject} {
		t.Run(action, func(t *testing.T) {
			f := newDKIMFixture(t, func(d *config.DKIM) { d.UnownedFrom = action })
			c := f.authed(t, "bob@other.test")
			got := c.mail("bob@other.test", []string{"x@far.test"}, message("ceo@example.com", ""))
			switch action {
			case config.FromAccept:
				if !strings.HasPrefix(got, "250 ok") || signatures(f.last(t)) != 0 {
					t.Fatalf("%q; handed off %q", got, f.last(t))
				}
			case config.FromHold:
				if got != "250 ok held h1\r\n" || len(f.h.deliveries()) != 0 {
					t.Fatalf("%q, %d handed off", got, len(f.h.deliveries()))
				}
				if r := f.hold.held[0].Reason; !strings.Contains(r, "example.com") || signatures(f.hold.msgs[0]) != 0 {
					t.Fatalf("held for %q: %q", r, f.hold.msgs[0])
				}
			case config.FromReject:
				if got != "550 5.7.1 not allowed to send From: example.com here (#5.7.1)\r\n" || len(f.h.deliveries()) != 0 {
					t.Fatalf("%q", got)
				}
			}
			// The session goes on: an owned From: is signed after it.
			c.mail("bob@other.test", []string{"x@far.test"}, message("bob@other.test", ""))
			c.expect("NOOP", "250") // both transactions have ended and are counted
			if action == config.FromReject {
				if v := testutil.ToFloat64(mustCounter(t, f.reg, "relay_dkim_refused_total", "unowned_from")); v != 1 {
					t.Errorf("dkim_refused_total{reason=unowned_from} = %v", v)
				}
			}
			rows := f.srv.DKIMReport().Domains
			if rows[0].Domain != "example.com" || rows[0].Unsigned[dkim.ReasonUnownedFrom]+rows[0].Held[dkim.ReasonUnownedFrom]+rows[0].Refused[dkim.ReasonUnownedFrom] != 1 {
				t.Errorf("tally %+v", rows[0])
			}
		})
	}
}

// mustCounter finds one series of a counter vector in reg.
func mustCounter(t *testing.T, reg *prometheus.Registry, name, label string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetValue() == label {
					c := prometheus.NewCounter(prometheus.CounterOpts{Name: "x"})
					c.Add(m.GetCounter().GetValue())
					return c
				}
			}
		}
	}
	t.Fatalf("no %s{%s}", name, label)
	return nil
}

// TestDKIMLocalSocket: on the local socket the uid is the identity; an
// owner uid is signed, the same uid in a domain whose logins own it is
// not.
func TestDKIMLocalSocket(t *testing.T) {
	f := newDKIMFixture(t, func(d *config.DKIM) { d.UnownedFrom = config.FromReject })
	c := dialRaw(t, "unix", f.sock)
	c.hello("localhost")
	if got := c.mail("www@shop.example", []string{"x@far.test"}, message("Shop <orders@shop.example>", "")); !strings.HasPrefix(got, "250 ok") {
		t.Fatal(got)
	}
	msg := f.last(t)
	if sigs := dkimtest.Verify(t, msg, f.records()); len(sigs) != 1 || sigs[0].Domain != "shop.example" {
		t.Fatalf("%+v", sigs)
	}
	if !bytes.Contains(msg, []byte("\nReceived: (relay invoked by uid "+uidString()+")")) {
		t.Fatalf("%s", msg)
	}
	if got := c.mail("www@shop.example", []string{"x@far.test"}, message("alice@example.com", "")); !strings.HasPrefix(got, "550 5.7.1") {
		t.Fatalf("uid sending as a login's domain: %q", got)
	}
}

// TestDKIMWebserver: uid:web1:1001 (from the web server's first Received
// line) owns shop.example; uid 1002 on the same web server does not, and
// the same line from another address proves nothing.
func TestDKIMWebserver(t *testing.T) {
	f := newDKIMFixture(t, func(d *config.DKIM) { d.UnownedFrom = config.FromReject })
	send := func(from, uid string) string {
		c := dialRawFrom(t, "tcp", tcpAddr(f.srv, 0), from)
		c.hello("web")
		return c.mail("www@shop.example", []string{"x@far.test"},
			"Received: (qmail 5 invoked by uid "+uid+"); 28 Nov 2026 02:41:53 -0000\r\n"+message("orders@shop.example", ""))
	}
	if got := send("127.0.0.7", "1001"); !strings.HasPrefix(got, "250 ok") {
		t.Fatal(got)
	}
	if sigs := dkimtest.Verify(t, f.last(t), f.records()); len(sigs) != 1 {
		t.Fatalf("%d signatures", len(sigs))
	}
	if got := send("127.0.0.7", "1002"); !strings.HasPrefix(got, "550 5.7.1 not allowed to send From: shop.example") {
		t.Fatalf("uid 1002: %q", got)
	}
}

// TestDKIMInboundNeverSigned: mail from the internet to our own domain
// with a From: in a signing domain is neither signed nor refused, whatever
// unowned_from and foreign_dmarc say.
func TestDKIMInboundNeverSigned(t *testing.T) {
	f := newDKIMFixture(t, func(d *config.DKIM) { d.UnownedFrom = config.FromReject })
	f.dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=reject")
	for _, from := range []string{"alice@example.com", "x@bank.example"} {
		c := dialRawFrom(t, "tcp", tcpAddr(f.srv, 0), "127.0.0.8")
		c.hello("internet")
		if got := c.mail("someone@far.test", []string{"postmaster@example.test"}, message(from, "")); !strings.HasPrefix(got, "250 ok") {
			t.Fatalf("%s: %q", from, got)
		}
		if signatures(f.last(t)) != 0 {
			t.Fatalf("inbound mail signed:\n%s", f.last(t))
		}
	}
	if f.dns.Queries("", "_dmarc.bank.example") != 0 {
		t.Error("DMARC looked up for inbound mail")
	}
}

func TestDKIMForeignDMARC(t *testing.T) {
	f := newDKIMFixture(t, nil)
	f.dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=reject")
	f.dns.SetTXT("_dmarc.news.example", "v=DMARC1; p=quarantine")
	f.dns.SetTXT("_dmarc.blog.example", "v=DMARC1; p=none")
	f.dns.SetMode("_dmarc.broken.example", dnstest.ServFail)
	c := f.authed(t, "alice@example.com")
	for from, want := range map[string]string{
		"x@bank.example":    "550 5.7.1 From: bank.example has DMARC p=reject; send its mail through its own servers (#5.7.1)\r\n",
		"x@news.example":    "550 5.7.1 From: news.example has DMARC p=quarantine; send its mail through its own servers (#5.7.1)\r\n",
		"x@blog.example":    "250 ok",
		"x@nowhere.example": "250 ok",
		"x@broken.example":  "250 ok",
		"x@example.test":    "250 ok", // local_domains: ours
	} {
		if got := c.mail("alice@example.com", []string{"x@far.test"}, message(from, "")); !strings.HasPrefix(got, want) {
			t.Errorf("%s: %q, want %q", from, got, want)
		}
	}
	if !strings.Contains(f.log.String(), "DMARC lookup failed; accepting") || !strings.Contains(f.log.String(), "broken.example") {
		t.Errorf("no log line for the failed lookup:\n%s", f.log.String())
	}
	if f.dns.Queries("", "_dmarc.example.test") != 0 || f.dns.Queries("", "_dmarc.example.com") != 0 {
		t.Error("DMARC looked up for our own domains")
	}
	// Cached: the same domain again asks DNS no more.
	n := f.dns.Queries("", "_dmarc.bank.example")
	c.mail("alice@example.com", []string{"x@far.test"}, message("x@bank.example", ""))
	if f.dns.Queries("", "_dmarc.bank.example") != n {
		t.Error("not cached")
	}
	c.expect("NOOP", "250") // the transaction has ended and is counted
	rows := map[string]dkim.DomainStats{}
	for _, d := range f.srv.DKIMReport().Domains {
		rows[d.Domain] = d
	}
	if rows["bank.example"].Refused[dkim.ReasonDMARCReject] != 2 || rows["news.example"].Refused[dkim.ReasonDMARCQuarantine] != 1 {
		t.Errorf("tally %+v", rows)
	}

	held := newDKIMFixture(t, func(d *config.DKIM) { d.ForeignDMARC = config.FromHold })
	held.dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=reject")
	c = held.authed(t, "alice@example.com")
	if got := c.mail("alice@example.com", []string{"x@far.test"}, message("x@bank.example", "")); got != "250 ok held h1\r\n" {
		t.Fatal(got)
	}
	if len(held.h.deliveries()) != 0 || !strings.Contains(held.hold.held[0].Reason, "p=reject") {
		t.Fatalf("%+v", held.hold.held)
	}
}

// TestDKIMLargeClientSignedEightBit: a 2 MB message with folded headers,
// an 8-bit body and the client's own DKIM-Signature is signed on top and
// verifies; relay keeps it in a file, not in memory.
func TestDKIMLargeClientSignedEightBit(t *testing.T) {
	f := newDKIMFixture(t, nil)
	var body strings.Builder
	body.WriteString("Gr\xfc\xdfe aus M\xfcnchen \xe9\xe8\r\n")
	for body.Len() < 2<<20 {
		body.WriteString("Lorem ipsum dolor sit amet, consectetur adipiscing elit \xc3\xa4\xc3\xb6\xc3\xbc  \r\n")
	}
	data := "DKIM-Signature: v=1; a=rsa-sha256; d=client.example; s=x; c=relaxed/relaxed;\r\n\th=from; bh=AAAA; b=AAAA\r\n" +
		"From: =?utf-8?q?J=C3=B6rg?=\r\n <alice@example.com>\r\n" +
		"To: a@far.test,\r\n\tb@far.test\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n   folded  \r\n" +
		"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body.String() + ".\r\n"
	c := f.authed(t, "alice@example.com")
	if got := c.mail("alice@example.com", []string{"x@far.test"}, data); !strings.HasPrefix(got, "250 ok") {
		t.Fatal(got)
	}
	msg := f.last(t)
	if !bytes.HasPrefix(msg, []byte("DKIM-Signature: ")) || !bytes.Contains(msg, []byte("\nDKIM-Signature: v=1; a=rsa-sha256; d=client.example")) {
		t.Fatal("ours is not on top of the client's")
	}
	if !bytes.Contains(msg, []byte("Gr\xfc\xdfe aus M\xfcnchen \xe9\xe8\n")) {
		t.Fatal("8-bit bytes changed")
	}
	// go-msgauth and dkimpy see three signatures; the client's (bogus)
	// one is not ours to make verify.
	res := dkimtest.Check(t, msg, f.records())
	if len(res) != 3 {
		t.Fatalf("%d signatures", len(res))
	}
	for i, r := range res[:2] {
		if r.Go != nil || (r.Python != "ok" && r.Python != "") {
			t.Errorf("signature %d: go %v, python %q", i, r.Go, r.Python)
		}
	}
}

// TestDKIMCheck: relay qq's local check gets From: control (a refusal is
// R with the SMTP reply, a hold is Q) and signing: a message to sign is
// answered G, relay qq sends it, and A carries the DKIM-Signature fields,
// which verify once on top of the message (both verifiers), and count as
// signed once committed. A message held for policy is held signed (and
// counted signed, as over SMTP).
func TestDKIMCheck(t *testing.T) {
	lf := func(s string) string { return strings.ReplaceAll(strings.TrimSuffix(s, ".\r\n"), "\r\n", "\n") }
	ck := &fakeChecker{}
	f := newDKIMFixture(t, func(d *config.DKIM) { d.UnownedFrom = config.FromReject; d.ForeignDMARC = config.FromHold }, ck)
	f.dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=reject")
	c := dialCheck(t, f.sock)
	c.request("www@example.test", []string{"x@far.test"}, lf(message("alice@example.com", "")))
	if typ, text := c.verdict(); typ != frameReject || !strings.HasPrefix(text, "550 5.7.1 not allowed to send From: example.com") {
		t.Fatalf("unowned: %q %q", typ, text)
	}

	owned := lf(message("Shop <orders@shop.example>", "Message-ID: <1@shop.example>\r\n")) + "8-bit: \xe9t\xe9\n"
	c = dialCheck(t, f.sock)
	c.request("www@example.test", []string{"x@far.test"}, owned)
	if typ, text := c.verdict(); typ != frameSign || text != "" {
		t.Fatalf("owned: %q %q", typ, text)
	}
	c.message(owned)
	typ, fields := c.frame()
	if typ != frameAccepted || !strings.HasPrefix(fields, "DKIM-Signature: ") || !strings.HasSuffix(fields, "\n") || strings.Contains(fields, "\r") {
		t.Fatalf("after the message: %q %q", typ, fields)
	}
	if sigs := dkimtest.Verify(t, []byte(fields+owned), f.records()); len(sigs) != 1 || sigs[0].Domain != "shop.example" {
		t.Fatalf("%+v", sigs)
	}
	// What qmail-queue stores: its own Received line above ours.
	stored := "Received: (qmail 4242 invoked by uid " + uidString() + "); 28 Nov 2026 02:41:53 -0000\n" + fields + owned
	if sigs := dkimtest.Verify(t, []byte(stored), f.records()); len(sigs) != 1 {
		t.Fatalf("under qmail-queue's Received line: %+v", sigs)
	}
	c.write(appendFrame(nil, frameCommit, ""))
	if typ, _ := c.frame(); typ != frameOK {
		t.Fatalf("commit answered %q", typ)
	}
	if len(f.h.deliveries()) != 0 {
		t.Fatal("a check handed the message off")
	}

	// A CR goes out as a bare CR, on which verifiers disagree: A is empty,
	// the message goes unsigned, counted as bare_cr.
	bareCR := strings.Replace(owned, "Subject: hi\n", "Subject: hi\r\n", 1)
	c = dialCheck(t, f.sock)
	c.request("www@example.test", []string{"x@far.test"}, bareCR)
	if typ, _ := c.verdict(); typ != frameSign {
		t.Fatalf("owned, with a CR: %q", typ)
	}
	c.message(bareCR)
	if typ, fields := c.frame(); typ != frameAccepted || fields != "" {
		t.Fatalf("with a CR: %q %q", typ, fields)
	}
	c.write(appendFrame(nil, frameCommit, ""))
	if typ, _ := c.frame(); typ != frameOK {
		t.Fatalf("commit answered %q", typ)
	}

	held := lf(message("x@bank.example", ""))
	c = dialCheck(t, f.sock)
	c.request("www@example.test", []string{"x@far.test"}, held)
	if typ, text := c.verdict(); typ != frameHold {
		t.Fatalf("foreign p=reject: %q %q", typ, text)
	}
	c.message(held)
	if typ, text := c.frame(); typ != frameOK || !strings.HasPrefix(text, "held ") {
		t.Fatalf("hold answered %q %q", typ, text)
	}
	if len(f.h.deliveries()) != 0 || !strings.Contains(f.hold.held[0].Reason, "p=reject") || signatures(f.hold.msgs[0]) != 0 {
		t.Fatalf("held %+v", f.hold.held)
	}

	// Over a cap that holds: the owner's message is held signed, as over
	// SMTP, with relay's own Received line under the signature.
	ck.mu.Lock()
	ck.msg = policy.Decision{Action: policy.Hold, Identity: "uid:local:" + uidString(), Limit: "1 message/1h"}
	ck.mu.Unlock()
	c = dialCheck(t, f.sock)
	c.request("www@example.test", []string{"x@far.test"}, owned)
	if typ, text := c.verdict(); typ != frameHold {
		t.Fatalf("owned over a cap: %q %q", typ, text)
	}
	c.message(owned)
	if typ, text := c.frame(); typ != frameOK || !strings.HasPrefix(text, "held ") {
		t.Fatalf("hold answered %q %q", typ, text)
	}
	heldSigned := f.hold.msgs[1]
	if !bytes.HasPrefix(heldSigned, []byte("DKIM-Signature: ")) || !bytes.Contains(heldSigned, []byte("\nReceived: (relay invoked by uid ")) {
		t.Fatalf("held:\n%s", heldSigned)
	}
	if sigs := dkimtest.Verify(t, heldSigned, f.records()); len(sigs) != 1 {
		t.Fatalf("held: %+v", sigs)
	}
	defer func() {
		if t.Failed() {
			t.Logf("report %+v\nlog %s", f.srv.DKIMReport(), f.log.String())
		}
	}()
	waitFor(t, func() bool {
		rows := map[string]dkim.DomainStats{}
		for _, d := range f.srv.DKIMReport().Domains {
			rows[d.Domain] = d
		}
		return rows["shop.example"].Signed == 2 && rows["shop.example"].Unsigned[dkim.ReasonBareCR] == 1 &&
			rows["example.com"].Refused[dkim.ReasonUnownedFrom] == 1 && rows["bank.example"].Held[dkim.ReasonDMARCReject] == 1
	})
	if !strings.Contains(f.log.String(), "dkim=sign:shop.example") {
		t.Errorf("no transaction log line says signed:\n%s", f.log.String())
	}
}

// TestDKIMCheckBrokenMessage: after G, a message that is not the one the
// request described (another header, shorter, longer, another frame) ends
// the check without an answer: nothing is signed nor charged.
func TestDKIMCheckBrokenMessage(t *testing.T) {
	ck := &fakeChecker{}
	f := newDKIMFixture(t, nil, ck)
	msg := "From: orders@shop.example\nSubject: s\n\nbody\n"
	for name, frames := range map[string][]byte{
		"another header":    append(appendFrame(nil, frameMessage, strings.Replace(msg, "orders@shop", "attack@shop", 1)), appendFrame(nil, frameEnd, "")...),
		"short":             append(appendFrame(nil, frameMessage, msg[:len(msg)-1]), appendFrame(nil, frameEnd, "")...),
		"long":              append(appendFrame(nil, frameMessage, msg+"x"), appendFrame(nil, frameEnd, "")...),
		"commit in between": append(appendFrame(nil, frameMessage, msg[:10]), appendFrame(nil, frameCommit, "")...),
	} {
		t.Run(name, func(t *testing.T) {
			c := dialCheck(t, f.sock)
			c.request("www@example.test", []string{"x@far.test"}, msg)
			if typ, _ := c.verdict(); typ != frameSign {
				t.Fatalf("verdict %q", typ)
			}
			c.write(frames)
			if !c.closed() {
				t.Fatal("the daemon answered a broken message")
			}
		})
	}
	waitFor(t, func() bool { return strings.Count(ck.log(), "abort") == 4 })
	if strings.Contains(ck.log(), "commit") {
		t.Fatalf("charged: %q", ck.log())
	}
	for _, d := range f.srv.DKIMReport().Domains {
		if d.Signed != 0 {
			t.Fatalf("counted signed: %+v", d)
		}
	}
}

// TestDKIMKeysOnReload: keys added or removed take effect on reload; a bad
// key keeps the running set.
func TestDKIMKeysOnReload(t *testing.T) {
	f := newDKIMFixture(t, nil)
	send := func() []byte {
		c := f.authed(t, "alice@example.com")
		if got := c.mail("alice@example.com", []string{"x@far.test"}, message("Alice <alice@example.org>", "")); !strings.HasPrefix(got, "250 ok") {
			t.Fatal(got)
		}
		return f.last(t)
	}
	if n := signatures(send()); n != 0 {
		t.Fatalf("%d signatures before the key", n)
	}
	_, edPEM := testKeyPEMs()
	putKey(t, f.keysDir, "example.org", "new", edPEM)
	f.cfg.DKIM.Domains = append(f.cfg.DKIM.Domains, config.DKIMDomain{Name: "example.org", Owners: []string{"user:alice@example.com"}})
	if err := f.srv.Reload(f.cfg); err != nil {
		t.Fatal(err)
	}
	if sigs := dkimtest.Verify(t, send(), f.records()); len(sigs) != 1 || sigs[0].Domain != "example.org" {
		t.Fatalf("after adding the key: %+v", sigs)
	}
	bad := filepath.Join(f.keysDir, "example.org", "broken.key")
	os.WriteFile(bad, []byte("junk"), 0o600)
	if err := f.srv.Reload(f.cfg); err == nil || !strings.Contains(err.Error(), bad) {
		t.Fatalf("reload with a bad key: %v", err)
	}
	if signatures(send()) != 1 {
		t.Fatal("a failed reload dropped the running keys")
	}
	os.Remove(bad)
	os.Remove(filepath.Join(f.keysDir, "example.org", "new.key"))
	if err := f.srv.Reload(f.cfg); err != nil {
		t.Fatal(err)
	}
	if n := signatures(send()); n != 0 {
		t.Fatalf("%d signatures after removing the key", n)
	}
}

func TestDKIMBadKeyStopsStart(t *testing.T) {
	dir := t.TempDir()
	putKey(t, dir, "example.com", "s1", []byte("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"))
	cfg := testConfig()
	cfg.DKIM.KeysDir = dir
	_, err := New(cfg, Deps{Handoff: &fakeHandoff{}})
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "example.com", "s1.key")) {
		t.Fatalf("New: %v", err)
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		t.Fatalf("not a key error: %v", err)
	}
}
