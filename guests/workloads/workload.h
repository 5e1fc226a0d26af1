/*
 * workload.h - helpers shared by the guest workloads of fastrestart (memcheck, blkcheck,
 * l1tool, edutest).
 *
 * A single-header library: every program stays one standalone static binary built from its
 * own .c file (gcc -O2 -static -Wall -Wextra -o OUT SRC; the compiler finds this header next
 * to the source). Everything here is static, so a program carries only what it calls, and
 * marked unused, so what it does not call draws no warning.
 *
 * Before including it, a program defines _GNU_SOURCE (before any system header) and WL_PROG,
 * its name as a string literal: it prefixes messages ("memcheck: ...") and names the files a
 * daemon keeps in its directory (<dir>/<WL_PROG>.pid, .log, .ready, .result).
 *
 *   utils    now_mono, pace, sleep_ms, mix64, prog_vwarn, die, die_usage, parse_u64,
 *            struct option_spec, parse_options, dlog
 *   files    path_in, slurp, write_atomic
 *   JSON     struct sbuf, sb_printf, sb_json_str
 *   daemons  read_pid, pid_alive, write_pid_file, detach, stdin_from_devnull,
 *            stdout_stderr_to, fork_daemon, await_ready, request_result, stop_daemon
 */
#ifndef FASTRESTART_WORKLOAD_H
#define FASTRESTART_WORKLOAD_H

#ifndef WL_PROG
#error "define WL_PROG (the program's name, a string literal) before including workload.h"
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define WL_API static __attribute__((unused))
#define WL_PRINTF(f, a) __attribute__((format(printf, f, a)))

/* ------------------------------------------------------------------ utils */

WL_API double now_mono(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Pacing against an absolute schedule, so that the rate does not drift: step n of a loop
 * running at rate steps per second is due at t0 + n / rate. Sets ts to the time left until
 * step n (ts is left alone when the step is due). After a stall of over a second (the VM was
 * stopped) it starts a new schedule (t0 = now, n = 0) rather than burst to catch up. */
WL_API void pace(double *t0, uint64_t *n, double rate, double now, struct timespec *ts)
{
	double target = *t0 + (double)*n / rate;

	if (now - target > 1.0) {
		*t0 = now;
		*n = 0;
	} else if (target > now) {
		double d = target - now;

		ts->tv_sec = (time_t)d;
		ts->tv_nsec = (long)((d - (double)ts->tv_sec) * 1e9);
	}
}

WL_API void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

/* splitmix64 finaliser: a cheap, well-mixed 64-bit bijection. */
static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* "<prog>: <message>\n" on stderr. */
WL_API void prog_vwarn(const char *fmt, va_list ap)
{
	fputs(WL_PROG ": ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
}

WL_API void die(int code, const char *fmt, ...) WL_PRINTF(2, 3) __attribute__((noreturn));
WL_API void die(int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	prog_vwarn(fmt, ap);
	va_end(ap);
	exit(code);
}

/* A usage (or setup) error: exit code 2. */
WL_API void die_usage(const char *fmt, ...) WL_PRINTF(1, 2) __attribute__((noreturn));
WL_API void die_usage(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	prog_vwarn(fmt, ap);
	va_end(ap);
	exit(2);
}

WL_API uint64_t parse_u64(const char *opt, const char *s)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s || *end || s[0] == '-')
		die_usage("%s: not a non-negative integer: '%s'", opt, s);
	return v;
}

/* One command-line option: "--name value" stores into str (the string) or u64 (parsed by
 * parse_u64), and sets *have if given; a flag (neither str nor u64) only sets *have. */
struct option_spec {
	const char *name;
	const char **str;
	uint64_t *u64;
	int *have;
};

/* Parse argv[first..] against specs (ended by a { NULL } entry). Usage errors exit 2:
 * "<opt>: missing value", "unknown option '<opt>'", or parse_u64's. */
WL_API void parse_options(int argc, char **argv, int first, const struct option_spec *specs)
{
	int i;

	for (i = first; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		const struct option_spec *o = specs;

		while (o->name && strcmp(a, o->name))
			o++;
		if (o->name && !o->str && !o->u64) {
			*o->have = 1;
			continue;
		}
		if (!v)
			die_usage("%s: missing value", a);
		if (!o->name)
			die_usage("unknown option '%s'", a);
		if (o->str)
			*o->str = v;
		else
			*o->u64 = parse_u64(a, v);
		if (o->have)
			*o->have = 1;
		i++;
	}
}

/* A daemon's log line (its stderr is its log file). */
WL_API void dlog(const char *fmt, ...) WL_PRINTF(1, 2);
WL_API void dlog(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
}

/* ------------------------------------------------------------------ files */

WL_API void path_in(char *out, size_t n, const char *dir, const char *name)
{
	if ((size_t)snprintf(out, n, "%s/%s", dir, name) >= n)
		die_usage("path too long: %s/%s", dir, name);
}

