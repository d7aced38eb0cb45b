package main

import (
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"relay/config"
	"relay/local"
)

// runQQ is relay qq, the stand-in for /var/qmail/bin/qmail-queue: the
// message on fd 0, the envelope on fd 1 (stdout is not written). A config
// that cannot be read exits 55, qmail-queue's "unable to read
// configuration", which every qmail caller treats as temporary.
func runQQ(args []string, stdout, stderr io.Writer) int {
	path, rest, _ := configPath(args)
	if len(rest) > 0 {
		fmt.Fprintf(stderr, "relay qq: takes no arguments (got %q)\n", rest)
		return local.ExitBadEnvelope
	}
	cfg, err := config.LoadFile(path)
	if err != nil {
		fmt.Fprintf(stderr, "relay qq: %v\n", err)
		return local.ExitConfigError
	}
	qq, err := local.NewQQ(cfg, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "relay qq: %s: %v\n", path, err)
		return local.ExitConfigError
	}
	// notqmail callers open fd 6 for qmail-queue's error text (exit 82).
	if _, err := unix.FcntlInt(6, unix.F_GETFD, 0); err == nil {
		qq.ErrFD = os.NewFile(6, "qq-errors")
	}
	return qq.Main()
}
