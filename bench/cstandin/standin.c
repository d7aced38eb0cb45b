/*
 * standin: the benchmark's qmail-queue stand-in in C, like qmail-queue
 * itself (bench/cmd/standin is the same in Go). It reads the message on
 * fd 0 and the envelope on fd 1 to EOF, queues nothing and exits 0; 54
 * when a read fails (qmail-queue(8)). The sink and relay hand their mail
 * to it, so the hand-off costs the same in both; built static, it costs
 * about what a small C program's exec costs, as qmail-queue does, where
 * a Go stand-in would add a Go runtime's start to every message.
 *
 * Build: musl-gcc (or cc) -O2 -static -o standin standin.c
 */
#include <errno.h>
#include <unistd.h>

int main(void)
{
	static char buf[65536];
	for (int fd = 0; fd <= 1; fd++) {
		for (;;) {
			ssize_t n = read(fd, buf, sizeof buf);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				return 54;
			if (n == 0)
				break;
		}
	}
	return 0;
}
