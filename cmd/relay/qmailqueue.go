package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"relay/config"
	"strconv"

	"relay/queue/inspect"
)

const qmailQueueUsage = `usage: relay qmail-queue [--queue DIR] [--from ADDR] [--uid N] [--ip A] [--json]
       relay qmail-queue [--queue DIR] [filters] --top N [--json]
       relay qmail-queue [--queue DIR] --received ID

Reads qmail's queue directly (never writes to it) and lists each message:
id, queue time, size, recipients left and done, sender, and its origin
from the Received lines. --top groups by origin and by sender.
Filters: --from ADDR (or @domain, or <>), --uid N, --ip ADDR or CIDR.
`

func runQmailQueue(args []string, stdout, stderr io.Writer) int {
	_, args, _ = config.PathFromArgs(args) // accepted for uniformity; not used
	fs := flag.NewFlagSet("relay qmail-queue", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, qmailQueueUsage); fs.PrintDefaults() }
	dir := fs.String("queue", inspect.DefaultDir, "qmail queue directory")
	passwd := fs.String("passwd", "/etc/passwd", "passwd file for uid -> account name")
	asJSON := fs.Bool("json", false, "print JSON instead of a table")
	top := fs.Int("top", 0, "list the `N` largest groups by origin and by sender")
	var filter inspect.Filter
	fs.StringVar(&filter.Sender, "from", "", "only messages from envelope sender `ADDR` (@domain for a domain, <> for bounces)")
	fs.Func("uid", "only messages injected by uid `N`", func(s string) error {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			return fmt.Errorf("not a uid: %q", s)
		}
		filter.UID = &n
		return nil
	})
	fs.Func("ip", "only messages from client `ADDR` or CIDR", func(s string) (err error) {
		filter.IP, err = inspect.ParsePrefix(s)
		return err
	})
	var received uint64
	var wantReceived bool
	fs.Func("received", "print the Received lines of message `ID`", func(s string) (err error) {
		received, err = strconv.ParseUint(s, 10, 64)
		wantReceived = true
		return err
	})
	if err := fs.Parse(args); err != nil {
		return 64
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "relay qmail-queue: unexpected argument %q\n", fs.Arg(0))
		return 64
	}

	accounts, err := config.ReadPasswdFile(*passwd)
	if err != nil {
		fmt.Fprintf(stderr, "relay qmail-queue: %v (account names not shown)\n", err)
	}
	r := &inspect.Reader{Dir: *dir, Accounts: accounts, Recipients: *asJSON && *top == 0}

	if wantReceived {
		lines, err := r.ReceivedLines(received)
		if err != nil {
			fmt.Fprintf(stderr, "relay qmail-queue: %v\n", err)
			return 1
		}
		if err := inspect.WriteReceived(stdout, lines); err != nil {
			return 1
		}
		return 0
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	msgs, st, err := r.Read(ctx, filter.Match)
	if err != nil {
		fmt.Fprintf(stderr, "relay qmail-queue: %v\n", err)
		return 1
	}
	if st.Failed > 0 {
		fmt.Fprintf(stderr, "relay qmail-queue: %d messages could not be read, first: %v\n", st.Failed, st.Err)
	}

	var out any = msgs
	if msgs == nil {
		out = []inspect.Message{}
	}
	if *top > 0 {
		out = inspect.Summarize(msgs, *top)
	}
	switch {
	case *asJSON:
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		err = enc.Encode(out)
	case *top > 0:
		err = inspect.WriteTop(stdout, out.(inspect.Top))
	default:
		err = inspect.WriteList(stdout, msgs)
	}
	if err != nil {
		fmt.Fprintf(stderr, "relay qmail-queue: %v\n", err)
		return 1
	}
	return 0
}
