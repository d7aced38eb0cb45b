/*
 * relay-qq: `relay qq` as a small C program, for the one path that runs
 * once per locally injected message. It does what relay-local qq does
 * (local/qq.go is the reference; the tests in local/ run both): read the
 * message on fd 0 and the envelope on fd 1 as qmail-queue does, ask the
 * relay daemon over its local socket (the check protocol: EHLO relay-qq,
 * MAIL, RCPT, DATA answered "250 ok reserved|exempt|held", AUTH
 * X-RELAY-COMMIT to charge it), and exec the real qmail-queue in its
 * place, as the caller.
 *
 * A Go program costs a runtime start per message; this costs an exec.
 *
 * It reads only the config keys it needs ([[listen]] addr and mode, and
 * [local] qmail_queue, on_daemon_down, exempt_users) with a strict reader
 * of the TOML it can be sure of. Anything else it cannot be sure of (a
 * key it needs written as an inline table or with escapes, a multi-line
 * string it would have to look into, a missing local listener, a file it
 * cannot read) makes it exec relay-local qq before reading any input, so
 * the Go code decides, and reports errors at file:line:col.
 *
 * Build: musl-gcc (or cc) -O2 -static -o relay-qq relay-qq.c
 * Compile-time settings (-D): RELAY_SECURE_CONFIG (the only config a
 * setgid relay-qq reads), RELAY_LOCAL_PATH (the fallback), and for tests
 * RELAY_QQ_TIMEOUT_MS, RELAY_QQ_SPOOL_MEMORY, RELAY_QQ_ARENA and RELAY_PASSWD.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef RELAY_SECURE_CONFIG
#define RELAY_SECURE_CONFIG "/etc/relay/relay.toml"
#endif
#ifndef RELAY_LOCAL_PATH
#define RELAY_LOCAL_PATH "/usr/local/bin/relay-local"
#endif
#ifndef RELAY_PASSWD
#define RELAY_PASSWD "/etc/passwd" /* tests point it elsewhere */
#endif
#ifndef RELAY_QQ_TIMEOUT_MS
#define RELAY_QQ_TIMEOUT_MS 10000 /* local.DefaultTimeout */
#endif
#ifndef RELAY_QQ_SPOOL_MEMORY
#define RELAY_QQ_SPOOL_MEMORY (1 << 20) /* local.DefaultSpoolMemory */
#endif
#define DEFAULT_CONFIG "/etc/relay/relay.toml" /* config.DefaultPath */
#define MAX_CONFIG_BYTES (1 << 20)
#define MAX_ENVELOPE_ADDR 1003

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
 * Settings: the few config keys relay qq uses, with config.Default()'s
 * values when the file leaves them out.
 */

struct settings {
	const char *config; /* the file read */
	const char *tmpdir; /* for messages larger than memory: $TMPDIR, or /tmp when setgid */
	const char *socket; /* first mode = "local" listener, made absolute */
	char *qmail_queue; /* local.qmail_queue */
	int defer_down;    /* local.on_daemon_down = "defer" */
	char **exempt;     /* local.exempt_users */
	size_t nexempt;
};

static const char *default_exempt[] = {"alias", "qmaild", "qmaill", "qmailp", "qmailq", "qmailr", "qmails"};

/* The reader gives up (and relay-local decides) on anything it is not
 * sure of: UNSURE. */
enum { SURE = 0, UNSURE = 1 };

struct lexer {
	const char *p, *end;
};

static int at(struct lexer *l, char c) { return l->p < l->end && *l->p == c; }

static int at_str(struct lexer *l, const char *s)
{
	size_t n = strlen(s);
	return (size_t)(l->end - l->p) >= n && memcmp(l->p, s, n) == 0;
}

static void skip_blank(struct lexer *l)
{
	while (l->p < l->end && (*l->p == ' ' || *l->p == '\t'))
		l->p++;
}

static void skip_comment(struct lexer *l)
{
	if (at(l, '#'))
		while (l->p < l->end && *l->p != '\n')
			l->p++;
}

/* Blanks, comments and newlines: what may sit between array elements. */
static void skip_space(struct lexer *l)
{
	for (;;) {
		skip_blank(l);
		skip_comment(l);
		if (at(l, '\n'))
			l->p++;
		else if (at_str(l, "\r\n"))
			l->p += 2;
		else
			return;
	}
}

/* The end of an expression: blanks, a comment, then a newline or EOF. */
static int end_of_line(struct lexer *l)
{
	skip_blank(l);
	skip_comment(l);
	if (l->p == l->end)
		return SURE;
	if (at(l, '\n')) {
		l->p++;
		return SURE;
	}
	if (at_str(l, "\r\n")) {
		l->p += 2;
		return SURE;
	}
	return UNSURE;
}

