/*
 * relay-qq: `relay qq` as a small C program, for the one path that runs
 * once per locally injected message. It does what relay-local qq does
 * (local/qq.go; the tests in local/ run both): read the message on fd 0
 * and the envelope on fd 1 as qmail-queue does, ask the relay daemon over
 * its local socket (the check protocol, docs/local-check.md: the envelope
 * and the header go in, "reserved", "sign", "exempt", "hold", "defer" or
 * "reject" comes back, the message follows for "sign" and "hold", and a
 * reservation is committed), and exec the real qmail-queue in its place,
 * as the caller, with the daemon's DKIM-Signature fields on top of the
 * message when it signed it.
 *
 * A Go program costs a runtime start per message; this costs an exec.
 *
 * What it needs to know it reads from one file, qq.settings, which the
 * daemon writes at start and on every reload (key=value lines: socket,
 * qmail_queue, on_daemon_down, exempt_uids), at a path fixed when it is
 * built; $RELAY_QQ_SETTINGS names another unless it runs setgid. When that
 * file is missing, unreadable or not as the daemon writes it, and when
 * the daemon is down and on_daemon_down says accept, it execs relay-local
 * qq on the same fds, which reads relay.toml and decides.
 *
 * Build: musl-gcc (or cc) -O2 -static -o relay-qq relay-qq.c
 * Compile-time settings (-D): RELAY_QQ_SETTINGS (the file; for a setgid
 * relay-qq the only one), RELAY_LOCAL_PATH (the fallback), and for tests
 * RELAY_QQ_TIMEOUT_MS, RELAY_QQ_SPOOL_MEMORY and RELAY_QQ_ARENA.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef RELAY_QQ_SETTINGS
#define RELAY_QQ_SETTINGS "/var/lib/relay/qq.settings"
#endif
#ifndef RELAY_LOCAL_PATH
#define RELAY_LOCAL_PATH "/usr/local/bin/relay-local"
#endif
#ifndef RELAY_QQ_TIMEOUT_MS
#define RELAY_QQ_TIMEOUT_MS 10000 /* local.DefaultTimeout */
#endif
#ifndef RELAY_QQ_SPOOL_MEMORY
#define RELAY_QQ_SPOOL_MEMORY (1 << 20) /* local.DefaultSpoolMemory */
#endif
#define MAX_SETTINGS_BYTES (64 << 10)
#define MAX_ENVELOPE_ADDR 1003

/* The check protocol (docs/local-check.md). */
#define CHECK_MAGIC "\0RQ1"
#define CHECK_MAGIC_LEN 4
#define MAX_CHECK_HEADER (64 << 10) /* the H frame */
#define MAX_MESSAGE_FRAME (64 << 10) /* each M frame */
#define MAX_REPLY_FRAME (8 << 10)   /* what is read of the daemon's frames */
#define MAX_SIGNATURE_FRAME (64 << 10) /* but the A after G: the DKIM-Signature fields */
/* In a spool file the message starts here: the hole in front of it takes
 * the signatures, so that fd 0 starts right at them, nothing copied. */
#define SPOOL_ROOM MAX_SIGNATURE_FRAME

/* qmail-queue's exit codes (local/envelope.go). */
enum {
	EXIT_QUEUED = 0,
	EXIT_ADDR_TOO_LONG = 11,
	EXIT_REJECTED = 31,
	EXIT_WRITE_ERROR = 53,
	EXIT_READ_ERROR = 54,
	EXIT_CONFIG_ERROR = 55,
	EXIT_DEFERRED = 71,
	EXIT_INTERNAL_BUG = 81,
	EXIT_BAD_ENVELOPE = 91,
};

extern char **environ;

#ifdef __SANITIZE_ADDRESS__
/* The tests' sanitized build: a run is short and frees nothing on purpose. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "detect_leaks=0"; }
#endif

static void logf_(const char *format, ...)
{
	char line[2048];
	va_list ap;
	int n = snprintf(line, sizeof line, "relay qq: ");
	va_start(ap, format);
	vsnprintf(line + n, sizeof line - n - 1, format, ap);
	va_end(ap);
	size_t len = strlen(line);
	line[len++] = '\n';
	ssize_t w = write(2, line, len);
	(void)w;
}

/* Memory. A short-lived process pays for every page it touches (a page
 * fault each, the main cost of a run here), so blocks come in order from
 * one arena in .bss, which a small message fills only a few pages of; the
 * latest block grows in place. Past the arena it is malloc. Each block
 * starts with its size. */
#ifndef RELAY_QQ_ARENA
#define RELAY_QQ_ARENA (256 << 10) /* tests under sanitizers set it to 16: all malloc */
#endif
enum { ARENA_SIZE = RELAY_QQ_ARENA, BLOCK_HEAD = 16 };
static _Alignas(16) char arena[ARENA_SIZE];
static size_t arena_used;
static char *arena_last;

static int in_arena(const void *p) { return (const char *)p >= arena && (const char *)p < arena + ARENA_SIZE; }

