package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"relay/admin"
	"relay/config"
	"relay/doctor"
)

// runDoctor checks the live installation read-only (package doctor) and
// exits 1 when a check FAILs.
func runDoctor(args []string, stdout, stderr io.Writer) int {
	path, rest, _ := config.PathFromArgs(args)
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print a JSON list of {check, status, detail, fix}")
	dns := fs.Bool("dns", false, "also look each DKIM key's record up in DNS")
	qmail := fs.String("qmail", doctor.DefaultQmailHome, "qmail's directory")
	sendmail := fs.String("sendmail", doctor.DefaultSendmail, "where PHP's mail() runs sendmail")
	if err := fs.Parse(rest); err != nil || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "usage: relay doctor [--config FILE] [--json] [--dns] [--qmail DIR] [--sendmail PATH]")
		return 64
	}
	results := doctor.Run(context.Background(), doctor.Options{
		Config:      path,
		QmailHome:   *qmail,
		Sendmail:    *sendmail,
		DNS:         *dns,
		AdminHealth: adminHealth,
	})
	write := doctor.WriteText
	if *asJSON {
		write = doctor.WriteJSON
	}
	if err := write(stdout, results); err != nil {
		fmt.Fprintln(stderr, "relay doctor:", err)
		return 1
	}
	if doctor.Failed(results) {
		return 1
	}
	return 0
}

// adminHealth asks /healthz as `relay ctl health` does (no token needed).
func adminHealth(ctx context.Context, cfg *config.Config) error {
	c, err := admin.NewClient(cfg.Admin.Listen, "", cfg.Admin.TLSCert)
	if err != nil {
		return err
	}
	return c.Health(ctx)
}