/* skip_string skips any TOML string at l->p. */
static int skip_string(struct lexer *l)
{
	if (at_str(l, "\"\"\"") || at_str(l, "'''")) {
		char q = *l->p;
		int basic = q == '"';
		l->p += 3;
		for (; l->p < l->end; l->p++) {
			if (basic && *l->p == '\\') {
				l->p++;
				continue;
			}
			if (*l->p == q && l->end - l->p >= 3 && l->p[1] == q && l->p[2] == q) {
				l->p += 3;
				/* up to two more quotes belong to the string */
				for (int i = 0; i < 2 && at(l, q); i++)
					l->p++;
				return SURE;
			}
		}
		return UNSURE;
	}
	char q = *l->p++;
	for (; l->p < l->end && *l->p != '\n'; l->p++) {
		if (q == '"' && *l->p == '\\') {
			l->p++;
			continue;
		}
		if (*l->p == q) {
			l->p++;
			return SURE;
		}
	}
	return UNSURE;
}

static int skip_value(struct lexer *l, int depth);

static int skip_key(struct lexer *l);

/* skip_value skips any TOML value. */
static int skip_value(struct lexer *l, int depth)
{
	if (depth > 32 || l->p == l->end)
		return UNSURE;
	if (at(l, '"') || at(l, '\''))
		return skip_string(l);
	if (at(l, '[')) {
		l->p++;
		for (;;) {
			skip_space(l);
			if (at(l, ']')) {
				l->p++;
				return SURE;
			}
			if (skip_value(l, depth + 1) != SURE)
				return UNSURE;
			skip_space(l);
			if (at(l, ','))
				l->p++;
			else if (!at(l, ']'))
				return UNSURE;
		}
	}
	if (at(l, '{')) {
		l->p++;
		for (;;) {
			skip_space(l);
			if (at(l, '}')) {
				l->p++;
				return SURE;
			}
			if (skip_key(l) != SURE)
				return UNSURE;
			skip_blank(l);
			if (!at(l, '='))
				return UNSURE;
			l->p++;
			skip_blank(l);
			if (skip_value(l, depth + 1) != SURE)
				return UNSURE;
			skip_space(l);
			if (at(l, ','))
				l->p++;
			else if (!at(l, '}'))
				return UNSURE;
		}
	}
	/* A number, boolean or date-time: up to what ends a value. */
	const char *start = l->p;
	while (l->p < l->end && !strchr("\n\r#,]}\"'[{=", *l->p))
		l->p++;
	return l->p > start ? SURE : UNSURE;
}

/* read_key reads a dotted key into buf as its parts joined by '.'. A part
 * that is quoted may only hold characters a bare key could (then it reads
 * the same as bare); anything else is UNSURE. */
static int read_key(struct lexer *l, char *buf, size_t size)
{
	size_t n = 0;
	for (;;) {
		skip_blank(l);
		char q = 0;
		if (at(l, '"') || at(l, '\''))
			q = *l->p++;
		const char *start = l->p;
		while (l->p < l->end && ((*l->p >= 'A' && *l->p <= 'Z') || (*l->p >= 'a' && *l->p <= 'z') ||
		                         (*l->p >= '0' && *l->p <= '9') || *l->p == '_' || *l->p == '-'))
			l->p++;
		size_t len = l->p - start;
		if (q) {
			if (!at(l, q))
				return UNSURE;
			l->p++;
		}
		if (len == 0) /* also "" and '': an empty key part */
			return UNSURE;
		if (n + len + 2 > size)
			return UNSURE;
		if (n > 0)
			buf[n++] = '.';
		/* go-toml matches field names without regard to case */
		for (size_t i = 0; i < len; i++)
			buf[n + i] = tolower((unsigned char)start[i]);
		n += len;
		buf[n] = 0;
		skip_blank(l);
		if (!at(l, '.'))
			return SURE;
		l->p++;
	}
}

static int skip_key(struct lexer *l)
{
	char buf[256];
	return read_key(l, buf, sizeof buf);
}

/* read_string reads a one-line string without escapes. */
static int read_string(struct lexer *l, char **out)
{
	if (at_str(l, "\"\"\"") || at_str(l, "'''") || !(at(l, '"') || at(l, '\'')))
		return UNSURE;
	char q = *l->p++;
	const char *start = l->p;
	for (; l->p < l->end; l->p++) {
		unsigned char c = *l->p;
		if (c == (unsigned char)q)
			break;
		if (c == '\\' || c < 0x20 || c >= 0x7f) /* escapes, controls, non-ASCII */
			return UNSURE;
	}
	if (l->p == l->end)
		return UNSURE;
	*out = xstrndup(start, l->p - start);
	l->p++;
	return SURE;
}

/* read_string_array reads an array of such strings. */
static int read_string_array(struct lexer *l, char ***out, size_t *n)
{
	if (!at(l, '['))
		return UNSURE;
	l->p++;
	*out = NULL;
	*n = 0;
	for (;;) {
		skip_space(l);
		if (at(l, ']')) {
			l->p++;
			return SURE;
		}
		char *s;
		if (read_string(l, &s) != SURE)
			return UNSURE;
		*out = xrealloc(*out, (*n + 1) * sizeof **out);
		(*out)[(*n)++] = s;
		skip_space(l);
		if (at(l, ','))
			l->p++;
		else if (!at(l, ']'))
			return UNSURE;
	}
}

