// Command relay is the qmail front end that stops a hosting server from
// sending spam. See the README for what each subcommand does.
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
)

const usage = `usage: relay <command> [--config FILE] [args]

commands:
  serve          run the SMTP front end, policy and admin API
  check-config   validate a config file and report every problem
  sendmail       sendmail/qmail-inject drop-in for local scripts
  qq             qmail-queue drop-in filter for local injection
  ctl            drive the admin API from a shell
  qmail-queue    list who is in qmail's queue right now
  scan           list processes talking SMTP (run on a web server)
  dkim           DKIM keys: keygen, dns (records to publish), check (against DNS)
  doctor         check this server's installation, read-only, and say what to fix
  queue-writer   write qmail's queue for delivery method qmail-direct
                 (relay serve runs it; not for use by hand)

--config defaults to $RELAY_CONFIG, then /etc/relay/relay.toml.
Invoked as "sendmail" or "qmail-queue" (a symlink), relay acts as
"relay sendmail" or "relay qq".
`

func main() {
	os.Exit(dispatch(os.Args, os.Stdout, os.Stderr))
}

func dispatch(argv []string, stdout, stderr io.Writer) int {
	switch filepath.Base(argv[0]) {
	case "sendmail":
		return runSendmail(argv[1:], stdout, stderr)
	case "qmail-queue":
		return runQQ(argv[1:], stdout, stderr)
	}
	if len(argv) < 2 {
		fmt.Fprint(stderr, usage)
		return 64
	}
	cmd, args := argv[1], argv[2:]
	switch cmd {
	case "serve":
		return runServe(args, stdout, stderr)
	case "check-config":
		return runCheckConfig(args, stdout, stderr)
	case "sendmail":
		return runSendmail(args, stdout, stderr)
	case "qq":
		return runQQ(args, stdout, stderr)
	case "ctl":
		return runCtl(args, stdout, stderr)
	case "qmail-queue":
		return runQmailQueue(args, stdout, stderr)
	case "scan":
		return runScan(args, stdout, stderr)
	case "dkim":
		return runDKIM(args, stdout, stderr)
	case "doctor":
		return runDoctor(args, stdout, stderr)
	case "queue-writer":
		return runQueueWriter(args, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "relay: unknown command %q\n\n%s", cmd, usage)
	return 64
}
