package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"relay/config"
	"relay/dkim"
)

const dkimUsage = `usage: relay dkim [--config FILE] COMMAND

commands:
  keygen --domain D --selector S [--algo rsa|ed25519]
                 write <keys_dir>/D/S.key (0600; never over an existing one)
                 and print the DNS record to publish
  dns --domain D print the TXT record of every key of D, one zone-file line each
  check --domain D
                 look the records up and say whether DNS matches each key
                 (exit 0 only when all do)

--config may also follow COMMAND. keys_dir, and dns (the resolver of
check), come from the [dkim] section.
`

// checkTimeout bounds `relay dkim check`'s lookups, one key at a time.
const checkTimeout = 10 * time.Second

func runDKIM(args []string, stdout, stderr io.Writer) int {
	path, rest, _ := config.PathFromArgs(args)
	if len(rest) == 0 {
		fmt.Fprint(stderr, dkimUsage)
		return exitUsage
	}
	cmd := rest[0]
	fs := flag.NewFlagSet("relay dkim "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&path, "config", path, "")
	domain := fs.String("domain", "", "")
	selector := fs.String("selector", "", "")
	algo := fs.String("algo", dkim.AlgoRSA, "")
	if err := fs.Parse(rest[1:]); err != nil || fs.NArg() > 0 || *domain == "" {
		switch {
		case err != nil:
			fmt.Fprintf(stderr, "relay dkim %s: %v\n\n", cmd, err)
		case fs.NArg() > 0:
			fmt.Fprintf(stderr, "relay dkim %s: unexpected %q\n\n", cmd, fs.Arg(0))
		default:
			fmt.Fprintf(stderr, "relay dkim %s: --domain is needed\n\n", cmd)
		}
		fmt.Fprint(stderr, dkimUsage)
		return exitUsage
	}
	d := strings.ToLower(strings.TrimSuffix(*domain, "."))
	if cmd != "keygen" && (*selector != "" || *algo != dkim.AlgoRSA) {
		fmt.Fprintf(stderr, "relay dkim %s: --selector and --algo are keygen's\n\n%s", cmd, dkimUsage)
		return exitUsage
	}
	switch cmd {
	case "keygen", "dns", "check":
	default:
		fmt.Fprintf(stderr, "relay dkim: unknown command %q\n\n%s", cmd, dkimUsage)
		return exitUsage
	}
	// The TOML alone: keygen works before the rest of the setup is there.
	cfg, err := config.LoadFile(path)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitConfig
	}
	if cmd == "keygen" {
		if *selector == "" {
			fmt.Fprintf(stderr, "relay dkim keygen: --selector is needed\n\n%s", dkimUsage)
			return exitUsage
		}
		k, err := dkim.GenerateKey(cfg.DKIM.KeysDir, d, *selector, *algo)
		if err != nil {
			fmt.Fprintf(stderr, "relay dkim keygen: %v\n", err)
			return exitFailed
		}
		fmt.Fprintln(stdout, k.ZoneLine())
		fmt.Fprintf(stderr, "wrote %s (mode 0600): make it readable by the user relay runs as, publish the record above, "+
			"then `relay dkim check --domain %s` and reload relay\n", k.Path, d)
		return exitOK
	}
	keys, err := dkim.LoadKeys(cfg.DKIM.KeysDir)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitFailed
	}
	if len(keys[d]) == 0 {
		fmt.Fprintf(stderr, "relay dkim %s: no keys for %s in %q\n", cmd, d, cfg.DKIM.KeysDir)
		return exitFailed
	}
	if cmd == "dns" {
		for _, k := range keys[d] {
			fmt.Fprintln(stdout, k.ZoneLine())
		}
		return exitOK
	}
	resolver := dkim.NewResolver(cfg.DKIM.DNS)
	code := exitOK
	for _, k := range keys[d] {
		ctx, cancel := context.WithTimeout(context.Background(), checkTimeout)
		err := dkim.CheckDNS(ctx, resolver, k)
		cancel()
		if err != nil {
			fmt.Fprintf(stdout, "%s: %v\n", k.Name(), err)
			code = exitFailed
			continue
		}
		fmt.Fprintf(stdout, "%s: ok (%s, matches %s)\n", k.Name(), k.Algo, k.Path)
	}
	return code
}