static void *xrealloc(void *p, size_t n)
{
	n = (n + 15) & ~(size_t)15;
	size_t old = p ? *(size_t *)((char *)p - BLOCK_HEAD) : 0;
	if (p && p == arena_last && (size_t)((char *)p - arena) + n <= ARENA_SIZE) {
		*(size_t *)((char *)p - BLOCK_HEAD) = n;
		arena_used = (char *)p - arena + n;
		return p;
	}
	char *q;
	if (arena_used + BLOCK_HEAD + n <= ARENA_SIZE) {
		q = arena + arena_used + BLOCK_HEAD;
		arena_used += BLOCK_HEAD + n;
		arena_last = q;
	} else if ((q = malloc(BLOCK_HEAD + n)) != NULL) {
		q += BLOCK_HEAD;
	} else {
		logf_("out of memory");
		exit(EXIT_DEFERRED);
	}
	*(size_t *)(q - BLOCK_HEAD) = n;
	if (p) {
		memcpy(q, p, old < n ? old : n);
		if (!in_arena(p))
			free((char *)p - BLOCK_HEAD);
	}
	return q;
}

static void xfree(void *p)
{
	if (p && !in_arena(p))
		free((char *)p - BLOCK_HEAD);
}

static char *xstrndup(const char *s, size_t n)
{
	char *d = xrealloc(NULL, n + 1);
	memcpy(d, s, n);
	d[n] = 0;
	return d;
}


/* ---------------------------------------------------------------------
 * Settings: qq.settings, as the daemon writes it (local/settings.go).
 */

struct settings {
	const char *tmpdir; /* for messages larger than memory: $TMPDIR, or /tmp when setgid */
	char *socket;       /* the daemon's local socket */
	char *qmail_queue;  /* the real qmail-queue */
	int defer_down;     /* on_daemon_down = defer */
	uint32_t *exempt;   /* exempt_uids */
	size_t nexempt;
};

/* Anything in the file that is not exactly as the daemon writes it makes
 * relay-local decide: UNSURE. */
enum { SURE = 0, UNSURE = 1 };

/* parse_uids reads exempt_uids: numbers (each below 2^32) separated by
 * commas, or nothing. */
static int parse_uids(const char *v, struct settings *s)
{
	s->exempt = NULL;
	s->nexempt = 0;
	while (*v) {
		uint64_t n = 0;
		const char *start = v;
		for (; *v >= '0' && *v <= '9'; v++)
			if ((n = n * 10 + (*v - '0')) > UINT32_MAX)
				return UNSURE;
		if (v == start || (*v && *v != ','))
			return UNSURE;
		if (*v == ',' && *++v == 0)
			return UNSURE;
		s->exempt = xrealloc(s->exempt, (s->nexempt + 1) * sizeof *s->exempt);
		s->exempt[s->nexempt++] = (uint32_t)n;
	}
	return SURE;
}

/* read_settings reads qq.settings: "key=value" lines, each of the four
 * keys exactly once, "#" lines and empty lines skipped, every line ended
 * by a newline, no control characters, no other key. */
static int read_settings(const char *path, struct settings *s)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0)
		return UNSURE;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size > MAX_SETTINGS_BYTES) {
		close(fd);
		return UNSURE;
	}
	/* Exactly the file's size: every page touched costs. */
	size_t size = st.st_size, len = 0;
	char *doc = xrealloc(NULL, size + 1);
	for (;;) {
		ssize_t r = read(fd, doc + len, size + 1 - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 || len + r > size) { /* unreadable, or grew under us */
			close(fd);
			return UNSURE;
		}
		if (r == 0)
			break;
		len += r;
	}
	close(fd);
	if (len == 0 || doc[len - 1] != '\n')
		return UNSURE;
	int have_socket = 0, have_queue = 0, have_down = 0, have_uids = 0;
	for (char *line = doc, *end; line < doc + len; line = end + 1) {
		end = memchr(line, '\n', doc + len - line);
		*end = 0;
		for (char *p = line; p < end; p++)
			if ((unsigned char)*p < 0x20 || *p == 0x7f)
				return UNSURE;
		if (line == end || line[0] == '#')
			continue;
		char *v = strchr(line, '=');
		if (v == NULL)
			return UNSURE;
		*v++ = 0;
		if (strcmp(line, "socket") == 0) {
			struct sockaddr_un sa;
			if (have_socket++ || v[0] != '/' || strlen(v) >= sizeof sa.sun_path)
				return UNSURE;
			s->socket = v;
		} else if (strcmp(line, "qmail_queue") == 0) {
			if (have_queue++ || v[0] != '/')
				return UNSURE;
			s->qmail_queue = v;
		} else if (strcmp(line, "on_daemon_down") == 0) {
			if (have_down++ || (strcmp(v, "accept") != 0 && strcmp(v, "defer") != 0))
				return UNSURE;
			s->defer_down = v[0] == 'd';
		} else if (strcmp(line, "exempt_uids") == 0) {
			if (have_uids++ || parse_uids(v, s) != SURE)
				return UNSURE;
		} else {
			return UNSURE;
		}
	}
	return have_socket && have_queue && have_down && have_uids ? SURE : UNSURE;
}

/* The arguments relay-qq passes on to relay-local: --config FILE, the
 * only one it takes (relay.toml is relay-local's to read). */
