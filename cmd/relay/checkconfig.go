package main

import (
	"fmt"
	"io"

	"relay/config"
	"relay/dkim"
)

// runCheckConfig loads the config with every external file it names and
// prints each problem as file:line:col: key: message; then the DKIM keys,
// each bad one named by its file.
func runCheckConfig(args []string, stdout, stderr io.Writer) int {
	path, rest, _ := config.PathFromArgs(args)
	if len(rest) > 0 {
		fmt.Fprintln(stderr, "usage: relay check-config [--config FILE]")
		return 64
	}
	cfg, err := config.Load(path)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if _, err := dkim.Load(cfg.DKIM); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: ok\n", path)
	return 0
}
