package admin

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"relay/dkim"
)

type fakeDKIM struct{ r dkim.Report }

func (f fakeDKIM) DKIMReport() dkim.Report { return f.r }

func testDKIMReport() dkim.Report {
	return dkim.Report{
		Since: time.Date(2026, 1, 1, 9, 0, 0, 0, time.UTC), UnownedFrom: "hold", ForeignDMARC: "reject", DMARCCached: 7,
		Keys: []dkim.KeyInfo{
			{Domain: "example.com", Selector: "ed1", Algo: "ed25519", Bits: 256},
			{Domain: "example.com", Selector: "rsa1", Algo: "rsa", Bits: 2048},
		},
		Domains: []dkim.DomainStats{
			{Domain: "example.com", Signed: 41, Unsigned: map[string]int64{"relay_qq": 3, "unowned_from": 0}, Held: map[string]int64{"unowned_from": 2}, Refused: map[string]int64{}},
			{Domain: "bank.example", Unsigned: map[string]int64{}, Held: map[string]int64{}, Refused: map[string]int64{"dmarc_reject": 5}},
		},
	}
}

func TestDKIMOnPageAPIAndCtl(t *testing.T) {
	f := newFixture(t)
	f.srv.opts.DKIM = fakeDKIM{testDKIMReport()}

	code, body := f.api(t, "GET", "/api/dkim", nil)
	r := decode[dkim.Report](t, body)
	if code != 200 || len(r.Domains) != 2 || r.Domains[0].Signed != 41 || r.Domains[1].Refused["dmarc_reject"] != 5 || r.Keys[1].Bits != 2048 {
		t.Fatalf("%d %s", code, body)
	}

	_, page := f.do(t, req{method: "GET", path: "/", bearer: testToken})
	section, _, _ := strings.Cut(page[strings.Index(page, `<section id="dkim">`):], "</section>")
	for _, want := range []string{
		`<tr data-domain="example.com"><td>example.com</td><td>ed1 (ed25519), rsa1 (rsa 2048)</td><td class="num">41</td><td>relay_qq 3</td><td>unowned_from 2</td>`,
		`<tr data-domain="bank.example"><td>bank.example</td><td><span class="muted">none: not ours</span></td><td class="num">0</td><td></td><td></td><td>dmarc_reject 5</td>`,
		"unowned_from = hold, foreign_dmarc = reject; 7 domains in the DMARC cache",
	} {
		if !strings.Contains(section, want) {
			t.Errorf("DKIM section lacks %q:\n%s", want, section)
		}
	}

	c := &Client{BaseURL: f.ts.URL, Token: testToken, HTTP: f.ts.Client()}
	got, err := c.DKIM(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := WriteDKIM(&out, got); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"DOMAIN", "example.com   ed1 (ed25519), rsa1 (rsa 2048)  41", "relay_qq 3", "dmarc_reject 5", "foreign_dmarc = reject"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

func TestDKIMWithoutSource(t *testing.T) {
	f := newFixture(t)
	code, body := f.api(t, "GET", "/api/dkim", nil)
	if code != 200 || !strings.Contains(body, `"domains":[]`) {
		t.Fatalf("%d %s", code, body)
	}
	_, page := f.do(t, req{method: "GET", path: "/", bearer: testToken})
	if !strings.Contains(page, "No DKIM keys and nothing refused") {
		t.Error("empty DKIM section missing")
	}
}