static char *config_arg;

/* fallback execs relay-local qq on the same fds 0 and 1, for it to
 * decide. */
static int fallback(void)
{
	char *argv[] = {"relay-local", "qq", config_arg ? "--config" : NULL, config_arg, NULL};
	signal(SIGPIPE, SIG_DFL);
	execve(RELAY_LOCAL_PATH, argv, environ);
	logf_("cannot run %s: %s", RELAY_LOCAL_PATH, strerror(errno));
	return EXIT_CONFIG_ERROR;
}

/* ---------------------------------------------------------------------
 * Input: the message (fd 0) and the envelope (fd 1), by qmail-queue's
 * rules.
 */

struct spool {
	char *head; /* the message, when file is -1 */
	size_t nhead;
	int file;   /* unlinked file with the whole message from SPOOL_ROOM, or -1 */
	off_t size;
};

static ssize_t read_some(int fd, char *buf, size_t n)
{
	for (;;) {
		ssize_t r = read(fd, buf, n);
		if (r >= 0 || errno != EINTR)
			return r;
	}
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= w;
	}
	return 0;
}

/* temp_file returns a file in dir that never has a name (O_TMPFILE), so
 * nobody, the caller included, can open it and change the message between
 * the daemon's check and the real qmail-queue; a memfd where the
 * filesystem has no O_TMPFILE; -1 when neither works. */
static int temp_file(const char *dir)
{
	int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	return fd >= 0 ? fd : memfd_create("relay-qq-message", MFD_CLOEXEC);
}

/* read_spool reads the message to EOF: in memory up to
 * RELAY_QQ_SPOOL_MEMORY bytes, past that whole into an unlinked file, from
 * SPOOL_ROOM on (the file becomes the real qmail-queue's fd 0). */
static int read_spool(struct spool *sp, const char *tmpdir)
{
	size_t cap = 8192;
	sp->head = xrealloc(NULL, cap);
	sp->nhead = 0;
	sp->file = -1;
	sp->size = 0;
	while (sp->nhead < RELAY_QQ_SPOOL_MEMORY) {
		if (sp->nhead == cap) {
			cap = cap * 2 < RELAY_QQ_SPOOL_MEMORY ? cap * 2 : RELAY_QQ_SPOOL_MEMORY;
			sp->head = xrealloc(sp->head, cap);
		}
		ssize_t r = read_some(0, sp->head + sp->nhead, cap - sp->nhead);
		if (r < 0) {
			logf_("reading the message: %s", strerror(errno));
			return EXIT_READ_ERROR;
		}
		if (r == 0) {
			sp->size = sp->nhead;
			return 0;
		}
		sp->nhead += r;
	}
	/* Buffers come from the heap when needed, so a small message touches
	 * no more pages than it needs. */
	enum { chunk = 65536 };
	char *buf = xrealloc(NULL, chunk);
	for (int first = 1;; first = 0) {
		ssize_t r = read_some(0, buf, chunk);
		if (r < 0) {
			logf_("reading the message: %s", strerror(errno));
			return EXIT_READ_ERROR;
		}
		if (r == 0)
			break;
		if (first) {
			if ((sp->file = temp_file(tmpdir)) < 0 || lseek(sp->file, SPOOL_ROOM, SEEK_SET) < 0 ||
			    write_all(sp->file, sp->head, sp->nhead) < 0) {
				logf_("reading the message: spooling message: %s", strerror(errno));
				return EXIT_WRITE_ERROR;
			}
			sp->size = sp->nhead;
		}
		if (write_all(sp->file, buf, r) < 0) {
			logf_("reading the message: spooling message: %s", strerror(errno));
			return EXIT_WRITE_ERROR;
		}
		sp->size += r;
	}
	xfree(buf);
	if (sp->file >= 0) {
		xfree(sp->head);
		sp->head = NULL;
		sp->nhead = 0;
	} else {
		sp->size = sp->nhead;
	}
	return 0;
}

/* each_chunk calls fn on the whole message in order. */
static int each_chunk(struct spool *sp, int (*fn)(void *, const char *, size_t), void *arg)
{
	if (sp->file < 0)
		return sp->nhead && fn(arg, sp->head, sp->nhead) < 0 ? -1 : 0;
	enum { chunk = 65536 };
	char *buf = xrealloc(NULL, chunk);
	for (off_t off = 0; off < sp->size;) {
		ssize_t r = pread(sp->file, buf, chunk, SPOOL_ROOM + off);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0 || fn(arg, buf, r) < 0) {
			xfree(buf);
			return -1;
		}
		off += r;
	}
	xfree(buf);
	return 0;
}

struct envelope {
	char *raw;
	size_t nraw;
	char *sender;
	char **rcpts;
	size_t nrcpts;
};

/* read_envelope is local.ReadEnvelope: 'F' first, 'T' for every later
 * record (else 91), an address reaching 1003 bytes 11, end of input
 * before the final NUL 54. Like qmail-queue it stops at the final NUL. */
