package doctor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"time"

	"relay/dkim"
)

// dnsTimeout bounds all of --dns's lookups together.
const dnsTimeout = 5 * time.Second

// checkDKIM: every key of [dkim] keys_dir loads (as the daemon loads
// them), the daemon may read it, and with --dns its record is published
// and matches (dkim.CheckDNS, what `relay dkim check` runs). One line per
// key.
func (r *run) checkDKIM() {
	dir := r.cfg.DKIM.KeysDir
	if dir == "" {
		r.ok("dkim", "no [dkim] keys_dir: relay signs nothing")
		return
	}
	keys, err := dkim.LoadKeys(dir)
	if err != nil {
		// LoadKeys formats the error it met (%v): tell it by its text.
		if !r.root() && (errors.Is(err, fs.ErrPermission) || strings.Contains(err.Error(), "permission denied")) {
			r.notChecked("dkim", fmt.Sprintf("%s cannot be read: %v", dir, err))
			return
		}
		r.add("dkim", Fail, "correct or remove each file named (relay dkim keygen --domain D --selector S writes a good one), then systemctl reload relay",
			"%s", strings.ReplaceAll(err.Error(), "\n", "; "))
		return
	}
	if len(keys) == 0 {
		domain := r.cfg.Hostname
		if len(r.cfg.DKIM.Domains) > 0 {
			domain = r.cfg.DKIM.Domains[0].Name
		}
		r.add("dkim", Warn, fmt.Sprintf("relay dkim keygen --domain %s --selector s%d (each domain you host), or delete [dkim] keys_dir from %s", domain, r.o.Now.Year(), r.o.Config),
			"%s holds no keys: relay signs nothing", dir)
		return
	}
	ctx, cancel := context.WithTimeout(r.ctx, dnsTimeout)
	defer cancel()
	resolver := dkim.NewResolver(r.cfg.DKIM.DNS)
	domains := make([]string, 0, len(keys))
	for d := range keys {
		domains = append(domains, d)
	}
	slices.Sort(domains)
	for _, d := range domains {
		for _, k := range keys[d] {
			var v verdict
			if c, who, ok := r.daemonCred(); ok {
				if err := c.reach(k.Path, 4); err != nil {
					v.bad(Fail, fmt.Sprintf("chown -R %s %s", userName(c.uid), dir), "%s cannot read %s (%v): relay will not start or reload with it", who, k.Path, err)
				}
			}
			if r.o.DNS {
				if err := dkim.CheckDNS(ctx, resolver, k); err != nil {
					// The record to publish goes in the fix, once.
					msg, _, _ := strings.Cut(err.Error(), "; publish: ")
					v.bad(Fail, fmt.Sprintf("publish %s (relay dkim dns --domain %s), then relay dkim check --domain %s", k.ZoneLine(), d, d), "%s", msg)
				} else {
					v.note("DNS matches")
				}
			} else {
				v.note("DNS not checked (relay doctor --dns)")
			}
			r.emit("dkim "+k.Name(), &v, fmt.Sprintf("%s loads (%s, %d bits)", k.Path, k.Algo, k.Bits))
		}
	}
}
