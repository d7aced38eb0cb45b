package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"relay/config"
	"strings"

	"relay/scan"
)

const scanUsage = `usage: relay scan [--proc DIR] [--port 25] [--home PREFIX] [--json]
       relay scan --firewall --mail-server ADDR... [--remote-user qmailr] [--port 25]

Lists the processes with TCP connections (established or being set up,
IPv4 and IPv6) to a remote port, by uid, with pid, command line and working
directory. Exit status 0: none found; 1: some found; 64: usage; 2: error.
--firewall prints nftables and iptables rules for a web server: only
qmail-remote's user (--remote-user) and root may open the port, and only
towards the mail servers. With them in place, the first Received line of
the web server's mail is its own qmail-queue's, with a uid the kernel
gave it. They change nothing until loaded.
`

func runScan(args []string, stdout, stderr io.Writer) int {
	_, args, _ = config.PathFromArgs(args) // accepted for uniformity; not used
	fs := flag.NewFlagSet("relay scan", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, scanUsage); fs.PrintDefaults() }
	proc := fs.String("proc", "/proc", "proc file system")
	port := fs.Uint("port", 25, "remote TCP `port`")
	home := fs.String("home", "", "also count processes per home directory under `PREFIX` (e.g. /home)")
	passwd := fs.String("passwd", "/etc/passwd", "passwd file for uid -> account name")
	asJSON := fs.Bool("json", false, "print JSON instead of a table")
	firewall := fs.Bool("firewall", false, "print firewall rules instead of scanning")
	var fw scan.Firewall
	fs.Func("mail-server", "mail server `ADDR` or CIDR (repeat, or comma-separate)", func(s string) error {
		for _, part := range strings.Split(s, ",") {
			p, err := scan.ParseMailServer(strings.TrimSpace(part))
			if err != nil {
				return err
			}
			fw.MailServers = append(fw.MailServers, p)
		}
		return nil
	})
	fs.StringVar(&fw.RemoteUser, "remote-user", scan.DefaultRemoteUser, "qmail-remote's user `NAME` (or uid): with root, the only one let through")
	// Flags may follow positional mail servers: --mail-server A B --remote-user qmailr.
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return 64
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if *port == 0 || *port > 65535 {
		fmt.Fprintf(stderr, "relay scan: --port %d: not a TCP port\n", *port)
		return 64
	}

	if *firewall {
		// Mail servers may also follow the flags: --mail-server A B C.
		for _, a := range positional {
			p, err := scan.ParseMailServer(a)
			if err != nil {
				fmt.Fprintf(stderr, "relay scan: %v\n", err)
				return 64
			}
			fw.MailServers = append(fw.MailServers, p)
		}
		fw.Port = uint16(*port)
		if err := scan.WriteFirewall(stdout, fw); err != nil {
			fmt.Fprintf(stderr, "relay scan: %v\n", err)
			return 64
		}
		return 0
	}
	if len(positional) > 0 {
		fmt.Fprintf(stderr, "relay scan: unexpected argument %q\n", positional[0])
		return 64
	}

	accounts, err := config.ReadPasswdFile(*passwd)
	if err != nil {
		fmt.Fprintf(stderr, "relay scan: %v (account names not shown)\n", err)
	}
	rep, err := scan.Scan(scan.Options{Proc: *proc, Port: uint16(*port), HomePrefix: *home, Accounts: accounts})
	if err != nil {
		fmt.Fprintf(stderr, "relay scan: %v\n", err)
		return 2
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		err = enc.Encode(rep)
	} else {
		err = scan.WriteReport(stdout, &rep)
	}
	if err != nil {
		fmt.Fprintf(stderr, "relay scan: %v\n", err)
		return 2
	}
	if rep.Found() {
		return 1
	}
	return 0
}
