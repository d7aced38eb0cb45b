package main

import (
	"fmt"
	"io"
)

func runCtl(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "relay: not implemented yet")
	return 70
}
