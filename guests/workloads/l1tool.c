/*
 * l1tool - small helpers that run in the L1 host of fastrestart (busybox only).
 *
 * Usage:
 *   l1tool digest PATH [--offset BYTES] [--size BYTES]
 *       xxh64 (seed 0) of the byte range [offset, offset+size) of PATH, read through a
 *       shared read-only mmap. PATH may be a device-DAX node (/dev/daxX.Y), a block
 *       device or a regular file. --size defaults to the rest of PATH.
 *       Prints: digest=<16 hex> size=<bytes> algo=xxh64 seconds=<t> offset=<o> mib_per_s=<r>
 *   l1tool flip PATH --offset BYTES [--count N] [--stride BYTES] [--mask M]
 *       XOR M (default 0xff) into the byte at offset and N-1 more at stride (default
 *       4096), through a shared read-write mmap, then msync.
 *       Prints: flipped=<n> first=<offset> last=<offset> mask=0x<m>
 *   l1tool msi-status BDF
 *       Prints: msi_cap=0x<c> control=0x<w> enabled=<0|1> [msix_cap=0x<c> msix_control=0x<w>]
 *   l1tool msi-disable BDF
 *       Clears MSI Enable in the MSI capability of the PCI function BDF.
 *       Prints: msi_cap=0x<c> control_before=0x<w> control_after=0x<w>
 *   BDF is "0000:00:02.0" or "00:02.0"; a BDF containing '/' is taken as the path of a
 *   config-space file (used by the unit tests).
 *
 * Device-DAX nodes support mmap only (no read/write), and their mappings must be
 * aligned to the device alignment (2 MiB, or 1 GiB): everything here maps windows that
 * are multiples of max(2 MiB, align).
 *
 * Exit codes: 0 ok, 1 operation failed (e.g. no MSI capability), 2 usage error.
 * Build: gcc -O2 -static -Wall -Wextra -o l1tool l1tool.c
 * (one static binary; the helpers shared with the other workloads come from workload.h)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define WL_PROG "l1tool"
#include "workload.h"

#define MIB (1024ULL * 1024ULL)
#define MIN_GRANULE (2 * MIB)
#define WINDOW (64 * MIB)

/* Read one unsigned integer from a sysfs attribute; 0 if absent. */
static uint64_t sysfs_u64(const char *path)
{
	char buf[64];
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	return strtoull(buf, NULL, 0);
}

/* ------------------------------------------------------------------ xxh64 */

/* XXH64 per the reference specification (seed 0), streaming, so a digest taken
 * here can be compared with `xxhsum -H1` on a machine that has it. */
#define P1 11400714785074694791ULL
#define P2 14029467366897019727ULL
#define P3 1609587929392839161ULL
#define P4 9650029242287828579ULL
#define P5 2870177450012600261ULL

struct xxh64 {
	uint64_t v[4];
	uint64_t total;
	uint8_t buf[32];
	unsigned buflen;
};

static inline uint64_t rotl64(uint64_t x, int r)
{
	return (x << r) | (x >> (64 - r));
}

static inline uint64_t rd64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return v;
}

static inline uint32_t rd32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return v;
}

static inline uint64_t xround(uint64_t acc, uint64_t in)
{
	acc += in * P2;
	acc = rotl64(acc, 31);
	return acc * P1;
}

static inline uint64_t xmerge(uint64_t acc, uint64_t v)
{
	acc ^= xround(0, v);
	return acc * P1 + P4;
}

static void xxh64_init(struct xxh64 *s)
{
	memset(s, 0, sizeof(*s));
	s->v[0] = P1 + P2;
	s->v[1] = P2;
	s->v[2] = 0;
	s->v[3] = -P1;
}

static void xxh64_update(struct xxh64 *s, const uint8_t *p, size_t len)
{
	uint64_t v0 = s->v[0], v1 = s->v[1], v2 = s->v[2], v3 = s->v[3];

	s->total += len;
	if (s->buflen) {
		size_t take = 32 - s->buflen;

		if (take > len)
			take = len;
		memcpy(s->buf + s->buflen, p, take);
		s->buflen += (unsigned)take;
		p += take;
		len -= take;
		if (s->buflen < 32)
			return;
		v0 = xround(v0, rd64(s->buf));
		v1 = xround(v1, rd64(s->buf + 8));
		v2 = xround(v2, rd64(s->buf + 16));
		v3 = xround(v3, rd64(s->buf + 24));
		s->buflen = 0;
	}
	while (len >= 32) {
		v0 = xround(v0, rd64(p));
		v1 = xround(v1, rd64(p + 8));
		v2 = xround(v2, rd64(p + 16));
		v3 = xround(v3, rd64(p + 24));
		p += 32;
		len -= 32;
	}
	memcpy(s->buf, p, len);
	s->buflen = (unsigned)len;
	s->v[0] = v0;
	s->v[1] = v1;
	s->v[2] = v2;
	s->v[3] = v3;
}