static int read_envelope(struct envelope *e)
{
	char buf[4096];
	size_t pos = 0, nbuf = 0, cap = 256;
	e->raw = xrealloc(NULL, cap);
	e->nraw = 0;
	e->rcpts = NULL;
	e->nrcpts = 0;
	size_t start = 0; /* of the current address in raw */
	enum { FIRST, ADDR, RECORD } state = FIRST;
	for (;;) {
		if (pos == nbuf) {
			ssize_t r = read_some(1, buf, sizeof buf);
			if (r <= 0) {
				logf_("envelope: %s (exit %d)", r == 0 ? "end of input before the final NUL" : strerror(errno), EXIT_READ_ERROR);
				return EXIT_READ_ERROR;
			}
			nbuf = r;
			pos = 0;
		}
		char b = buf[pos++];
		if (e->nraw == cap)
			e->raw = xrealloc(e->raw, cap *= 2);
		e->raw[e->nraw++] = b;
		switch (state) {
		case FIRST:
			if (b != 'F') {
				logf_("envelope: does not start with F (exit %d)", EXIT_BAD_ENVELOPE);
				return EXIT_BAD_ENVELOPE;
			}
			start = e->nraw;
			state = ADDR;
			break;
		case ADDR:
			if (b == 0) {
				char *a = xstrndup(e->raw + start, e->nraw - 1 - start);
				if (start == 1) {
					e->sender = a;
				} else {
					if ((e->nrcpts & (e->nrcpts - 1)) == 0) /* 0, 1, 2, 4, ...: double */
						e->rcpts = xrealloc(e->rcpts, (e->nrcpts ? 2 * e->nrcpts : 1) * sizeof *e->rcpts);
					e->rcpts[e->nrcpts++] = a;
				}
				state = RECORD;
			} else if (e->nraw - start >= MAX_ENVELOPE_ADDR) {
				logf_("envelope: address too long (exit %d)", EXIT_ADDR_TOO_LONG);
				return EXIT_ADDR_TOO_LONG;
			}
			break;
		case RECORD:
			if (b == 0)
				return 0;
			if (b != 'T') {
				logf_("envelope: record does not start with T (exit %d)", EXIT_BAD_ENVELOPE);
				return EXIT_BAD_ENVELOPE;
			}
			start = e->nraw;
			state = ADDR;
			break;
		}
	}
}

/* ---------------------------------------------------------------------
 * The real qmail-queue, exec'd in place as the caller (docs/design.md §7): the
 * caller waits for it and gets its exit code, and qmail's "invoked by uid"
 * line names the caller. fd 0 and fd 1 are files holding the message and
 * the envelope from their start: the spool file, or a memfd (an unlinked
 * temporary file where memfd_create is not allowed). fd 2 and, when the
 * caller opened it, notqmail's fd 6 are passed on.
 */

static int mem_file(const char *name, const char *tmpdir)
{
	int fd = memfd_create(name, MFD_CLOEXEC);
	return fd >= 0 ? fd : open(tmpdir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
}

static int write_chunk(void *arg, const char *p, size_t n) { return write_all(*(int *)arg, p, n); }

/* hand_over_fds makes fd 0 the signatures (sigs[0..nsigs), DKIM-Signature
 * fields from the daemon, or nothing) and the message, and fd 1 the
 * envelope; -1 and a logged line when it cannot. A spool file gets the
 * signatures in the room in front of the message. */
static int hand_over_fds(struct spool *sp, struct envelope *e, const char *tmpdir, const char *sigs, size_t nsigs)
{
	int msg = sp->file, env = -1;
	off_t start = 0;
	if (msg < 0 && ((msg = mem_file("relay-qq-message", tmpdir)) < 0 || write_all(msg, sigs, nsigs) < 0 ||
	                each_chunk(sp, write_chunk, &msg) < 0)) {
		logf_("cannot hand the message to the real qmail-queue: %s", strerror(errno));
		return -1;
	}
	if (sp->file >= 0) {
		start = SPOOL_ROOM - (off_t)nsigs; /* nsigs <= MAX_SIGNATURE_FRAME */
		for (size_t off = 0; off < nsigs;) {
			ssize_t w = pwrite(msg, sigs + off, nsigs - off, start + (off_t)off);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				logf_("cannot hand the message to the real qmail-queue: %s", strerror(errno));
				return -1;
			}
			off += w;
		}
	}
	if ((env = mem_file("relay-qq-envelope", tmpdir)) < 0 || write_all(env, e->raw, e->nraw) < 0) {
		logf_("cannot hand the envelope to the real qmail-queue: %s", strerror(errno));
		return -1;
	}
	if (lseek(msg, start, SEEK_SET) < 0 || lseek(env, 0, SEEK_SET) < 0 || dup2(msg, 0) < 0 || dup2(env, 1) < 0) {
		logf_("cannot hand the message to the real qmail-queue: %s", strerror(errno));
		return -1;
	}
	return 0;
}

/* exec_qq execs the real qmail-queue; it returns only when that fails. */
static int exec_qq(const struct settings *s)
{
	signal(SIGPIPE, SIG_DFL);
	char *argv[] = {s->qmail_queue, NULL};
	execve(s->qmail_queue, argv, environ);
	logf_("cannot run the real qmail-queue %s: %s", s->qmail_queue, strerror(errno));
	return EXIT_DEFERRED;
}

