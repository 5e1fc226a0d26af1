/*
 * memcheck - memory integrity workload for the L2 guest of fastrestart.
 *
 * A daemon fills N MiB of locked anonymous memory with a deterministic pattern
 * (seed, page number, generation), keeps rewriting random pages with the next
 * generation (verifying each page before it rewrites it, so a corrupted page is
 * never silently repaired), and on request verifies every byte of every page.
 * A single flipped bit anywhere in the region, including one flipped in the
 * host's backing memory while the VM was stopped, makes the verify fail.
 *
 * Usage:
 *   memcheck start  --mib N --seed S --dir D [--writer-hz H] [--timeout SEC]
 *   memcheck verify --dir D [--timeout SEC]
 *   memcheck phys   --dir D --page I
 *   memcheck stop   --dir D
 *   memcheck selftest-flip --dir D --page I --byte K --bit B   (test hook)
 *
 * Exit codes: 0 ok, 1 corruption found (verify) or daemon failure, 2 usage or
 * timeout error.
 *
 * Build: gcc -O2 -static -Wall -Wextra -o memcheck memcheck.c
 * Standalone on purpose: the guest has only busybox.
 */
#define _GNU_SOURCE
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
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE_B 4096u
#define PAGE_WORDS (PAGE_SIZE_B / 8)
#define MAGIC32 0x4d43484bULL /* "MCHK" */
#define MAX_EVIDENCE 8
#define DEFAULT_HZ 2000

/* ------------------------------------------------------------------ utils */

static double now_mono(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

static void die_usage(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("memcheck: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(2);
}

static uint64_t parse_u64(const char *opt, const char *s)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s || *end || s[0] == '-')
		die_usage("%s: not a non-negative integer: '%s'", opt, s);
	return v;
}

static void path_in(char *out, size_t n, const char *dir, const char *name)
{
	if ((size_t)snprintf(out, n, "%s/%s", dir, name) >= n)
		die_usage("path too long: %s/%s", dir, name);
}

/* Read a whole small file into a malloc'd NUL-terminated buffer (NULL on error). */
static char *slurp(const char *path)
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
static int write_atomic(const char *path, const char *text)
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

/* Growable string buffer for building JSON without fixed-size surprises. */
struct sbuf {
	char *p;
	size_t len, cap;
};

static void sb_printf(struct sbuf *b, const char *fmt, ...)
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
			fputs("memcheck: out of memory\n", stderr);
			exit(1);
		}
	}
}

static pid_t read_pid(const char *dir)
{
	char path[PATH_MAX];
	char *s;
	long pid;

	path_in(path, sizeof(path), dir, "memcheck.pid");
	s = slurp(path);
	if (!s)
		return -1;
	pid = strtol(s, NULL, 10);
	free(s);
	return pid > 0 ? (pid_t)pid : -1;
}

/* A zombie still answers kill(pid, 0) until its new parent reaps it, which some inits do
 * lazily: treat it as dead, as the daemon's work is over. */
static int pid_alive(pid_t pid)
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

/* Physical address of the page holding va, from pagemap (PFN bits 0-54, present bit 63).
 * Returns 0 when unknown: not root (PFN reads as 0), page not present, or no pagemap. */
static uint64_t virt_to_phys(int pagemap_fd, uintptr_t va)
{
	uint64_t e;

	if (pagemap_fd < 0)
		return 0;
	if (pread(pagemap_fd, &e, sizeof(e), (off_t)(va / PAGE_SIZE_B) * 8) != sizeof(e))
		return 0;
	if (!(e >> 63))
		return 0;
	e &= (1ULL << 55) - 1;
	return e * PAGE_SIZE_B;
}

static void sb_paddr(struct sbuf *b, uint64_t pa)
{
	if (pa)
		sb_printf(b, "\"0x%" PRIx64 "\"", pa);
	else
		sb_printf(b, "null");
}

/* ---------------------------------------------------------------- pattern */