static uint64_t xxh64_final(const struct xxh64 *s)
{
	const uint8_t *p = s->buf;
	unsigned len = s->buflen;
	uint64_t h;

	if (s->total >= 32) {
		h = rotl64(s->v[0], 1) + rotl64(s->v[1], 7) + rotl64(s->v[2], 12) + rotl64(s->v[3], 18);
		h = xmerge(h, s->v[0]);
		h = xmerge(h, s->v[1]);
		h = xmerge(h, s->v[2]);
		h = xmerge(h, s->v[3]);
	} else {
		h = P5; /* seed + P5 */
	}
	h += s->total;
	while (len >= 8) {
		h ^= xround(0, rd64(p));
		h = rotl64(h, 27) * P1 + P4;
		p += 8;
		len -= 8;
	}
	if (len >= 4) {
		h ^= (uint64_t)rd32(p) * P1;
		h = rotl64(h, 23) * P2 + P3;
		p += 4;
		len -= 4;
	}
	while (len--) {
		h ^= (uint64_t)(*p++) * P5;
		h = rotl64(h, 11) * P1;
	}
	h ^= h >> 33;
	h *= P2;
	h ^= h >> 29;
	h *= P3;
	h ^= h >> 32;
	return h;
}

/* ------------------------------------------------------------ mmap target */

struct target {
	int fd;
	uint64_t size;    /* bytes addressable */
	uint64_t granule; /* mapping offsets and lengths are multiples of this */
	int is_dax;
};

static void open_target(const char *path, int writable, struct target *t)
{
	struct stat st;

	t->fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (t->fd < 0)
		die(2, "open %s: %s", path, strerror(errno));
	if (fstat(t->fd, &st) != 0)
		die(2, "stat %s: %s", path, strerror(errno));
	t->granule = MIN_GRANULE;
	t->is_dax = 0;
	if (S_ISREG(st.st_mode)) {
		t->size = (uint64_t)st.st_size;
	} else if (S_ISCHR(st.st_mode)) {
		char sys[128];
		uint64_t align;

		/* A device-DAX node: its size and alignment are sysfs attributes of the device. */
		snprintf(sys, sizeof(sys), "/sys/dev/char/%u:%u/size", major(st.st_rdev), minor(st.st_rdev));
		t->size = sysfs_u64(sys);
		snprintf(sys, sizeof(sys), "/sys/dev/char/%u:%u/align", major(st.st_rdev), minor(st.st_rdev));
		align = sysfs_u64(sys);
		if (align > t->granule)
			t->granule = align;
		t->is_dax = 1;
	} else if (S_ISBLK(st.st_mode)) {
		if (ioctl(t->fd, BLKGETSIZE64, &t->size) != 0)
			die(2, "BLKGETSIZE64 %s: %s", path, strerror(errno));
	} else {
		die(2, "%s: not a regular file, char (DAX) or block device", path);
	}
}

static void *map_window(struct target *t, uint64_t start, uint64_t len, int writable)
{
	void *p = mmap(NULL, len, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, t->fd, (off_t)start);

	if (p == MAP_FAILED)
		die(1, "mmap offset=%" PRIu64 " len=%" PRIu64 ": %s", start, len, strerror(errno));
	return p;
}

/* ---------------------------------------------------------------- commands */

