package local

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"relay/dkim"
	"relay/internal/dkimtest"
	"relay/internal/fakeqq"
)

// dkimDaemon is the real daemon signing for shop.example (an Ed25519 and
// an RSA key; our uid owns it) and other.example (one Ed25519 key; owned
// by a uid that is not ours, so our mail From: it goes unsigned), and the
// DNS records of its keys.
func dkimDaemon(t *testing.T) (*realDaemon, map[string]string) {
	t.Helper()
	keys := filepath.Join(worldDir(t), "keys")
	for _, k := range [][3]string{{"shop.example", "ed1", dkim.AlgoEd25519}, {"shop.example", "rsa1", dkim.AlgoRSA}, {"other.example", "ed1", dkim.AlgoEd25519}} {
		if _, err := dkim.GenerateKey(keys, k[0], k[1], k[2]); err != nil {
			t.Fatal(err)
		}
	}
	loaded, err := dkim.LoadKeys(keys)
	if err != nil {
		t.Fatal(err)
	}
	records := map[string]string{}
	for _, ks := range loaded {
		for _, k := range ks {
			records[k.Name()] = k.Record()
		}
	}
	d := startRealDaemon(t, fmt.Sprintf(`[dkim]
keys_dir = %q
foreign_dmarc = "accept" # no DNS lookups outside loopback

[[dkim.domain]]
name = "shop.example"
owners = ["uid:local:%d"]

[[dkim.domain]]
name = "other.example"
owners = ["uid:local:4000000000"]
`, keys, os.Getuid()))
	return d, records
}

// dkimReport is GET /api/dkim's per-domain rows.
func (d *realDaemon) dkimReport(t *testing.T) map[string]dkim.DomainStats {
	t.Helper()
	code, body := d.get(t, "/api/dkim")
	var r dkim.Report
	if err := json.Unmarshal([]byte(body), &r); code != 200 || err != nil {
		t.Fatalf("GET /api/dkim: %d %v %s", code, err, body)
	}
	rows := map[string]dkim.DomainStats{}
	for _, s := range r.Domains {
		rows[s.Domain] = s
	}
	return rows
}

// relay qq, both builds, against the real daemon: the owner's mail reaches
// the real qmail-queue with two DKIM-Signature fields on top, which
// go-msgauth and python3-dkim verify, as stored (under qmail-queue's own
// Received line) and as sent; a 2 MB message (through both builds' spool
// files and the daemon's streaming signer) too; mail From: a domain our
// uid does not own passes unsigned, unchanged. The page's tally counts
// what was signed.
func TestQQSignedByRealDaemon(t *testing.T) {
	d, records := dkimDaemon(t)
	settings := filepath.Join(d.dir, "data", SettingsFile)
	small := []byte("From: Shop <orders@shop.example>\nTo: <b@example.net>\nSubject: your order\n" +
		"Message-ID: <1@shop.example>\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n" +
		"Gr\xc3\xbc\xc3\x9fe,   thank you.  \n.leading dot\n\n\n")
	var big bytes.Buffer
	big.WriteString("From: orders@shop.example\nSubject: catalogue\n\n")
	for i := 0; big.Len() < 2<<20; i++ {
		fmt.Fprintf(&big, "line %d of the catalogue, \xe9t\xe9 2026  \n", i)
	}
	notOurs := []byte("From: someone@other.example\nSubject: hi\n\nhello\n")
	builds := map[string]string{"relay qq": d.bin, "relay-qq": testCQQ(t).bin}
	for name, bin := range builds {
		t.Run(name, func(t *testing.T) {
			calls, tmp := worldDir(t), worldDir(t)
			run := func(msg []byte) {
				t.Helper()
				cmd := exec.Command(bin)
				cmd.Env = append(os.Environ(), "FAKEQQ_DIR="+calls, "RELAY_QQ_SETTINGS="+settings, "RELAY_CONFIG=/nonexistent/relay.toml", "TMPDIR="+tmp)
				if bin == d.bin {
					cmd.Args = []string{bin, "qq", "--config", d.config}
				}
				if code, _, stderr := runProcess(t, cmd, msg, testEnvelope); code != 0 {
					t.Fatalf("exit %d; stderr %s", code, stderr)
				}
			}
			run(small)
			run(big.Bytes())
			run(notOurs)
			got := fakeqq.Calls(t, calls)
			if len(got) != 3 {
				t.Fatalf("%d calls of the real qmail-queue, want 3", len(got))
			}
			for i, msg := range [][]byte{small, big.Bytes()} {
				queued := got[i].Message
				if !bytes.HasPrefix(queued, []byte("DKIM-Signature: ")) || !bytes.HasSuffix(queued, msg) {
					t.Fatalf("message %d reached qmail-queue as\n%.600s", i, queued)
				}
				sigs := dkimtest.Verify(t, queued, records)
				if len(sigs) != 2 || sigs[0].Domain != "shop.example" || sigs[1].Domain != "shop.example" {
					t.Fatalf("message %d: %+v", i, sigs)
				}
				// As qmail-queue stores it, its own line on top.
				stored := append([]byte("Received: (qmail 4242 invoked by uid 1001); 28 Nov 2026 02:41:53 -0000\n"), queued...)
				if len(dkimtest.Verify(t, stored, records)) != 2 {
					t.Fatalf("message %d under qmail-queue's Received line", i)
				}
			}
			if !bytes.Equal(got[2].Message, notOurs) {
				t.Fatalf("mail From: a domain our uid does not own changed:\n%s", got[2].Message)
			}
			if left, _ := os.ReadDir(tmp); len(left) != 0 {
				t.Errorf("spool left %d files behind", len(left))
			}
		})
	}
	want := int64(2 * len(builds))
	var rows map[string]dkim.DomainStats
	if !waitFor(5*time.Second, nil, func() bool {
		rows = d.dkimReport(t)
		return rows["shop.example"].Signed == want && rows["other.example"].Unsigned[dkim.ReasonUnownedFrom] == want/2
	}) {
		t.Errorf("tally %+v, want shop.example signed %d, other.example unsigned unowned_from %d", rows, want, want/2)
	}
}

