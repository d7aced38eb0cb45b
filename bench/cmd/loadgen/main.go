// Command loadgen sends SMTP load to a server on loopback and reports
// msgs/s, transaction latency and the server's CPU per message. With -idle
// it holds idle sessions open and reports the server's memory instead; with
// -exec it runs a qmail-queue-protocol program once per message (relay qq,
// or the stand-in called directly).
//
//	loadgen -addr 127.0.0.1:2525 -conns 20 -duration 3s -size 1024 -rcpts 1 -reuse -pid 1234
//	loadgen -addr 127.0.0.1:2525 -idle 10000 -hold 2s -pid 1234
//	loadgen -exec "relay qq --config relay.toml" -conns 1 -duration 3s -pid 1234
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"relay/bench/loadgen"
)

func main() {
	var c loadgen.Config
	flag.StringVar(&c.Addr, "addr", "127.0.0.1:2525", "server `host:port`")
	flag.IntVar(&c.Conns, "conns", 1, "concurrent connections (or programs with -exec)")
	flag.IntVar(&c.Messages, "msgs", 0, "messages in all (0: until -duration)")
	flag.DurationVar(&c.Duration, "duration", 0, "stop starting messages after this (0: until -msgs)")
	flag.IntVar(&c.Size, "size", 1024, "message size in bytes")
	flag.IntVar(&c.Rcpts, "rcpts", 1, "recipients per message")
	flag.BoolVar(&c.Reuse, "reuse", false, "reuse sessions (default: one connection per message)")
	flag.BoolVar(&c.Pipelining, "pipelining", false, "batch MAIL, RCPT and DATA when the server offers PIPELINING")
	flag.IntVar(&c.Senders, "senders", 1000, "distinct envelope senders")
	flag.IntVar(&c.Domains, "domains", 100, "distinct sender domains")
	flag.IntVar(&c.UIDs, "uids", 0, "distinct web-server uids in a \"(qmail N invoked by uid U)\" Received line (0: none)")
	flag.StringVar(&c.RcptDomain, "rcpt-domain", "rcpt.bench.example", "recipients' domain")
	flag.DurationVar(&c.Timeout, "timeout", 30*time.Second, "per read or write")
	pids := flag.String("pid", "", "server `pid` whose CPU (with its children's) and memory are measured; more pids after commas add their CPU")
	flag.DurationVar(&c.Settle, "settle", 0, "wait this long after the last message before reading the server's CPU")
	flag.StringVar(&c.Tag, "tag", "", "put this in every Message-ID, to tell runs apart")
	idle := flag.Int("idle", 0, "hold this many idle sessions open instead of sending mail")
	hold := flag.Duration("hold", 2*time.Second, "with -idle: how long to hold them")
	execArgv := flag.String("exec", "", "run this program (space-separated argv) per message with the message on fd 0 and the envelope on fd 1")
	execEnv := flag.String("exec-env", "", "with -exec: extra environment, space-separated NAME=value")
	asJSON := flag.Bool("json", false, "print the result as JSON")
	label := flag.String("label", "", "label printed with the result")
	flag.Parse()
	for i, p := range strings.Split(*pids, ",") {
		if p == "" {
			continue
		}
		n, err := strconv.Atoi(p)
		if err != nil || n <= 0 {
			fmt.Fprintf(os.Stderr, "loadgen: -pid %q: want pids separated by commas\n", *pids)
			os.Exit(64)
		}
		if i == 0 {
			c.ServerPID = n
		} else {
			c.ExtraPIDs = append(c.ExtraPIDs, n)
		}
	}

	var res any
	var err error
	switch {
	case *idle > 0:
		res, err = loadgen.Idle(loadgen.IdleConfig{Addr: c.Addr, Conns: *idle, Hold: *hold, Timeout: c.Timeout, ServerPID: c.ServerPID})
	case *execArgv != "":
		res, err = loadgen.RunExec(loadgen.ExecConfig{
			Argv: strings.Fields(*execArgv), Env: strings.Fields(*execEnv), Conns: c.Conns,
			Messages: c.Messages, Duration: c.Duration, Size: c.Size, Rcpts: c.Rcpts,
			Senders: c.Senders, Domains: c.Domains, Timeout: c.Timeout, ServerPID: c.ServerPID,
		})
	default:
		res, err = loadgen.Run(c)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	if *asJSON {
		out := map[string]any{"label": *label, "result": res}
		json.NewEncoder(os.Stdout).Encode(out)
		return
	}
	fmt.Println(line(*label, res))
}

// line writes a result as "label key=value ...", in the struct's field
// order, embedded structs (the Summary) in place.
func line(label string, res any) string {
	var b strings.Builder
	b.WriteString(label)
	writeFields(&b, reflect.ValueOf(res))
	return b.String()
}

func writeFields(b *strings.Builder, v reflect.Value) {
	for i := range v.NumField() {
		sf, f := v.Type().Field(i), v.Field(i)
		if sf.Anonymous && f.Kind() == reflect.Struct {
			writeFields(b, f)
			continue
		}
		name, _, _ := strings.Cut(sf.Tag.Get("json"), ",")
		if f.IsZero() && name == "first_error" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		switch f.Kind() {
		case reflect.Float64:
			fmt.Fprintf(b, "%s=%.1f", name, f.Float())
		case reflect.String:
			fmt.Fprintf(b, "%s=%q", name, f.String())
		default:
			fmt.Fprintf(b, "%s=%v", name, f.Interface())
		}
	}
}
