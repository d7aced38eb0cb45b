package main

import (
	"io"
	"os"

	"relay/local"
)

// runSendmail is relay sendmail (also run as a symlink named sendmail).
func runSendmail(args []string, stdout, stderr io.Writer) int {
	return local.SendmailCommand(args, os.Stdin, stderr)
}
