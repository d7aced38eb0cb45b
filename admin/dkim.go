package admin

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"

	"relay/dkim"
)

// DKIMReport is what DKIM signing and From: control did (docs/design.md §11).
type DKIMReport = dkim.Report

// DKIM is where the admin reads it from (*relay.Server).
type DKIM interface {
	DKIMReport() dkim.Report
}

// dkimReport is the report, an empty one without a DKIM source.
func (s *Server) dkimReport() DKIMReport {
	if s.opts.DKIM == nil {
		return DKIMReport{Keys: []dkim.KeyInfo{}, Domains: []dkim.DomainStats{}}
	}
	return s.opts.DKIM.DKIMReport()
}

// getDKIM is GET /api/dkim.
func (s *Server) getDKIM(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.dkimReport())
}

// DKIM fetches GET /api/dkim.
func (c *Client) DKIM(ctx context.Context) (DKIMReport, error) {
	var r DKIMReport
	err := c.getJSON(ctx, http.MethodGet, "/api/dkim", nil, &r)
	return r, err
}

// dkimRow is one domain on the page and in relay ctl.
type dkimRow struct {
	Domain                    string
	Keys                      string // "ed1 (ed25519), rsa1 (rsa 2048)"; "" for a domain without keys
	Signed                    int64
	Unsigned, Held, Refused   string // "unowned_from 3, relay_qq 1"
	UnsignedN, HeldN, RefuseN int64
}

// dkimRows lays the report out per domain.
func dkimRows(r DKIMReport) []dkimRow {
	keys := map[string][]string{}
	for _, k := range r.Keys {
		desc := k.Selector + " (" + k.Algo
		if k.Algo == dkim.AlgoRSA {
			desc += fmt.Sprintf(" %d", k.Bits)
		}
		keys[k.Domain] = append(keys[k.Domain], desc+")")
	}
	rows := make([]dkimRow, 0, len(r.Domains))
	for _, d := range r.Domains {
		row := dkimRow{Domain: d.Domain, Keys: strings.Join(keys[d.Domain], ", "), Signed: d.Signed}
		row.Unsigned, row.UnsignedN = reasons(d.Unsigned)
		row.Held, row.HeldN = reasons(d.Held)
		row.Refused, row.RefuseN = reasons(d.Refused)
		rows = append(rows, row)
	}
	return rows
}

// reasons writes "reason n, reason n" (by reason) and the total.
func reasons(m map[string]int64) (string, int64) {
	var parts []string
	var total int64
	for _, r := range slices.Sorted(maps.Keys(m)) {
		if m[r] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", r, m[r]))
			total += m[r]
		}
	}
	return strings.Join(parts, ", "), total
}

// WriteDKIM writes the report as a table (relay ctl dkim).
func WriteDKIM(w io.Writer, r DKIMReport) error {
	tw := newTable(w)
	row(tw, "DOMAIN", "KEYS", "SIGNED", "UNSIGNED", "HELD", "REFUSED")
	for _, d := range dkimRows(r) {
		row(tw, d.Domain, d.Keys, fmt.Sprint(d.Signed), d.Unsigned, d.Held, d.Refused)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "counted since %s; unowned_from = %s, foreign_dmarc = %s; %d domains in the DMARC cache\n",
		fmtTime(r.Since), clean(r.UnownedFrom), clean(r.ForeignDMARC), r.DMARCCached)
	return err
}
