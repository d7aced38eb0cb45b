package main

import (
	"fmt"
	"io"
)

func runQmailQueue(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "relay: not implemented yet")
	return 70
}
