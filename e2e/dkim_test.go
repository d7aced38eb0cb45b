package e2e

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"relay/admin"
	"relay/internal/dkimtest"
	"relay/internal/dnstest"
)

// relayCmd runs the real binary with the daemon's environment.
func relayCmd(t *testing.T, d *daemon, stdin string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(bins.relay, args...)
	cmd.Env = d.env
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatalf("relay %v: %v", args, err)
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

// publish puts the records `relay dkim dns` prints into the DNS server and
// returns them by name.
func publish(t *testing.T, d *daemon, dns *dnstest.Server, domain string) map[string]string {
	t.Helper()
	code, out, errs := relayCmd(t, d, "", "dkim", "--config", d.config, "dns", "--domain", domain)
	if code != 0 {
		t.Fatalf("relay dkim dns: %d %s", code, errs)
	}
	recs := map[string]string{}
	line := regexp.MustCompile(`^(\S+)\. 3600 IN TXT((?: "[^"]*")+)$`)
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		m := line.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("not a zone-file line: %q", l)
		}
		var text string
		for _, s := range regexp.MustCompile(`"([^"]*)"`).FindAllStringSubmatch(m[2], -1) {
			text += s[1]
		}
		dns.SetTXT(m[1], text)
		recs[m[1]] = text
	}
	return recs
}