/* splitmix64 finaliser: a cheap, well-mixed 64-bit bijection. */
static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* Expected contents of one page. Words 0-1 are a header (magic|page, generation|seed)
 * so a page moved or left at an old generation is recognisable in a hex dump; the
 * other 510 words are a splitmix64 stream seeded by (seed, page, generation). The
 * verifier compares all 512 words, so the whole 4096 bytes are covered. */
static inline void page_expected(uint64_t *out, uint64_t seed, uint64_t page, uint32_t gen)
{
	uint64_t s = mix64(seed ^ mix64(page ^ mix64(((uint64_t)gen << 32) ^ 0x6d656d636865636bULL)));
	unsigned i;

	out[0] = (MAGIC32 << 32) | (page & 0xffffffffULL);
	out[1] = ((uint64_t)gen << 32) | (seed & 0xffffffffULL);
	for (i = 2; i < PAGE_WORDS; i++) {
		s += 0x9e3779b97f4a7c15ULL;
		out[i] = mix64(s);
	}
}

struct mismatch {
	uint64_t page;
	unsigned offset; /* byte offset within the page of the first differing byte */
	uint64_t expected, actual; /* the 8-byte word holding that byte */
	uint32_t gen;
	const char *source; /* "writer" or "verify" */
};

/* Compare a page with its expected contents. Returns 1 if it matches; otherwise fills m. */
static int page_check(const uint64_t *p, uint64_t seed, uint64_t page, uint32_t gen, struct mismatch *m)
{
	uint64_t exp[PAGE_WORDS];
	uint64_t diff = 0;
	unsigned i;

	page_expected(exp, seed, page, gen);
	/* Fast path: OR of XORs lets the compiler vectorise; the slow path finds the byte. */
	for (i = 0; i < PAGE_WORDS; i++)
		diff |= p[i] ^ exp[i];
	if (!diff)
		return 1;
	for (i = 0; i < PAGE_WORDS; i++) {
		uint64_t x = p[i] ^ exp[i];

		if (x) {
			m->page = page;
			/* x86 is little-endian: the lowest set byte of x is the first differing byte. */
			m->offset = i * 8 + (unsigned)(__builtin_ctzll(x) / 8);
			m->expected = exp[i];
			m->actual = p[i];
			m->gen = gen;
			return 0;
		}
	}
	return 1;
}

/* ----------------------------------------------------------------- daemon */

static struct {
	char dir[PATH_MAX];
	uint64_t seed, mib, pages, hz;
	uint64_t *base;
	uint32_t *gen;   /* per-page generation, kept apart from the region it describes */
	uint8_t *bad;    /* pages found bad by the writer: never rewritten again */
	int mlocked;
	int mlock_errno;
	double fill_s;
	uint64_t writes, writer_mismatches;
	struct mismatch ev[MAX_EVIDENCE];
	int nev;
	int pagemap_fd;
} g;

static void dlog(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
}

static void add_evidence(const struct mismatch *m)
{
	if (g.nev < MAX_EVIDENCE)
		g.ev[g.nev++] = *m;
}

static void sb_mismatch(struct sbuf *b, const struct mismatch *m)
{
	uintptr_t va = (uintptr_t)g.base + m->page * PAGE_SIZE_B;

	sb_printf(b, "{\"page\": %" PRIu64 ", \"vaddr\": \"0x%" PRIxPTR "\", \"paddr\": ", m->page, va);
	sb_paddr(b, virt_to_phys(g.pagemap_fd, va));
	sb_printf(b, ", \"offset\": %u, \"expected\": \"0x%016" PRIx64 "\", \"actual\": \"0x%016" PRIx64
		  "\", \"generation\": %" PRIu32 ", \"found_by\": \"%s\"}",
		  m->offset, m->expected, m->actual, m->gen, m->source);
}

