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
 * Standalone on purpose (the guest has only busybox): one static binary, with the helpers it
 * shares with the other workloads taken from the single header workload.h.
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

#define WL_PROG "memcheck"
#include "workload.h"

#define PAGE_SIZE_B 4096u
#define PAGE_WORDS (PAGE_SIZE_B / 8)
#define MAGIC32 0x4d43484bULL /* "MCHK" */
#define MAX_EVIDENCE 8
#define DEFAULT_HZ 2000

/* ------------------------------------------------------------------ utils */

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
			pace(&t0, &n, (double)g.hz, now_mono(), &ts);
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
	char path[PATH_MAX];
	size_t bytes = (size_t)(g.mib << 20);
	sigset_t set;
	uint64_t i;
	double t0;

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	sigprocmask(SIG_BLOCK, &set, NULL);

	if (write_pid_file(g.dir, status_fd) != 0)
		return 1;
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
	const struct option_spec specs[] = {
		{ "--dir", &o->dir, NULL, NULL },
		{ "--mib", NULL, &o->mib, &o->have_mib },
		{ "--seed", NULL, &o->seed, &o->have_seed },
		{ "--writer-hz", NULL, &o->hz, NULL },
		{ "--page", NULL, &o->page, &o->have_page },
		{ "--byte", NULL, &o->byte, &o->have_byte },
		{ "--bit", NULL, &o->bit, &o->have_bit },
		{ "--timeout", NULL, &o->timeout, NULL },
		{ NULL, NULL, NULL, NULL },
	};

	parse_options(argc, argv, 2, specs);
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
	int pfd[2];
	pid_t pid, old;

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

	pid = fork_daemon(g.dir, pfd);
	if (pid == 0)
		_exit(daemon_main(pfd[1]));
	waitpid(pid, NULL, 0);
	/* The daemon writes "ok" once the region is filled, or why it failed; EOF means it died. */
	return await_ready(pfd[0], o->timeout, g.dir);
}

static int cmd_verify(struct opts *o)
{
	char *res, *p;
	int ok, rc;

	res = request_result(o->dir, o->timeout, &rc);
	if (!res && rc == -1) {
		fprintf(stderr, "memcheck: no result after %" PRIu64 " s\n", o->timeout ? o->timeout : 600);
		return 2;
	}
	if (!res)
		return rc;
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
		return stop_daemon(o.dir);
	if (!strcmp(argv[1], "selftest-flip"))
		return cmd_selftest_flip(&o);
	die_usage("unknown command '%s'", argv[1]);
	return 2;
}