// TestDKIMEndToEnd: keys made with `relay dkim keygen`, published from
// `relay dkim dns`, checked with `relay dkim check`, loaded by a reload;
// then mail over SMTP AUTH and through `relay sendmail` reaches qmail-queue
// signed (both verifiers agree), non-owners and a foreign p=reject From:
// are refused, and the page's API, `relay ctl dkim` and /metrics say so.
func TestDKIMEndToEnd(t *testing.T) {
	dns := dnstest.New(t)
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys")
	os.Mkdir(keys, 0o700)
	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users := filepath.Join(dir, "users")
	os.WriteFile(users, []byte("alice@example.com:"+string(hash)+"\nbob@other.test:"+string(hash)+"\n"), 0o600)
	d := newDaemon(t, daemonOpts{
		relay:     "[relay]\nlocal_domains = [\"example.com\"]\nrelay_networks = []\n",
		extraTOML: fmt.Sprintf("[auth]\nusers_file = %q\nrequire_tls = false\n", users),
		dkim: fmt.Sprintf("[dkim]\nkeys_dir = %q\ndns = %q\nunowned_from = \"reject\"\nforeign_dmarc = \"reject\"\n\n"+
			"[[dkim.domain]]\nname = \"shop.example\"\nowners = [\"uid:local:%d\"]\n", keys, dns.Addr, os.Getuid()),
	})

	for _, k := range [][3]string{{"example.com", "ed1", "ed25519"}, {"example.com", "rsa1", "rsa"}, {"shop.example", "s1", "ed25519"}} {
		if code, out, errs := relayCmd(t, d, "", "dkim", "keygen", "--config", d.config, "--domain", k[0], "--selector", k[1], "--algo", k[2]); code != 0 || !strings.Contains(out, "v=DKIM1; k="+k[2]+"; p=") {
			t.Fatalf("keygen %v: %d %q %q", k, code, out, errs)
		}
	}
	if code, out, _ := relayCmd(t, d, "", "dkim", "check", "--config", d.config, "--domain", "example.com"); code != 1 || !strings.Contains(out, "no TXT record") {
		t.Fatalf("check before publishing: %d %q", code, out)
	}
	recs := publish(t, d, dns, "example.com")
	for k, v := range publish(t, d, dns, "shop.example") {
		recs[k] = v
	}
	if code, out, _ := relayCmd(t, d, "", "dkim", "check", "--config", d.config, "--domain", "example.com"); code != 0 || strings.Count(out, ": ok") != 2 {
		t.Fatalf("check: %d %q", code, out)
	}
	d.signal(syscall.SIGHUP)
	d.waitLog("config reloaded")

	auth := func(login string) *smtpConn {
		c := dialSMTP(t, d.sub)
		c.expect("EHLO client.example", "250")
		c.expect("AUTH PLAIN "+base64.StdEncoding.EncodeToString([]byte("\x00"+login+"\x00pw")), "235")
		return c
	}
	msg := func(from string) string {
		return "From: " + from + "\nTo: x@remote.example\nSubject: hello\nMessage-ID: <1@example.com>\n\nHello \xe9t\xe9.\n"
	}
	c := auth("alice@example.com")
	mustPrefix(t, "owner", c.send("alice@example.com", []string{"x@remote.example"}, msg("Alice <alice@example.com>")), "250 ok ")
	q := d.queued()
	signed := q[len(q)-1].Message
	if !bytes.HasPrefix(signed, []byte("DKIM-Signature: ")) {
		t.Fatalf("qmail-queue got:\n%s", signed)
	}
	if sigs := dkimtest.Verify(t, signed, recs); len(sigs) != 2 {
		t.Fatalf("%d signatures verified", len(sigs))
	}

	dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=reject")
	mustPrefix(t, "foreign p=reject", c.send("alice@example.com", []string{"x@remote.example"}, msg("x@bank.example")),
		"550 5.7.1 From: bank.example has DMARC p=reject")
	mustPrefix(t, "non-owner", auth("bob@other.test").send("bob@other.test", []string{"x@remote.example"}, msg("ceo@example.com")),
		"550 5.7.1 not allowed to send From: example.com")

	// A local script through relay sendmail: its uid owns shop.example.
	if code, _, errs := relayCmd(t, d, msg("Shop <orders@shop.example>"), "sendmail", "--config", d.config, "-t"); code != 0 {
		t.Fatalf("relay sendmail: %d %s", code, errs)
	}
	q = d.queued()
	if sigs := dkimtest.Verify(t, q[len(q)-1].Message, recs); len(sigs) != 1 || sigs[0].Domain != "shop.example" {
		t.Fatalf("sendmail: %+v", sigs)
	}
	if len(q) != 2 {
		t.Fatalf("%d messages reached qmail-queue, want 2", len(q))
	}

	code, out, errs := ctlRun(t, d, "dkim")
	if code != 0 || !regexp.MustCompile(`(?m)^example\.com +ed1 \(ed25519\), rsa1 \(rsa 2048\) +1 .*unowned_from 1`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^bank\.example .*dmarc_reject 1`).MatchString(out) {
		t.Errorf("relay ctl dkim: %d\n%s%s", code, out, errs)
	}
	_, body := d.api("GET", "/api/dkim")
	r := decodeJSON[admin.DKIMReport](t, body)
	if len(r.Keys) != 3 || r.UnownedFrom != "reject" {
		t.Errorf("/api/dkim: %s", body)
	}
	series := scrape(t, d)
	if v, _ := sum(series, "relay_dkim_signed_total", map[string]string{"domain": "example.com"}); v != 1 {
		t.Errorf("dkim_signed_total{domain=example.com} = %v", v)
	}
	if v, _ := sum(series, "relay_dkim_refused_total", map[string]string{"reason": "dmarc_reject"}); v != 1 {
		t.Errorf("dkim_refused_total{reason=dmarc_reject} = %v", v)
	}

	// A key that does not load: check-config names it, a reload keeps the
	// running keys, a restart refuses to start.
	bad := filepath.Join(keys, "example.com", "broken.key")
	os.WriteFile(bad, []byte("not a key\n"), 0o600)
	if code, _, errs := relayCmd(t, d, "", "check-config", "--config", d.config); code != 1 || !strings.Contains(errs, bad) {
		t.Errorf("check-config: %d %q", code, errs)
	}
	d.signal(syscall.SIGHUP)
	d.waitLog("reload failed")
	mustPrefix(t, "after a failed reload", c.send("alice@example.com", []string{"x@remote.example"}, msg("alice@example.com")), "250 ok ")
	q = d.queued()
	if sigs := dkimtest.Verify(t, q[len(q)-1].Message, recs); len(sigs) != 2 {
		t.Fatalf("after a failed reload: %d signatures", len(sigs))
	}
	d.stop()
	if err := d.tryStart(); err == nil || !strings.Contains(d.logs(), bad) {
		t.Fatalf("started with a bad key (%v):\n%s", err, d.logs())
	}
}

// TestDKIMHoldListedInAPI: unowned_from and foreign_dmarc = "hold" answer
// 250, hand nothing to qmail-queue and list the message in /api/held.
func TestDKIMHoldListedInAPI(t *testing.T) {
	dns := dnstest.New(t)
	dns.SetTXT("_dmarc.bank.example", "v=DMARC1; p=quarantine")
	keys := filepath.Join(t.TempDir(), "keys")
	os.Mkdir(keys, 0o700)
	d := newDaemon(t, daemonOpts{
		dkim: fmt.Sprintf("[dkim]\nkeys_dir = %q\ndns = %q\nunowned_from = \"hold\"\nforeign_dmarc = \"hold\"\n", keys, dns.Addr),
	})
	if code, _, errs := relayCmd(t, d, "", "dkim", "keygen", "--config", d.config, "--domain", "example.com", "--selector", "s1", "--algo", "ed25519"); code != 0 {
		t.Fatal(errs)
	}
	d.signal(syscall.SIGHUP)
	d.waitLog("config reloaded")
	c := dialSMTP(t, d.smtp) // a relay network: ip:127.0.0.1 owns nothing
	c.expect("EHLO client.example", "250")
	for _, from := range []string{"ceo@example.com", "x@bank.example"} {
		mustPrefix(t, from, c.send("someone@example.net", []string{"x@remote.example"}, "From: "+from+"\nSubject: s\n\nb\n"), "250 ok held ")
	}
	if q := d.queued(); len(q) != 0 {
		t.Fatalf("%d messages reached qmail-queue", len(q))
	}
	_, body := d.api("GET", "/api/held")
	held := decodeJSON[[]admin.HeldSummary](t, body)
	if len(held) != 2 || !strings.Contains(body, "not allowed to send From: example.com") || !strings.Contains(body, "bank.example has DMARC p=quarantine") {
		t.Fatalf("/api/held: %s", body)
	}
}