static void write_ready(void)
{
	struct sbuf b = { 0 };
	char path[PATH_MAX];
	uint64_t idx[9];
	int i, n = 0;

	/* First, last, middle and every eighth in between: enough to locate the region in the
	 * host's RAM file and to aim an outside flip at a known page. */
	for (i = 0; i <= 8; i++) {
		uint64_t p = i == 8 ? g.pages - 1 : g.pages * (uint64_t)i / 8;

		if (n == 0 || idx[n - 1] != p)
			idx[n++] = p;
	}
	sb_printf(&b, "{\"pid\": %d, \"pages\": %" PRIu64 ", \"mib\": %" PRIu64 ", \"seed\": %" PRIu64
		  ", \"writer_hz\": %" PRIu64 ", \"base\": \"0x%" PRIxPTR "\", \"fill_seconds\": %.6f"
		  ", \"fill_mib_per_s\": %.1f, \"mlocked\": %s, \"mlock_error\": ",
		  (int)getpid(), g.pages, g.mib, g.seed, g.hz, (uintptr_t)g.base, g.fill_s,
		  g.fill_s > 0 ? (double)g.mib / g.fill_s : 0.0, g.mlocked ? "true" : "false");
	if (g.mlocked)
		sb_printf(&b, "null");
	else
		sb_printf(&b, "\"%s\"", strerror(g.mlock_errno));
	sb_printf(&b, ", \"samples\": [");
	for (i = 0; i < n; i++) {
		uintptr_t va = (uintptr_t)g.base + idx[i] * PAGE_SIZE_B;

		sb_printf(&b, "%s{\"page\": %" PRIu64 ", \"vaddr\": \"0x%" PRIxPTR "\", \"paddr\": ",
			  i ? ", " : "", idx[i], va);
		sb_paddr(&b, virt_to_phys(g.pagemap_fd, va));
		sb_printf(&b, "}");
	}
	sb_printf(&b, "]}\n");
	path_in(path, sizeof(path), g.dir, "memcheck.ready");
	if (write_atomic(path, b.p) != 0)
		dlog("cannot write %s: %s", path, strerror(errno));
	free(b.p);
}

/* Test hook: flip one bit of our own memory as if the host had corrupted it. */
static void do_flip(void)
{
	char req[PATH_MAX], ack[PATH_MAX], msg[256];
	unsigned long long page, byte, bit;
	char *s;

	path_in(req, sizeof(req), g.dir, "flip.req");
	path_in(ack, sizeof(ack), g.dir, "flip.ack");
	s = slurp(req);
	if (!s) {
		snprintf(msg, sizeof(msg), "error: no flip.req: %s\n", strerror(errno));
	} else if (sscanf(s, "%llu %llu %llu", &page, &byte, &bit) != 3 || page >= g.pages ||
		   byte >= PAGE_SIZE_B || bit > 7) {
		snprintf(msg, sizeof(msg), "error: bad flip.req '%.60s' (pages=%" PRIu64 ")\n", s, g.pages);
	} else {
		volatile uint8_t *p = (volatile uint8_t *)g.base + page * PAGE_SIZE_B + byte;
		uint8_t before = *p;

		*p = before ^ (uint8_t)(1u << bit);
		snprintf(msg, sizeof(msg), "ok page=%llu byte=%llu bit=%llu before=0x%02x after=0x%02x\n",
			 page, byte, bit, before, *p);
	}
	free(s);
	unlink(req);
	dlog("flip: %s", msg);
	write_atomic(ack, msg);
}

static void write_result(double vs, uint64_t bad_pages, const struct mismatch *vev, int nvev)
{
	struct sbuf b = { 0 };
	char path[PATH_MAX];
	int i, n = 0;

	sb_printf(&b, "{\"pages_checked\": %" PRIu64 ", \"bad_pages\": %" PRIu64 ", \"writer_writes\": %" PRIu64
		  ", \"writer_mismatches\": %" PRIu64 ", \"verify_seconds\": %.6f, \"verify_mib_per_s\": %.1f"
		  ", \"fill_mib_per_s\": %.1f, \"mib\": %" PRIu64 ", \"seed\": %" PRIu64 ", \"mlocked\": %s"
		  ", \"first_bad\": [",
		  g.pages, bad_pages, g.writes, g.writer_mismatches, vs, vs > 0 ? (double)g.mib / vs : 0.0,
		  g.fill_s > 0 ? (double)g.mib / g.fill_s : 0.0, g.mib, g.seed, g.mlocked ? "true" : "false");
	for (i = 0; i < g.nev && n < MAX_EVIDENCE; i++, n++) {
		sb_printf(&b, n ? ", " : "");
		sb_mismatch(&b, &g.ev[i]);
	}
	for (i = 0; i < nvev && n < MAX_EVIDENCE; i++, n++) {
		sb_printf(&b, n ? ", " : "");
		sb_mismatch(&b, &vev[i]);
	}
	sb_printf(&b, "]}\n");
	path_in(path, sizeof(path), g.dir, "memcheck.result");
	if (write_atomic(path, b.p) != 0)
		dlog("cannot write %s: %s", path, strerror(errno));
	free(b.p);
}

