/*
 * blkcheck - block-device data integrity and I/O accounting for the L2 guest of
 * fastrestart (a small stand-in for `fio --verify=crc32c`, which is too heavy to ship).
 *
 * A daemon writes N MiB of the device with self-describing blocks, then keeps reading,
 * verifying and rewriting random blocks (generation+1) at a throttled rate, counting
 * every I/O it submits and every one that completes. On request it stops and reads
 * back every block against the generation it recorded.
 *
 * Block layout (bs bytes, little-endian):
 *   0  u64 magic "BLKCHK01"   8 u64 block number   16 u64 generation
 *   24 u32 crc32c of bytes [32, bs)                28 u32 low 32 bits of the seed
 *   32 payload: splitmix64 stream seeded by (seed, block, generation)
 *
 * Usage:
 *   blkcheck start  --dev PATH --dir D --mib N [--bs 4096] [--seed S] [--iops 200] [--timeout SEC]
 *                   [--buffered]
 *   blkcheck verify --dir D [--timeout SEC]
 *   blkcheck status --dir D
 *   blkcheck stop   --dir D
 *   blkcheck selftest                     (checks crc32c against its standard test vector)
 *
 * I/O uses O_DIRECT with aligned buffers; if the file system refuses O_DIRECT (EINVAL)
 * it falls back to buffered I/O and says so ("direct": false); --buffered forces that.
 * --iops is the loop's rate in I/Os per second (a read and a write per block); 0 stops
 * the loop (write once, verify on request).
 *
 * Exit codes: 0 ok, 1 corruption / I/O errors / lost I/Os, 2 usage or timeout error.
 * Build: gcc -O2 -static -Wall -Wextra -o blkcheck blkcheck.c
 * (one static binary; the helpers shared with the other workloads come from workload.h)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WL_PROG "blkcheck"
#include "workload.h"

#define MAGIC 0x313054484b434c42ULL /* "BLKCHK01" read as a little-endian u64 */
#define HDR 32u
#define MAX_EVIDENCE 8
#define CHUNK (1024u * 1024u) /* bytes per I/O in the sequential fill and verify passes */

/* ----------------------------------------------------------------- crc32c */

/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), slicing-by-8 in software:
 * no SSE4.2 assumption, so it runs on any x86 CPU model the guest is given. */
static uint32_t crc_tab[8][256];

static void crc32c_init(void)
{
	unsigned i, k;

	for (i = 0; i < 256; i++) {
		uint32_t c = i;

		for (k = 0; k < 8; k++)
			c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
		crc_tab[0][i] = c;
	}
	for (i = 0; i < 256; i++)
		for (k = 1; k < 8; k++)
			crc_tab[k][i] = (crc_tab[k - 1][i] >> 8) ^ crc_tab[0][crc_tab[k - 1][i] & 0xff];
}

static uint32_t crc32c(const uint8_t *p, size_t len)
{
	uint32_t c = 0xffffffffu;

	while (len >= 8) {
		uint64_t w;

		memcpy(&w, p, 8);
		w ^= c;
		c = crc_tab[7][w & 0xff] ^ crc_tab[6][(w >> 8) & 0xff] ^ crc_tab[5][(w >> 16) & 0xff] ^
		    crc_tab[4][(w >> 24) & 0xff] ^ crc_tab[3][(w >> 32) & 0xff] ^ crc_tab[2][(w >> 40) & 0xff] ^
		    crc_tab[1][(w >> 48) & 0xff] ^ crc_tab[0][w >> 56];
		p += 8;
		len -= 8;
	}
	while (len--)
		c = (c >> 8) ^ crc_tab[0][(c ^ *p++) & 0xff];
	return c ^ 0xffffffffu;
}

/* ---------------------------------------------------------------- blocks */

