package dkim

import (
	"crypto"
	"fmt"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"relay/config"
)

func TestStats(t *testing.T) {
	reg := prometheus.NewRegistry()
	st, err := NewStats(reg, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := testSet(t, config.DKIM{}, map[string]crypto.Signer{"s1@example.com": ed25519Key(), "s1@quiet.example": ed25519Key()})
	st.Record("example.com", OutcomeSigned, "")
	st.Record("example.com", OutcomeSigned, "")
	st.Record("example.com", OutcomeUnsigned, ReasonUnownedFrom)
	st.Record("example.com", OutcomeRefused, ReasonUnownedFrom)
	st.Record("bank.example", OutcomeRefused, ReasonDMARCReject)
	st.Record("", OutcomeUnsigned, "") // nothing to count
	for i := range maxTallyDomains + 5 {
		st.Record(fmt.Sprintf("f%d.example", i), OutcomeHeld, ReasonDMARCQuarantine)
	}
	st.Record("example.org", OutcomeSigned, "") // a signing domain always gets its row
	r := st.Report(s, nil)
	if len(r.Keys) != 2 || r.Domains[0].Domain != "example.com" || r.Domains[1].Domain != "example.org" && r.Domains[1].Domain != "quiet.example" {
		t.Fatalf("keys %v, first rows %v %v", r.Keys, r.Domains[0], r.Domains[1])
	}
	rows := map[string]DomainStats{}
	for _, d := range r.Domains {
		rows[d.Domain] = d
	}
	if d := rows["example.com"]; d.Signed != 2 || d.Unsigned[ReasonUnownedFrom] != 1 || d.Refused[ReasonUnownedFrom] != 1 {
		t.Errorf("example.com %+v", d)
	}
	if _, ok := rows["quiet.example"]; !ok {
		t.Error("a domain with keys and no mail has no row")
	}
	if rows[OtherDomains].Held[ReasonDMARCQuarantine] == 0 || len(r.Domains) > maxTallyDomains+3 {
		t.Errorf("%d rows; other %+v", len(r.Domains), rows[OtherDomains])
	}
	if rows["example.org"].Signed != 1 {
		t.Error("a signing domain past the bound lost its row")
	}
	want := `
# HELP relay_dkim_signed_total Messages signed, by signing domain.
# TYPE relay_dkim_signed_total counter
relay_dkim_signed_total{domain="example.com"} 2
relay_dkim_signed_total{domain="example.org"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "relay_dkim_signed_total"); err != nil {
		t.Error(err)
	}
	if v := testutil.ToFloat64(st.refused.WithLabelValues(ReasonDMARCReject)); v != 1 {
		t.Errorf("dkim_refused_total{reason=dmarc_reject} = %v", v)
	}
}
