// Command fakeqq stands in for qmail-queue in tests. It speaks qmail-queue's
// protocol exactly: the message on fd 0 until EOF, then the envelope on fd 1
// (F sender NUL, T rcpt NUL ..., NUL), exiting 91 on a malformed envelope,
// 11 on an address of 1003 bytes or more and 54 on a short read. It also
// fails with 81 if envelope bytes were readable on fd 1 before fd 0 reached
// EOF while fd 0 is a pipe (the writer must close the message pipe first);
// fds 0 and 1 may also be files holding the whole message and envelope,
// as relay qq gives them when it execs qmail-queue.
//
// Environment:
//
//	FAKEQQ_DIR   where to record each call: N.msg, N.env, N.info (uid, pid)
//	FAKEQQ_EXIT  exit code to use after a well-formed call (default 0)
//	FAKEQQ_SLEEP a duration to sleep before exiting (e.g. "2s")
//	FAKEQQ_FD6   text to write on fd 6 (notqmail's custom error, with exit 82)
package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	os.Exit(run())
}

func run() int {
	msgIn := os.NewFile(0, "message")
	envIn := os.NewFile(1, "envelope")
	var msg bytes.Buffer
	buf := make([]byte, 64*1024)
	for {
		if envelopeReadable() {
			fmt.Fprintln(os.Stderr, "fakeqq: envelope written before the message pipe was closed")
			return 81
		}
		n, err := msgIn.Read(buf)
		msg.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			return 54
		}
	}
	env, err := io.ReadAll(envIn)
	if err != nil {
		return 54
	}
	if code := checkEnvelope(env); code != 0 {
		return code
	}
	if d := os.Getenv("FAKEQQ_DIR"); d != "" {
		if err := record(d, msg.Bytes(), env); err != nil {
			fmt.Fprintln(os.Stderr, "fakeqq:", err)
			return 53
		}
	}
	if s := os.Getenv("FAKEQQ_SLEEP"); s != "" {
		if d, err := time.ParseDuration(s); err == nil {
			time.Sleep(d)
		}
	}
	if t := os.Getenv("FAKEQQ_FD6"); t != "" {
		os.NewFile(6, "errtext").Write([]byte(t))
	}
	code, _ := strconv.Atoi(os.Getenv("FAKEQQ_EXIT"))
	return code
}

// envelopeReadable reports whether envelope bytes are waiting on fd 1 while
// the writer still holds the message pipe (fd 0) open. fd 1 is polled first:
// a correct caller closes fd 0 before it writes the envelope, so once
// envelope bytes are visible fd 0 must show the hang-up. It may show it a
// moment late: a child another thread of the caller is starting holds a
// copy of every descriptor until its exec, so a hang-up that comes within
// a second is the caller's due.
func envelopeReadable() bool {
	var st unix.Stat_t
	if unix.Fstat(0, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
		return false // a file has no writer to close it
	}
	env := []unix.PollFd{{Fd: 1, Events: unix.POLLIN}}
	if n, err := unix.Poll(env, 0); err != nil || n == 0 || env[0].Revents&unix.POLLIN == 0 {
		return false
	}
	for deadline := time.Now().Add(time.Second); ; {
		msg := []unix.PollFd{{Fd: 0, Events: unix.POLLIN}}
		unix.Poll(msg, 0)
		if msg[0].Revents&unix.POLLHUP != 0 {
			return false
		}
		if time.Now().After(deadline) {
			return true
		}
		time.Sleep(time.Millisecond)
	}
}

// checkEnvelope applies qmail-queue's envelope rules.
func checkEnvelope(env []byte) int {
	if len(env) == 0 {
		return 54
	}
	if env[0] != 'F' {
		return 91
	}
	rest := env
	first := true
	for {
		if len(rest) == 0 {
			return 54 // EOF before the final NUL
		}
		if !first && rest[0] == 0 {
			if len(rest) != 1 {
				return 91
			}
			return 0
		}
		if first && rest[0] != 'F' || !first && rest[0] != 'T' {
			return 91
		}
		end := bytes.IndexByte(rest, 0)
		if end < 0 {
			return 54
		}
		if end-1 >= 1003 {
			return 11
		}
		rest = rest[end+1:]
		first = false
	}
}

func record(dir string, msg, env []byte) error {
	for n := 1; ; n++ {
		base := filepath.Join(dir, strconv.Itoa(n))
		f, err := os.OpenFile(base+".info", os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if os.IsExist(err) {
			continue
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(f, "uid=%d pid=%d\n", os.Getuid(), os.Getpid())
		f.Close()
		if err := os.WriteFile(base+".msg", msg, 0o644); err != nil {
			return err
		}
		return os.WriteFile(base+".env", env, 0o644)
	}
}
