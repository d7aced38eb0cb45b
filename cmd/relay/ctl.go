package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"

	"relay/admin"
	"relay/config"
	"relay/queue"
)

const ctlUsage = `usage: relay ctl [--config FILE] [--json] COMMAND

commands:
  senders [--state ok|throttled|suspended|all]
  sender ID
  suspend ID [--reason TEXT]
  unsuspend ID
  reset ID
  held
  queue                per identity: messages waiting in the release queue, state, when it drains
  show-held ID [--raw]
  release ID
  delete ID
  events [--identity ID] [--kind KIND] [--limit N]
  dkim                 per domain: signed, unsigned and why, held, refused
  reload
  health

--json prints the API's JSON instead of a table.
`

// Exit codes of relay ctl (sysexits.h).
const (
	exitOK          = 0
	exitFailed      = 1  // the daemon answered with an error
	exitUsage       = 64 // EX_USAGE
	exitUnavailable = 69 // EX_UNAVAILABLE: the daemon cannot be reached
	exitConfig      = 78 // EX_CONFIG
)

func runCtl(args []string, stdout, stderr io.Writer) int {
	path, rest, _ := config.PathFromArgs(args)
	return ctl(rest, stdout, stderr, func() (*admin.Client, error) {
		cfg, err := config.Load(path)
		if err != nil {
			return nil, err
		}
		if cfg.Admin.Listen == "" {
			return nil, fmt.Errorf("%s: admin.listen is empty: the admin API is off", path)
		}
		token, err := admin.ReadToken(cfg.Admin.TokenFile, cfg.DataDir)
		if err != nil {
			return nil, err
		}
		return admin.NewClient(cfg.Admin.Listen, token, cfg.Admin.TLSCert)
	})
}

// parseInterspersed parses flags that may come before or after the
// positional arguments ("suspend ID --reason R") and returns the positionals.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// ctl runs one ctl command with the client connect makes.
func ctl(args []string, stdout, stderr io.Writer, connect func() (*admin.Client, error)) int {
	global := flag.NewFlagSet("relay ctl", flag.ContinueOnError)
	global.SetOutput(io.Discard)
	asJSON := global.Bool("json", false, "print JSON")
	if err := global.Parse(args); err != nil || global.NArg() == 0 {
		fmt.Fprint(stderr, ctlUsage)
		return exitUsage
	}
	cmd := global.Arg(0)
	fs := flag.NewFlagSet("relay ctl "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.BoolVar(asJSON, "json", *asJSON, "print JSON")
	state := fs.String("state", admin.StateAll, "")
	reason := fs.String("reason", "", "")
	raw := fs.Bool("raw", false, "")
	identity := fs.String("identity", "", "")
	kind := fs.String("kind", "", "")
	limit := fs.Int("limit", 0, "")
	pos, err := parseInterspersed(fs, global.Args()[1:])
	if err != nil {
		fmt.Fprintf(stderr, "relay ctl %s: %v\n\n%s", cmd, err, ctlUsage)
		return exitUsage
	}
	wantArgs := map[string]int{"senders": 0, "sender": 1, "suspend": 1, "unsuspend": 1, "reset": 1, "held": 0, "queue": 0,
		"show-held": 1, "release": 1, "delete": 1, "events": 0, "reload": 0, "health": 0, "dkim": 0}
	n, known := wantArgs[cmd]
	if !known || len(pos) != n {
		if !known {
			fmt.Fprintf(stderr, "relay ctl: unknown command %q\n\n", cmd)
		} else {
			fmt.Fprintf(stderr, "relay ctl %s: want %d argument(s)\n\n", cmd, n)
		}
		fmt.Fprint(stderr, ctlUsage)
		return exitUsage
	}
	var id string
	if n == 1 {
		id = pos[0]
	}

	c, err := connect()
	if err != nil {
		fmt.Fprintf(stderr, "relay ctl: %v\n", err)
		return exitConfig
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	// out prints v as JSON or with its table writer.
	out := func(v any, table func() error) error {
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(v)
		}
		return table()
	}
	done := func(r admin.ActionResult) error {
		return out(r, func() error {
			msg := r.Action + " " + r.ID + ": done"
			if r.ID == "" {
				msg = r.Action + ": done"
			}
			if r.Reply != "" {
				msg += " (" + r.Reply + ")"
			}
			_, err := fmt.Fprintln(stdout, msg)
			return err
		})
	}

	switch cmd {
	case "senders":
		var ss []admin.Sender
		if ss, err = c.Senders(ctx, *state); err == nil {
			err = out(ss, func() error { return admin.WriteSenders(stdout, ss) })
		}
	case "sender":
		var s admin.Sender
		if s, err = c.Sender(ctx, id); err == nil {
			err = out(s, func() error { return admin.WriteSender(stdout, s) })
		}
	case "suspend", "unsuspend", "reset", "release", "delete", "reload":
		var r admin.ActionResult
		switch cmd {
		case "suspend":
			r, err = c.Suspend(ctx, id, *reason)
		case "unsuspend":
			r, err = c.Unsuspend(ctx, id)
		case "reset":
			r, err = c.Reset(ctx, id)
		case "release":
			r, err = c.Release(ctx, id)
		case "delete":
			r, err = c.Delete(ctx, id)
		case "reload":
			r, err = c.Reload(ctx)
		}
		if err == nil {
			err = done(r)
		}
	case "held":
		var hs []admin.HeldSummary
		if hs, err = c.Held(ctx); err == nil {
			err = out(hs, func() error { return admin.WriteHeld(stdout, hs) })
		}
	case "queue":
		var qs []queue.ReleaseQueue
		if qs, err = c.Queues(ctx); err == nil {
			err = out(qs, func() error { return admin.WriteQueues(stdout, qs) })
		}
	case "show-held":
		if *raw {
			err = c.HeldRaw(ctx, id, stdout)
			break
		}
		var m admin.HeldMessage
		if m, err = c.HeldMessage(ctx, id); err == nil {
			err = out(m, func() error { return admin.WriteHeldMessage(stdout, m) })
		}
	case "events":
		var evs []admin.Event
		if evs, err = c.Events(ctx, admin.EventFilter{Identity: *identity, Kind: *kind, Limit: *limit}); err == nil {
			err = out(evs, func() error { return admin.WriteEvents(stdout, evs) })
		}
	case "dkim":
		var r admin.DKIMReport
		if r, err = c.DKIM(ctx); err == nil {
			err = out(r, func() error { return admin.WriteDKIM(stdout, r) })
		}
	case "health":
		if err = c.Health(ctx); err == nil {
			err = out(map[string]string{"status": "ok"}, func() error {
				_, err := fmt.Fprintln(stdout, "ok")
				return err
			})
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "relay ctl %s: %v\n", cmd, err)
		var se *admin.StatusError
		if errors.As(err, &se) {
			return exitFailed
		}
		return exitUnavailable
	}
	return exitOK
}
