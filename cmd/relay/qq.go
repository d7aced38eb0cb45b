package main

import (
	"io"

	"relay/local"
)

// runQQ is relay qq (also run as a symlink named qmail-queue).
func runQQ(args []string, stdout, stderr io.Writer) int {
	return local.QQCommand(args, stderr)
}