static int cmd_digest(int argc, char **argv)
{
	const char *path = NULL;
	uint64_t off = 0, size = 0, pos, end, win;
	int have_size = 0, i;
	struct target t;
	struct xxh64 st;
	double t0, secs;

	for (i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "--offset") && i + 1 < argc)
			off = parse_u64(argv[i], argv[i + 1]), i++;
		else if (!strcmp(argv[i], "--size") && i + 1 < argc)
			size = parse_u64(argv[i], argv[i + 1]), have_size = 1, i++;
		else if (argv[i][0] != '-' && !path)
			path = argv[i];
		else
			die(2, "digest: unexpected argument '%s'", argv[i]);
	}
	if (!path)
		die(2, "usage: l1tool digest PATH [--offset BYTES] [--size BYTES]");
	open_target(path, 0, &t);
	if (!have_size) {
		if (t.size == 0 && t.is_dax)
			die(2, "%s: size unknown (no sysfs size attribute); pass --size", path);
		if (off > t.size)
			die(2, "--offset %" PRIu64 " beyond the end (%" PRIu64 ")", off, t.size);
		size = t.size - off;
	} else if (t.size && off + size > t.size) {
		die(2, "range %" PRIu64 "+%" PRIu64 " beyond the end (%" PRIu64 ")", off, size, t.size);
	}
	win = WINDOW > t.granule ? WINDOW - WINDOW % t.granule : t.granule;
	t0 = now_mono();
	xxh64_init(&st);
	end = off + size;
	for (pos = off; pos < end;) {
		uint64_t mstart = pos - pos % t.granule;
		uint64_t mlen = win, chunk_end;
		uint8_t *p;

		/* Do not map past the end of a device (rounded up to the granule). */
		if (mstart + mlen > end)
			mlen = ((end - mstart) + t.granule - 1) / t.granule * t.granule;
		chunk_end = mstart + mlen < end ? mstart + mlen : end;
		p = map_window(&t, mstart, mlen, 0);
		if (!t.is_dax)
			madvise(p, mlen, MADV_SEQUENTIAL);
		xxh64_update(&st, p + (pos - mstart), chunk_end - pos);
		munmap(p, mlen);
		pos = chunk_end;
	}
	secs = now_mono() - t0;
	printf("digest=%016" PRIx64 " size=%" PRIu64 " algo=xxh64 seconds=%.3f offset=%" PRIu64 " mib_per_s=%.1f\n",
	       xxh64_final(&st), size, secs, off, secs > 0 ? (double)size / MIB / secs : 0.0);
	close(t.fd);
	return 0;
}

static int cmd_flip(int argc, char **argv)
{
	const char *path = NULL;
	uint64_t off = 0, count = 1, stride = 4096, mask = 0xff, i, first = 0, last = 0;
	uint64_t mstart = 0, mlen = 0;
	uint8_t *map = NULL;
	int have_off = 0, a;
	struct target t;

	for (a = 2; a < argc; a++) {
		if (!strcmp(argv[a], "--offset") && a + 1 < argc)
			off = parse_u64(argv[a], argv[a + 1]), have_off = 1, a++;
		else if (!strcmp(argv[a], "--count") && a + 1 < argc)
			count = parse_u64(argv[a], argv[a + 1]), a++;
		else if (!strcmp(argv[a], "--stride") && a + 1 < argc)
			stride = parse_u64(argv[a], argv[a + 1]), a++;
		else if (!strcmp(argv[a], "--mask") && a + 1 < argc)
			mask = parse_u64(argv[a], argv[a + 1]), a++;
		else if (argv[a][0] != '-' && !path)
			path = argv[a];
		else
			die(2, "flip: unexpected argument '%s'", argv[a]);
	}
	if (!path || !have_off)
		die(2, "usage: l1tool flip PATH --offset BYTES [--count N] [--stride BYTES] [--mask M]");
	if (count == 0 || mask == 0 || mask > 0xff)
		die(2, "--count must be >= 1 and --mask in 1..0xff");
	if (count > 1 && stride == 0)
		die(2, "--stride must be >= 1 when --count > 1");
	open_target(path, 1, &t);
	if (t.size == 0)
		die(2, "%s: size unknown", path);
	last = off + (count - 1) * stride;
	if (last >= t.size || last < off)
		die(2, "flip range ends at %" PRIu64 ", beyond the end (%" PRIu64 ")", last, t.size);
	for (i = 0; i < count; i++) {
		uint64_t at = off + i * stride;

		if (!map || at < mstart || at >= mstart + mlen) {
			if (map) {
				msync(map, mlen, MS_SYNC); /* best effort; see below */
				munmap(map, mlen);
			}
			mstart = at - at % t.granule;
			mlen = t.granule;
			map = map_window(&t, mstart, mlen, 1);
		}
		map[at - mstart] ^= (uint8_t)mask;
		if (i == 0)
			first = at;
		last = at;
	}
	/* msync so the change reaches the file before we report it done. A device-DAX mapping is
	 * the memory itself: there is nothing to write back, and msync says EINVAL. */
	if (msync(map, mlen, MS_SYNC) != 0 && errno != EINVAL)
		die(1, "msync: %s", strerror(errno));
	munmap(map, mlen);
	close(t.fd);
	printf("flipped=%" PRIu64 " first=%" PRIu64 " last=%" PRIu64 " mask=0x%02" PRIx64 "\n", count, first, last,
	       mask);
	return 0;
}

