package main

import (
	"flag"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"relay/queue"
)

// runQueueWriter is `relay queue-writer --queue DIR`: it writes the
// messages of the daemon at the other end of the socket on descriptor
// --fd into qmail's queue (queue.QueueWriter), until the daemon closes the
// socket or dies. relay serve starts it, as qmailq, for method
// qmail-direct; it is not meant to be run by hand.
func runQueueWriter(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("queue-writer", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("queue", "/var/qmail/queue", "qmail's queue `directory`")
	fd := fs.Int("fd", 3, "`descriptor` of the socket to the daemon")
	if err := fs.Parse(args); err != nil {
		return 64
	}
	log := slog.New(slog.NewTextHandler(stderr, nil)).With("process", "queue-writer", "pid", os.Getpid())
	if os.Getuid() == 0 {
		log.Error("refusing to run as root: qmail's queue files belong to qmailq (relay serve starts the writer as qmailq)")
		return 111
	}
	f := os.NewFile(uintptr(*fd), "daemon")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		log.Error("no socket to the daemon", "fd", *fd, "err", err)
		return 111
	}
	w, err := queue.OpenQueueWriter(*dir, log)
	if err != nil {
		log.Error("cannot write qmail's queue", "err", err)
		conn.Close()
		return 111
	}
	defer w.Close()

	// The writer's life is the daemon's: it ends when the socket closes,
	// when it is told to stop, or when its parent is gone.
	stop := make(chan os.Signal, 2)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	parent := os.Getppid()
	go func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case sig := <-stop:
				log.Info("stopping", "signal", sig.String())
				conn.Close()
				return
			case <-tick.C:
				if os.Getppid() != parent {
					log.Warn("the daemon's supervisor is gone: stopping")
					conn.Close()
					return
				}
			}
		}
	}()
	log.Info("queue writer started", "queue", *dir, "split", w.Split(), "uid", os.Getuid(), "gid", os.Getgid())
	err = w.Serve(conn)
	log.Info("queue writer done", "rounds", w.Rounds(), "queued", w.Queued(), "end", errString(err))
	return 0
}

func errString(err error) string {
	if err == nil {
		return "daemon closed the connection"
	}
	return err.Error()
}