struct listener {
	char *addr, *mode;
};

/* clean_join returns dir + "/" + rel with "." and ".." resolved as Go's
 * filepath.Join does; dir is absolute. */
static char *clean_join(const char *dir, const char *rel)
{
	size_t n = strlen(dir) + strlen(rel) + 2;
	char *in = xrealloc(NULL, n), *out = xrealloc(NULL, n + 1);
	snprintf(in, n, "%s/%s", dir, rel);
	size_t o = 0;
	for (char *seg = strtok(in, "/"); seg; seg = strtok(NULL, "/")) {
		if (strcmp(seg, ".") == 0)
			continue;
		if (strcmp(seg, "..") == 0) {
			while (o > 0 && out[o - 1] != '/')
				o--;
			if (o > 0)
				o--;
			continue;
		}
		out[o++] = '/';
		size_t len = strlen(seg);
		memcpy(out + o, seg, len);
		o += len;
	}
	if (o == 0)
		out[o++] = '/';
	out[o] = 0;
	xfree(in);
	return out;
}

/* read_settings reads the keys relay qq needs from the config at path. */
static int read_settings(const char *path, struct settings *s)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0)
		return UNSURE;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size > MAX_CONFIG_BYTES) {
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
	if (memchr(doc, 0, len) || (len >= 3 && memcmp(doc, "\xef\xbb\xbf", 3) == 0))
		return UNSURE;

	struct lexer l = {doc, doc + len};
	struct listener *ls = NULL;
	size_t nls = 0;
	int in_listen = 0; /* inside a [[listen]] table */
	char table[256] = "";
	int have_queue = 0, have_down = 0, have_exempt = 0;
	char *down = NULL;

	while (l.p < l.end) {
		skip_blank(&l);
		if (end_of_line(&l) == SURE)
			continue;
		if (at(&l, '[')) {
			int array = at_str(&l, "[[");
			l.p += array ? 2 : 1;
			const char *name = l.p;
			if (read_key(&l, table, sizeof table) != SURE)
				return UNSURE;
			/* go-toml matches keys to fields without case, but [[LISTEN]]
			 * and [[listen]] are two arrays in TOML, the later one
			 * winning: no capitals in a table name, to be sure. */
			for (const char *q = name; q < l.p; q++)
				if (*q >= 'A' && *q <= 'Z')
					return UNSURE;
			skip_blank(&l);
			if (!at_str(&l, array ? "]]" : "]"))
				return UNSURE;
			l.p += array ? 2 : 1;
			if (end_of_line(&l) != SURE)
				return UNSURE;
			in_listen = 0;
			if (strcmp(table, "listen") == 0 || strncmp(table, "listen.", 7) == 0 ||
			    strncmp(table, "local.", 6) == 0 || (array && strcmp(table, "local") == 0)) {
				if (!(array && strcmp(table, "listen") == 0))
					return UNSURE;
				ls = xrealloc(ls, (nls + 1) * sizeof *ls);
				ls[nls].addr = ls[nls].mode = NULL;
				nls++;
				in_listen = 1;
			}
			continue;
		}
		char key[256], full[520];
		if (read_key(&l, key, sizeof key) != SURE)
			return UNSURE;
		skip_blank(&l);
		if (!at(&l, '='))
			return UNSURE;
		l.p++;
		skip_blank(&l);
		if (table[0])
			snprintf(full, sizeof full, "%s.%s", table, key);
		else
			snprintf(full, sizeof full, "%s", key);

		int r;
		if (in_listen && (strcmp(key, "addr") == 0 || strcmp(key, "mode") == 0)) {
			char **dst = key[0] == 'a' ? &ls[nls - 1].addr : &ls[nls - 1].mode;
			if (*dst)
				return UNSURE;
			r = read_string(&l, dst);
		} else if (in_listen && (strncmp(key, "addr.", 5) == 0 || strncmp(key, "mode.", 5) == 0)) {
			return UNSURE;
		} else if (strcmp(full, "local.qmail_queue") == 0) {
			if (have_queue++)
				return UNSURE;
			r = read_string(&l, &s->qmail_queue);
		} else if (strcmp(full, "local.on_daemon_down") == 0) {
			if (have_down++)
				return UNSURE;
			r = read_string(&l, &down);
		} else if (strcmp(full, "local.exempt_users") == 0) {
			if (have_exempt++)
				return UNSURE;
			r = read_string_array(&l, &s->exempt, &s->nexempt);
		} else if (strcmp(full, "listen") == 0 || strncmp(full, "listen.", 7) == 0 ||
		           strcmp(full, "local") == 0 ||
		           (strncmp(full, "local.", 6) == 0 && strchr(full + 6, '.'))) {
			return UNSURE; /* written in a form this reader does not follow */
		} else {
			r = skip_value(&l, 0);
		}
		if (r != SURE || end_of_line(&l) != SURE)
			return UNSURE;
	}

	/* The socket: the first local listener; without [[listen]] the
	 * default ones, whose local socket is ./relay-data/submit.sock. */
	const char *addr = NULL;
	if (nls == 0)
		addr = "./relay-data/submit.sock";
	for (size_t i = 0; i < nls && !addr; i++)
		if (ls[i].mode && strcmp(ls[i].mode, "local") == 0)
			addr = ls[i].addr;
	if (addr == NULL || addr[0] == 0)
		return UNSURE;
	if (addr[0] == '/') {
		s->socket = addr; /* used as written, as Go does */
	} else {
		/* relative to the config file's directory */
		char *abs;
		if (path[0] == '/') {
			abs = xstrndup(path, strlen(path));
		} else {
			char cwd[4096];
			if (getcwd(cwd, sizeof cwd) == NULL)
				return UNSURE;
			size_t n = strlen(cwd) + strlen(path) + 2;
			abs = xrealloc(NULL, n);
			snprintf(abs, n, "%s/%s", cwd, path);
		}
		*strrchr(abs, '/') = 0;
		s->socket = clean_join(abs, addr);
	}
	if (!have_queue)
		s->qmail_queue = "/var/qmail/bin/qmail-queue.orig";
	if (s->qmail_queue[0] != '/')
		return UNSURE; /* empty (an error) or looked up in $PATH by Go */
	if (!have_down || strcmp(down, "accept") == 0)
		s->defer_down = 0;
	else if (strcmp(down, "defer") == 0)
		s->defer_down = 1;
	else
		return UNSURE;
	if (!have_exempt) {
		s->exempt = (char **)default_exempt;
		s->nexempt = sizeof default_exempt / sizeof *default_exempt;
	}
	return SURE;
}