static int exec_real(const struct settings *s, struct spool *sp, struct envelope *e)
{
	return hand_over_fds(sp, e, s->tmpdir, NULL, 0) < 0 ? EXIT_DEFERRED : exec_qq(s);
}

/* ---------------------------------------------------------------------
 * The check conversation with the daemon (docs/local-check.md).
 */

struct conn {
	int fd;
	char buf[4096];
	size_t pos, n;
	char out[16384];
	size_t nout;
};

/* A failed step: why, for the log. */
struct failure {
	char text[256];
};

static int io_failure(struct failure *f, const char *what)
{
	snprintf(f->text, sizeof f->text, "%s", what);
	return -1;
}

static int flush_out(struct conn *c, struct failure *f)
{
	size_t off = 0;
	while (off < c->nout) {
		ssize_t w = send(c->fd, c->out + off, c->nout - off, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return io_failure(f, errno == EAGAIN ? "write: i/o timeout" : strerror(errno));
		off += w;
	}
	c->nout = 0;
	return 0;
}

static int put(struct conn *c, struct failure *f, const char *p, size_t n)
{
	while (n > 0) {
		if (c->nout == sizeof c->out && flush_out(c, f) < 0)
			return -1;
		size_t k = sizeof c->out - c->nout < n ? sizeof c->out - c->nout : n;
		memcpy(c->out + c->nout, p, k);
		c->nout += k;
		p += k;
		n -= k;
	}
	return 0;
}

/* put_frame queues one frame: the type, the payload's length (4 bytes,
 * big-endian), the payload. */
static int put_frame(struct conn *c, struct failure *f, char type, const char *p, size_t n)
{
	char h[5] = {type, (char)(n >> 24), (char)(n >> 16), (char)(n >> 8), (char)n};
	return put(c, f, h, sizeof h) < 0 || put(c, f, p, n) < 0 ? -1 : 0;
}

/* get reads n bytes within the timeout. */
static int get(struct conn *c, struct failure *f, char *dst, size_t n)
{
	while (n > 0) {
		if (c->pos == c->n) {
			struct pollfd p = {.fd = c->fd, .events = POLLIN};
			int k;
			while ((k = poll(&p, 1, RELAY_QQ_TIMEOUT_MS)) < 0 && errno == EINTR)
				;
			if (k == 0)
				return io_failure(f, "read: i/o timeout");
			ssize_t got = read_some(c->fd, c->buf, sizeof c->buf);
			if (got <= 0)
				return io_failure(f, got == 0 ? "EOF" : strerror(errno));
			c->pos = 0;
			c->n = got;
		}
		size_t k = c->n - c->pos < n ? c->n - c->pos : n;
		memcpy(dst, c->buf + c->pos, k);
		c->pos += k;
		dst += k;
		n -= k;
	}
	return 0;
}

/* get_line reads one line of the greeting, without its CRLF, cut to size. */
static int get_line(struct conn *c, struct failure *f, char *line, size_t size)
{
	size_t n = 0;
	for (;;) {
		char ch;
		if (get(c, f, &ch, 1) < 0)
			return -1;
		if (ch == '\n')
			break;
		if (n + 1 < size)
			line[n++] = ch;
	}
	if (n > 0 && line[n - 1] == '\r')
		n--;
	line[n] = 0;
	return 0;
}

/* get_frame reads one of the daemon's frames, its payload into text (max
 * + 1 bytes) and its length into *n when n is not NULL. A longer payload
 * is no answer of this protocol: NOT_CHECK. */
enum { NOT_CHECK = -2 };
static int get_frame(struct conn *c, struct failure *f, char *type, char *text, uint32_t max, size_t *len)
{
	unsigned char h[5];
	if (get(c, f, (char *)h, sizeof h) < 0)
		return -1;
	uint32_t n = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
	if (n > max)
		return NOT_CHECK;
	if (get(c, f, text, n) < 0)
		return -1;
	text[n] = 0;
	*type = (char)h[0];
	if (len)
		*len = n;
	return 0;
}

/* signature_fields reports whether the payload of the A after G is what
 * may go on top of a message: nothing, or DKIM-Signature header fields,
 * every line ended by LF, no empty line, no CR, no NUL. */
static int signature_fields(const char *p, size_t n)
{
	static const char name[] = "DKIM-Signature:";
	if (n == 0)
		return 1;
	if (n < sizeof name - 1 || memcmp(p, name, sizeof name - 1) != 0 || p[n - 1] != '\n')
		return 0;
	for (size_t i = 0; i < n; i++)
		if (p[i] == '\r' || p[i] == 0 || (p[i] == '\n' && i + 1 < n && p[i + 1] == '\n'))
			return 0;
	return 1;
}

/* header_len is the length of what the H frame carries of the message's
 * start p[0..n): through the first empty line, or all of it. */
static size_t header_len(const char *p, size_t n)
{
	for (size_t i = 0; i < n;) {
		if (p[i] == '\n')
			return i + 1;
		if (p[i] == '\r' && i + 1 < n && p[i + 1] == '\n')
			return i + 2;
		const char *nl = memchr(p + i, '\n', n - i);
		if (nl == NULL)
			break;
		i = nl - p + 1;
	}
	return n;
}

/* send_request queues and sends the magic, F, T..., S, H and E. */
static int send_request(struct conn *c, struct failure *f, struct spool *sp, struct envelope *e)
{
	char size[24];
	int nsize = snprintf(size, sizeof size, "%lld", (long long)sp->size);
	const char *head = sp->head;
	size_t nhead = sp->nhead < MAX_CHECK_HEADER ? sp->nhead : MAX_CHECK_HEADER;
	if (sp->file >= 0) {
		char *buf = xrealloc(NULL, MAX_CHECK_HEADER);
		ssize_t r;
		while ((r = pread(sp->file, buf, MAX_CHECK_HEADER, SPOOL_ROOM)) < 0 && errno == EINTR)
			;
		if (r < 0)
			return io_failure(f, strerror(errno));
		head = buf;
		nhead = r;
	}
	if (put(c, f, CHECK_MAGIC, CHECK_MAGIC_LEN) < 0 || put_frame(c, f, 'F', e->sender, strlen(e->sender)) < 0)
		return -1;
	for (size_t i = 0; i < e->nrcpts; i++)
		if (put_frame(c, f, 'T', e->rcpts[i], strlen(e->rcpts[i])) < 0)
			return -1;
	if (put_frame(c, f, 'S', size, nsize) < 0 || put_frame(c, f, 'H', head, header_len(head, nhead)) < 0 ||
	    put_frame(c, f, 'E', NULL, 0) < 0)
		return -1;
	return flush_out(c, f);
}

struct framer {
	struct conn *c;
	struct failure *f;
};

/* put_message_chunk queues a piece of the message as M frames. */
static int put_message_chunk(void *arg, const char *p, size_t n)
{
	struct framer *m = arg;
	while (n > 0) {
		size_t k = n < MAX_MESSAGE_FRAME ? n : MAX_MESSAGE_FRAME;
		if (put_frame(m->c, m->f, 'M', p, k) < 0)
			return -1;
		p += k;
		n -= k;
	}
	return 0;
}

enum verdict { UNKNOWN, RESERVED, EXEMPT, HELD, DEFERRED, REJECTED, DOWN };

/* send_message sends the whole message as M frames and an E (for a hold or
 * a signature) and reads the daemon's answer, of at most max bytes, into
 * text; NOT_CHECK or -1 as get_frame. */
static int send_message(struct conn *c, struct failure *f, struct spool *sp, char *type, char *text, uint32_t max, size_t *len)
{
	struct framer m = {c, f};
	if (each_chunk(sp, put_message_chunk, &m) < 0 || put_frame(c, f, 'E', NULL, 0) < 0 || flush_out(c, f) < 0)
		return -1;
	return get_frame(c, f, type, text, max, len);
}

/* check asks the daemon. why gets the daemon's text, or what went wrong;
 * the connection stays open (c->fd) only when the verdict is RESERVED, and
 * then *sigs holds the DKIM-Signature fields to put on top of the message
 * (*nsigs bytes, 0 when the daemon did not sign it). */
static enum verdict check(const struct settings *s, struct conn *c, struct spool *sp, struct envelope *e, char *why, size_t size,
                          char **sigs, size_t *nsigs)
{
	struct failure f;
	c->pos = c->n = c->nout = 0;
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		/* our own trouble, not a daemon that is not there: defer */
		snprintf(why, size, "relay daemon at %s: %s", s->socket, strerror(errno));
		return DEFERRED;
	}
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strcpy(sa.sun_path, s->socket); /* its length was checked with the settings */
	struct timeval tv = {RELAY_QQ_TIMEOUT_MS / 1000, (RELAY_QQ_TIMEOUT_MS % 1000) * 1000};
	setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		/* Down means nobody listens: no socket, or nothing behind it. A
		 * daemon that is there but slow or full (EAGAIN), or our own
		 * trouble, is a deferral: "down" may pass mail uncounted. */
		int down = errno == ENOENT || errno == ECONNREFUSED || errno == ENOTDIR || errno == EACCES;
		snprintf(why, size, "relay daemon at %s unreachable: connect: %s", s->socket, strerror(errno));
		close(c->fd);
		return down ? DOWN : DEFERRED;
	}
	/* From here on the daemon is up: whatever goes wrong (it refuses with
	 * 421, stops answering, closes, or does not speak the check protocol)
	 * is a deferral, never "down", or whoever can make a conversation fail
	 * (by filling the daemon's connection slots, or stopping relay qq
	 * until the daemon gives up on it) would get mail past it uncounted.
	 *
	 * The whole request goes in the first write, before the greeting is
	 * read: one wait for the verdict. Even when that write failed, a
	 * refusal may be waiting to be read. */
	struct failure wf;
	*sigs = NULL;
	*nsigs = 0;
	int sent = send_request(c, &wf, sp, e);
	char line[1024], type, *text = xrealloc(NULL, MAX_REPLY_FRAME + 1);
	enum verdict v = DEFERRED;
	for (;;) {
		if (get_line(c, &f, line, sizeof line) < 0) {
			snprintf(why, size, "relay daemon at %s did not greet: %s", s->socket, sent < 0 ? wf.text : f.text);
			goto out;
		}
		if (strncmp(line, "220 ", 4) == 0)
			break;
		if (strncmp(line, "220-", 4) != 0) {
			snprintf(why, size, "%s", line); /* a refusal: "421 4.7.0 too many connections" */
			goto out;
		}
	}
	char magic[CHECK_MAGIC_LEN];
	int got = get(c, &f, magic, sizeof magic);
	if (got == 0 && memcmp(magic, CHECK_MAGIC, CHECK_MAGIC_LEN) == 0)
		got = get_frame(c, &f, &type, text, MAX_REPLY_FRAME, NULL);
	else if (got == 0)
		got = NOT_CHECK;
	if (got == NOT_CHECK) {
		snprintf(why, size, "relay daemon at %s does not speak the check protocol", s->socket);
		goto out;
	}
	if (got < 0) {
		snprintf(why, size, "relay daemon at %s stopped answering: %s", s->socket, f.text);
		goto out;
	}
	if (type == 'Q' || type == 'G') {
		/* hold or sign: the daemon wants the message itself, and answers
		 * K (held) or A with the signatures (a refusal either way) */
		char asked = type, *answer = text;
		uint32_t max = MAX_REPLY_FRAME;
		size_t n = 0;
		if (asked == 'G') {
			answer = xrealloc(NULL, MAX_SIGNATURE_FRAME + 1);
			max = MAX_SIGNATURE_FRAME;
		}
		if ((got = send_message(c, &f, sp, &type, answer, max, &n)) < 0) {
			if (got == NOT_CHECK)
				snprintf(why, size, "relay daemon at %s does not speak the check protocol", s->socket);
			else
				snprintf(why, size, "relay daemon at %s stopped answering: %s", s->socket, f.text);
			goto out;
		}
		if (asked == 'Q' && type == 'K') {
			type = 'H'; /* held */
		} else if (asked == 'G' && type == 'A') {
			if (!signature_fields(answer, n)) {
				snprintf(why, size, "'A' after 'G' is not DKIM-Signature fields: \"%.200s\"", answer);
				v = UNKNOWN;
				goto out;
			}
			*sigs = answer;
			*nsigs = n;
			snprintf(why, size, "signed");
			return RESERVED;
		} else if (type == 'A' || type == 'K') {
			snprintf(why, size, "'%c' after '%c'", type, asked); /* not an answer to this */
			v = UNKNOWN;
			goto out;
		}
		if (answer != text)
			snprintf(text, MAX_REPLY_FRAME + 1, "%s", answer);
	}
	snprintf(why, size, "%s", text);
	switch (type) {
	case 'A':
		return RESERVED;
	case 'X':
		v = EXEMPT;
		break;
	case 'H':
		v = HELD;
		break;
	case 'D':
		v = DEFERRED;
		break;
	case 'R':
		v = REJECTED;
		break;
	default:
		snprintf(why, size, "'%c' \"%s\"", type, text);
		v = UNKNOWN;
	}
