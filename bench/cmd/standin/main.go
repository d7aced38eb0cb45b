// Command standin is the benchmark's qmail-queue stand-in: it reads the
// message on fd 0 and the envelope on fd 1 to EOF, as qmail-queue does
// (qmail-queue(8)), queues nothing and exits 0. Both the bare sink and
// relay hand their mail to it, so the hand-off costs the same in both.
package main

import (
	"os"
	"syscall"
)

func main() {
	var buf [64 << 10]byte
	for _, fd := range []int{0, 1} {
		for {
			n, err := syscall.Read(fd, buf[:])
			if err == syscall.EINTR {
				continue
			}
			if err != nil {
				os.Exit(54) // qmail-queue: unable to read the message or envelope
			}
			if n == 0 {
				break
			}
		}
	}
}