static void config_path(const char *bdf, char *out, size_t n)
{
	if (strchr(bdf, '/'))
		snprintf(out, n, "%s", bdf);
	else if (strlen(bdf) == 7) /* "00:02.0": add the default PCI domain */
		snprintf(out, n, "/sys/bus/pci/devices/0000:%s/config", bdf);
	else
		snprintf(out, n, "/sys/bus/pci/devices/%s/config", bdf);
}

static int cfg_read(int fd, unsigned off, void *buf, size_t len)
{
	return pread(fd, buf, len, off) == (ssize_t)len ? 0 : -1;
}

/* Walk the standard capability list; returns the offset of capability `id`, or 0. */
static unsigned find_cap(int fd, uint8_t id)
{
	uint16_t status;
	uint8_t ptr, hdr[2];
	int guard;

	if (cfg_read(fd, 0x06, &status, 2) != 0 || !(status & 0x10))
		return 0;
	if (cfg_read(fd, 0x34, &ptr, 1) != 0)
		return 0;
	/* 48 entries is the most that fit in 256 bytes; the guard stops a looping list. */
	for (guard = 0; ptr >= 0x40 && guard < 48; guard++) {
		ptr &= 0xfc;
		if (cfg_read(fd, ptr, hdr, 2) != 0)
			return 0;
		if (hdr[0] == id)
			return ptr;
		ptr = hdr[1];
	}
	return 0;
}

static int cmd_msi(int argc, char **argv, int disable)
{
	char path[PATH_MAX];
	unsigned cap, xcap;
	uint16_t before, after;
	int fd;

	if (argc != 3)
		die(2, "usage: l1tool %s BDF", argv[1]);
	config_path(argv[2], path, sizeof(path));
	fd = open(path, (disable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (fd < 0)
		die(2, "open %s: %s", path, strerror(errno));
	cap = find_cap(fd, 0x05);
	xcap = find_cap(fd, 0x11);
	if (!cap) {
		fprintf(stderr, "l1tool: %s: no MSI capability%s\n", argv[2], xcap ? " (has MSI-X)" : "");
		close(fd);
		return 1;
	}
	if (cfg_read(fd, cap + 2, &before, 2) != 0)
		die(1, "read MSI control: %s", strerror(errno));
	if (!disable) {
		printf("msi_cap=0x%02x control=0x%04x enabled=%d", cap, before, before & 1);
		if (xcap) {
			uint16_t xc = 0;

			cfg_read(fd, xcap + 2, &xc, 2);
			printf(" msix_cap=0x%02x msix_control=0x%04x", xcap, xc);
		}
		printf("\n");
		close(fd);
		return 0;
	}
	after = before & (uint16_t)~1u;
	/* Write only the 16-bit Message Control word: the rest of the capability is untouched. */
	if (pwrite(fd, &after, 2, cap + 2) != 2)
		die(1, "write MSI control: %s", strerror(errno));
	if (cfg_read(fd, cap + 2, &after, 2) != 0)
		die(1, "re-read MSI control: %s", strerror(errno));
	close(fd);
	printf("msi_cap=0x%02x control_before=0x%04x control_after=0x%04x\n", cap, before, after);
	return (after & 1) ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		die(2, "usage: l1tool digest|flip|msi-status|msi-disable ...");
	if (!strcmp(argv[1], "digest"))
		return cmd_digest(argc, argv);
	if (!strcmp(argv[1], "flip"))
		return cmd_flip(argc, argv);
	if (!strcmp(argv[1], "msi-status"))
		return cmd_msi(argc, argv, 0);
	if (!strcmp(argv[1], "msi-disable"))
		return cmd_msi(argc, argv, 1);
	die(2, "unknown command '%s'", argv[1]);
	return 2;
}