out:
	close(c->fd);
	return v;
}

/* commit tells the daemon that the real qmail-queue is about to run: C,
 * answered K. C carries this process's pid in decimal: the exec keeps it,
 * so it is the qp qmail-send logs for the message, and the daemon joins
 * that log's lines to the message's identities. */
static int commit(struct conn *c, char *why, size_t size)
{
	struct failure f;
	char type, text[MAX_REPLY_FRAME + 1], pid[24];
	int got = 0;
	int n = snprintf(pid, sizeof pid, "%ld", (long)getpid());
	if (put_frame(c, &f, 'C', pid, (size_t)n) < 0 || flush_out(c, &f) < 0 ||
	    (got = get_frame(c, &f, &type, text, MAX_REPLY_FRAME, NULL)) < 0) {
		snprintf(why, size, "%s", got == NOT_CHECK ? "does not speak the check protocol" : f.text);
		return -1;
	}
	if (type != 'K') {
		snprintf(why, size, "'%c' \"%s\"", type, text);
		return -1;
	}
	return 0;
}


/* quote writes s into out as a C string literal (control bytes, quotes
 * and backslashes escaped), cut to fit: what a caller put in an address
 * must not forge lines in its log. */
static const char *quote(const char *s, char *out, size_t size)
{
	size_t o = 0;
	out[o++] = '"';
	for (; *s && o + 6 < size; s++) {
		unsigned char ch = *s;
		if (ch < 0x20 || ch == 0x7f || ch == '"' || ch == '\\')
			o += snprintf(out + o, size - o, ch == '"' || ch == '\\' ? "\\%c" : "\\x%02x", ch);
		else
			out[o++] = ch;
	}
	out[o++] = '"';
	out[o] = 0;
	return out;
}