// PHP's mail() on the mail server, the main local path: php runs qmail's
// own sendmail, which runs qmail-inject, which hands the message to
// qmail-queue (relay-qq, through $QMAILQUEUE as notqmail allows), which
// asks the real daemon. With php.ini's mail.mixed_lf_and_crlf = On the
// message qmail-inject completed is signed; without it PHP 8 writes CRLF
// header lines, qmail-inject keeps some of the CRs, and the message goes
// unsigned (bare_cr on the page) rather than with a signature verifiers
// disagree on. Needs php-cli and real qmail in /var/qmail (.ci/run
// installs both).
func TestPHPMailThroughQmailInjectSigned(t *testing.T) {
	php, err := exec.LookPath("php")
	if err != nil {
		t.Skip("php-cli not installed")
	}
	sendmail := "/var/qmail/bin/sendmail"
	if _, err := os.Stat("/var/qmail/bin/qmail-inject"); err != nil {
		t.Skip("real qmail is not installed in /var/qmail")
	}
	d, records := dkimDaemon(t)
	script := filepath.Join(d.dir, "order.php")
	os.WriteFile(script, []byte(`<?php
exit(mail("customer@example.net", "your order", "thank you\n", "From: Shop <orders@shop.example>") ? 0 : 1);
`), 0o644)
	mail := func(ini ...string) []byte {
		t.Helper()
		calls := worldDir(t)
		args := append([]string{"-n", "-d", "sendmail_path=" + sendmail + " -t -i", "-d", "mail.add_x_header=1"}, ini...)
		cmd := exec.Command(php, append(args, script)...)
		cmd.Env = append(os.Environ(), "QMAILQUEUE="+testCQQ(t).bin, "FAKEQQ_DIR="+calls,
			"RELAY_QQ_SETTINGS="+filepath.Join(d.dir, "data", SettingsFile), "RELAY_CONFIG=/nonexistent/relay.toml")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("php mail() failed: %v\n%s", err, out)
		}
		got := fakeqq.Calls(t, calls)
		if len(got) != 1 {
			t.Fatalf("%d calls of the real qmail-queue, want 1", len(got))
		}
		return got[0].Message
	}

	msg := mail("-d", "mail.mixed_lf_and_crlf=On")
	// qmail-inject completed the header (Date, Message-ID) before relay-qq
	// saw it; the signatures cover them.
	if !bytes.HasPrefix(msg, []byte("DKIM-Signature: ")) || !bytes.Contains(msg, []byte("\nMessage-ID: ")) || !bytes.Contains(msg, []byte("X-PHP-Originating-Script: ")) {
		t.Fatalf("qmail-queue got\n%s", msg)
	}
	if sigs := dkimtest.Verify(t, msg, records); len(sigs) != 2 {
		t.Fatalf("%+v", sigs)
	}
	id := regexp.MustCompile(`\nMessage-ID: <[^>]*>`).Find(msg)
	forged := bytes.Replace(msg, id, []byte("\nMessage-ID: <forged@shop.example>"), 1)
	for i, r := range dkimtest.Check(t, forged, records) {
		if r.Go == nil {
			t.Errorf("signature %d still verifies with another Message-ID", i)
		}
	}

	if msg := mail(); bytes.Contains(msg, []byte("DKIM-Signature:")) || !bytes.Contains(msg, []byte("\r\n")) {
		t.Fatalf("PHP's CRLF mail reached qmail-queue as\n%q", msg)
	}
	var rows map[string]dkim.DomainStats
	if !waitFor(5*time.Second, nil, func() bool {
		rows = d.dkimReport(t)
		return rows["shop.example"].Signed == 1 && rows["shop.example"].Unsigned[dkim.ReasonBareCR] == 1
	}) {
		t.Errorf("tally %+v, want shop.example signed 1, unsigned bare_cr 1", rows)
	}
}