static void block_build(uint8_t *b, unsigned bs, uint64_t seed, uint64_t blk, uint64_t gen)
{
	uint64_t s = mix64(seed ^ mix64(blk ^ mix64((gen << 32) ^ 0x626c6b636865636bULL)));
	uint64_t hdr[4];
	unsigned i;

	for (i = HDR; i < bs; i += 8) {
		uint64_t w;

		s += 0x9e3779b97f4a7c15ULL;
		w = mix64(s);
		memcpy(b + i, &w, 8);
	}
	hdr[0] = MAGIC;
	hdr[1] = blk;
	hdr[2] = gen;
	hdr[3] = (uint64_t)crc32c(b + HDR, bs - HDR) | ((seed & 0xffffffffULL) << 32);
	memcpy(b, hdr, HDR);
}

struct blkbad {
	uint64_t block, expected_gen, actual_gen, actual_block;
	int crc_ok, header_ok;
	const char *found_by;
};

/* Check one block read back. Returns 1 if good; otherwise fills e. `alt` lets a block
 * whose last write failed be at either generation. */
static int block_check(const uint8_t *b, unsigned bs, uint64_t seed, uint64_t blk, uint64_t gen, int alt,
		       struct blkbad *e)
{
	uint64_t hdr[4];
	int crc_ok, hdr_ok;

	memcpy(hdr, b, HDR);
	crc_ok = (uint32_t)hdr[3] == crc32c(b + HDR, bs - HDR);
	hdr_ok = hdr[0] == MAGIC && hdr[1] == blk && (hdr[3] >> 32) == (seed & 0xffffffffULL) &&
		 (hdr[2] == gen || (alt && hdr[2] == gen + 1));
	if (crc_ok && hdr_ok)
		return 1;
	e->block = blk;
	e->expected_gen = gen;
	e->actual_gen = hdr[2];
	e->actual_block = hdr[1];
	e->crc_ok = crc_ok;
	e->header_ok = hdr_ok;
	return 0;
}

/* ----------------------------------------------------------------- daemon */

struct ioerr {
	const char *op;
	uint64_t block;
	int err; /* errno, or 0 for a short transfer */
};

static struct {
	char dir[PATH_MAX];
	char dev[PATH_MAX];
	uint64_t mib, seed, iops, blocks;
	unsigned bs;
	int fd, direct;
	uint64_t *gen;
	uint8_t *flags; /* FL_BAD: found bad, never rewritten; FL_ALT: last write failed */
	uint64_t submitted, completed, errors, loop_reads, loop_writes, loop_bad;
	struct blkbad ev[MAX_EVIDENCE];
	int nev;
	struct ioerr ioev[MAX_EVIDENCE];
	int nioev;
	double write_s;
} g;

#define FL_BAD 1
#define FL_ALT 2

/* One counted I/O: submitted before the syscall, completed only if it moved every byte. */
static int do_io(int write, uint8_t *buf, size_t len, uint64_t off, uint64_t blk)
{
	ssize_t r;

	g.submitted++;
	do
		r = write ? pwrite(g.fd, buf, len, (off_t)off) : pread(g.fd, buf, len, (off_t)off);
	while (r < 0 && errno == EINTR);
	if (r == (ssize_t)len) {
		g.completed++;
		return 0;
	}
	g.errors++;
	if (g.nioev < MAX_EVIDENCE)
		g.ioev[g.nioev++] = (struct ioerr){ write ? "write" : "read", blk, r < 0 ? errno : 0 };
	dlog("%s block %" PRIu64 ": %s", write ? "write" : "read", blk, r < 0 ? strerror(errno) : "short transfer");
	return -1;
}

static void sb_counters(struct sbuf *b)
{
	int i;

	sb_printf(b, "\"ios_submitted\": %" PRIu64 ", \"ios_completed\": %" PRIu64 ", \"io_errors\": %" PRIu64
		  ", \"loop_reads\": %" PRIu64 ", \"loop_writes\": %" PRIu64 ", \"loop_bad\": %" PRIu64
		  ", \"direct\": %s, \"io_error_list\": [",
		  g.submitted, g.completed, g.errors, g.loop_reads, g.loop_writes, g.loop_bad,
		  g.direct ? "true" : "false");
	for (i = 0; i < g.nioev; i++)
		sb_printf(b, "%s{\"op\": \"%s\", \"block\": %" PRIu64 ", \"errno\": %d, \"error\": \"%s\"}", i ? ", " : "",
			  g.ioev[i].op, g.ioev[i].block, g.ioev[i].err,
			  g.ioev[i].err ? strerror(g.ioev[i].err) : "short transfer");
	sb_printf(b, "]");
}