static int bad_address(struct envelope *e)
{
	char q[256];
	if (strpbrk(e->sender, "\r\n"))
		return logf_("rejected: envelope address %s contains CR or LF", quote(e->sender, q, sizeof q)), 1;
	for (size_t i = 0; i < e->nrcpts; i++)
		if (strpbrk(e->rcpts[i], "\r\n"))
			return logf_("rejected: envelope address %s contains CR or LF", quote(e->rcpts[i], q, sizeof q)), 1;
	return 0;
}


static int filter(const struct settings *s)
{
	struct spool sp;
	struct envelope e;
	int code = read_spool(&sp, s->tmpdir);
	if (code)
		return code;
	if ((code = read_envelope(&e)))
		return code;
	if (e.nrcpts == 0) /* nothing to count: a message nobody receives */
		return exec_real(s, &sp, &e);
	if (bad_address(&e))
		return EXIT_REJECTED;

	struct conn c;
	char why[MAX_REPLY_FRAME + 512], *sigs;
	size_t nsigs;
	switch (check(s, &c, &sp, &e, why, sizeof why, &sigs, &nsigs)) {
	case RESERVED:
		/* fds 0 (the signatures, when the daemon signed, and the
		 * message) and 1 first, so that only the exec itself can fail
		 * once the message is charged; if they cannot be set up, the
		 * connection ends without a commit and the daemon releases the
		 * charge. The commit comes before the exec: nothing of relay qq is
		 * left to commit after. A real qmail-queue that then fails has
		 * been charged; counting errs on the side of more. */
		if (hand_over_fds(&sp, &e, s->tmpdir, sigs, nsigs) < 0) {
			close(c.fd);
			return EXIT_DEFERRED;
		}
		/* Without the commit (the daemon gave up on the reservation, or
		 * restarted) the message would go out uncounted: defer it. */
		if (commit(&c, why, sizeof why) < 0) {
			close(c.fd);
			logf_("deferred: the daemon did not take the commit: %s", why);
			return EXIT_DEFERRED;
		}
		close(c.fd);
		return exec_qq(s);
	case EXEMPT:
		return exec_real(s, &sp, &e);
	case HELD:
		return EXIT_QUEUED;
	case DEFERRED:
		logf_("deferred: %s", why);
		return EXIT_DEFERRED;
	case REJECTED:
		logf_("rejected: %s", why);
		return EXIT_REJECTED;
	case DOWN:
		if (s->defer_down) {
			logf_("%s; deferring (on_daemon_down = defer)", why);
			return EXIT_DEFERRED;
		}
		/* Before mail passes uncounted, relay-local decides with the same
		 * fds: it reads the whole config (a file the daemon would refuse
		 * to start with is refused there too, exit 55) and tries the
		 * daemon again. This costs a Go start only while nobody listens. */
		if (hand_over_fds(&sp, &e, s->tmpdir, NULL, 0) < 0)
			return EXIT_DEFERRED;
		return fallback();
	case UNKNOWN:
		break;
	}
	logf_("deferred: daemon reply not understood: %s", why);
	return EXIT_DEFERRED;
}

