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
 *   l1tool luo-hold --dir DIR --ram-size BYTES [--session NAME] [--timeout S]
 *       Starts a daemon that creates two memfds (L2's RAM, sized BYTES, and its device state)
 *       and holds them. Prints: pid=<p> ram_fd=<n> state_fd=<m> ram_size=<b> state_size=<b>
 *       ram_path=/proc/<p>/fd/<n> state_path=/proc/<p>/fd/<m> session=<name>
 *   l1tool luo-preserve --dir DIR
 *       Asks that daemon to open /dev/liveupdate, create the session (default
 *       "fastrestart-l2") and preserve the RAM memfd as token 1 and the state one as token 2;
 *       it keeps holding the session until the kexec. Prints: preserved=1 session=<name> ...
 *       (or preserved=0 failed=<op> errno=<e>, exit 1).
 *   l1tool luo-retrieve --dir DIR [--ram-size BYTES] [--session NAME]
 *       After the kexec: a daemon retrieves the session, tokens 1 and 2, checks the RAM size,
 *       finishes the session and holds the fds. Prints the luo-hold line plus finished=1.
 *   l1tool luo-stop --dir DIR      stops either daemon (SIGTERM).
 *   l1tool luo-abi                 the LUO uapi layouts as compiled (for the unit tests).
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
#include <stddef.h>
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
#include <sys/wait.h>
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

/* ------------------------------------------------------------ live update */

/* The Live Update Orchestrator's uapi (include/uapi/linux/liveupdate.h, Linux 6.19), spelt out
 * here because the build host's headers predate it. Every argument struct starts with its own
 * size: the kernel rejects sizes it does not know, so these layouts must match exactly. */
#define LUO_DEVICE "/dev/liveupdate"
#define LUO_IOCTL_TYPE 0xBA
#define LUO_NAME_LEN 64
#define LUO_IOCTL_CREATE_SESSION _IO(LUO_IOCTL_TYPE, 0x00)
#define LUO_IOCTL_RETRIEVE_SESSION _IO(LUO_IOCTL_TYPE, 0x01)
#define LUO_SESSION_PRESERVE_FD _IO(LUO_IOCTL_TYPE, 0x40)
#define LUO_SESSION_RETRIEVE_FD _IO(LUO_IOCTL_TYPE, 0x41)
#define LUO_SESSION_FINISH _IO(LUO_IOCTL_TYPE, 0x42)
#define LUO_TOKEN_RAM 1
#define LUO_TOKEN_STATE 2
#define LUO_DEFAULT_SESSION "fastrestart-l2"

struct luo_session_arg { /* create_session and retrieve_session */
	uint32_t size;
	int32_t fd;
	uint8_t name[LUO_NAME_LEN];
};

struct luo_fd_arg { /* session preserve_fd and retrieve_fd */
	uint32_t size;
	int32_t fd;
	uint64_t token __attribute__((aligned(8)));
};

struct luo_finish_arg {
	uint32_t size;
	uint32_t reserved;
};

_Static_assert(sizeof(struct luo_session_arg) == 72, "liveupdate_ioctl_create_session is 72 bytes");
_Static_assert(sizeof(struct luo_fd_arg) == 16, "liveupdate_session_preserve_fd is 16 bytes");
_Static_assert(sizeof(struct luo_finish_arg) == 8, "liveupdate_session_finish is 8 bytes");

/* What a LUO daemon holds. The fds stay open for its whole life, so that /proc/<pid>/fd/<n>
 * names the memfds for L2's QEMU and for cat; closing the session fd would unpreserve them. */
static struct {
	char dir[PATH_MAX];
	const char *session;
	uint64_t ram_size;
	int luo_fd, session_fd, ram_fd, state_fd;
	int preserved;
} luo = { .luo_fd = -1, .session_fd = -1, .ram_fd = -1, .state_fd = -1 };

static int luo_session_ioctl(int fd, unsigned long request, const char *name)
{
	struct luo_session_arg arg;

	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	snprintf((char *)arg.name, sizeof(arg.name), "%s", name);
	if (ioctl(fd, request, &arg) != 0)
		return -1;
	return arg.fd;
}

static int luo_fd_ioctl(int session_fd, unsigned long request, int fd, uint64_t token)
{
	struct luo_fd_arg arg;

	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	arg.fd = fd;
	arg.token = token;
	if (ioctl(session_fd, request, &arg) != 0)
		return -1;
	return arg.fd;
}

static uint64_t fd_size(int fd)
{
	struct stat st;

	return fstat(fd, &st) == 0 ? (uint64_t)st.st_size : 0;
}

/* The line both daemons print when ready (and tests parse): where the memfds are. */
static void luo_write_ready(const char *extra)
{
	char path[PATH_MAX], line[1024];
	int pid = (int)getpid();

	snprintf(line, sizeof(line),
		 "pid=%d ram_fd=%d state_fd=%d ram_size=%" PRIu64 " state_size=%" PRIu64
		 " ram_path=/proc/%d/fd/%d state_path=/proc/%d/fd/%d session=%s%s\n",
		 pid, luo.ram_fd, luo.state_fd, fd_size(luo.ram_fd), fd_size(luo.state_fd), pid, luo.ram_fd, pid,
		 luo.state_fd, luo.session, extra);
	path_in(path, sizeof(path), luo.dir, WL_PROG ".ready");
	if (write_atomic(path, line) != 0)
		dlog("cannot write %s: %s", path, strerror(errno));
}

/* SIGUSR1 in the hold daemon: put both memfds into a new LUO session (tokens 1 and 2). The
 * RAM is final by now (L2's QEMU has quit), and so is the state (the save wrote it). */
static void luo_preserve(void)
{
	char path[PATH_MAX], line[512];
	const char *op = NULL;

	if (!luo.preserved && luo.session_fd >= 0) {
		/* A retrieve daemon preserving again (the next cycle): its finished session goes
		 * first, so that the name is free for the new one. */
		close(luo.session_fd);
		luo.session_fd = -1;
	}
	if (!luo.preserved) {
		/* Reuse /dev/liveupdate once open: LUO may admit one opener at a time. */
		if (luo.luo_fd < 0 && (luo.luo_fd = open(LUO_DEVICE, O_RDWR | O_CLOEXEC)) < 0)
			op = "open_" LUO_DEVICE;
		else if ((luo.session_fd = luo_session_ioctl(luo.luo_fd, LUO_IOCTL_CREATE_SESSION, luo.session)) < 0)
			op = "create_session";
		else if (luo_fd_ioctl(luo.session_fd, LUO_SESSION_PRESERVE_FD, luo.ram_fd, LUO_TOKEN_RAM) < 0)
			op = "preserve_fd_ram";
		else if (luo_fd_ioctl(luo.session_fd, LUO_SESSION_PRESERVE_FD, luo.state_fd, LUO_TOKEN_STATE) < 0)
			op = "preserve_fd_state";
	}
	if (op) {
		dlog("luo-preserve: %s: %s", op, strerror(errno));
		snprintf(line, sizeof(line), "preserved=0 failed=%s errno=%d pid=%d\n", op, errno, (int)getpid());
	} else {
		luo.preserved = 1;
		snprintf(line, sizeof(line),
			 "preserved=1 session=%s session_fd=%d ram_token=%d state_token=%d ram_size=%" PRIu64
			 " state_size=%" PRIu64 " pid=%d\n",
			 luo.session, luo.session_fd, LUO_TOKEN_RAM, LUO_TOKEN_STATE, fd_size(luo.ram_fd),
			 fd_size(luo.state_fd), (int)getpid());
	}
	path_in(path, sizeof(path), luo.dir, WL_PROG ".result");
	if (write_atomic(path, line) != 0)
		dlog("cannot write %s: %s", path, strerror(errno));
}

/* Hold everything until SIGTERM; SIGUSR1 preserves (hold daemon only). The signals are
 * blocked before the daemon says it is ready: an early SIGUSR1 would otherwise kill it. */
static int luo_serve(sigset_t *set)
{
	int sig;

	for (;;) {
		if (sigwait(set, &sig) != 0)
			continue;
		if (sig == SIGUSR1)
			luo_preserve();
		else
			return 0;
	}
}

static void luo_block_signals(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGUSR1);
	sigaddset(set, SIGTERM);
	sigaddset(set, SIGINT);
	sigaddset(set, SIGHUP);
	sigprocmask(SIG_BLOCK, set, NULL);
}