static void final_verify(void)
{
	struct mismatch vev[MAX_EVIDENCE], m;
	uint64_t i, bad = 0;
	int nvev = 0;
	double t0 = now_mono(), vs;

	for (i = 0; i < g.pages; i++) {
		int ok = page_check(g.base + i * PAGE_WORDS, g.seed, i, g.gen[i], &m);

		if (g.bad[i]) {
			/* Already counted and evidenced by the writer; it was never rewritten. */
			bad++;
			continue;
		}
		if (!ok) {
			bad++;
			m.source = "verify";
			if (nvev < MAX_EVIDENCE)
				vev[nvev++] = m;
		}
	}
	vs = now_mono() - t0;
	dlog("verify: %" PRIu64 " pages, %" PRIu64 " bad, %.3f s", g.pages, bad, vs);
	write_result(vs, bad, vev, nvev);
}

static void writer_loop(void)
{
	sigset_t set;
	siginfo_t si;
	uint64_t rng = mix64(g.seed ^ 0x7772697465720000ULL) | 1, n = 0;
	double t0 = now_mono();
	struct mismatch m;

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	for (;;) {
		struct timespec ts = { 0, 0 };
		int sig;

		if (g.hz) {
			/* Pace against an absolute schedule so the rate does not drift; after a long
			 * stall (the VM was stopped) start a new schedule instead of bursting. */
			double target = t0 + (double)n / (double)g.hz, now = now_mono();

			if (now - target > 1.0) {
				t0 = now;
				n = 0;
			} else if (target > now) {
				double d = target - now;

				ts.tv_sec = (time_t)d;
				ts.tv_nsec = (long)((d - (double)ts.tv_sec) * 1e9);
			}
			/* Signals stay blocked; this both sleeps and polls for them without races. */
			sig = sigtimedwait(&set, &si, &ts);
		} else {
			sig = sigwaitinfo(&set, &si);
		}
		if (sig == SIGUSR1)
			return;
		if (sig == SIGUSR2) {
			do_flip();
			continue;
		}
		if (!g.hz)
			continue;

		/* xorshift64 picks the page; the writer verifies before it rewrites. */
		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		{
			uint64_t page = rng % g.pages;
			uint64_t *p = g.base + page * PAGE_WORDS;

			if (!g.bad[page]) {
				if (!page_check(p, g.seed, page, g.gen[page], &m)) {
					g.bad[page] = 1;
					g.writer_mismatches++;
					m.source = "writer";
					add_evidence(&m);
					dlog("writer: page %" PRIu64 " bad at offset %u", page, m.offset);
				} else {
					g.gen[page]++;
					page_expected(p, g.seed, page, g.gen[page]);
					g.writes++;
				}
			}
		}
		n++;
	}
}