/* fallback execs relay-local qq on the same config and fds 0 and 1, for it
 * to decide. */
static int fallback(const char *config)
{
	char *argv[] = {"relay-local", "qq", "--config", (char *)config, NULL};
	signal(SIGPIPE, SIG_DFL);
	execve(RELAY_LOCAL_PATH, argv, environ);
	logf_("cannot run %s for %s: %s", RELAY_LOCAL_PATH, config, strerror(errno));
	return EXIT_CONFIG_ERROR;
}

/* go_atoi_ok reports whether Go's strconv.Atoi takes [p, end). */
static int go_atoi_ok(const char *p, const char *end)
{
	if (p < end && (*p == '+' || *p == '-'))
		p++;
	if (p == end || end - p > 18) /* past 18 digits int64 may overflow: refuse */
		return 0;
	for (; p < end; p++)
		if (*p < '0' || *p > '9')
			return 0;
	return 1;
}

/* passwd_name is Go's os/user match of one passwd line (readColonFile and
 * matchUserIndexValue, without cgo): blank space around the line ignored,
 * comments skipped, at least 6 colons, the uid field equal to want, a
 * name that is not empty and does not start with + or -, numeric uid and
 * gid. It returns the name or NULL. */
static char *passwd_name(char *line, size_t len, const char *want)
{
	while (len > 0 && isspace((unsigned char)line[len - 1]))
		len--;
	while (len > 0 && isspace((unsigned char)*line))
		line++, len--;
	if (len == 0 || line[0] == '#')
		return NULL;
	const char *f[7];
	size_t nf = 1, colons = 0;
	f[0] = line;
	for (size_t i = 0; i < len; i++) {
		if (line[i] != ':')
			continue;
		colons++;
		if (nf < 7)
			f[nf++] = line + i + 1;
	}
	if (colons < 6)
		return NULL;
	const char *uid = f[2], *uidend = f[3] - 1, *gid = f[3], *gidend = f[4] - 1;
	size_t namelen = f[1] - 1 - f[0];
	if ((size_t)(uidend - uid) != strlen(want) || memcmp(uid, want, uidend - uid) != 0 || namelen == 0 ||
	    f[0][0] == '+' || f[0][0] == '-' || !go_atoi_ok(uid, uidend) || !go_atoi_ok(gid, gidend))
		return NULL;
	return xstrndup(f[0], namelen);
}

/* account_name returns uid's login name from /etc/passwd as Go's os/user
 * finds it without cgo (relay-local is built so), or NULL. */