/* Read a whole small file into a malloc'd NUL-terminated buffer (NULL on error). */
WL_API char *slurp(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	size_t cap = 4096, len = 0;
	char *buf;
	ssize_t r;

	if (fd < 0)
		return NULL;
	buf = malloc(cap + 1);
	if (!buf) {
		close(fd);
		return NULL;
	}
	for (;;) {
		if (len == cap) {
			char *nb = realloc(buf, cap * 2 + 1);

			if (!nb)
				break;
			buf = nb;
			cap *= 2;
		}
		r = read(fd, buf + len, cap - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		len += (size_t)r;
	}
	close(fd);
	buf[len] = 0;
	return buf;
}

/* Write a file atomically: a reader sees the old file, no file, or all of the new one. */
WL_API int write_atomic(const char *path, const char *text)
{
	char tmp[PATH_MAX + 16];
	size_t len = strlen(text), off = 0;
	int fd;

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	while (off < len) {
		ssize_t w = write(fd, text + off, len - off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			close(fd);
			return -1;
		}
		off += (size_t)w;
	}
	fsync(fd);
	close(fd);
	return rename(tmp, path);
}

/* ------------------------------------------------------------------- JSON */

/* Growable string buffer for building JSON without fixed-size surprises. */
struct sbuf {
	char *p;
	size_t len, cap;
};

WL_API void sb_printf(struct sbuf *b, const char *fmt, ...) WL_PRINTF(2, 3);
WL_API void sb_printf(struct sbuf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		size_t room = b->cap - b->len;

		va_start(ap, fmt);
		n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, ap);
		va_end(ap);
		if (n < 0)
			return;
		if ((size_t)n < room) {
			b->len += (size_t)n;
			return;
		}
		b->cap = (b->cap + (size_t)n + 1) * 2;
		b->p = realloc(b->p, b->cap);
		if (!b->p) {
			fputs(WL_PROG ": out of memory\n", stderr);
			exit(1);
		}
	}
}

/* A JSON string literal, for the user-supplied strings we print. */
WL_API void sb_json_str(struct sbuf *b, const char *s)
{
	sb_printf(b, "\"");
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\')
			sb_printf(b, "\\%c", c);
		else if (c < 0x20)
			sb_printf(b, "\\u%04x", c);
		else
			sb_printf(b, "%c", c);
	}
	sb_printf(b, "\"");
}

/* ---------------------------------------------------------------- daemons */

/* The pid in <dir>/<prog>.pid, or -1. */
WL_API pid_t read_pid(const char *dir)
{
	char path[PATH_MAX];
	char *s;
	long pid;

	path_in(path, sizeof(path), dir, WL_PROG ".pid");
	s = slurp(path);
	if (!s)
		return -1;
	pid = strtol(s, NULL, 10);
	free(s);
	return pid > 0 ? (pid_t)pid : -1;
}

/* A zombie still answers kill(pid, 0) until its new parent reaps it, which some inits do
 * lazily: treat it as dead, as the daemon's work is over. */
WL_API int pid_alive(pid_t pid)
{
	char path[64], *s, *p;
	int zombie = 0;

	if (pid <= 0 || (kill(pid, 0) != 0 && errno != EPERM))
		return 0;
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	s = slurp(path);
	if (s && (p = strrchr(s, ')')) && p[1] == ' ')
		zombie = p[2] == 'Z' || p[2] == 'X';
	free(s);
	return !zombie;
}

/* In the daemon: write <dir>/<prog>.pid; on failure say why on status_fd and return -1. */
WL_API int write_pid_file(const char *dir, int status_fd)
{
	char path[PATH_MAX], pidtxt[32];

	path_in(path, sizeof(path), dir, WL_PROG ".pid");
	snprintf(pidtxt, sizeof(pidtxt), "%d\n", (int)getpid());
	if (write_atomic(path, pidtxt) != 0) {
		dprintf(status_fd, "cannot write %s: %s\n", path, strerror(errno));
		return -1;
	}
	return 0;
}

/* In the child of a fork: setsid and fork again, so that the daemon is reparented to init
 * and has no controlling terminal (the shell or serial console session that started it can
 * go away). Returns in the grandchild only; the middle process exits at once (its status is
 * of no interest: the parent reaps it and waits on a pipe for the daemon's word). */
WL_API void detach(void)
{
	pid_t pid;

	setsid();
	pid = fork();
	if (pid < 0)
		_exit(1);
	if (pid > 0)
		_exit(0);
}

WL_API void stdin_from_devnull(void)
{
	int fd = open("/dev/null", O_RDONLY);

	if (fd >= 0) {
		dup2(fd, 0);
		close(fd);
	}
}