static int luo_hold_daemon(int status_fd)
{
	sigset_t set;

	luo_block_signals(&set);
	if (write_pid_file(luo.dir, status_fd) != 0)
		return 1;
	luo.ram_fd = memfd_create("fastrestart-l2-ram", 0);
	luo.state_fd = memfd_create("fastrestart-l2-state", 0);
	if (luo.ram_fd < 0 || luo.state_fd < 0) {
		dprintf(status_fd, "memfd_create: %s\n", strerror(errno));
		return 1;
	}
	if (ftruncate(luo.ram_fd, (off_t)luo.ram_size) != 0) {
		dprintf(status_fd, "ftruncate the RAM memfd to %" PRIu64 ": %s\n", luo.ram_size, strerror(errno));
		return 1;
	}
	luo_write_ready("");
	dprintf(status_fd, "ok\n");
	close(status_fd);
	return luo_serve(&set);
}

/* After the kexec: take the session back, both memfds by token, check them, and finish. */
static int luo_retrieve_daemon(int status_fd)
{
	sigset_t set;
	const char *op = NULL;

	luo_block_signals(&set);
	if (write_pid_file(luo.dir, status_fd) != 0)
		return 1;
	if ((luo.luo_fd = open(LUO_DEVICE, O_RDWR | O_CLOEXEC)) < 0)
		op = "open " LUO_DEVICE;
	else if ((luo.session_fd = luo_session_ioctl(luo.luo_fd, LUO_IOCTL_RETRIEVE_SESSION, luo.session)) < 0)
		op = "retrieve_session";
	else if ((luo.ram_fd = luo_fd_ioctl(luo.session_fd, LUO_SESSION_RETRIEVE_FD, -1, LUO_TOKEN_RAM)) < 0)
		op = "retrieve_fd (token 1, RAM)";
	else if ((luo.state_fd = luo_fd_ioctl(luo.session_fd, LUO_SESSION_RETRIEVE_FD, -1, LUO_TOKEN_STATE)) < 0)
		op = "retrieve_fd (token 2, state)";
	if (op) {
		dprintf(status_fd, "%s (session %s): %s\n", op, luo.session, strerror(errno));
		return 1;
	}
	if (luo.ram_size && fd_size(luo.ram_fd) != luo.ram_size) {
		dprintf(status_fd, "the RAM memfd came back with %" PRIu64 " bytes, not %" PRIu64 "\n",
			fd_size(luo.ram_fd), luo.ram_size);
		return 1;
	}
	{
		struct luo_finish_arg arg = { .size = sizeof(arg), .reserved = 0 };

		if (ioctl(luo.session_fd, LUO_SESSION_FINISH, &arg) != 0) {
			dprintf(status_fd, "session_finish (session %s): %s\n", luo.session, strerror(errno));
			return 1;
		}
	}
	luo_write_ready(" finished=1");
	dprintf(status_fd, "ok\n");
	close(status_fd);
	return luo_serve(&set);
}

