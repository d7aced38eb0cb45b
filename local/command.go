package local

import (
	"fmt"
	"io"
	"os"

	"relay/config"
)

// QQCommand is relay qq, the stand-in for /var/qmail/bin/qmail-queue: the
// message on fd 0, the envelope on fd 1 (stdout is not written). args may
// start with --config FILE. A config that cannot be read exits 55,
// qmail-queue's "unable to read configuration", which every qmail caller
// treats as temporary.
func QQCommand(args []string, stderr io.Writer) int {
	path, rest, err := configPathFor(args)
	if err != nil {
		fmt.Fprintf(stderr, "relay qq: %v\n", err)
		return ExitConfigError
	}
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
	// A setgid qq does not let the caller choose where a large message is
	// spooled.
	if os.Getegid() != os.Getgid() {
		qq.TempDir = "/tmp"
	}
	// notqmail callers' fd 6 (qmail-queue's error text for exit 82) is
	// left alone: Main execs the real qmail-queue, which inherits it. An
	// *os.File for it would close it when collected.
	return qq.Main()
}

// SendmailCommand is relay sendmail, the drop-in for /usr/sbin/sendmail:
// sendmail's flags in args (after an optional --config FILE), the message
// on stdin, sendmail's exit codes (sysexits.h).
func SendmailCommand(args []string, stdin io.Reader, stderr io.Writer) int {
	path, rest, err := configPathFor(args)
	if err != nil {
		fmt.Fprintf(stderr, "relay sendmail: %v\n", err)
		return ExConfig
	}
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

// secureConfigPath is the one config read when relay qq runs setgid (the
// README's "closing the back door": only that group may run the real
// qmail-queue). A caller must not pick a config of its own then: its socket
// or on_daemon_down would send mail past the daemon. Tests set it at link
// time (-ldflags -X); nothing changes it at run time.
var secureConfigPath = config.DefaultPath

// configPathFor is config.PathFromArgs, except that a setgid process takes
// secureConfigPath whatever --config or $RELAY_CONFIG say, and a setuid one
// refuses to run: the daemon counts the uid the kernel reports for the
// socket, which is the effective one, so a setuid qq would make every user
// look like its owner.
func configPathFor(args []string) (path string, rest []string, err error) {
	path, rest, _ = config.PathFromArgs(args)
	if os.Geteuid() != os.Getuid() {
		return "", nil, fmt.Errorf("must not run setuid (uid %d, effective %d): the daemon would count every caller as %d; install it setgid or plain", os.Getuid(), os.Geteuid(), os.Geteuid())
	}
	if os.Getegid() != os.Getgid() {
		path = secureConfigPath
	}
	return path, rest, nil
}
