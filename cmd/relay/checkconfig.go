package main

import (
	"fmt"
	"io"

	"relay/config"
	"relay/dkim"
)

// runCheckConfig loads the config with every external file it names and
// prints each problem as file:line:col: key: message (exit 1); then the
// DKIM keys, each bad one named by its file (exit 1); and each warning (a
// setting that can never work as written, which relay serve also logs) as
// "warning: file:line:col: key: message" (exit 0).
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
	for _, w := range cfg.Warnings {
		fmt.Fprintf(stderr, "warning: %v\n", w)
	}
	if n := len(cfg.Warnings); n > 0 {
		fmt.Fprintf(stdout, "%s: ok, with %d warning(s)\n", path, n)
		return 0
	}
	fmt.Fprintf(stdout, "%s: ok\n", path)
	return 0
}