static void luo_clear(void)
{
	static const char *names[] = { WL_PROG ".ready", WL_PROG ".result", WL_PROG ".pid" };
	char path[PATH_MAX];
	size_t i;

	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		path_in(path, sizeof(path), luo.dir, names[i]);
		unlink(path);
	}
}

/* luo-hold / luo-retrieve / luo-preserve / luo-stop --dir DIR [...] */
static int cmd_luo(int argc, char **argv)
{
	const char *cmd = argv[1], *dir = NULL, *session = LUO_DEFAULT_SESSION;
	uint64_t ram_size = 0, timeout = 60;
	int have_ram = 0, pfd[2], rc;
	pid_t pid;
	const struct option_spec specs[] = {
		{ "--dir", &dir, NULL, NULL },
		{ "--session", &session, NULL, NULL },
		{ "--ram-size", NULL, &ram_size, &have_ram },
		{ "--timeout", NULL, &timeout, NULL },
		{ NULL, NULL, NULL, NULL },
	};

	parse_options(argc, argv, 2, specs);
	if (!dir)
		die_usage("%s: --dir is required", cmd);
	if (!session[0] || strlen(session) >= LUO_NAME_LEN)
		die_usage("--session: 1 to %d characters", LUO_NAME_LEN - 1);
	if (mkdir(dir, 0755) != 0 && errno != EEXIST)
		die_usage("mkdir %s: %s", dir, strerror(errno));
	if (!realpath(dir, luo.dir))
		die_usage("--dir %s: %s", dir, strerror(errno));
	luo.session = session;
	luo.ram_size = ram_size;
	if (!strcmp(cmd, "luo-preserve")) {
		char *res = request_result(luo.dir, timeout, &rc);

		if (!res) {
			if (rc < 0)
				fprintf(stderr, WL_PROG ": no preserve result after %" PRIu64 " s\n", timeout);
			return rc < 0 ? 2 : rc;
		}
		rc = strncmp(res, "preserved=1", 11) == 0 ? 0 : 1;
		free(res);
		return rc;
	}
	if (!strcmp(cmd, "luo-stop"))
		return stop_daemon(luo.dir);
	if (!strcmp(cmd, "luo-hold") && (!have_ram || ram_size == 0))
		die_usage("luo-hold needs --ram-size BYTES (L2's RAM size)");
	if (pid_alive(read_pid(luo.dir)))
		die_usage("a daemon (pid %d) already runs in %s", (int)read_pid(luo.dir), luo.dir);
	luo_clear();
	pid = fork_daemon(luo.dir, pfd);
	if (pid == 0)
		_exit(!strcmp(cmd, "luo-hold") ? luo_hold_daemon(pfd[1]) : luo_retrieve_daemon(pfd[1]));
	waitpid(pid, NULL, 0);
	return await_ready(pfd[0], timeout, luo.dir);
}

