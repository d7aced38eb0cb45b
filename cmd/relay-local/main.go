// Command relay-local is the small build of `relay qq` and `relay
// sendmail`: the same code as the relay binary's, without the daemon, so a
// process started for every locally injected message loads a quarter of
// the program. Install it as /var/qmail/bin/qmail-queue or /usr/sbin/sendmail
// (symlinks named qmail-queue or sendmail), or call it as
// `relay-local qq ...` / `relay-local sendmail ...`.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"relay/local"
)

func main() {
	name, args := filepath.Base(os.Args[0]), os.Args[1:]
	if name != "qmail-queue" && name != "sendmail" && len(args) > 0 {
		name, args = args[0], args[1:]
	}
	switch name {
	case "qmail-queue", "qq":
		os.Exit(local.QQCommand(args, os.Stderr))
	case "sendmail":
		os.Exit(local.SendmailCommand(args, os.Stdin, os.Stderr))
	}
	fmt.Fprintln(os.Stderr, "usage: relay-local qq|sendmail [--config FILE] [args] (or run it as qmail-queue or sendmail)")
	os.Exit(64)
}
