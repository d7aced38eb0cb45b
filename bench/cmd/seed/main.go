// Command seed fills a relay data_dir's counters store with many identities
// before the daemon starts, so benchmarks run against a realistic table. It
// drives the policy engine itself (package relay/policy) on data_dir's
// relay.db under the same config the daemon will read, charging one message
// with one recipient to each identity, then flushes and exits.
//
// The senders and uids are the ones bench/cmd/loadgen sends as, so a load
// run finds its identities already in the table:
//
//	seed --config relay.toml -senders 90000 -domains 1000 -uids 9000 -webserver web1
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"relay/bench/loadgen"
	"relay/config"
	"relay/policy"
)

func main() {
	path := flag.String("config", "", "relay config `file` (its data_dir is seeded; required)")
	senders := flag.Int("senders", 90000, "distinct envelope senders (each also adds its domain)")
	domains := flag.Int("domains", 1000, "sender domains the senders are spread over")
	uids := flag.Int("uids", 9000, "web-server uids (uid:<webserver>:<uid>)")
	webserver := flag.String("webserver", "web1", "web server name of the uids")
	flag.Parse()
	if *path == "" {
		fmt.Fprintln(os.Stderr, "seed: --config is required")
		os.Exit(64)
	}
	if err := seed(*path, *senders, max(*domains, 1), *uids, *webserver); err != nil {
		fmt.Fprintln(os.Stderr, "seed:", err)
		os.Exit(1)
	}
}

func seed(path string, senders, domains, uids int, webserver string) error {
	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	db, err := policy.OpenDB(cfg.DataDir)
	if err != nil {
		return err
	}
	defer db.Close()
	eng, err := policy.New(db, cfg, policy.Options{FlushInterval: time.Hour})
	if err != nil {
		return err
	}
	start := time.Now()
	charge := func(ids ...policy.Identity) error {
		tx := eng.Begin(ids)
		for _, d := range []policy.Decision{tx.Check(), tx.AddRcpt("rcpt@example.net"), tx.Message()} {
			if d.Action != policy.Accept {
				tx.Abort()
				return fmt.Errorf("%v over its cap while seeding (%s): raise the config's limits", ids, d.Limit)
			}
		}
		tx.Commit()
		return nil
	}
	for k := range senders {
		addr := loadgen.SenderAddr(k, domains)
		ids := []policy.Identity{policy.SenderID(addr)}
		if d, ok := policy.DomainID(addr); ok {
			ids = append(ids, d)
		}
		if err := charge(ids...); err != nil {
			return err
		}
	}
	for k := range uids {
		if err := charge(policy.WebUID(webserver, uint32(loadgen.FirstUID+k), "", "")); err != nil {
			return err
		}
	}
	if err := eng.Close(); err != nil {
		return err
	}
	total := senders + min(senders, domains) + uids
	fmt.Printf("seeded %d identities (%d senders, %d domains, %d uids) in %s\n",
		total, senders, min(senders, domains), uids, time.Since(start).Round(time.Millisecond))
	return nil
}
