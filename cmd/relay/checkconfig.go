package main

import (
	"fmt"
	"io"

	"relay/config"
)

// runCheckConfig loads the config with every external file it names and
// prints each problem as file:line:col: key: message.
func runCheckConfig(args []string, stdout, stderr io.Writer) int {
	path, rest, _ := config.PathFromArgs(args)
	if len(rest) > 0 {
		fmt.Fprintln(stderr, "usage: relay check-config [--config FILE]")
		return 64
	}
	if _, err := config.Load(path); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: ok\n", path)
	return 0
}