/* Runs in the daemon; reports readiness (or the reason it failed) on status_fd. */
static int daemon_main(int status_fd)
{
	char path[PATH_MAX], pidtxt[32];
	size_t bytes = (size_t)(g.mib << 20);
	sigset_t set;
	uint64_t i;
	double t0;

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	sigprocmask(SIG_BLOCK, &set, NULL);

	path_in(path, sizeof(path), g.dir, "memcheck.pid");
	snprintf(pidtxt, sizeof(pidtxt), "%d\n", (int)getpid());
	if (write_atomic(path, pidtxt) != 0) {
		dprintf(status_fd, "cannot write %s: %s\n", path, strerror(errno));
		return 1;
	}
	g.pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	/* No MAP_POPULATE here: MADV_NOHUGEPAGE must come before the pages exist, so that
	 * khugepaged never collapses (moves) them and the physical addresses we report stay
	 * put. mlock then populates the range; if it fails, MADV_POPULATE_WRITE (or the fill
	 * below) does. Compaction may still migrate mlocked pages unless the guest sets
	 * vm.compact_unevictable_allowed=0: the verify reports current addresses to compare. */
	g.base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (g.base == MAP_FAILED) {
		dprintf(status_fd, "mmap %" PRIu64 " MiB: %s\n", g.mib, strerror(errno));
		return 1;
	}
	madvise(g.base, bytes, MADV_NOHUGEPAGE);
	if (mlock(g.base, bytes) == 0) {
		g.mlocked = 1;
	} else {
		g.mlock_errno = errno;
		dlog("mlock failed (%s); continuing unlocked", strerror(errno));
#ifdef MADV_POPULATE_WRITE
		madvise(g.base, bytes, MADV_POPULATE_WRITE);
#endif
	}
	g.gen = calloc(g.pages, sizeof(*g.gen));
	g.bad = calloc(g.pages, 1);
	if (!g.gen || !g.bad) {
		dprintf(status_fd, "cannot allocate page tables for %" PRIu64 " pages\n", g.pages);
		return 1;
	}
	t0 = now_mono();
	for (i = 0; i < g.pages; i++)
		page_expected(g.base + i * PAGE_WORDS, g.seed, i, 0);
	g.fill_s = now_mono() - t0;
	dlog("filled %" PRIu64 " MiB in %.3f s (%.1f MiB/s), mlocked=%d", g.mib, g.fill_s,
	     g.fill_s > 0 ? (double)g.mib / g.fill_s : 0.0, g.mlocked);
	write_ready();
	dprintf(status_fd, "ok\n");
	close(status_fd);

	writer_loop();
	final_verify();
	path_in(path, sizeof(path), g.dir, "memcheck.pid");
	unlink(path);
	return 0;
}

/* --------------------------------------------------------------- commands */

struct opts {
	const char *dir;
	uint64_t mib, seed, hz, page, byte, bit, timeout;
	int have_mib, have_seed, have_page, have_byte, have_bit;
};

static void parse_opts(int argc, char **argv, struct opts *o)
{
	int i;

	for (i = 2; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!v)
			die_usage("%s: missing value", a);
		if (!strcmp(a, "--dir"))
			o->dir = v;
		else if (!strcmp(a, "--mib"))
			o->mib = parse_u64(a, v), o->have_mib = 1;
		else if (!strcmp(a, "--seed"))
			o->seed = parse_u64(a, v), o->have_seed = 1;
		else if (!strcmp(a, "--writer-hz"))
			o->hz = parse_u64(a, v);
		else if (!strcmp(a, "--page"))
			o->page = parse_u64(a, v), o->have_page = 1;
		else if (!strcmp(a, "--byte"))
			o->byte = parse_u64(a, v), o->have_byte = 1;
		else if (!strcmp(a, "--bit"))
			o->bit = parse_u64(a, v), o->have_bit = 1;
		else if (!strcmp(a, "--timeout"))
			o->timeout = parse_u64(a, v);
		else
			die_usage("unknown option '%s'", a);
		i++;
	}
	if (!o->dir)
		die_usage("--dir is required");
}

static void clear_state_files(const char *dir)
{
	static const char *names[] = { "memcheck.ready", "memcheck.result", "memcheck.pid", "flip.req",
				       "flip.ack" };
	char path[PATH_MAX];
	size_t i;

	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		path_in(path, sizeof(path), dir, names[i]);
		unlink(path);
	}
}