int main(int argc, char **argv)
{
	/* --config FILE (or --config=FILE, -config FILE) is relay-local's, for
	 * the fallback; relay-qq takes no other argument. */
	int rest = 1;
	if (argc >= 3 && (strcmp(argv[1], "--config") == 0 || strcmp(argv[1], "-config") == 0)) {
		config_arg = argv[2];
		rest = 3;
	} else if (argc >= 2 && strncmp(argv[1], "--config=", 9) == 0) {
		config_arg = argv[1] + 9;
		rest = 2;
	}
	/* The daemon counts the uid SO_PEERCRED reports, the effective one: a
	 * setuid qq would make every caller look like its owner. */
	if (geteuid() != getuid()) {
		logf_("must not run setuid (uid %d, effective %d): the daemon would count every caller as %d; install it setgid or plain",
		      (int)getuid(), (int)geteuid(), (int)geteuid());
		return EXIT_CONFIG_ERROR;
	}
	if (rest < argc) {
		logf_("takes no arguments (got \"%s\")", argv[rest]);
		return EXIT_BAD_ENVELOPE;
	}
	/* A setgid qq (the relayqq install) must not let the caller choose
	 * the settings, nor where the message is spooled. */
	const char *path = RELAY_QQ_SETTINGS, *tmpdir = getenv("TMPDIR");
	if (tmpdir == NULL || *tmpdir == 0)
		tmpdir = "/tmp";
	if (getegid() != getgid()) {
		tmpdir = "/tmp";
	} else if (getenv("RELAY_QQ_SETTINGS") && *getenv("RELAY_QQ_SETTINGS")) {
		path = getenv("RELAY_QQ_SETTINGS");
	}
	struct settings s = {.tmpdir = tmpdir};
	if (read_settings(path, &s) != SURE)
		return fallback();
	for (size_t i = 0; i < s.nexempt; i++) {
		if (s.exempt[i] == getuid()) {
			/* qmail's own accounts: the real qmail-queue in place, fds
			 * untouched, at no cost. */
			char *qargv[] = {s.qmail_queue, NULL};
			execve(s.qmail_queue, qargv, environ);
			logf_("cannot run the real qmail-queue %s: %s", s.qmail_queue, strerror(errno));
			return EXIT_DEFERRED;
		}
	}
	signal(SIGPIPE, SIG_IGN); /* write errors are judged by exit codes */
	return filter(&s);
}