static void write_stats(void)
{
	struct sbuf b = { 0 };
	char path[PATH_MAX];
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	sb_printf(&b, "{\"time\": %.3f, ", (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
	sb_counters(&b);
	sb_printf(&b, "}\n");
	path_in(path, sizeof(path), g.dir, "blkcheck.stats");
	write_atomic(path, b.p);
	free(b.p);
}

static void add_bad(struct blkbad *e, const char *by)
{
	e->found_by = by;
	if (g.nev < MAX_EVIDENCE)
		g.ev[g.nev++] = *e;
}

/* Sequential pass over every block, CHUNK bytes per I/O: fill (write) or final verify. */
static int pass(int write, uint8_t *buf, uint64_t *bad_out)
{
	uint64_t per = CHUNK / g.bs, blk, bad = 0;
	struct blkbad e;

	for (blk = 0; blk < g.blocks; blk += per) {
		uint64_t n = g.blocks - blk < per ? g.blocks - blk : per, i;

		if (write) {
			for (i = 0; i < n; i++)
				block_build(buf + i * g.bs, g.bs, g.seed, blk + i, 0);
			if (do_io(1, buf, n * g.bs, blk * g.bs, blk) != 0)
				return -1;
			continue;
		}
		if (do_io(0, buf, n * g.bs, blk * g.bs, blk) != 0) {
			/* An unreadable chunk: every block in it is unverified, hence bad. */
			for (i = 0; i < n; i++) {
				e = (struct blkbad){ blk + i, g.gen[blk + i], 0, 0, 0, 0, NULL };
				if (!(g.flags[blk + i] & FL_BAD))
					add_bad(&e, "verify-io-error");
			}
			bad += n;
			continue;
		}
		for (i = 0; i < n; i++) {
			uint64_t b = blk + i;
			int ok = block_check(buf + i * g.bs, g.bs, g.seed, b, g.gen[b], g.flags[b] & FL_ALT, &e);

			if (g.flags[b] & FL_BAD) {
				bad++; /* already evidenced by the loop, which never rewrote it */
				continue;
			}
			if (!ok) {
				bad++;
				add_bad(&e, "verify");
			}
		}
	}
	if (bad_out)
		*bad_out = bad;
	return 0;
}

static void io_loop(uint8_t *buf)
{
	sigset_t set;
	siginfo_t si;
	uint64_t rng = mix64(g.seed ^ 0x6c6f6f7000000000ULL) | 1, n = 0;
	double rate = (double)g.iops / 2.0, t0 = now_mono(), last_stats = 0;
	struct blkbad e;

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	for (;;) {
		struct timespec ts = { 0, 0 };
		double now = now_mono();
		int sig;

		if (now - last_stats >= 1.0) {
			write_stats();
			last_stats = now;
		}
		if (g.iops) {
			/* Absolute schedule (two I/Os per step); after a stall (VM stopped) restart
			 * the schedule rather than burst to catch up. */
			pace(&t0, &n, rate, now, &ts);
		} else {
			ts.tv_sec = 1;
		}
		sig = sigtimedwait(&set, &si, &ts);
		if (sig == SIGUSR1)
			return;
		if (!g.iops)
			continue;
		n++;

		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		{
			uint64_t b = rng % g.blocks;

			if (g.flags[b] & FL_BAD)
				continue;
			if (do_io(0, buf, g.bs, b * g.bs, b) != 0)
				continue;
			g.loop_reads++;
			if (!block_check(buf, g.bs, g.seed, b, g.gen[b], g.flags[b] & FL_ALT, &e)) {
				/* Never rewrite a bad block: a rewrite would hide the corruption. */
				g.flags[b] |= FL_BAD;
				g.loop_bad++;
				add_bad(&e, "loop");
				dlog("loop: block %" PRIu64 " bad (gen %" PRIu64 " expected %" PRIu64 ", crc_ok=%d)", b,
				     e.actual_gen, e.expected_gen, e.crc_ok);
				continue;
			}
			if (g.flags[b] & FL_ALT) {
				/* The earlier failed write may or may not have landed; adopt what is there. */
				uint64_t hg;

				memcpy(&hg, buf + 16, 8);
				g.gen[b] = hg;
				g.flags[b] &= (uint8_t)~FL_ALT;
			}
			block_build(buf, g.bs, g.seed, b, g.gen[b] + 1);
			if (do_io(1, buf, g.bs, b * g.bs, b) != 0) {
				g.flags[b] |= FL_ALT;
				continue;
			}
			g.gen[b]++;
			g.loop_writes++;
		}
	}
}

static int daemon_main(int status_fd)
{
	char path[PATH_MAX];
	struct sbuf b = { 0 };
	sigset_t set;
	uint8_t *buf;
	uint64_t bad = 0;
	double t0, vs;
	int i;

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	if (write_pid_file(g.dir, status_fd) != 0)
		return 1;
	g.gen = calloc(g.blocks, sizeof(*g.gen));
	g.flags = calloc(g.blocks, 1);
	/* O_DIRECT needs buffers aligned to the logical block size; 4096 covers every device. */
	if (!g.gen || !g.flags || posix_memalign((void **)&buf, 4096, CHUNK) != 0) {
		dprintf(status_fd, "out of memory for %" PRIu64 " blocks\n", g.blocks);
		return 1;
	}
	t0 = now_mono();
	if (pass(1, buf, NULL) != 0 || fsync(g.fd) != 0) {
		dprintf(status_fd, "initial write of %s failed: %s\n", g.dev,
			g.nioev ? strerror(g.ioev[0].err) : strerror(errno));
		return 1;
	}
	g.write_s = now_mono() - t0;
	sb_printf(&b, "{\"pid\": %d, \"dev\": ", (int)getpid());
	sb_json_str(&b, g.dev);
	sb_printf(&b, ", \"blocks\": %" PRIu64 ", \"bs\": %u, \"mib\": %" PRIu64
		  ", \"seed\": %" PRIu64 ", \"iops\": %" PRIu64 ", \"direct\": %s, \"write_seconds\": %.6f"
		  ", \"write_mib_per_s\": %.1f}\n",
		  g.blocks, g.bs, g.mib, g.seed, g.iops, g.direct ? "true" : "false",
		  g.write_s, g.write_s > 0 ? (double)g.mib / g.write_s : 0.0);
	path_in(path, sizeof(path), g.dir, "blkcheck.ready");
	if (write_atomic(path, b.p) != 0) {
		dprintf(status_fd, "cannot write %s: %s\n", path, strerror(errno));
		return 1;
	}
	free(b.p);
	dlog("wrote %" PRIu64 " MiB in %.3f s, direct=%d", g.mib, g.write_s, g.direct);
	dprintf(status_fd, "ok\n");
	close(status_fd);

	io_loop(buf);

	t0 = now_mono();
	pass(0, buf, &bad);
	vs = now_mono() - t0;
	dlog("verify: %" PRIu64 " blocks, %" PRIu64 " bad, %.3f s", g.blocks, bad, vs);
	b = (struct sbuf){ 0 };
	sb_printf(&b, "{\"blocks_checked\": %" PRIu64 ", \"bad_blocks\": %" PRIu64 ", ", g.blocks, bad);
	sb_counters(&b);
	sb_printf(&b, ", \"verify_seconds\": %.6f, \"verify_mib_per_s\": %.1f, \"write_mib_per_s\": %.1f"
		  ", \"first_bad\": [", vs, vs > 0 ? (double)g.mib / vs : 0.0,
		  g.write_s > 0 ? (double)g.mib / g.write_s : 0.0);
	for (i = 0; i < g.nev; i++)
		sb_printf(&b, "%s{\"block\": %" PRIu64 ", \"expected_gen\": %" PRIu64 ", \"actual_gen\": %" PRIu64
			  ", \"actual_block\": %" PRIu64 ", \"crc_ok\": %s, \"header_ok\": %s, \"found_by\": \"%s\"}",
			  i ? ", " : "", g.ev[i].block, g.ev[i].expected_gen, g.ev[i].actual_gen, g.ev[i].actual_block,
			  g.ev[i].crc_ok ? "true" : "false", g.ev[i].header_ok ? "true" : "false", g.ev[i].found_by);
	sb_printf(&b, "]}\n");
	path_in(path, sizeof(path), g.dir, "blkcheck.result");
	if (write_atomic(path, b.p) != 0)
		dlog("cannot write %s: %s", path, strerror(errno));
	free(b.p);
	write_stats();
	path_in(path, sizeof(path), g.dir, "blkcheck.pid");
	unlink(path);
	return 0;
}

/* --------------------------------------------------------------- commands */

struct opts {
	const char *dir, *dev;
	uint64_t mib, seed, bs, iops, timeout;
	int have_mib, buffered;
};

static void parse_opts(int argc, char **argv, struct opts *o)
{
	const struct option_spec specs[] = {
		{ "--buffered", NULL, NULL, &o->buffered },
		{ "--dir", &o->dir, NULL, NULL },
		{ "--dev", &o->dev, NULL, NULL },
		{ "--mib", NULL, &o->mib, &o->have_mib },
		{ "--seed", NULL, &o->seed, NULL },
		{ "--bs", NULL, &o->bs, NULL },
		{ "--iops", NULL, &o->iops, NULL },
		{ "--timeout", NULL, &o->timeout, NULL },
		{ NULL, NULL, NULL, NULL },
	};

	parse_options(argc, argv, 2, specs);
	if (!o->dir)
		die_usage("--dir is required");
}

static void open_dev(int buffered)
{
	struct stat st;

	/* O_CREAT only matters for a regular file (the unit tests); a device node exists. */
	g.fd = buffered ? -1 : open(g.dev, O_RDWR | O_DIRECT | O_CREAT | O_CLOEXEC, 0644);
	g.direct = 1;
	if (buffered || (g.fd < 0 && errno == EINVAL)) {
		g.fd = open(g.dev, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
		g.direct = 0;
	}
	if (g.fd < 0)
		die_usage("open %s: %s", g.dev, strerror(errno));
	if (fstat(g.fd, &st) != 0)
		die_usage("stat %s: %s", g.dev, strerror(errno));
	if (S_ISBLK(st.st_mode)) {
		uint64_t size = 0;

		if (ioctl(g.fd, BLKGETSIZE64, &size) != 0)
			die_usage("BLKGETSIZE64 %s: %s", g.dev, strerror(errno));
		if (size < (g.mib << 20))
			die_usage("%s holds %" PRIu64 " bytes, less than --mib %" PRIu64, g.dev, size, g.mib);
	} else if (!S_ISREG(st.st_mode)) {
		die_usage("%s: not a block device or regular file", g.dev);
	}
}

static int cmd_start(struct opts *o)
{
	static const char *names[] = { "blkcheck.ready", "blkcheck.result", "blkcheck.pid", "blkcheck.stats" };
	char path[PATH_MAX];
	int pfd[2];
	pid_t pid, old;
	size_t i;

	if (!o->dev || !o->have_mib)
		die_usage("start needs --dev and --mib");
	if (o->mib == 0 || o->mib > (1ULL << 24))
		die_usage("--mib must be between 1 and 2^24");
	if (o->bs < 512 || o->bs % 512 || o->bs > CHUNK || CHUNK % o->bs)
		die_usage("--bs must be a multiple of 512 that divides %u", CHUNK);
	if (!realpath(o->dir, g.dir))
		die_usage("--dir %s: %s", o->dir, strerror(errno));
	old = read_pid(g.dir);
	if (pid_alive(old))
		die_usage("a blkcheck daemon (pid %d) already runs in %s", (int)old, g.dir);
	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		path_in(path, sizeof(path), g.dir, names[i]);
		unlink(path);
	}
	snprintf(g.dev, sizeof(g.dev), "%s", o->dev);
	g.mib = o->mib;
	g.seed = o->seed;
	g.bs = (unsigned)o->bs;
	g.iops = o->iops;
	g.blocks = (o->mib << 20) / o->bs;
	crc32c_init();
	open_dev(o->buffered);

	pid = fork_daemon(g.dir, pfd);
	if (pid == 0) {
		if (!g.direct)
			dlog("buffered I/O on %s (%s)", g.dev, o->buffered ? "--buffered" : "O_DIRECT refused");
		_exit(daemon_main(pfd[1]));
	}
	close(g.fd);
	waitpid(pid, NULL, 0);
	return await_ready(pfd[0], o->timeout, g.dir);
}

static uint64_t json_u64(const char *text, const char *key, int *found)
{
	char pat[64];
	const char *p;

	snprintf(pat, sizeof(pat), "\"%s\": ", key);
	p = strstr(text, pat);
	if (!p) {
		*found = 0;
		return 0;
	}
	return strtoull(p + strlen(pat), NULL, 10);
}

static int cmd_verify(struct opts *o)
{
	char path[PATH_MAX];
	uint64_t bad, errs, sub, comp;
	int found = 1, rc;
	char *res;

	res = request_result(o->dir, o->timeout, &rc);
	if (!res && rc == -1) {
		/* A daemon stuck in an I/O that never completes ends up here: show its counters. */
		char *st;

		path_in(path, sizeof(path), o->dir, "blkcheck.stats");
		st = slurp(path);
		fprintf(stderr, "blkcheck: no result after %" PRIu64 " s; last stats: %s",
			o->timeout ? o->timeout : 600, st ? st : "none\n");
		free(st);
		return 2;
	}
	if (!res)
		return rc;
	bad = json_u64(res, "bad_blocks", &found);
	errs = json_u64(res, "io_errors", &found);
	sub = json_u64(res, "ios_submitted", &found);
	comp = json_u64(res, "ios_completed", &found);
	free(res);
	if (!found) {
		fprintf(stderr, "blkcheck: malformed result\n");
		return 2;
	}
	return bad == 0 && errs == 0 && sub == comp ? 0 : 1;
}

static int cmd_status(struct opts *o)
{
	char path[PATH_MAX];
	char *st;

	path_in(path, sizeof(path), o->dir, "blkcheck.stats");
	st = slurp(path);
	if (!st) {
		fprintf(stderr, "blkcheck: no stats in %s\n", o->dir);
		return 2;
	}
	fputs(st, stdout);
	free(st);
	return pid_alive(read_pid(o->dir)) ? 0 : 1;
}

int main(int argc, char **argv)
{
	struct opts o = { 0 };

	o.bs = 4096;
	o.iops = 200;
	if (argc >= 2 && !strcmp(argv[1], "selftest")) {
		/* The standard CRC-32C check value of "123456789" is 0xe3069283. */
		uint32_t c;

		crc32c_init();
		c = crc32c((const uint8_t *)"123456789", 9);
		printf("crc32c(\"123456789\")=0x%08x %s\n", c, c == 0xe3069283u ? "ok" : "WRONG");
		return c == 0xe3069283u ? 0 : 1;
	}
	if (argc < 2)
		die_usage("usage: blkcheck start|verify|status|stop|selftest --dir D ...");
	parse_opts(argc, argv, &o);
	crc32c_init();
	if (!strcmp(argv[1], "start"))
		return cmd_start(&o);
	if (!strcmp(argv[1], "verify"))
		return cmd_verify(&o);
	if (!strcmp(argv[1], "status"))
		return cmd_status(&o);
	if (!strcmp(argv[1], "stop"))
		return stop_daemon(o.dir);
	die_usage("unknown command '%s'", argv[1]);
	return 2;
}