static int cmd_start(struct opts *o)
{
	char path[PATH_MAX], status[512];
	int pfd[2];
	pid_t pid, old;
	ssize_t n = 0;
	struct pollfd pl;
	char *ready;

	if (!o->have_mib || !o->have_seed)
		die_usage("start needs --mib and --seed");
	if (o->mib == 0 || o->mib > (1ULL << 30))
		die_usage("--mib must be between 1 and 2^30");
	if (!realpath(o->dir, g.dir))
		die_usage("--dir %s: %s", o->dir, strerror(errno));
	old = read_pid(g.dir);
	if (pid_alive(old))
		die_usage("a memcheck daemon (pid %d) already runs in %s", (int)old, g.dir);
	clear_state_files(g.dir);
	g.mib = o->mib;
	g.seed = o->seed;
	g.hz = o->hz;
	g.pages = o->mib * (1048576 / PAGE_SIZE_B);
	g.pagemap_fd = -1;

	if (pipe2(pfd, O_CLOEXEC) != 0)
		die_usage("pipe: %s", strerror(errno));
	fflush(NULL);
	pid = fork();
	if (pid < 0)
		die_usage("fork: %s", strerror(errno));
	if (pid == 0) {
		int fd;

		/* Double fork + setsid: the daemon is reparented to init and has no controlling
		 * terminal, so the shell (or serial console session) that started it can go away. */
		close(pfd[0]);
		setsid();
		pid = fork();
		if (pid < 0)
			_exit(1);
		if (pid > 0)
			_exit(0);
		if (chdir("/") != 0)
			_exit(1);
		fd = open("/dev/null", O_RDONLY);
		if (fd >= 0) {
			dup2(fd, 0);
			close(fd);
		}
		path_in(path, sizeof(path), g.dir, "memcheck.log");
		fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
		if (fd < 0)
			fd = open("/dev/null", O_WRONLY);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
			close(fd);
		}
		_exit(daemon_main(pfd[1]));
	}
	close(pfd[1]);
	waitpid(pid, NULL, 0);

	/* The daemon writes "ok" once the region is filled, or why it failed; EOF means it died. */
	pl.fd = pfd[0];
	pl.events = POLLIN;
	if (poll(&pl, 1, o->timeout ? (int)(o->timeout * 1000) : 600000) <= 0) {
		fprintf(stderr, "memcheck: daemon not ready after %" PRIu64 " s\n", o->timeout ? o->timeout : 600);
		return 2;
	}
	n = read(pfd[0], status, sizeof(status) - 1);
	status[n > 0 ? n : 0] = 0;
	close(pfd[0]);
	if (strncmp(status, "ok", 2) != 0) {
		fprintf(stderr, "memcheck: daemon failed: %s\n", n > 0 ? status : "exited without a word (see memcheck.log)");
		return 1;
	}
	path_in(path, sizeof(path), g.dir, "memcheck.ready");
	ready = slurp(path);
	if (!ready) {
		fprintf(stderr, "memcheck: %s missing\n", path);
		return 1;
	}
	fputs(ready, stdout);
	free(ready);
	return 0;
}

static int cmd_verify(struct opts *o)
{
	char path[PATH_MAX];
	pid_t pid = read_pid(o->dir);
	double deadline = now_mono() + (double)(o->timeout ? o->timeout : 600);
	char *res, *p;
	int ok;

	path_in(path, sizeof(path), o->dir, "memcheck.result");
	if (pid_alive(pid)) {
		unlink(path);
		if (kill(pid, SIGUSR1) != 0)
			die_usage("kill(%d, SIGUSR1): %s", (int)pid, strerror(errno));
	}
	/* If the daemon is gone, a result it left behind is still the answer. */
	while (access(path, F_OK) != 0) {
		if (!pid_alive(pid) && access(path, F_OK) != 0) {
			fprintf(stderr, "memcheck: no daemon running in %s and no result (see memcheck.log)\n", o->dir);
			return 2;
		}
		if (now_mono() > deadline) {
			fprintf(stderr, "memcheck: no result after %" PRIu64 " s\n", o->timeout ? o->timeout : 600);
			return 2;
		}
		sleep_ms(10);
	}
	res = slurp(path);
	if (!res)
		die_usage("cannot read %s", path);
	fputs(res, stdout);
	p = strstr(res, "\"bad_pages\": ");
	if (!p) {
		free(res);
		fprintf(stderr, "memcheck: malformed result\n");
		return 2;
	}
	ok = strtoull(p + 13, NULL, 10) == 0;
	free(res);
	return ok ? 0 : 1;
}