/* Point stdout and stderr at fd and close it; nothing when fd < 0. */
WL_API void stdout_stderr_to(int fd)
{
	if (fd >= 0) {
		dup2(fd, 1);
		dup2(fd, 2);
		close(fd);
	}
}

/* Start a daemon in dir. Returns 0 in the daemon: detached, in /, stdin from /dev/null,
 * stdout and stderr to <dir>/<prog>.log, pfd[1] the pipe on which it reports "ok" (or why it
 * failed). Returns the pid of the middle process in the parent, for waitpid; pfd[0] is the
 * pipe's read end (see await_ready). */
WL_API pid_t fork_daemon(const char *dir, int pfd[2])
{
	char path[PATH_MAX];
	pid_t pid;
	int fd;

	if (pipe2(pfd, O_CLOEXEC) != 0)
		die_usage("pipe: %s", strerror(errno));
	fflush(NULL);
	pid = fork();
	if (pid < 0)
		die_usage("fork: %s", strerror(errno));
	if (pid > 0) {
		close(pfd[1]);
		return pid;
	}
	close(pfd[0]);
	detach();
	if (chdir("/") != 0)
		_exit(1);
	stdin_from_devnull();
	path_in(path, sizeof(path), dir, WL_PROG ".log");
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
	if (fd < 0)
		fd = open("/dev/null", O_WRONLY);
	stdout_stderr_to(fd);
	return 0;
}

/* The parent's side of `start`: wait up to timeout seconds (600 if 0) for the daemon's word
 * on status_fd ("ok" once it is ready, or why it failed; EOF means it died), then print
 * <dir>/<prog>.ready. Returns the exit code: 0 ready, 1 daemon failure, 2 timeout. */
WL_API int await_ready(int status_fd, uint64_t timeout, const char *dir)
{
	char path[PATH_MAX], status[512];
	struct pollfd pl;
	ssize_t n;
	char *ready;

	pl.fd = status_fd;
	pl.events = POLLIN;
	if (poll(&pl, 1, timeout ? (int)(timeout * 1000) : 600000) <= 0) {
		fprintf(stderr, WL_PROG ": daemon not ready after %" PRIu64 " s\n", timeout ? timeout : 600);
		return 2;
	}
	n = read(status_fd, status, sizeof(status) - 1);
	status[n > 0 ? n : 0] = 0;
	close(status_fd);
	if (strncmp(status, "ok", 2) != 0) {
		fprintf(stderr, WL_PROG ": daemon failed: %s\n",
			n > 0 ? status : "exited without a word (see " WL_PROG ".log)");
		return 1;
	}
	path_in(path, sizeof(path), dir, WL_PROG ".ready");
	ready = slurp(path);
	if (!ready) {
		fprintf(stderr, WL_PROG ": %s missing\n", path);
		return 1;
	}
	fputs(ready, stdout);
	free(ready);
	return 0;
}

/* The first half of `verify`: ask the daemon in dir to stop and verify (SIGUSR1), then wait
 * up to timeout seconds (600 if 0) for <dir>/<prog>.result. If the daemon is gone, a result
 * it left behind is still the answer. Returns the result's text, already printed on stdout
 * (the caller frees it); NULL when there is none, with *rc = 2 when the daemon is gone
 * (said on stderr) or *rc = -1 at the deadline (the caller says so). */
WL_API char *request_result(const char *dir, uint64_t timeout, int *rc)
{
	char path[PATH_MAX];
	pid_t pid = read_pid(dir);
	double deadline = now_mono() + (double)(timeout ? timeout : 600);
	char *res;

	path_in(path, sizeof(path), dir, WL_PROG ".result");
	if (pid_alive(pid)) {
		unlink(path);
		if (kill(pid, SIGUSR1) != 0)
			die_usage("kill(%d, SIGUSR1): %s", (int)pid, strerror(errno));
	}
	while (access(path, F_OK) != 0) {
		if (!pid_alive(pid) && access(path, F_OK) != 0) {
			fprintf(stderr, WL_PROG ": no daemon running in %s and no result (see " WL_PROG ".log)\n",
				dir);
			*rc = 2;
			return NULL;
		}
		if (now_mono() > deadline) {
			*rc = -1;
			return NULL;
		}
		sleep_ms(10);
	}
	res = slurp(path);
	if (!res)
		die_usage("cannot read %s", path);
	fputs(res, stdout);
	return res;
}

/* `stop`: SIGTERM the daemon in dir, SIGKILL it if it is still there after 5 s. */
WL_API int stop_daemon(const char *dir)
{
	pid_t pid = read_pid(dir);
	int i;

	if (!pid_alive(pid))
		return 0;
	kill(pid, SIGTERM);
	for (i = 0; i < 500 && pid_alive(pid); i++)
		sleep_ms(10);
	if (pid_alive(pid))
		kill(pid, SIGKILL);
	return 0;
}

#endif /* FASTRESTART_WORKLOAD_H */