/* The ABI as compiled, for the unit tests to hold against the kernel's uapi header. */
static int cmd_luo_abi(void)
{
	printf("session_arg_size=%zu fd_arg_size=%zu finish_arg_size=%zu token_offset=%zu"
	       " create_session=0x%lx retrieve_session=0x%lx preserve_fd=0x%lx retrieve_fd=0x%lx finish=0x%lx"
	       " ram_token=%d state_token=%d\n",
	       sizeof(struct luo_session_arg), sizeof(struct luo_fd_arg), sizeof(struct luo_finish_arg),
	       offsetof(struct luo_fd_arg, token), (unsigned long)LUO_IOCTL_CREATE_SESSION,
	       (unsigned long)LUO_IOCTL_RETRIEVE_SESSION, (unsigned long)LUO_SESSION_PRESERVE_FD,
	       (unsigned long)LUO_SESSION_RETRIEVE_FD, (unsigned long)LUO_SESSION_FINISH, LUO_TOKEN_RAM,
	       LUO_TOKEN_STATE);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		die(2, "usage: l1tool digest|flip|msi-status|msi-disable|luo-hold|luo-preserve|luo-retrieve|luo-stop|luo-abi ...");
	if (!strcmp(argv[1], "digest"))
		return cmd_digest(argc, argv);
	if (!strcmp(argv[1], "flip"))
		return cmd_flip(argc, argv);
	if (!strcmp(argv[1], "msi-status"))
		return cmd_msi(argc, argv, 0);
	if (!strcmp(argv[1], "msi-disable"))
		return cmd_msi(argc, argv, 1);
	if (!strcmp(argv[1], "luo-hold") || !strcmp(argv[1], "luo-preserve") || !strcmp(argv[1], "luo-retrieve") ||
	    !strcmp(argv[1], "luo-stop"))
		return cmd_luo(argc, argv);
	if (!strcmp(argv[1], "luo-abi"))
		return cmd_luo_abi();
	die(2, "unknown command '%s'", argv[1]);
	return 2;
}
