// Command sink is the benchmark's bare go-smtp server: it accepts every
// message and hands it to a qmail-queue-protocol program (the stand-in)
// exactly as relay does, with no policy. See package relay/bench/sink.
//
//	sink -addr 127.0.0.1:2600 -qmail-queue bench/out/standin
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"relay/bench/sink"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:2600", "listen `host:port`")
	qq := flag.String("qmail-queue", "", "program each message is handed to (required)")
	timeout := flag.Duration("timeout", 60*time.Second, "per read or write, and per hand-off")
	maxBytes := flag.Int64("max-message-bytes", 0, "largest message (0: unlimited)")
	flag.Parse()
	if *qq == "" {
		fmt.Fprintln(os.Stderr, "sink: -qmail-queue is required")
		os.Exit(64)
	}
	l, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sink:", err)
		os.Exit(1)
	}
	srv := sink.NewServer(sink.Config{QmailQueue: *qq, Timeout: *timeout, MaxMessageBytes: *maxBytes})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		srv.Close()
	}()
	if err := srv.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "sink:", err)
		os.Exit(1)
	}
}
