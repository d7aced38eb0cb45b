package main

import (
	"fmt"
	"io"
	"os"

	"relay/config"
	"relay/local"
)

// runSendmail is relay sendmail, the drop-in for /usr/sbin/sendmail: the
// message on stdin, sendmail's exit codes (sysexits.h).
func runSendmail(args []string, stdout, stderr io.Writer) int {
	path, rest, _ := configPath(args)
	parsed, err := local.ParseSendmailArgs(rest)
	if err != nil { // a *local.UsageError
		fmt.Fprintf(stderr, "relay sendmail: %v (usage: relay sendmail [--config FILE] [-t] [-i] [-f sender] [-F name] [--] [recipient ...])\n", err)
		return local.ExUsage
	}
	cfg, err := config.LoadFile(path)
	if err != nil {
		fmt.Fprintf(stderr, "relay sendmail: %v\n", err)
		return local.ExConfig
	}
	sm, err := local.NewSendmail(cfg, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "relay sendmail: %s: %v\n", path, err)
		return local.ExConfig
	}
	return sm.Run(parsed, os.Stdin)
}