static char *account_name(uid_t uid)
{
	int fd = open(RELAY_PASSWD, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	char want[24], *found = NULL;
	snprintf(want, sizeof want, "%u", (unsigned)uid);
	size_t cap = 4096, n = 0;
	char *buf = xrealloc(NULL, cap);
	int eof = 0;
	while (found == NULL) {
		char *nl = memchr(buf, '\n', n);
		if (nl == NULL && !eof) {
			if (n == cap) /* a long line: hold all of it, as Go does */
				buf = xrealloc(buf, cap *= 2);
			ssize_t r = read(fd, buf + n, cap - n);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				eof = 1;
			else
				n += r;
			continue;
		}
		if (nl == NULL && n == 0)
			break; /* end of file */
		size_t len = nl ? (size_t)(nl - buf) : n; /* no newline: the last line */
		found = passwd_name(buf, len, want);
		size_t used = nl ? len + 1 : n;
		memmove(buf, buf + used, n - used);
		n -= used;
	}
	close(fd);
	xfree(buf);
	return found;
}

/* ---------------------------------------------------------------------
 * Input: the message (fd 0) and the envelope (fd 1), by qmail-queue's
 * rules.
 */

struct spool {
	char *head; /* the message, when file is -1 */
	size_t nhead;
	int file;   /* unlinked file with the whole message, or -1 */
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
 * RELAY_QQ_SPOOL_MEMORY bytes, past that whole into an unlinked file (which
 * becomes the real qmail-queue's fd 0). */
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
			if ((sp->file = temp_file(tmpdir)) < 0 || write_all(sp->file, sp->head, sp->nhead) < 0) {
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
		ssize_t r = pread(sp->file, buf, chunk, off);
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

/* hand_over_fds makes fd 0 and fd 1 the message and the envelope; -1 and
 * a logged line when it cannot. */
static int hand_over_fds(struct spool *sp, struct envelope *e, const char *tmpdir)
{
	int msg = sp->file, env = -1;
	if (msg < 0 && ((msg = mem_file("relay-qq-message", tmpdir)) < 0 || each_chunk(sp, write_chunk, &msg) < 0)) {
		logf_("cannot hand the message to the real qmail-queue: %s", strerror(errno));
		return -1;
	}
	if ((env = mem_file("relay-qq-envelope", tmpdir)) < 0 || write_all(env, e->raw, e->nraw) < 0) {
		logf_("cannot hand the envelope to the real qmail-queue: %s", strerror(errno));
		return -1;
	}
	if (lseek(msg, 0, SEEK_SET) < 0 || lseek(env, 0, SEEK_SET) < 0 || dup2(msg, 0) < 0 || dup2(env, 1) < 0) {
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
	return hand_over_fds(sp, e, s->tmpdir) < 0 ? EXIT_DEFERRED : exec_qq(s);
}

/* ---------------------------------------------------------------------
 * The check conversation with the daemon.
 */

struct conn {
	int fd;
	char buf[4096];
	size_t pos, n;
	char out[16384];
	size_t nout;
	int eightbit;   /* the daemon offered 8BITMIME */
	int commit;   /* the daemon offered AUTH X-RELAY-COMMIT */
};

/* A reply: its code, and its text (lines joined by '\n'). code is -1 when
 * the connection failed, with the reason in text. */
struct reply {
	int code;
	char text[2048];
};

static void io_failure(struct reply *r, const char *what)
{
	r->code = -1;
	snprintf(r->text, sizeof r->text, "%s", what);
}

static int flush_out(struct conn *c, struct reply *r)
{
	size_t off = 0;
	while (off < c->nout) {
		ssize_t w = send(c->fd, c->out + off, c->nout - off, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			io_failure(r, errno == EAGAIN ? "write: i/o timeout" : strerror(errno));
			return -1;
		}
		off += w;
	}
	c->nout = 0;
	return 0;
}

static int put(struct conn *c, struct reply *r, const char *p, size_t n)
{
	while (n > 0) {
		if (c->nout == sizeof c->out && flush_out(c, r) < 0)
			return -1;
		size_t k = sizeof c->out - c->nout < n ? sizeof c->out - c->nout : n;
		memcpy(c->out + c->nout, p, k);
		c->nout += k;
		p += k;
		n -= k;
	}
	return 0;
}

/* read_line reads one reply line (without CRLF) within the timeout. */
static int read_line(struct conn *c, struct reply *r, char *line, size_t size)
{
	size_t n = 0;
	for (;;) {
		if (c->pos == c->n) {
			struct pollfd p = {.fd = c->fd, .events = POLLIN};
			int k;
			while ((k = poll(&p, 1, RELAY_QQ_TIMEOUT_MS)) < 0 && errno == EINTR)
				;
			if (k == 0) {
				io_failure(r, "read: i/o timeout");
				return -1;
			}
			ssize_t got = read_some(c->fd, c->buf, sizeof c->buf);
			if (got <= 0) {
				io_failure(r, got == 0 ? "EOF" : strerror(errno));
				return -1;
			}
			c->pos = 0;
			c->n = got;
		}
		char ch = c->buf[c->pos++];
		if (ch == '\n') {
			if (n > 0 && line[n - 1] == '\r')
				n--;
			line[n] = 0;
			return 0;
		}
		if (n + 1 < size)
			line[n++] = ch;
	}
}

/* read_reply reads a whole reply; on the EHLO reply it notes the
 * extensions. */
static int read_reply(struct conn *c, struct reply *r, int ehlo)
{
	char line[1024];
	size_t t = 0;
	r->text[0] = 0;
	for (int first = 1;; first = 0) {
		if (read_line(c, r, line, sizeof line) < 0)
			return -1;
		if (strlen(line) < 4 || line[0] < '1' || line[0] > '5' || line[1] < '0' || line[1] > '9' ||
		    line[2] < '0' || line[2] > '9' || (line[3] != ' ' && line[3] != '-')) {
			io_failure(r, "short or malformed response line");
			return -1;
		}
		int code = atoi(line);
		if (!first && code != r->code) {
			io_failure(r, "response codes differ between lines");
			return -1;
		}
		r->code = code;
		const char *text = line + 4;
		if (ehlo && !first) {
			if (strcmp(text, "8BITMIME") == 0)
				c->eightbit = 1;
			if (strncmp(text, "AUTH ", 5) == 0) {
				for (const char *m = text + 5; *m;) {
					size_t len = strcspn(m, " ");
					if (len == strlen("X-RELAY-COMMIT") && strncasecmp(m, "X-RELAY-COMMIT", len) == 0)
						c->commit = 1;
					m += len;
					m += strspn(m, " ");
				}
			}
		}
		t += snprintf(r->text + t, t < sizeof r->text ? sizeof r->text - t : 0, "%s%s", first ? "" : "\n", text);
		if (t >= sizeof r->text)
			t = sizeof r->text - 1;
		if (line[3] == ' ')
			return 0;
	}
}

/* queue_command adds one command line to the output buffer. */
static int queue_command(struct conn *c, struct reply *r, const char *format, ...)
{
	char line[2200];
	va_list ap;
	va_start(ap, format);
	int n = vsnprintf(line, sizeof line - 2, format, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof line - 2) {
		io_failure(r, "command too long");
		return -1;
	}
	memcpy(line + n, "\r\n", 2);
	return put(c, r, line, n + 2);
}

/* send_and_read sends what is queued and reads one reply. */
static int send_and_read(struct conn *c, struct reply *r)
{
	if (flush_out(c, r) < 0)
		return -1;
	return read_reply(c, r, 0);
}

/* reply_line formats a reply as relay qq reports it: "451 4.7.1 text". */
static const char *reply_line(const struct reply *r, char *out, size_t size)
{
	snprintf(out, size, "%d %s", r->code, r->text);
	return out;
}

/* The DATA stream: net/textproto's DotWriter, byte for byte (LF becomes
 * CRLF, a leading dot is doubled, the end is CRLF . CRLF). */
struct dot {
	struct conn *c;
	struct reply *r;
	enum { BEGIN, BEGIN_LINE, CR, DATA } state;
};

static int dot_write(void *arg, const char *p, size_t n)
{
	struct dot *d = arg;
	struct conn *c = d->c;
	for (size_t i = 0; i < n; i++) {
		char ch = p[i];
		if (c->nout + 3 > sizeof c->out && flush_out(c, d->r) < 0)
			return -1;
		switch (d->state) {
		case BEGIN:
		case BEGIN_LINE:
			d->state = DATA;
			if (ch == '.')
				c->out[c->nout++] = '.';
			/* fallthrough */
		case DATA:
			if (ch == '\r')
				d->state = CR;
			if (ch == '\n') {
				c->out[c->nout++] = '\r';
				d->state = BEGIN_LINE;
			}
			break;
		case CR:
			d->state = DATA;
			if (ch == '\n')
				d->state = BEGIN_LINE;
			break;
		}
		c->out[c->nout++] = ch;
	}
	return 0;
}

static int dot_close(struct dot *d)
{
	const char *end = d->state == BEGIN_LINE ? ".\r\n" : d->state == CR ? "\n.\r\n" : "\r\n.\r\n";
	if (put(d->c, d->r, end, strlen(end)) < 0 || flush_out(d->c, d->r) < 0)
		return -1;
	return read_reply(d->c, d->r, 0);
}

enum verdict { UNKNOWN, RESERVED, EXEMPT, HELD, DEFERRED, REJECTED, DOWN };

/* fail maps a failed step: a reply decides by its class; a broken
 * conversation with a daemon that spoke the protocol is a deferral, never
 * "down" (which could pass mail uncounted). */
static enum verdict fail(struct conn *c, const struct reply *r, const char *socket, char *why, size_t size)
{
	close(c->fd);
	c->fd = -1;
	if (r->code < 0) {
		snprintf(why, size, "relay daemon at %s stopped answering: %s", socket, r->text);
		return DEFERRED;
	}
	reply_line(r, why, size);
	return r->code < 500 ? DEFERRED : REJECTED;
}

static enum verdict check(const struct settings *s, struct conn *c, struct spool *sp, struct envelope *e, char *why, size_t size)
{
	struct reply r;
	c->pos = c->n = c->nout = 0;
	c->eightbit = c->commit = 0;
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (c->fd < 0 || strlen(s->socket) >= sizeof sa.sun_path) {
		/* our own trouble, not a daemon that is not there: defer */
		snprintf(why, size, "relay daemon at %s: %s", s->socket, c->fd < 0 ? strerror(errno) : "socket path too long");
		if (c->fd >= 0)
			close(c->fd);
		return DEFERRED;
	}
	strcpy(sa.sun_path, s->socket);
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
	 * With one recipient (a script's usual mail), EHLO, MAIL, RCPT and
	 * DATA go in the first write, and the replies are read after it: the
	 * check conversation is relay's own protocol with its own daemon,
	 * which reads commands one by one, so one wait does instead of three.
	 * A refused MAIL or RCPT makes the daemon refuse DATA too ("503"), so
	 * no message text is ever sent after a refusal. With more recipients a
	 * RCPT is sent only after the one before it was accepted, as relay qq
	 * in Go does, so the daemon sees no recipient after a refusal. */
	int batch = e->nrcpts == 1;
	int sent = !batch || (queue_command(c, &r, "EHLO relay-qq") == 0 &&
	                      queue_command(c, &r, "MAIL FROM:<%s> BODY=8BITMIME", e->sender) == 0 &&
	                      queue_command(c, &r, "RCPT TO:<%s>", e->rcpts[0]) == 0 &&
	                      queue_command(c, &r, "DATA") == 0 && flush_out(c, &r) == 0);
	/* Even when that write failed, a refusal may be waiting to be read. */
	if (read_reply(c, &r, 0) < 0 || r.code != 220) {
		if (r.code > 0)
			reply_line(&r, why, size);
		else
			snprintf(why, size, "relay daemon at %s did not greet: %s", s->socket, r.text);
		close(c->fd);
		return DEFERRED;
	}
	if (!sent || (!batch && (put(c, &r, "EHLO relay-qq\r\n", 15) < 0 || flush_out(c, &r) < 0)) ||
	    read_reply(c, &r, 1) < 0 || r.code != 250) {
		/* Not even a 5xx here means "reject": it is not the check
		 * protocol speaking. */
		fail(c, &r, s->socket, why, size);
		return DEFERRED;
	}
	if (!c->commit) {
		snprintf(why, size, "relay daemon at %s does not speak the check protocol (no AUTH X-RELAY-COMMIT after EHLO relay-qq)", s->socket);
		close(c->fd);
		return DEFERRED;
	}
	if (batch) {
		if (read_reply(c, &r, 0) < 0 || r.code != 250)
			return fail(c, &r, s->socket, why, size);
		if (read_reply(c, &r, 0) < 0 || r.code / 10 != 25)
			return fail(c, &r, s->socket, why, size);
		if (read_reply(c, &r, 0) < 0 || r.code != 354)
			return fail(c, &r, s->socket, why, size);
	} else {
		if (queue_command(c, &r, "MAIL FROM:<%s>%s", e->sender, c->eightbit ? " BODY=8BITMIME" : "") < 0 ||
		    send_and_read(c, &r) < 0 || r.code != 250)
			return fail(c, &r, s->socket, why, size);
		for (size_t i = 0; i < e->nrcpts; i++)
			if (queue_command(c, &r, "RCPT TO:<%s>", e->rcpts[i]) < 0 || send_and_read(c, &r) < 0 ||
			    r.code / 10 != 25)
				return fail(c, &r, s->socket, why, size);
		if (queue_command(c, &r, "DATA") < 0 || send_and_read(c, &r) < 0 || r.code != 354)
			return fail(c, &r, s->socket, why, size);
	}
	struct dot d = {c, &r, BEGIN};
	if (each_chunk(sp, dot_write, &d) < 0 || dot_close(&d) < 0 || r.code != 250)
		return fail(c, &r, s->socket, why, size);

	snprintf(why, size, "250 %s", r.text);
	/* The verdict: "ok reserved", "ok exempt", "ok held <id>", after an
	 * optional enhanced status code, in any case. */
	char text[2048], *f[4];
	int nf = 0;
	snprintf(text, sizeof text, "%s", r.text);
	char *t = text;
	int a, b2, c2;
	char sp_;
	if (sscanf(t, "%d.%d.%d%c", &a, &b2, &c2, &sp_) == 4 && sp_ == ' ' && isdigit((unsigned char)t[0]))
		t = strchr(t, ' ') + 1;
	for (char *tok = strtok(t, " \t\n\r\v\f"); tok && nf < 4; tok = strtok(NULL, " \t\n\r\v\f"))
		f[nf++] = tok;
	if (nf == 2 && strcasecmp(f[0], "ok") == 0 && strcasecmp(f[1], "reserved") == 0)
		return RESERVED;
	if (nf == 2 && strcasecmp(f[0], "ok") == 0 && strcasecmp(f[1], "exempt") == 0)
		return EXEMPT;
	if (nf == 3 && strcasecmp(f[0], "ok") == 0 && strcasecmp(f[1], "held") == 0)
		return HELD;
	return UNKNOWN;
}

/* quit says QUIT and closes; its reply changes nothing, so it is not
 * waited for. */
static void quit(struct conn *c)
{
	struct reply r;
	if (queue_command(c, &r, "QUIT") == 0)
		flush_out(c, &r);
	close(c->fd);
}

/* commit tells the daemon that the real qmail-queue queued the message:
 * AUTH X-RELAY-COMMIT with an empty initial response (RFC 4954 "="), and
 * QUIT behind it; only the AUTH reply is read. */
static int commit(struct conn *c, struct reply *r)
{
	if (queue_command(c, r, "AUTH X-RELAY-COMMIT =") < 0 || queue_command(c, r, "QUIT") < 0 ||
	    send_and_read(c, r) < 0)
		return -1;
	return r->code == 235 ? 0 : -1;
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
	char why[2600], line[2100];
	struct reply r;
	switch (check(s, &c, &sp, &e, why, sizeof why)) {
	case RESERVED:
		/* fds 0 and 1 first, so that only the exec itself can fail once
		 * the message is charged; if they cannot be set up, the session
		 * ends without a commit and the daemon releases the charge. The
		 * commit comes before the exec: nothing of relay qq is left to
		 * commit after. A real qmail-queue that then fails has been
		 * charged; counting errs on the side of more. */
		if (hand_over_fds(&sp, &e, s->tmpdir) < 0) {
			close(c.fd);
			return EXIT_DEFERRED;
		}
		/* Without the commit (the daemon gave up on the reservation, or
		 * restarted) the message would go out uncounted: defer it. */
		if (commit(&c, &r) < 0) {
			close(c.fd);
			logf_("deferred: the daemon did not take the commit: %s", r.code < 0 ? r.text : reply_line(&r, line, sizeof line));
			return EXIT_DEFERRED;
		}
		close(c.fd);
		return exec_qq(s);
	case EXEMPT:
		quit(&c);
		return exec_real(s, &sp, &e);
	case HELD:
		quit(&c);
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
		if (hand_over_fds(&sp, &e, s->tmpdir) < 0)
			return EXIT_DEFERRED;
		return fallback(s->config);
	case UNKNOWN:
		break;
	}
	close(c.fd);
	logf_("deferred: daemon reply not understood: %s", why);
	return EXIT_DEFERRED;
}

int main(int argc, char **argv)
{
	/* config.PathFromArgs */
	const char *config = DEFAULT_CONFIG;
	int rest = 1;
	if (argc >= 3 && (strcmp(argv[1], "--config") == 0 || strcmp(argv[1], "-config") == 0)) {
		config = argv[2];
		rest = 3;
	} else if (argc >= 2 && strncmp(argv[1], "--config=", 9) == 0) {
		config = argv[1] + 9;
		rest = 2;
	} else if (getenv("RELAY_CONFIG") && *getenv("RELAY_CONFIG")) {
		config = getenv("RELAY_CONFIG");
	}
	/* The daemon counts the uid SO_PEERCRED reports, the effective one: a
	 * setuid qq would make every caller look like its owner. A setgid one
	 * (the relayqq install) reads only the secure config. */
	if (geteuid() != getuid()) {
		logf_("must not run setuid (uid %d, effective %d): the daemon would count every caller as %d; install it setgid or plain",
		      (int)getuid(), (int)geteuid(), (int)geteuid());
		return EXIT_CONFIG_ERROR;
	}
	/* A setgid qq must not let the caller choose where the message is
	 * spooled, nor which config is read. */
	const char *tmpdir = getenv("TMPDIR");
	if (tmpdir == NULL || *tmpdir == 0)
		tmpdir = "/tmp";
	if (getegid() != getgid()) {
		config = RELAY_SECURE_CONFIG;
		tmpdir = "/tmp";
	}
	int settings_only = rest < argc && strcmp(argv[rest], "--settings") == 0;
	if (rest < argc && !(settings_only && rest + 1 == argc)) {
		logf_("takes no arguments (got \"%s\")", argv[rest]);
		return EXIT_BAD_ENVELOPE;
	}

	if (settings_only && getegid() != getgid()) {
		logf_("--settings is for tests, not for a setgid run");
		return EXIT_CONFIG_ERROR;
	}
	struct settings s = {.config = config, .tmpdir = tmpdir};
	if (read_settings(config, &s) != SURE) {
		if (settings_only) {
			printf("unsure\n");
			return 0;
		}
		return fallback(config);
	}
	if (settings_only) {
		/* for the tests that hold this reader to the Go one */
		printf("socket=%s\nqmail_queue=%s\non_daemon_down=%s\nexempt_users=", s.socket, s.qmail_queue,
		       s.defer_down ? "defer" : "accept");
		for (size_t i = 0; i < s.nexempt; i++)
			printf("%s%s", i ? "," : "", s.exempt[i]);
		char *account = account_name(getuid());
		printf("\naccount=%s\n", account ? account : "");
		return 0;
	}

	if (s.nexempt > 0) {
		char *name = account_name(getuid());
		for (size_t i = 0; name && i < s.nexempt; i++) {
			if (strcmp(name, s.exempt[i]) == 0) {
				/* qmail's own accounts: the real qmail-queue in place,
				 * fds untouched, at no cost. */
				char *qargv[] = {s.qmail_queue, NULL};
				execve(s.qmail_queue, qargv, environ);
				logf_("cannot run the real qmail-queue %s: %s", s.qmail_queue, strerror(errno));
				return EXIT_DEFERRED;
			}
		}
	}
	signal(SIGPIPE, SIG_IGN); /* write errors are judged by exit codes */
	return filter(&s);
}
