package local

import (
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"relay/config"
)

// QQCommand is relay qq, the stand-in for /var/qmail/bin/qmail-queue: the
// message on fd 0, the envelope on fd 1 (stdout is not written). args may
// start with --config FILE. A config that cannot be read exits 55,
// qmail-queue's "unable to read configuration", which every qmail caller
// treats as temporary.
func QQCommand(args []string, stderr io.Writer) int {
	path, rest, _ := config.PathFromArgs(args)
	if len(rest) > 0 {
		fmt.Fprintf(stderr, "relay qq: takes no arguments (got %q)\n", rest)
		return ExitBadEnvelope
	}
	cfg, err := config.LoadFile(path)
	if err != nil {
		fmt.Fprintf(stderr, "relay qq: %v\n", err)
		return ExitConfigError
	}
	qq, err := NewQQ(cfg, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "relay qq: %s: %v\n", path, err)
		return ExitConfigError
	}
	// notqmail callers open fd 6 for qmail-queue's error text (exit 82).
	if _, err := unix.FcntlInt(6, unix.F_GETFD, 0); err == nil {
		qq.ErrFD = os.NewFile(6, "qq-errors")
	}
	return qq.Main()
}

// SendmailCommand is relay sendmail, the drop-in for /usr/sbin/sendmail:
// sendmail's flags in args (after an optional --config FILE), the message
// on stdin, sendmail's exit codes (sysexits.h).
func SendmailCommand(args []string, stdin io.Reader, stderr io.Writer) int {
	path, rest, _ := config.PathFromArgs(args)
	parsed, err := ParseSendmailArgs(rest)
	if err != nil { // a *UsageError
		fmt.Fprintf(stderr, "relay sendmail: %v (usage: relay sendmail [--config FILE] [-t] [-i] [-f sender] [-F name] [--] [recipient ...])\n", err)
		return ExUsage
	}
	cfg, err := config.LoadFile(path)
	if err != nil {
		fmt.Fprintf(stderr, "relay sendmail: %v\n", err)
		return ExConfig
	}
	sm, err := NewSendmail(cfg, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "relay sendmail: %s: %v\n", path, err)
		return ExConfig
	}
	return sm.Run(parsed, stdin)
}