static int cmd_phys(struct opts *o)
{
	char path[PATH_MAX];
	pid_t pid = read_pid(o->dir);
	unsigned long long base = 0, pages = 0;
	uint64_t pa;
	uintptr_t va;
	char *ready, *p;
	int fd;

	if (!o->have_page)
		die_usage("phys needs --page");
	if (!pid_alive(pid))
		die_usage("no memcheck daemon running in %s", o->dir);
	path_in(path, sizeof(path), o->dir, "memcheck.ready");
	ready = slurp(path);
	if (!ready || !(p = strstr(ready, "\"base\": \"")) || sscanf(p + 9, "%llx", &base) != 1 ||
	    !(p = strstr(ready, "\"pages\": ")) || sscanf(p + 9, "%llu", &pages) != 1)
		die_usage("cannot read base and pages from %s", path);
	free(ready);
	if (o->page >= pages)
		die_usage("--page %" PRIu64 " out of range (pages=%llu)", o->page, pages);
	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	va = (uintptr_t)(base + o->page * PAGE_SIZE_B);
	pa = virt_to_phys(fd, va);
	if (fd >= 0)
		close(fd);
	printf("page=%" PRIu64 " vaddr=0x%" PRIxPTR " paddr=", o->page, va);
	if (pa)
		printf("0x%" PRIx64 "\n", pa);
	else
		printf("unknown\n");
	return pa ? 0 : 1;
}

static int cmd_stop(struct opts *o)
{
	pid_t pid = read_pid(o->dir);
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

static int cmd_selftest_flip(struct opts *o)
{
	char req[PATH_MAX], ack[PATH_MAX], text[128];
	pid_t pid = read_pid(o->dir);
	double deadline = now_mono() + 10;
	char *a;
	int ok;

	if (!o->have_page || !o->have_byte || !o->have_bit)
		die_usage("selftest-flip needs --page, --byte and --bit");
	if (!pid_alive(pid))
		die_usage("no memcheck daemon running in %s", o->dir);
	path_in(req, sizeof(req), o->dir, "flip.req");
	path_in(ack, sizeof(ack), o->dir, "flip.ack");
	unlink(ack);
	snprintf(text, sizeof(text), "%" PRIu64 " %" PRIu64 " %" PRIu64 "\n", o->page, o->byte, o->bit);
	if (write_atomic(req, text) != 0)
		die_usage("cannot write %s: %s", req, strerror(errno));
	kill(pid, SIGUSR2);
	while (access(ack, F_OK) != 0) {
		if (now_mono() > deadline || !pid_alive(pid)) {
			fprintf(stderr, "memcheck: flip not acknowledged\n");
			return 2;
		}
		sleep_ms(5);
	}
	a = slurp(ack);
	unlink(ack);
	ok = a && !strncmp(a, "ok", 2);
	fputs(a ? a : "error: unreadable ack\n", stdout);
	free(a);
	return ok ? 0 : 1;
}

int main(int argc, char **argv)
{
	struct opts o = { 0 };

	o.hz = DEFAULT_HZ;
	if (argc < 2)
		die_usage("usage: memcheck start|verify|phys|stop|selftest-flip --dir D ...");
	parse_opts(argc, argv, &o);
	if (!strcmp(argv[1], "start"))
		return cmd_start(&o);
	if (!strcmp(argv[1], "verify"))
		return cmd_verify(&o);
	if (!strcmp(argv[1], "phys"))
		return cmd_phys(&o);
	if (!strcmp(argv[1], "stop"))
		return cmd_stop(&o);
	if (!strcmp(argv[1], "selftest-flip"))
		return cmd_selftest_flip(&o);
	die_usage("unknown command '%s'", argv[1]);
	return 2;
}
