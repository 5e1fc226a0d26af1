// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * edutest - DMA integrity and exact interrupt accounting on QEMU's "edu" PCI
 * test device (1234:11e8), driven entirely from userspace inside a guest.
 *
 * Build: gcc -O2 -static -Wall -Wextra -o edutest edutest.c
 * (one static binary; the helpers shared with the other workloads come from workload.h)
 *
 * Backends (chosen automatically, or with --backend):
 *   vfio-type1    vfio-pci + a real (virtual) IOMMU in this guest. MSI and INTx,
 *                 both delivered to eventfds. DMA addresses are IOVAs we pick
 *                 below the device's DMA mask, so guest memory layout does not
 *                 matter. Needs a vIOMMU (e.g. -device intel-iommu[,intremap=on]
 *                 + intel_iommu=on); without interrupt remapping load
 *                 vfio_iommu_type1 with allow_unsafe_interrupts=1.
 *   vfio-noiommu  vfio-pci in no-IOMMU mode (kernel needs CONFIG_VFIO_NOIOMMU,
 *                 which Debian's kernels do NOT set). MSI and INTx; DMA
 *                 addresses are guest-physical addresses (pagemap).
 *   uio           --irq intx: uio_pci_generic; --irq msi: edu_uio, our own UIO
 *                 driver for edu on MSI (guests/modules/edu_uio.c, which the
 *                 harness builds for the guest's kernel). No IOMMU needed: DMA
 *                 addresses are guest-physical addresses (pagemap). MSI is edge:
 *                 each raise is one message, nothing to unmask.
 *                 uio_pci_generic has no irqcontrol hook:
 *                 its handler masks INTx with the Command register's Interrupt
 *                 Disable bit and write(/dev/uioN, 1) fails with ENOSYS, so the
 *                 re-enable MUST be a config-space write clearing that bit
 *                 (after acking the device). A loop that "unmasks" through
 *                 /dev/uioN receives exactly one interrupt; --naive-unmask
 *                 reproduces that on purpose.
 *
 * Subcommands:
 *   edutest start --bdf BDF --dir D [--irq msi|intx] [--slots N] [--size BYTES]
 *                 [--backend auto|vfio|uio] [--irq-timeout-ms MS]
 *                 [--dma-bits BITS] [--seed N] [--foreground]
 *   edutest verify --dir D [--timeout S] [--strict]
 *   edutest status --dir D
 *   edutest busy --dir D [--timeout S]   (return once edu runs a DMA: exit 0, else 1)
 *   edutest selftest-corrupt --dir D [--slot N|-1] [--timeout S]   (hidden)
 *
 * Guest suspend/resume (a driver's resume path, done from userspace):
 *   Before every DMA, after every transfer and before every raise-IRQ test the
 *   daemon reads the device's real Command register (sysfs config). For a
 *   driver without PM callbacks (uio_pci_generic) the PCI core disables the
 *   device on system suspend and on resume re-enables bus mastering only if
 *   pci_dev->is_busmaster, which a raw config write never sets: after any
 *   `echo mem > /sys/power/state` Bus Master Enable reads 0 and every DMA goes
 *   nowhere. If BME or Memory Space is clear:
 *     - a system suspend happened since the previous check (the
 *       /sys/power/suspend_stats success+fail counters moved, or CLOCK_BOOTTIME
 *       - CLOCK_MONOTONIC jumped by > 50 ms; the counters are bumped only after
 *       user space is thawed, so they are re-read for up to 1.5 s): this is
 *       the PCI PM path. BME/Memory are set again, counted in
 *       pm_resume_reinits, logged "PM-RESUME". Not a failure. A transfer whose
 *       DMA overlapped such a suspend and did not land is redone
 *       (pm_retried_transfers), because the device may have run it while the
 *       PM core had bus mastering off.
 *     - otherwise the bit was lost underneath us (e.g. cleared by the host):
 *       counted in bme_lost, logged "BME LOST" with the transfer number, the
 *       Command value and the time, re-enabled, and the run continues.
 *       bme_lost > 0 fails the run like a DMA mismatch.
 *   INTx Disable set while our INTx loop expects it clear and no interrupt is
 *   pending (the "irq-drop" fault) is only logged ("INTX MASKED") and counted
 *   in intx_masked_seen: it is never repaired before the interrupt it
 *   swallows has been counted as lost; wait_irq then acks and re-arms INTx.
 *   (The kernel's own resume of a uio device clears INTx Disable itself, in
 *   pci_reenable_device.)
 *   Interrupt deadlines use CLOCK_MONOTONIC, which stops while the guest is
 *   suspended (and, with kvmclock/TCG, while the VM is paused); a wait that a
 *   detected suspend interrupted gets one fresh full timeout. If that also
 *   expires in INTx mode while edu's irq status shows the interrupt raised
 *   and INTx Disable is clear, the S3 cycle swallowed it: QEMU's wake-up
 *   resets every device (pc_machine_wakeup), which drops an asserted INTx
 *   level while edu keeps its irq status, and a level raised before the
 *   guest restored its interrupt routing never reaches the CPU. The pending
 *   interrupt is then re-presented once (re-raised with INTx disabled, then
 *   INTx enabled), counted in irq_resume_kicks, logged "IRQ KICK", with one
 *   more timeout; only if it still does not arrive it is lost. A disabled
 *   INTx or MSI (irq-drop) is never kicked.
 *   The opposite also happens: an interrupt that fired while the kernel had
 *   device interrupts suspended is re-sent on resume, and uio then counts
 *   one assertion twice. Extra notifications for the awaited interrupt
 *   during a wait that a suspend hit are counted in irq_pm_replays (logged
 *   "PM REPLAY"), not in irq_spurious.
 *
 * Exit codes: start 0 = daemon ready, 2 = setup/usage error.
 *             verify 0 = no DMA mismatch, bme_lost == 0 and
 *             irq_expected == irq_received,
 *             1 = check failed, 2 = usage error / daemon gone without result.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>

#define WL_PROG "edutest"
#include "workload.h"

#ifndef VFIO_NOIOMMU_IOMMU
#define VFIO_NOIOMMU_IOMMU 8
#endif

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8

/* edu BAR0 registers */
#define EDU_ID 0x00
#define EDU_LIVENESS 0x04
#define EDU_STATUS 0x20
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_CNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_DMA_RUN 0x1
#define EDU_DMA_TO_RAM 0x2 /* direction: device buffer -> RAM */
#define EDU_DMA_IRQ 0x4
#define EDU_DMA_IRQ_VALUE 0x100u
#define EDU_DEV_BUF 0x40000u
/* QEMU 7.2's edu rejects a 4096-byte DMA (off-by-one) with a hw_error that
 * kills the whole VM, so 4095 is the hard maximum. */
#define EDU_MAX_DMA 4095u

#define PAGE 4096u
#define MAX_FIRST_MISMATCH 16
#define IOVA_BASE 0x1000000ull /* 16 MiB: IOVAs for vfio-type1 */
#define MAX_PCI_EVENTS 16
#define SUSPEND_JUMP_S 0.050 /* BOOTTIME - MONOTONIC jump that means "slept" */
#define SUSPEND_GRACE_S 1.5  /* wait for suspend_stats after the thaw */

enum backend { BK_AUTO, BK_VFIO_TYPE1, BK_VFIO_NOIOMMU, BK_UIO };
enum irqmode { IRQ_MSI, IRQ_INTX };

static const char *backend_name(enum backend b)
{
	switch (b) {
	case BK_VFIO_TYPE1: return "vfio-type1";
	case BK_VFIO_NOIOMMU: return "vfio-noiommu";
	case BK_UIO: return "uio";
	default: return "auto";
	}
}

/* ------------------------------------------------------------------ utils */

static char errbuf[1024];

static void seterr(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void seterr(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
	va_end(ap);
}

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
	struct timespec ts;
	struct tm tm;
	char tbuf[64];
	va_list ap;

	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(tbuf, sizeof(tbuf), "%Y-%m-%dT%H:%M:%S", &tm);
	fprintf(stderr, "%s.%03ldZ edutest[%d]: ", tbuf, ts.tv_nsec / 1000000, getpid());
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
}

static int read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = 0;
	return 0;
}

static int write_file(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;
	int e;

	if (fd < 0)
		return -1;
	n = write(fd, s, strlen(s));
	e = errno;
	close(fd);
	errno = e;
	return n == (ssize_t)strlen(s) ? 0 : -1;
}

/* Write len bytes to a file atomically: a per-process tmp + fsync + rename. */
static int write_atomic_len(const char *path, const char *data, size_t len)
{
	char tmp[PATH_MAX];
	int fd;

	snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, getpid());
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	if (write(fd, data, len) != (ssize_t)len || fsync(fd) < 0) {
		close(fd);
		unlink(tmp);
		return -1;
	}
	close(fd);
	return rename(tmp, path);
}

/* ------------------------------------------------------- pattern and hash */

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Deterministic payload of a transfer: a pure function of (seed, transfer). */
static void fill_pattern(uint8_t *buf, size_t len, uint64_t seed, uint64_t transfer)
{
	uint64_t st = seed ^ (transfer * 0xd1b54a32d192ed03ull) ^ 0x6a09e667f3bcc908ull;
	size_t i = 0;

	while (i < len) {
		uint64_t v = splitmix64(&st);
		size_t n = len - i < 8 ? len - i : 8;
		memcpy(buf + i, &v, n);
		i += n;
	}
}

/* 64-bit hash (word-wise multiply/xor with a final avalanche). */
static uint64_t hash64(const volatile uint8_t *vbuf, size_t len)
{
	const uint8_t *buf = (const uint8_t *)vbuf;
	uint64_t h = 0xcbf29ce484222325ull ^ (len * 0x100000001b3ull);
	size_t i = 0;

	for (; i + 8 <= len; i += 8) {
		uint64_t w;
		memcpy(&w, buf + i, 8);
		h ^= w;
		h *= 0x9fb21c651e98df25ull;
		h ^= h >> 29;
	}
	if (i < len) {
		uint64_t w = 0;
		memcpy(&w, buf + i, len - i);
		h ^= w ^ 0xff;
		h *= 0x9fb21c651e98df25ull;
	}
	h ^= h >> 32;
	h *= 0xd6e8feb86659fd93ull;
	h ^= h >> 32;
	return h;
}

/* ------------------------------------------------------------ device state */

struct page_buf {
	uint8_t *va;
	uint64_t gpa; /* guest-physical address (pagemap) */
	uint64_t dma; /* address the device uses: IOVA (type1) or GPA */
};

struct slot {
	uint64_t transfer;
	uint64_t hash;
	bool valid; /* holds completed, landing-verified data not yet retired */
};

struct mismatch {
	uint64_t transfer;
	uint32_t slot;
	uint64_t gpa;
	uint64_t expected, actual;
	long offset; /* first differing byte, -1 if unknown */
	const char *when;
};

struct pci_event {
	const char *kind; /* "pm-resume" or "bme-lost" */
	const char *when;
	uint64_t transfer;
	uint16_t cmd, cmd_after;
	double t_s;       /* CLOCK_MONOTONIC seconds since start */
	double realtime;  /* CLOCK_REALTIME */
};

struct stats {
	uint64_t transfers_started, transfers, transfers_failed;
	uint64_t dma_mismatches, landing_mismatches, retire_mismatches, final_mismatches;
	uint64_t retire_checks, final_checked;
	uint64_t dma_timeouts;
	uint64_t irq_expected, irq_received, irq_lost, irq_spurious, irq_status_anomalies;
	uint64_t dma_done_expected, dma_done_irqs, raised_expected, raised_irqs;
	uint64_t gpa_moved;
	uint64_t corruptions_injected;
	uint64_t pm_resume_reinits, bme_lost, suspends_seen, intx_masked_seen, pm_retried_transfers;
	uint64_t irq_pm_replays;
	uint64_t irq_resume_kicks;
	struct mismatch first[MAX_FIRST_MISMATCH];
	int nfirst;
	struct pci_event pci_ev[MAX_PCI_EVENTS];
	int npci_ev;
};

static struct {
	/* options */
	char bdf[64];
	char dir[PATH_MAX];
	enum backend backend;
	enum irqmode irq;
	unsigned slots;
	unsigned size;
	unsigned irq_timeout_ms;
	unsigned dma_bits;
	uint64_t seed;
	bool foreground;
	bool naive_unmask;

	/* device */
	char sysdev[128];
	int container_fd, group_fd, device_fd;
	uint64_t cfg_off; /* vfio config region offset */
	int cfg_fd;       /* uio: sysfs config */
	int phys_cfg_fd;  /* sysfs config, read-only: the physical registers (vfio virtualizes MSI) */
	int uio_fd;
	char uio_event[PATH_MAX]; /* /sys/class/uio/uioN/event: cumulative count */
	uint32_t uio_count;
	int efd; /* vfio eventfd */
	int req_fd; /* vfio device request (hot-unplug): stop and release */
	volatile uint8_t *bar;
	size_t bar_size;
	int msi_cap;
	uint32_t dev_id;

	/* buffers */
	struct page_buf src;
	struct page_buf *slot_pb;
	struct slot *slot;
	uint8_t *big_map; /* type1: one mapping for src + slots */
	size_t big_len;
	int pagemap_fd;

	/* suspend detection */
	bool have_susp_stats;
	uint64_t susp_success, susp_fail; /* /sys/power/suspend_stats at the last sample */
	double boot_off;                  /* CLOCK_BOOTTIME - CLOCK_MONOTONIC at the last sample */
	uint64_t jump_unmatched;          /* suspends seen as a clock jump, counters not yet moved */
	uint64_t pm_epoch;                /* bumped on every detected suspend */
	uint64_t pm_epoch_checked;        /* pm_epoch at the previous Command check */
	bool intx_masked_reported;

	struct stats st;
	double t_start;
	double last_status;
	bool ready;
} g = {
	.container_fd = -1, .group_fd = -1, .device_fd = -1, .cfg_fd = -1,
	.uio_fd = -1, .efd = -1, .pagemap_fd = -1, .msi_cap = -1, .phys_cfg_fd = -1, .req_fd = -1,
};

static volatile sig_atomic_t stop_req, corrupt_req;
static const char *stop_reason = "SIGUSR1";

static void on_signal(int sig)
{
	if (sig == SIGUSR2) {
		corrupt_req = 1;
		return;
	}
	if (sig == SIGTERM)
		stop_reason = "SIGTERM";
	else if (sig == SIGINT)
		stop_reason = "SIGINT";
	stop_req = 1;
}

static void dpath(char *out, size_t len, const char *name)
{
	/* g.dir is limited to PATH_MAX/2 when parsed; no truncation possible */
	size_t a = strnlen(g.dir, len / 2), b = strnlen(name, len / 2 - 2);

	memcpy(out, g.dir, a);
	out[a] = '/';
	memcpy(out + a + 1, name, b);
	out[a + 1 + b] = 0;
}

/* ----------------------------------------------------- register access */

static inline uint32_t rd32(uint32_t off)
{
	uint32_t v = *(volatile uint32_t *)(g.bar + off);
	__asm__ __volatile__("" ::: "memory");
	return v;
}

static inline void wr32(uint32_t off, uint32_t v)
{
	__asm__ __volatile__("" ::: "memory");
	*(volatile uint32_t *)(g.bar + off) = v;
	__asm__ __volatile__("" ::: "memory");
}

static int cfg_read(unsigned off, void *buf, size_t len)
{
	ssize_t n;

	if (g.backend == BK_UIO)
		n = pread(g.cfg_fd, buf, len, off);
	else
		n = pread(g.device_fd, buf, len, g.cfg_off + off);
	return n == (ssize_t)len ? 0 : -1;
}

static int cfg_write(unsigned off, const void *buf, size_t len)
{
	ssize_t n;

	if (g.backend == BK_UIO)
		n = pwrite(g.cfg_fd, buf, len, off);
	else
		n = pwrite(g.device_fd, buf, len, g.cfg_off + off);
	return n == (ssize_t)len ? 0 : -1;
}

static uint16_t cfg_r16(unsigned off)
{
	uint16_t v = 0xffff;
	cfg_read(off, &v, 2);
	return v;
}

/* The device's real config space as the kernel sees it (not vfio's view). */
static uint16_t phys_r16(unsigned off)
{
	uint16_t v = 0xffff;

	if (g.phys_cfg_fd < 0 || pread(g.phys_cfg_fd, &v, 2, off) != 2)
		return 0xffff;
	return v;
}

static int find_cap(uint8_t id)
{
	uint8_t pos = 0;
	int guard = 48;

	if (!(cfg_r16(PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return -1;
	cfg_read(PCI_CAPABILITY_LIST, &pos, 1);
	while (pos >= 0x40 && guard--) {
		uint8_t cid = 0, next = 0;
		pos &= ~3;
		cfg_read(pos, &cid, 1);
		if (cid == id)
			return pos;
		cfg_read(pos + 1, &next, 1);
		pos = next;
	}
	return -1;
}

/* ------------------------------------------------------------- pagemap */

static int virt_to_phys(const void *va, uint64_t *pa)
{
	uint64_t e;
	uintptr_t v = (uintptr_t)va;

	if (pread(g.pagemap_fd, &e, 8, (v / PAGE) * 8) != 8)
		return -1;
	if (!(e & (1ull << 63)))
		return -1;
	e &= (1ull << 55) - 1;
	if (!e) /* PFNs are hidden without CAP_SYS_ADMIN */
		return -1;
	*pa = e * PAGE + (v % PAGE);
	return 0;
}

/* --------------------------------------------------------- device binding */

static int current_driver(char *out, size_t len)
{
	char p[PATH_MAX], link[PATH_MAX];
	ssize_t n;

	snprintf(p, sizeof(p), "%s/driver", g.sysdev);
	n = readlink(p, link, sizeof(link) - 1);
	if (n < 0) {
		out[0] = 0;
		return 0;
	}
	link[n] = 0;
	snprintf(out, len, "%.120s", strrchr(link, '/') ? strrchr(link, '/') + 1 : link);
	return 0;
}

static bool path_exists(const char *p)
{
	struct stat sb;
	return stat(p, &sb) == 0;
}

static void try_modprobe(const char *mod)
{
	pid_t pid = fork();
	int st;

	if (pid == 0) {
		int fd = open("/dev/null", O_RDWR);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execlp("modprobe", "modprobe", mod, (char *)NULL);
		_exit(127);
	}
	if (pid > 0)
		waitpid(pid, &st, 0);
}

static int bind_driver(const char *drv)
{
	char cur[128], p[PATH_MAX];

	current_driver(cur, sizeof(cur));
	if (!strcmp(cur, drv))
		return 0;
	snprintf(p, sizeof(p), "/sys/bus/pci/drivers/%s", drv);
	if (!path_exists(p)) {
		try_modprobe(drv);
		if (!path_exists(p)) {
			seterr("driver %s is not available (modprobe %s failed?)", drv, drv);
			return -1;
		}
	}
	snprintf(p, sizeof(p), "%s/driver_override", g.sysdev);
	if (write_file(p, drv) < 0) {
		seterr("cannot write %s: %s", p, strerror(errno));
		return -1;
	}
	if (cur[0]) {
		snprintf(p, sizeof(p), "%s/driver/unbind", g.sysdev);
		if (write_file(p, g.bdf) < 0) {
			seterr("cannot unbind %s from %s: %s", g.bdf, cur, strerror(errno));
			return -1;
		}
	}
	/* drivers_probe honours driver_override; EINVAL etc. is reported below. */
	write_file("/sys/bus/pci/drivers_probe", g.bdf);
	current_driver(cur, sizeof(cur));
	if (strcmp(cur, drv)) {
		seterr("binding %s to %s failed (now bound to '%s'); see dmesg", g.bdf, drv, cur);
		return -1;
	}
	return 0;
}

/* Decide the backend (auto) before binding. */
static int choose_backend(void)
{
	char cur[128], p[PATH_MAX];
	bool has_group, noiommu_param;

	current_driver(cur, sizeof(cur));
	snprintf(p, sizeof(p), "%s/iommu_group", g.sysdev);
	has_group = path_exists(p);
	if (!path_exists("/sys/module/vfio"))
		try_modprobe("vfio");
	noiommu_param = path_exists("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode");

	if (g.backend == BK_AUTO) {
		if (!strcmp(cur, "uio_pci_generic") || !strcmp(cur, "edu_uio"))
			g.backend = BK_UIO;
		else if (!strcmp(cur, "vfio-pci") || has_group || noiommu_param)
			g.backend = BK_VFIO_TYPE1; /* refined to noiommu below */
		else
			g.backend = BK_UIO;
	}
	if (has_group) {
		/* a group vfio created in no-IOMMU mode is not a real IOMMU group */
		char name[64] = "";
		snprintf(p, sizeof(p), "%s/iommu_group/name", g.sysdev);
		if (read_file(p, name, sizeof(name)) == 0 && !strcmp(name, "vfio-noiommu")) {
			if (g.backend == BK_VFIO_TYPE1)
				g.backend = BK_VFIO_NOIOMMU;
			has_group = false;
		}
	}
	if (g.backend == BK_VFIO_TYPE1 || g.backend == BK_VFIO_NOIOMMU) {
		if (!has_group || g.backend == BK_VFIO_NOIOMMU) {
			if (!noiommu_param) {
				seterr("vfio backend impossible: %s has no IOMMU group (no IOMMU in this "
				       "guest) and this kernel's vfio has no enable_unsafe_noiommu_mode "
				       "(CONFIG_VFIO_NOIOMMU unset). Give the guest a vIOMMU "
				       "(intel-iommu + intel_iommu=on) or use --irq intx (uio backend)",
				       g.bdf);
				return -1;
			}
			if (!has_group &&
			    write_file("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode", "1") < 0) {
				seterr("cannot enable vfio noiommu mode: %s", strerror(errno));
				return -1;
			}
			g.backend = BK_VFIO_NOIOMMU;
		}
	}
	if (g.backend == BK_UIO && g.irq == IRQ_MSI && !path_exists("/sys/bus/pci/drivers/edu_uio")) {
		try_modprobe("edu_uio");
		if (!path_exists("/sys/bus/pci/drivers/edu_uio")) {
			seterr("MSI without vfio needs the edu_uio module (uio_pci_generic can only "
			       "deliver INTx), and modprobe edu_uio failed; %s cannot use vfio here (no "
			       "IOMMU group; kernel without CONFIG_VFIO_NOIOMMU). Use --irq intx, or give "
			       "the guest a vIOMMU", g.bdf);
			return -1;
		}
	}
	if (g.backend == BK_UIO && has_group) {
		char t[64] = "";
		snprintf(p, sizeof(p), "%s/iommu_group/type", g.sysdev);
		if (read_file(p, t, sizeof(t)) == 0 && strcmp(t, "identity")) {
			seterr("uio backend DMAs to guest-physical addresses but %s sits in an IOMMU "
			       "domain of type '%s'; boot with iommu=pt or use the vfio backend", g.bdf, t);
			return -1;
		}
	}
	return 0;
}

/* ------------------------------------------------------------ vfio setup */

static int vfio_setup(void)
{
	char p[PATH_MAX], link[PATH_MAX], *grp;
	struct vfio_group_status gs = {.argsz = sizeof(gs)};
	struct vfio_region_info ri = {.argsz = sizeof(ri)};
	struct vfio_device_info di = {.argsz = sizeof(di)};
	int type = g.backend == BK_VFIO_NOIOMMU ? VFIO_NOIOMMU_IOMMU : VFIO_TYPE1v2_IOMMU;
	ssize_t n;

	if (bind_driver("vfio-pci") < 0)
		return -1;
	snprintf(p, sizeof(p), "%s/iommu_group", g.sysdev);
	n = readlink(p, link, sizeof(link) - 1);
	if (n < 0) {
		seterr("%s has no iommu_group after binding vfio-pci", g.bdf);
		return -1;
	}
	link[n] = 0;
	grp = strrchr(link, '/') ? strrchr(link, '/') + 1 : link;

	g.container_fd = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
	if (g.container_fd < 0) {
		seterr("open /dev/vfio/vfio: %s", strerror(errno));
		return -1;
	}
	if (ioctl(g.container_fd, VFIO_GET_API_VERSION) != VFIO_API_VERSION) {
		seterr("unexpected VFIO API version");
		return -1;
	}
	if (type == VFIO_TYPE1v2_IOMMU && !ioctl(g.container_fd, VFIO_CHECK_EXTENSION, type))
		try_modprobe("vfio_iommu_type1");
	if (type == VFIO_TYPE1v2_IOMMU && !ioctl(g.container_fd, VFIO_CHECK_EXTENSION, type))
		type = VFIO_TYPE1_IOMMU;
	if (!ioctl(g.container_fd, VFIO_CHECK_EXTENSION, type)) {
		seterr("VFIO container does not support IOMMU type %d%s", type,
		       type == VFIO_NOIOMMU_IOMMU ? "" : " (is vfio_iommu_type1 loaded?)");
		return -1;
	}
	if (g.backend == BK_VFIO_NOIOMMU)
		snprintf(p, sizeof(p), "/dev/vfio/noiommu-%.32s", grp);
	else
		snprintf(p, sizeof(p), "/dev/vfio/%.32s", grp);
	g.group_fd = open(p, O_RDWR | O_CLOEXEC);
	if (g.group_fd < 0) {
		seterr("open %s: %s", p, strerror(errno));
		return -1;
	}
	if (ioctl(g.group_fd, VFIO_GROUP_GET_STATUS, &gs) < 0 || !(gs.flags & VFIO_GROUP_FLAGS_VIABLE)) {
		seterr("VFIO group %s is not viable (bind every device of the group to vfio-pci)", grp);
		return -1;
	}
	if (ioctl(g.group_fd, VFIO_GROUP_SET_CONTAINER, &g.container_fd) < 0) {
		seterr("VFIO_GROUP_SET_CONTAINER: %s", strerror(errno));
		return -1;
	}
	if (ioctl(g.container_fd, VFIO_SET_IOMMU, type) < 0) {
		seterr("VFIO_SET_IOMMU(%d): %s%s", type, strerror(errno),
		       errno == EPERM ? " (no interrupt remapping: use intel-iommu,intremap=on or "
					"vfio_iommu_type1 allow_unsafe_interrupts=1)" : "");
		return -1;
	}
	g.device_fd = ioctl(g.group_fd, VFIO_GROUP_GET_DEVICE_FD, g.bdf);
	if (g.device_fd < 0) {
		seterr("VFIO_GROUP_GET_DEVICE_FD(%s): %s", g.bdf, strerror(errno));
		return -1;
	}
	if (ioctl(g.device_fd, VFIO_DEVICE_GET_INFO, &di) < 0 || !(di.flags & VFIO_DEVICE_FLAGS_PCI)) {
		seterr("VFIO_DEVICE_GET_INFO failed or not a PCI device");
		return -1;
	}
	ri.index = VFIO_PCI_CONFIG_REGION_INDEX;
	if (ioctl(g.device_fd, VFIO_DEVICE_GET_REGION_INFO, &ri) < 0) {
		seterr("config region info: %s", strerror(errno));
		return -1;
	}
	g.cfg_off = ri.offset;
	memset(&ri, 0, sizeof(ri));
	ri.argsz = sizeof(ri);
	ri.index = VFIO_PCI_BAR0_REGION_INDEX;
	if (ioctl(g.device_fd, VFIO_DEVICE_GET_REGION_INFO, &ri) < 0 || !(ri.flags & VFIO_REGION_INFO_FLAG_MMAP)) {
		seterr("BAR0 region not mmappable");
		return -1;
	}
	g.bar_size = ri.size;
	g.bar = mmap(NULL, ri.size, PROT_READ | PROT_WRITE, MAP_SHARED, g.device_fd, ri.offset);
	if (g.bar == MAP_FAILED) {
		seterr("mmap BAR0: %s", strerror(errno));
		g.bar = NULL;
		return -1;
	}
	return 0;
}

static int vfio_set_irq(unsigned index, int fd)
{
	char buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *s = (struct vfio_irq_set *)buf;

	memset(buf, 0, sizeof(buf));
	s->argsz = sizeof(buf);
	s->index = index;
	s->start = 0;
	if (fd >= 0) {
		int32_t f = fd;
		s->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
		s->count = 1;
		memcpy(s->data, &f, sizeof(f));
	} else {
		s->argsz = sizeof(*s);
		s->flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
		s->count = 0;
	}
	return ioctl(g.device_fd, VFIO_DEVICE_SET_IRQS, s);
}

static int vfio_unmask_intx(void)
{
	struct vfio_irq_set s = {
		.argsz = sizeof(s),
		.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
		.index = VFIO_PCI_INTX_IRQ_INDEX,
		.start = 0,
		.count = 1,
	};
	return ioctl(g.device_fd, VFIO_DEVICE_SET_IRQS, &s);
}

static int vfio_irq_setup(void)
{
	struct vfio_irq_info ii = {.argsz = sizeof(ii)};
	unsigned index = g.irq == IRQ_MSI ? VFIO_PCI_MSI_IRQ_INDEX : VFIO_PCI_INTX_IRQ_INDEX;

	ii.index = index;
	if (ioctl(g.device_fd, VFIO_DEVICE_GET_IRQ_INFO, &ii) < 0 || ii.count < 1) {
		seterr("device has no %s interrupt (VFIO_DEVICE_GET_IRQ_INFO)", g.irq == IRQ_MSI ? "MSI" : "INTx");
		return -1;
	}
	g.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (g.efd < 0) {
		seterr("eventfd: %s", strerror(errno));
		return -1;
	}
	if (vfio_set_irq(index, g.efd) < 0) {
		seterr("VFIO_DEVICE_SET_IRQS(%s): %s", g.irq == IRQ_MSI ? "MSI" : "INTx", strerror(errno));
		return -1;
	}
	/* Without a device-request handler, a hot-unplug of the device would
	 * block in vfio-pci's remove until we exit. */
	memset(&ii, 0, sizeof(ii));
	ii.argsz = sizeof(ii);
	ii.index = VFIO_PCI_REQ_IRQ_INDEX;
	if (ioctl(g.device_fd, VFIO_DEVICE_GET_IRQ_INFO, &ii) == 0 && ii.count >= 1) {
		g.req_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (g.req_fd >= 0 && vfio_set_irq(VFIO_PCI_REQ_IRQ_INDEX, g.req_fd) < 0) {
			logmsg("cannot register the VFIO device request eventfd: %s", strerror(errno));
			close(g.req_fd);
			g.req_fd = -1;
		}
	}
	return 0;
}

/* The kernel asks for the device back (hot-unplug): stop after this op. */
static void check_device_request(void)
{
	uint64_t c;

	if (g.req_fd >= 0 && read(g.req_fd, &c, sizeof(c)) == sizeof(c)) {
		logmsg("VFIO device request (device being removed): stopping");
		stop_reason = "vfio-device-request";
		stop_req = 1;
	}
}

/* ------------------------------------------------------------- uio setup */

static int uio_setup(void)
{
	char p[PATH_MAX];
	DIR *d;
	struct dirent *de;
	int uio = -1, fd;
	struct stat sb;

	if (bind_driver(g.irq == IRQ_MSI ? "edu_uio" : "uio_pci_generic") < 0)
		return -1;
	snprintf(p, sizeof(p), "%s/uio", g.sysdev);
	d = opendir(p);
	if (!d) {
		seterr("%s: %s", p, strerror(errno));
		return -1;
	}
	while ((de = readdir(d)))
		if (!strncmp(de->d_name, "uio", 3) && isdigit((unsigned char)de->d_name[3]))
			uio = atoi(de->d_name + 3);
	closedir(d);
	if (uio < 0) {
		seterr("no uio node under %s", p);
		return -1;
	}
	snprintf(g.uio_event, sizeof(g.uio_event), "/sys/class/uio/uio%d/event", uio);
	snprintf(p, sizeof(p), "/dev/uio%d", uio);
	g.uio_fd = open(p, O_RDWR | O_CLOEXEC | O_NONBLOCK);
	if (g.uio_fd < 0) {
		seterr("open %s: %s", p, strerror(errno));
		return -1;
	}
	snprintf(p, sizeof(p), "%s/config", g.sysdev);
	g.cfg_fd = open(p, O_RDWR | O_CLOEXEC);
	if (g.cfg_fd < 0) {
		seterr("open %s: %s", p, strerror(errno));
		return -1;
	}
	snprintf(p, sizeof(p), "%s/resource0", g.sysdev);
	fd = open(p, O_RDWR | O_SYNC | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &sb) < 0) {
		seterr("open %s: %s", p, strerror(errno));
		return -1;
	}
	g.bar_size = sb.st_size;
	g.bar = mmap(NULL, g.bar_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (g.bar == MAP_FAILED) {
		seterr("mmap %s: %s", p, strerror(errno));
		g.bar = NULL;
		return -1;
	}
	return 0;
}

/* --------------------------------------------------------- interrupt side */

/* Set (mask=true) or clear the Command register's INTx Disable bit. */
static void intx_disable_bit(bool set)
{
	uint16_t cmd = cfg_r16(PCI_COMMAND);
	uint16_t n = set ? (cmd | PCI_COMMAND_INTX_DISABLE) : (cmd & ~PCI_COMMAND_INTX_DISABLE);

	if (n != cmd)
		cfg_write(PCI_COMMAND, &n, 2);
}

static void irq_unmask(void)
{
	if (g.backend == BK_UIO) {
		if (g.naive_unmask) {
			/* The naive loop of docs/design.md §9: uio_pci_generic has no irqcontrol,
			 * so this write fails (ENOSYS) and INTx stays disabled. */
			int32_t one = 1;
			static bool logged;
			if (write(g.uio_fd, &one, sizeof(one)) != sizeof(one) && !logged) {
				logmsg("naive unmask: write(/dev/uio, 1) failed: %s -- INTx stays masked", strerror(errno));
				logged = true;
			}
			return;
		}
		if (g.irq == IRQ_INTX)
			intx_disable_bit(false);
	} else if (g.irq == IRQ_INTX) {
		vfio_unmask_intx();
	}
}

/* Consume pending notifications. Returns how many interrupts they represent. */
static uint64_t irq_consume(void)
{
	if (g.backend == BK_UIO) {
		uint32_t c;
		ssize_t n = read(g.uio_fd, &c, sizeof(c));
		if (n != sizeof(c))
			return 0;
		uint32_t d = c - g.uio_count;
		g.uio_count = c;
		return d;
	} else {
		uint64_t c;
		if (read(g.efd, &c, sizeof(c)) != sizeof(c))
			return 0;
		return c;
	}
}

static int irq_fd(void)
{
	return g.backend == BK_UIO ? g.uio_fd : g.efd;
}

static uint16_t msi_ctrl(void)
{
	return g.msi_cap >= 0 ? phys_r16(g.msi_cap + PCI_MSI_FLAGS) : 0;
}

/* Anything that arrives while nothing is outstanding is spurious. */
static void drain_spurious(void)
{
	struct pollfd pfd = {.fd = irq_fd(), .events = POLLIN};
	uint32_t status;

	while (poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN)) {
		uint64_t n = irq_consume();
		if (!n)
			break;
		g.st.irq_spurious += n;
		status = rd32(EDU_IRQ_STATUS);
		logmsg("SPURIOUS: %" PRIu64 " interrupt(s) while none outstanding (irq status 0x%x)", n, status);
		if (status)
			wr32(EDU_IRQ_ACK, status);
		irq_unmask();
	}
	status = rd32(EDU_IRQ_STATUS);
	if (status) {
		g.st.irq_status_anomalies++;
		logmsg("ANOMALY: irq status 0x%x pending with nothing outstanding; acking", status);
		wr32(EDU_IRQ_ACK, status);
		irq_unmask();
	}
}

/* ------------------------------------------- suspend/resume and the Command register */

static double boot_offset_s(void)
{
	struct timespec b, m;

	clock_gettime(CLOCK_BOOTTIME, &b);
	clock_gettime(CLOCK_MONOTONIC, &m);
	return (b.tv_sec - m.tv_sec) + (b.tv_nsec - m.tv_nsec) / 1e9;
}

static bool read_u64(const char *path, uint64_t *v)
{
	char buf[64];
	char *end;

	if (read_file(path, buf, sizeof(buf)) < 0)
		return false;
	*v = strtoull(buf, &end, 10);
	return end != buf;
}

static bool read_susp_stats(uint64_t *ok, uint64_t *fail)
{
	return read_u64("/sys/power/suspend_stats/success", ok) &&
	       read_u64("/sys/power/suspend_stats/fail", fail);
}

static void suspend_baseline(void)
{
	g.have_susp_stats = read_susp_stats(&g.susp_success, &g.susp_fail);
	g.boot_off = boot_offset_s();
	g.pm_epoch_checked = g.pm_epoch;
}

/* Sample the suspend evidence; returns how many new suspends it shows. A
 * suspend may show up as a clock jump first and as a counter bump later
 * (pm_suspend() bumps the counters after thawing user space): it is counted
 * once. */
static uint64_t suspend_sample(void)
{
	uint64_t ok = 0, fail = 0, d = 0, n = 0;
	double off = boot_offset_s(), jump = off - g.boot_off;
	bool jumped = jump > SUSPEND_JUMP_S;

	if (g.have_susp_stats && read_susp_stats(&ok, &fail)) {
		d = (ok - g.susp_success) + (fail - g.susp_fail);
		g.susp_success = ok;
		g.susp_fail = fail;
	}
	g.boot_off = off;
	if (d) {
		uint64_t credited = 0;
		if (!jumped) {
			credited = d < g.jump_unmatched ? d : g.jump_unmatched;
			g.jump_unmatched -= credited;
		}
		n = d - credited;
	} else if (jumped) {
		n = 1;
		g.jump_unmatched++;
	}
	if (d || jumped) {
		g.pm_epoch++;
		logmsg("SUSPEND: suspend_stats success %" PRIu64 " fail %" PRIu64 " (+%" PRIu64 "), "
		       "boottime-monotonic jump %.3f s; %" PRIu64 " new suspend(s) at transfer %" PRIu64,
		       ok, fail, d, jump, n, g.st.transfers_started);
	}
	g.st.suspends_seen += n;
	return n;
}

static bool irq_pending(void)
{
	struct pollfd pfd = {.fd = irq_fd(), .events = POLLIN};

	return poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN);
}

static void pci_event(const char *kind, const char *when, uint16_t cmd, uint16_t after)
{
	struct pci_event *e;
	struct timespec rt;

	if (g.st.npci_ev >= MAX_PCI_EVENTS)
		return;
	e = &g.st.pci_ev[g.st.npci_ev++];
	clock_gettime(CLOCK_REALTIME, &rt);
	e->kind = kind;
	e->when = when;
	e->transfer = g.st.transfers_started;
	e->cmd = cmd;
	e->cmd_after = after;
	e->t_s = now_mono() - g.t_start;
	e->realtime = rt.tv_sec + rt.tv_nsec / 1e9;
}

/* Check the real Command register before an operation (see the header). */
static void check_command(const char *when)
{
	uint16_t cmd = phys_r16(PCI_COMMAND), n, after;
	bool pm;

	if (cmd == 0xffff) /* config read failed / device gone: nothing to judge */
		return;
	suspend_sample();

	/* INTx Disable while the INTx loop expects it clear and nothing is
	 * pending: report, never repair (the lost interrupt must be counted). */
	if (g.irq == IRQ_INTX && !g.naive_unmask) {
		if ((cmd & PCI_COMMAND_INTX_DISABLE) && !irq_pending()) {
			if (!g.intx_masked_reported) {
				g.st.intx_masked_seen++;
				g.intx_masked_reported = true;
				logmsg("INTX MASKED: Command 0x%04x has INTx Disable set with no interrupt being "
				       "handled (%s, transfer %" PRIu64 "); the next interrupt will be lost",
				       cmd, when, g.st.transfers_started);
			}
		} else {
			g.intx_masked_reported = false;
		}
	}

	if ((cmd & (PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY)) == (PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY)) {
		g.pm_epoch_checked = g.pm_epoch;
		return;
	}
	pm = g.pm_epoch != g.pm_epoch_checked;
	if (!pm) {
		/* pm_suspend() bumps suspend_stats only after thawing us */
		double until = now_mono() + SUSPEND_GRACE_S;
		struct timespec ts = {0, 50000000};
		while (!pm && now_mono() < until) {
			nanosleep(&ts, NULL);
			suspend_sample();
			pm = g.pm_epoch != g.pm_epoch_checked;
		}
	}
	g.pm_epoch_checked = g.pm_epoch;

	n = cfg_r16(PCI_COMMAND) | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY;
	if (cfg_write(PCI_COMMAND, &n, 2) < 0)
		logmsg("cannot re-enable bus mastering: %s", strerror(errno));
	after = phys_r16(PCI_COMMAND);
	if (pm) {
		g.st.pm_resume_reinits++;
		pci_event("pm-resume", when, cmd, after);
		logmsg("PM-RESUME: Command 0x%04x after a system suspend (%s, transfer %" PRIu64 "); "
		       "re-enabled bus master/memory like a driver's resume: now 0x%04x",
		       cmd, when, g.st.transfers_started, after);
	} else {
		g.st.bme_lost++;
		pci_event("bme-lost", when, cmd, after);
		logmsg("BME LOST: Command 0x%04x (%s%s) with no system suspend (%s, transfer %" PRIu64
		       ", t=%.3f s); re-enabled: now 0x%04x",
		       cmd, cmd & PCI_COMMAND_MASTER ? "" : "bus master off ",
		       cmd & PCI_COMMAND_MEMORY ? "" : "memory off", when, g.st.transfers_started,
		       now_mono() - g.t_start, after);
	}
	if ((after & (PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY)) != (PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY))
		logmsg("ERROR: Command still 0x%04x after re-enabling", after);
}

enum irqkind { K_DMA, K_RAISE };

/* Wait for the interrupt that sets `expect` in the irq status register.
 * Returns 0 if received within the deadline, -1 if lost. */
static int wait_irq(uint32_t expect, enum irqkind kind)
{
	double deadline = now_mono() + g.irq_timeout_ms / 1000.0;
	struct pollfd pfd = {.fd = irq_fd(), .events = POLLIN};
	uint32_t status;
	uint64_t epoch = g.pm_epoch;
	bool extended = false, kicked = false;

	g.st.irq_expected++;
	if (kind == K_DMA)
		g.st.dma_done_expected++;
	else
		g.st.raised_expected++;

	for (;;) {
		double rem = deadline - now_mono();
		int r;
		uint64_t n;

		if (rem <= 0) {
			/* CLOCK_MONOTONIC excludes the suspend itself, but the device
			 * and the interrupt path are re-initialized around it: one
			 * fresh timeout after a suspend that hit this wait. */
			suspend_sample();
			if (!extended && g.pm_epoch != epoch) {
				extended = true;
				deadline = now_mono() + g.irq_timeout_ms / 1000.0;
				logmsg("irq wait (0x%x) spanned a system suspend: one more %u ms", expect,
				       g.irq_timeout_ms);
				continue;
			}
			if (extended && !kicked && g.irq == IRQ_INTX && !g.naive_unmask) {
				/* edu raised it (irq status), INTx is not disabled, yet
				 * it never arrived: the wake-up's device reset dropped
				 * the asserted level (PCI Interrupt Status clear), or
				 * the level rose while the platform's interrupt routing
				 * was reset and not yet restored (status set). Like a
				 * resume path, re-present the pending interrupt once:
				 * re-raise it with INTx disabled, then enable INTx, so
				 * the level rises again. A disabled INTx (irq-drop) is
				 * never touched here. */
				uint16_t pst = phys_r16(PCI_STATUS), pcmd = phys_r16(PCI_COMMAND);
				status = rd32(EDU_IRQ_STATUS);
				if ((status & expect) == expect && pst != 0xffff && !(pcmd & PCI_COMMAND_INTX_DISABLE)) {
					kicked = true;
					g.st.irq_resume_kicks++;
					logmsg("IRQ KICK: %s interrupt 0x%x raised around the suspend was never "
					       "delivered after resume (irq status 0x%x, pci status 0x%04x, cmd "
					       "0x%04x, INTx %s): re-presenting it once",
					       kind == K_DMA ? "DMA-done" : "raised", expect, status, pst, pcmd,
					       pst & PCI_STATUS_INTERRUPT ? "asserted" : "deasserted by the reset");
					intx_disable_bit(true);
					wr32(EDU_IRQ_RAISE, expect);
					intx_disable_bit(false);
					deadline = now_mono() + g.irq_timeout_ms / 1000.0;
					continue;
				}
			}
			break;
		}
		r = poll(&pfd, 1, (int)(rem * 1000) + 1);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			logmsg("poll: %s", strerror(errno));
			break;
		}
		if (r == 0)
			continue; /* re-check the deadline */
		n = irq_consume();
		if (!n)
			continue;
		status = rd32(EDU_IRQ_STATUS);
		if ((status & expect) == expect) {
			g.st.irq_received++;
			if (kind == K_DMA)
				g.st.dma_done_irqs++;
			else
				g.st.raised_irqs++;
			if (n > 1) {
				/* A level interrupt that fired while device interrupts
				 * were suspended is re-sent by the PM core on resume
				 * (IRQS_PENDING): with the line still asserted, uio
				 * counts it twice. Only across a suspend. */
				suspend_sample();
				if (g.pm_epoch != epoch) {
					g.st.irq_pm_replays += n - 1;
					logmsg("PM REPLAY: %" PRIu64 " notifications for one expected interrupt "
					       "0x%x across a system suspend (re-sent on resume)", n, expect);
				} else {
					g.st.irq_spurious += n - 1;
					logmsg("SPURIOUS: %" PRIu64 " notifications for one expected interrupt 0x%x",
					       n, expect);
				}
			}
			if (status & ~expect) {
				g.st.irq_status_anomalies++;
				logmsg("ANOMALY: irq status 0x%x, expected only 0x%x", status, expect);
			}
			/* Ack first so the device drops INTx, then re-enable INTx. */
			wr32(EDU_IRQ_ACK, status);
			irq_unmask();
			return 0;
		}
		g.st.irq_spurious += n;
		logmsg("SPURIOUS: interrupt with irq status 0x%x while waiting for 0x%x", status, expect);
		if (status)
			wr32(EDU_IRQ_ACK, status);
		irq_unmask();
	}
	status = rd32(EDU_IRQ_STATUS);
	g.st.irq_lost++;
	logmsg("LOST: no %s interrupt (0x%x) within %u ms; irq status 0x%x, cmd 0x%04x, msi ctrl 0x%04x, pci status 0x%04x",
	       kind == K_DMA ? "DMA-done" : "raised", expect, g.irq_timeout_ms, status,
	       phys_r16(PCI_COMMAND), msi_ctrl(), phys_r16(PCI_STATUS));
	if (status)
		wr32(EDU_IRQ_ACK, status);
	irq_unmask();
	return -1;
}

/* ---------------------------------------------------------------- DMA side */

static int wait_dma_idle(double timeout_s)
{
	double deadline = now_mono() + timeout_s;
	struct timespec ts = {0, 1000000};

	while (rd32(EDU_DMA_CMD) & EDU_DMA_RUN) {
		if (now_mono() > deadline)
			return -1;
		nanosleep(&ts, NULL);
	}
	return 0;
}

/* 0 = done + irq, 1 = done but irq lost, -1 = DMA did not complete. */
static int dma_op(uint64_t src, uint64_t dst, uint32_t cnt, uint32_t dir)
{
	int rc;

	if (wait_dma_idle(g.irq_timeout_ms / 1000.0) < 0) {
		g.st.dma_timeouts++;
		logmsg("DMA engine still busy before a new transfer (cmd 0x%x)", rd32(EDU_DMA_CMD));
		return -1;
	}
	drain_spurious();
	wr32(EDU_DMA_SRC, (uint32_t)src);
	wr32(EDU_DMA_DST, (uint32_t)dst);
	wr32(EDU_DMA_CNT, cnt);
	wr32(EDU_DMA_CMD, EDU_DMA_RUN | EDU_DMA_IRQ | dir);
	rc = wait_irq(EDU_DMA_IRQ_VALUE, K_DMA) < 0 ? 1 : 0;
	if (wait_dma_idle(g.irq_timeout_ms / 1000.0) < 0) {
		g.st.dma_timeouts++;
		logmsg("DMA did not complete within %u ms (cmd 0x%x)", g.irq_timeout_ms, rd32(EDU_DMA_CMD));
		return -1;
	}
	__sync_synchronize();
	return rc;
}

static long first_diff(const uint8_t *buf, uint64_t seed, uint64_t transfer, size_t len)
{
	uint8_t *exp = malloc(len);
	long off = -1;

	fill_pattern(exp, len, seed, transfer);
	for (size_t i = 0; i < len; i++)
		if (exp[i] != buf[i]) {
			off = (long)i;
			break;
		}
	free(exp);
	return off;
}

static void record_mismatch(unsigned s, uint64_t expected, uint64_t actual, const char *when)
{
	struct mismatch *m;
	long off = first_diff(g.slot_pb[s].va, g.seed, g.slot[s].transfer, g.size);

	g.st.dma_mismatches++;
	logmsg("MISMATCH (%s): transfer %" PRIu64 " slot %u gpa 0x%" PRIx64 " expected 0x%016" PRIx64
	       " actual 0x%016" PRIx64 " first bad byte offset %ld",
	       when, g.slot[s].transfer, s, g.slot_pb[s].gpa, expected, actual, off);
	if (g.st.nfirst >= MAX_FIRST_MISMATCH)
		return;
	m = &g.st.first[g.st.nfirst++];
	m->transfer = g.slot[s].transfer;
	m->slot = s;
	m->gpa = g.slot_pb[s].gpa;
	m->expected = expected;
	m->actual = actual;
	m->offset = off;
	m->when = when;
}

/* Re-verify a slot that holds completed data. Clears `valid` on mismatch so
 * one corruption is counted once. */
static bool check_slot(unsigned s, const char *when)
{
	uint64_t h = hash64(g.slot_pb[s].va, g.size);

	if (h == g.slot[s].hash)
		return true;
	if (!strcmp(when, "retire"))
		g.st.retire_mismatches++;
	else if (!strcmp(when, "final"))
		g.st.final_mismatches++;
	else
		g.st.landing_mismatches++;
	record_mismatch(s, g.slot[s].hash, h, when);
	g.slot[s].valid = false;
	return false;
}

static void do_transfer(void)
{
	uint64_t t = g.st.transfers_started++;
	unsigned s = (unsigned)(t % g.slots);
	uint64_t h;
	int rc;

	if (g.slot[s].valid) {
		g.st.retire_checks++;
		check_slot(s, "retire");
	}
	g.slot[s].valid = false;
	fill_pattern(g.src.va, g.size, g.seed, t);
	h = hash64(g.src.va, g.size);
	for (int attempt = 0;; attempt++) {
		uint64_t reinits;

		check_command("before transfer");
		reinits = g.st.pm_resume_reinits;
		memset(g.slot_pb[s].va, 0xa5, g.size); /* poison: a DMA that never lands is caught */
		__sync_synchronize();

		rc = dma_op(g.src.dma, EDU_DEV_BUF, g.size, 0);
		if (rc < 0) {
			g.st.transfers_failed++;
			return;
		}
		check_command("between DMAs");
		rc = dma_op(EDU_DEV_BUF, g.slot_pb[s].dma, g.size, EDU_DMA_TO_RAM);
		if (rc < 0) {
			g.st.transfers_failed++;
			return;
		}
		check_command("after transfer");
		/* Only a transfer that a PM-path BME loss overlapped is redone;
		 * anything else is judged below. */
		if (g.st.pm_resume_reinits != reinits && attempt < 3 && hash64(g.slot_pb[s].va, g.size) != h) {
			g.st.pm_retried_transfers++;
			logmsg("transfer %" PRIu64 " overlapped a system suspend (bus mastering was off) and did "
			       "not land: redoing it", t);
			continue;
		}
		break;
	}
	g.slot[s].transfer = t;
	g.slot[s].hash = h;
	g.slot[s].valid = true;
	g.st.transfers++;
	check_slot(s, "landing");
}

static void do_raise(void)
{
	static uint32_t n;
	/* bits 12..28 only: never the DMA (0x100) or factorial (0x1) bits */
	uint32_t v = 0x10000000u | ((++n & 0xffffu) << 12);

	check_command("before raise");
	drain_spurious();
	wr32(EDU_IRQ_RAISE, v);
	wait_irq(v, K_RAISE);
}

/* --------------------------------------------------------------- buffers */

static int alloc_buffers(void)
{
	uint64_t limit = g.dma_bits >= 64 ? UINT64_MAX : (1ull << g.dma_bits);
	unsigned need = g.slots + 1, got = 0;

	g.pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (g.pagemap_fd < 0) {
		seterr("open /proc/self/pagemap: %s", strerror(errno));
		return -1;
	}
	g.slot_pb = calloc(g.slots, sizeof(*g.slot_pb));
	g.slot = calloc(g.slots, sizeof(*g.slot));
	if (!g.slot_pb || !g.slot) {
		seterr("out of memory");
		return -1;
	}

	if (g.backend == BK_VFIO_TYPE1) {
		struct vfio_iommu_type1_dma_map map = {.argsz = sizeof(map)};

		g.big_len = (size_t)need * PAGE;
		if (IOVA_BASE + g.big_len > limit) {
			seterr("%u slots do not fit below the %u-bit DMA mask", g.slots, g.dma_bits);
			return -1;
		}
		g.big_map = mmap(NULL, g.big_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (g.big_map == MAP_FAILED) {
			seterr("mmap %zu bytes: %s", g.big_len, strerror(errno));
			return -1;
		}
		madvise(g.big_map, g.big_len, MADV_NOHUGEPAGE);
		if (mlock(g.big_map, g.big_len) < 0) {
			seterr("mlock: %s", strerror(errno));
			return -1;
		}
		map.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
		map.vaddr = (uintptr_t)g.big_map;
		map.iova = IOVA_BASE;
		map.size = g.big_len;
		if (ioctl(g.container_fd, VFIO_IOMMU_MAP_DMA, &map) < 0) {
			seterr("VFIO_IOMMU_MAP_DMA: %s", strerror(errno));
			return -1;
		}
		for (unsigned i = 0; i < need; i++) {
			struct page_buf *pb = i == 0 ? &g.src : &g.slot_pb[i - 1];
			pb->va = g.big_map + (size_t)i * PAGE;
			pb->dma = IOVA_BASE + (uint64_t)i * PAGE;
			if (virt_to_phys(pb->va, &pb->gpa) < 0) {
				seterr("cannot read guest-physical address from /proc/self/pagemap (root?)");
				return -1;
			}
		}
		return 0;
	}

	/* uio / noiommu: the device sees guest-physical addresses; every page
	 * must lie below the DMA mask. Allocate chunks, keep the low pages,
	 * hold the high ones until done so they are not handed back to us. */
	{
		const size_t chunk_pages = 1024;
		uint8_t **rejects = NULL;
		size_t nrej = 0, caprej = 0, tried = 0;
		long phys_pages = sysconf(_SC_PHYS_PAGES);
		size_t max_try = phys_pages > 0 ? (size_t)phys_pages : (size_t)1 << 20;

		/* Stable PFNs: do not let compaction migrate mlocked pages. */
		write_file("/proc/sys/vm/compact_unevictable_allowed", "0");
		while (got < need) {
			uint8_t *m;
			if (tried >= max_try) {
				seterr("could not find %u pages below %u-bit DMA limit 0x%" PRIx64
				       " (found %u after trying %zu pages)", need, g.dma_bits, limit, got, tried);
				goto fail_rej;
			}
			m = mmap(NULL, chunk_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (m == MAP_FAILED) {
				seterr("mmap: %s", strerror(errno));
				goto fail_rej;
			}
			madvise(m, chunk_pages * PAGE, MADV_NOHUGEPAGE);
			if (mlock(m, chunk_pages * PAGE) < 0) {
				seterr("mlock: %s (ulimit -l?)", strerror(errno));
				goto fail_rej;
			}
			tried += chunk_pages;
			for (size_t i = 0; i < chunk_pages; i++) {
				uint8_t *va = m + i * PAGE;
				uint64_t pa;
				if (virt_to_phys(va, &pa) < 0) {
					seterr("cannot read guest-physical address from /proc/self/pagemap (root?)");
					goto fail_rej;
				}
				if (got < need && pa + PAGE <= limit) {
					struct page_buf *pb = got == 0 ? &g.src : &g.slot_pb[got - 1];
					pb->va = va;
					pb->gpa = pa;
					pb->dma = pa;
					got++;
				} else {
					if (nrej == caprej) {
						caprej = caprej ? caprej * 2 : 1024;
						rejects = realloc(rejects, caprej * sizeof(*rejects));
					}
					rejects[nrej++] = va;
				}
			}
		}
		for (size_t i = 0; i < nrej; i++)
			munmap(rejects[i], PAGE);
		free(rejects);
		return 0;
fail_rej:
		free(rejects);
		return -1;
	}
}

/* ------------------------------------------------------------ JSON output */

static void json_counters(struct sbuf *sb)
{
	double el = now_mono() - g.t_start;

	sb_printf(sb,
		  "\"bdf\":\"%s\",\"backend\":\"%s\",\"irq\":\"%s\",\"size\":%u,\"slots\":%u,"
		  "\"transfers\":%" PRIu64 ",\"transfers_started\":%" PRIu64 ",\"transfers_failed\":%" PRIu64 ","
		  "\"dma_mismatches\":%" PRIu64 ",\"landing_mismatches\":%" PRIu64 ",\"retire_mismatches\":%" PRIu64
		  ",\"final_mismatches\":%" PRIu64 ",\"retire_checks\":%" PRIu64 ",\"final_checked\":%" PRIu64 ","
		  "\"dma_timeouts\":%" PRIu64 ",\"irq_expected\":%" PRIu64 ",\"irq_received\":%" PRIu64
		  ",\"irq_lost\":%" PRIu64 ",\"irq_spurious\":%" PRIu64 ",\"irq_status_anomalies\":%" PRIu64 ","
		  "\"dma_done_expected\":%" PRIu64 ",\"dma_done_irqs\":%" PRIu64 ",\"raised_expected\":%" PRIu64
		  ",\"raised_irqs\":%" PRIu64 ",\"gpa_moved\":%" PRIu64 ",\"corruptions_injected\":%" PRIu64 ","
		  "\"pm_resume_reinits\":%" PRIu64 ",\"bme_lost\":%" PRIu64 ",\"suspends_seen\":%" PRIu64
		  ",\"intx_masked_seen\":%" PRIu64 ",\"pm_retried_transfers\":%" PRIu64
		  ",\"irq_resume_kicks\":%" PRIu64 ",\"irq_pm_replays\":%" PRIu64 ","
		  "\"irq_timeout_ms\":%u,\"elapsed_s\":%.3f,\"transfers_per_s\":%.3f,\"irqs_per_s\":%.3f",
		  g.bdf, backend_name(g.backend), g.irq == IRQ_MSI ? "msi" : "intx", g.size, g.slots,
		  g.st.transfers, g.st.transfers_started, g.st.transfers_failed,
		  g.st.dma_mismatches, g.st.landing_mismatches, g.st.retire_mismatches,
		  g.st.final_mismatches, g.st.retire_checks, g.st.final_checked,
		  g.st.dma_timeouts, g.st.irq_expected, g.st.irq_received, g.st.irq_lost, g.st.irq_spurious,
		  g.st.irq_status_anomalies, g.st.dma_done_expected, g.st.dma_done_irqs, g.st.raised_expected,
		  g.st.raised_irqs, g.st.gpa_moved, g.st.corruptions_injected, g.st.pm_resume_reinits,
		  g.st.bme_lost, g.st.suspends_seen, g.st.intx_masked_seen, g.st.pm_retried_transfers,
		  g.st.irq_resume_kicks, g.st.irq_pm_replays,
		  g.irq_timeout_ms, el,
		  el > 0 ? g.st.transfers / el : 0.0, el > 0 ? g.st.irq_received / el : 0.0);
	sb_printf(sb, ",\"first_mismatch\":[");
	for (int i = 0; i < g.st.nfirst; i++) {
		struct mismatch *m = &g.st.first[i];
		sb_printf(sb,
			  "%s{\"transfer\":%" PRIu64 ",\"slot\":%u,\"gpa\":\"0x%" PRIx64 "\",\"expected\":\"0x%016" PRIx64
			  "\",\"actual\":\"0x%016" PRIx64 "\",\"offset\":%ld,\"when\":\"%s\"}",
			  i ? "," : "", m->transfer, m->slot, m->gpa, m->expected, m->actual, m->offset, m->when);
	}
	sb_printf(sb, "]");
	sb_printf(sb, ",\"pci_events\":[");
	for (int i = 0; i < g.st.npci_ev; i++) {
		struct pci_event *e = &g.st.pci_ev[i];
		sb_printf(sb,
			  "%s{\"kind\":\"%s\",\"when\":\"%s\",\"transfer\":%" PRIu64 ",\"cmd\":\"0x%04x\","
			  "\"cmd_after\":\"0x%04x\",\"t_s\":%.3f,\"realtime\":%.3f}",
			  i ? "," : "", e->kind, e->when, e->transfer, e->cmd, e->cmd_after, e->t_s, e->realtime);
	}
	sb_printf(sb, "]");
}

static void write_status(bool force)
{
	struct sbuf sb = {0};
	char p[PATH_MAX];
	double t = now_mono();

	if (!force && t - g.last_status < 1.0)
		return;
	g.last_status = t;
	sb_printf(&sb, "{\"running\":true,\"pid\":%d,", getpid());
	json_counters(&sb);
	sb_printf(&sb, "}\n");
	dpath(p, sizeof(p), "edutest.status");
	write_atomic_len(p, sb.p, sb.len);
	free(sb.p);
}

static int write_ready(void)
{
	struct sbuf sb = {0};
	char p[PATH_MAX];
	int rc;

	sb_printf(&sb, "{\"bdf\":\"%s\",\"backend\":\"%s\",\"irq\":\"%s\",\"slots\":%u,\"size\":%u,"
		       "\"slot_stride\":%u,\"dma_bits\":%u,\"id\":\"0x%08x\",\"pid\":%d,\"seed\":\"0x%" PRIx64 "\","
		       "\"irq_timeout_ms\":%u,\"msi_cap\":\"0x%x\",\"src_gpa\":\"0x%" PRIx64 "\","
		       "\"slot_dma_base\":\"0x%" PRIx64 "\","
		       "\"slot_gpas\":[",
		  g.bdf, backend_name(g.backend), g.irq == IRQ_MSI ? "msi" : "intx", g.slots, g.size, PAGE,
		  g.dma_bits, g.dev_id, getpid(), g.seed, g.irq_timeout_ms, g.msi_cap < 0 ? 0 : g.msi_cap, g.src.gpa,
		  g.backend == BK_VFIO_TYPE1 ? g.slot_pb[0].dma : 0);
	for (unsigned i = 0; i < g.slots; i++)
		sb_printf(&sb, "%s\"0x%" PRIx64 "\"", i ? "," : "", g.slot_pb[i].gpa);
	sb_printf(&sb, "]}\n");
	dpath(p, sizeof(p), "edutest.ready");
	rc = write_atomic_len(p, sb.p, sb.len);
	free(sb.p);
	return rc;
}

static bool result_pass(void)
{
	/* a lost Bus Master Enable is a DMA failure even if no slot was hit */
	return g.st.dma_mismatches == 0 && g.st.bme_lost == 0 && g.st.irq_expected == g.st.irq_received;
}

static void write_result(void)
{
	struct sbuf sb = {0};
	char p[PATH_MAX];

	sb_printf(&sb, "{");
	json_counters(&sb);
	sb_printf(&sb, ",\"stopped_by\":");
	sb_json_str(&sb, stop_reason);
	sb_printf(&sb, ",\"pass\":%s}\n", result_pass() ? "true" : "false");
	dpath(p, sizeof(p), "edutest.result");
	if (write_atomic_len(p, sb.p, sb.len) < 0)
		logmsg("cannot write %s: %s", p, strerror(errno));
	logmsg("result: %s", sb.p);
	free(sb.p);
}

/* -------------------------------------------------------- corrupt selftest */

static void handle_corrupt(void)
{
	char p[PATH_MAX], buf[64], out[512];
	long want = -1;
	int s = -1;

	corrupt_req = 0;
	dpath(p, sizeof(p), "edutest.corrupt-req");
	if (read_file(p, buf, sizeof(buf)) == 0)
		want = strtol(buf, NULL, 0);
	unlink(p);
	if (want >= 0 && want < (long)g.slots && g.slot[want].valid) {
		s = (int)want;
	} else if (want < 0 && g.st.transfers_started) {
		/* the most recently completed slot */
		for (uint64_t k = 0; k < g.slots && k < g.st.transfers_started; k++) {
			unsigned c = (unsigned)((g.st.transfers_started - 1 - k) % g.slots);
			if (g.slot[c].valid) {
				s = (int)c;
				break;
			}
		}
	}
	if (s < 0) {
		snprintf(out, sizeof(out), "{\"error\":\"slot %ld holds no completed data\"}\n", want);
	} else {
		size_t off = g.size / 2;
		g.slot_pb[s].va[off] ^= 0xff;
		g.st.corruptions_injected++;
		logmsg("SELFTEST: flipped byte %zu of slot %d (transfer %" PRIu64 ", gpa 0x%" PRIx64 ")", off, s,
		       g.slot[s].transfer, g.slot_pb[s].gpa);
		snprintf(out, sizeof(out),
			 "{\"slot\":%d,\"transfer\":%" PRIu64 ",\"gpa\":\"0x%" PRIx64 "\",\"offset\":%zu}\n", s,
			 g.slot[s].transfer, g.slot_pb[s].gpa, off);
	}
	dpath(p, sizeof(p), "edutest.corrupt-done");
	write_atomic_len(p, out, strlen(out));
}

/* ------------------------------------------------------------- lifecycle */

static int device_setup(void)
{
	uint16_t cmd;
	uint32_t l;
	char p[PATH_MAX], v[32];

	snprintf(g.sysdev, sizeof(g.sysdev), "/sys/bus/pci/devices/%s", g.bdf);
	if (!path_exists(g.sysdev)) {
		seterr("no PCI device %s", g.bdf);
		return -1;
	}
	snprintf(p, sizeof(p), "%s/vendor", g.sysdev);
	if (read_file(p, v, sizeof(v)) < 0 || strtoul(v, NULL, 0) != EDU_VENDOR) {
		seterr("%s is not an edu device (vendor %s)", g.bdf, v);
		return -1;
	}
	snprintf(p, sizeof(p), "%s/device", g.sysdev);
	if (read_file(p, v, sizeof(v)) < 0 || strtoul(v, NULL, 0) != EDU_DEVICE) {
		seterr("%s is not an edu device (device %s)", g.bdf, v);
		return -1;
	}
	snprintf(p, sizeof(p), "%s/config", g.sysdev);
	g.phys_cfg_fd = open(p, O_RDONLY | O_CLOEXEC);
	if (choose_backend() < 0)
		return -1;
	if (g.backend == BK_UIO ? uio_setup() < 0 : vfio_setup() < 0)
		return -1;

	cmd = cfg_r16(PCI_COMMAND);
	cmd |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
	if (cfg_write(PCI_COMMAND, &cmd, 2) < 0) {
		seterr("cannot enable bus mastering: %s", strerror(errno));
		return -1;
	}
	g.msi_cap = find_cap(PCI_CAP_ID_MSI);
	g.dev_id = rd32(EDU_ID);
	if ((g.dev_id & 0xff) != 0xed) {
		seterr("edu id register reads 0x%08x (expected 0x......ed)", g.dev_id);
		return -1;
	}
	wr32(EDU_LIVENESS, 0x12345678);
	l = rd32(EDU_LIVENESS);
	if (l != ~0x12345678u) {
		seterr("edu liveness check failed: wrote 0x12345678, read 0x%08x", l);
		return -1;
	}
	if (wait_dma_idle(2.0) < 0) {
		seterr("edu DMA engine busy at start (cmd 0x%x)", rd32(EDU_DMA_CMD));
		return -1;
	}
	/* clean slate: no pending irq status, no factorial irq */
	wr32(EDU_STATUS, 0);
	l = rd32(EDU_IRQ_STATUS);
	if (l)
		wr32(EDU_IRQ_ACK, l);

	if (alloc_buffers() < 0)
		return -1;
	if (g.backend == BK_UIO) {
		char ev[32];
		/* read(/dev/uioN) returns the event count accumulated since the
		 * driver was bound, not since open: take the baseline from sysfs
		 * while the device is quiet, then re-enable INTx (a previous user
		 * may have left it disabled; with MSI the PCI core keeps it off). */
		if (read_file(g.uio_event, ev, sizeof(ev)) < 0) {
			seterr("cannot read %s: %s", g.uio_event, strerror(errno));
			return -1;
		}
		g.uio_count = (uint32_t)strtoul(ev, NULL, 0);
		if (g.irq == IRQ_INTX)
			intx_disable_bit(false);
	} else if (vfio_irq_setup() < 0) {
		return -1;
	}
	if (g.irq == IRQ_MSI && !(msi_ctrl() & PCI_MSI_FLAGS_ENABLE)) {
		seterr("MSI was set up but the MSI Enable bit reads 0 (msi ctrl 0x%04x)", msi_ctrl());
		return -1;
	}
	/* swallow anything that fired during setup */
	{
		struct pollfd pfd = {.fd = irq_fd(), .events = POLLIN};
		if (poll(&pfd, 1, 50) == 1)
			irq_consume();
		if (g.backend == BK_VFIO_TYPE1 || g.backend == BK_VFIO_NOIOMMU)
			irq_unmask();
	}
	return 0;
}

static void device_teardown(void)
{
	if (g.backend != BK_UIO && g.device_fd >= 0) {
		vfio_set_irq(g.irq == IRQ_MSI ? VFIO_PCI_MSI_IRQ_INDEX : VFIO_PCI_INTX_IRQ_INDEX, -1);
		if (g.req_fd >= 0)
			vfio_set_irq(VFIO_PCI_REQ_IRQ_INDEX, -1);
		if (g.big_map) {
			struct vfio_iommu_type1_dma_unmap um = {.argsz = sizeof(um), .iova = IOVA_BASE,
								.size = g.big_len};
			ioctl(g.container_fd, VFIO_IOMMU_UNMAP_DMA, &um);
		}
	}
	if (g.bar) {
		uint16_t cmd = cfg_r16(PCI_COMMAND) & ~PCI_COMMAND_MASTER;
		cfg_write(PCI_COMMAND, &cmd, 2);
	}
}

static void final_verify(void)
{
	for (unsigned s = 0; s < g.slots; s++) {
		if (!g.slot[s].valid)
			continue;
		g.st.final_checked++;
		check_slot(s, "final");
	}
	/* In the GPA-addressed backends a migrated page would silently stop
	 * receiving DMA: make it visible. */
	for (unsigned i = 0; i <= g.slots; i++) {
		struct page_buf *pb = i == 0 ? &g.src : &g.slot_pb[i - 1];
		uint64_t pa = 0;
		if (virt_to_phys(pb->va, &pa) == 0 && pa != pb->gpa) {
			g.st.gpa_moved++;
			logmsg("GPA MOVED: buffer %u was at 0x%" PRIx64 ", now 0x%" PRIx64, i, pb->gpa, pa);
		}
	}
}

static int run_daemon(int notify_fd)
{
	char p[PATH_MAX], pid[32];
	struct sigaction sa;
	int rc;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	dpath(p, sizeof(p), "edutest.pid");
	snprintf(pid, sizeof(pid), "%d\n", getpid());
	write_atomic_len(p, pid, strlen(pid));

	logmsg("starting: bdf %s irq %s slots %u size %u timeout %u ms", g.bdf,
	       g.irq == IRQ_MSI ? "msi" : "intx", g.slots, g.size, g.irq_timeout_ms);
	rc = device_setup();
	if (rc < 0) {
		logmsg("setup failed: %s", errbuf);
		if (notify_fd >= 0) {
			if (write(notify_fd, errbuf, strlen(errbuf)) < 0) {
				/* parent gone; nothing else to do */
			}
			close(notify_fd);
		}
		dpath(p, sizeof(p), "edutest.pid");
		unlink(p);
		return 2;
	}
	g.t_start = now_mono();
	suspend_baseline();
	if (write_ready() < 0) {
		seterr("cannot write edutest.ready in %s: %s", g.dir, strerror(errno));
		logmsg("%s", errbuf);
		if (notify_fd >= 0 && write(notify_fd, errbuf, strlen(errbuf)) < 0) {
			/* ignore */
		}
		return 2;
	}
	logmsg("ready: backend %s id 0x%08x msi cap 0x%x src gpa 0x%" PRIx64 " slot0 gpa 0x%" PRIx64
	       " dma 0x%" PRIx64, backend_name(g.backend), g.dev_id, g.msi_cap, g.src.gpa,
	       g.slot_pb[0].gpa, g.slot_pb[0].dma);
	if (notify_fd >= 0) {
		if (write(notify_fd, "OK", 2) < 0) {
			/* parent gone */
		}
		close(notify_fd);
	}
	write_status(true);

	while (!stop_req) {
		if (corrupt_req)
			handle_corrupt();
		do_transfer();
		check_device_request();
		if (stop_req)
			break;
		if (corrupt_req)
			handle_corrupt();
		do_raise();
		check_device_request();
		write_status(false);
	}
	logmsg("stop requested (%s): final verification of %u slots", stop_reason, g.slots);
	drain_spurious();
	final_verify();
	device_teardown();
	write_result();
	dpath(p, sizeof(p), "edutest.pid");
	unlink(p);
	dpath(p, sizeof(p), "edutest.status");
	unlink(p);
	return 0;
}

/* ------------------------------------------------------------------- CLI */

static void usage(FILE *f)
{
	fprintf(f,
		"usage:\n"
		"  edutest start --bdf BDF --dir D [--irq msi|intx] [--slots N] [--size BYTES]\n"
		"                [--backend auto|vfio|uio] [--irq-timeout-ms MS] [--dma-bits N]\n"
		"                [--seed N] [--foreground]\n"
		"  edutest verify --dir D [--timeout SECONDS] [--strict]\n"
		"  edutest status --dir D\n"
		"  edutest busy --dir D [--timeout SECONDS]   (return once a DMA is in flight)\n");
}

/* A usage error: say what is wrong, show the usage, and return exit code 2. */
static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	prog_vwarn(fmt, ap);
	va_end(ap);
	usage(stderr);
	return 2;
}

static bool parse_u(const char *s, unsigned long long *out)
{
	char *end;
	errno = 0;
	*out = strtoull(s, &end, 0);
	return s[0] && !*end && !errno && s[0] != '-';
}

/* Is pid a live (not zombie) edutest? Guards against a reused pid. */
static bool alive(pid_t pid)
{
	char p[64], buf[512], self[64] = "", *c;

	if (pid <= 0 || (kill(pid, 0) < 0 && errno == ESRCH))
		return false;
	read_file("/proc/self/comm", self, sizeof(self));
	snprintf(p, sizeof(p), "/proc/%d/comm", pid);
	if (read_file(p, buf, sizeof(buf)) < 0 || (strcmp(buf, "edutest") && strcmp(buf, self)))
		return false;
	snprintf(p, sizeof(p), "/proc/%d/stat", pid);
	if (read_file(p, buf, sizeof(buf)) < 0)
		return false;
	c = strrchr(buf, ')');
	return !(c && c[1] == ' ' && c[2] == 'Z');
}

static int cmd_start(int argc, char **argv)
{
	int pfd[2];
	pid_t pid;
	char p[PATH_MAX];

	g.irq = IRQ_MSI;
	g.slots = 1024;
	g.size = 2048;
	g.irq_timeout_ms = 2000;
	g.dma_bits = 28;
	g.backend = BK_AUTO;
	g.seed = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull ^ (uint64_t)getpid();

	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		unsigned long long n;

		if (!strcmp(a, "--foreground")) {
			g.foreground = true;
			continue;
		}
		if (!strcmp(a, "--naive-unmask")) {
			g.naive_unmask = true;
			continue;
		}
		if (!v)
			return usage_error("%s needs a value", a);
		i++;
		if (!strcmp(a, "--bdf")) {
			snprintf(g.bdf, sizeof(g.bdf), "%s", v);
		} else if (!strcmp(a, "--dir")) {
			if (strlen(v) >= sizeof(g.dir) / 2 - 32)
				return usage_error("--dir path too long");
			snprintf(g.dir, sizeof(g.dir), "%s", v);
		} else if (!strcmp(a, "--irq")) {
			if (!strcmp(v, "msi"))
				g.irq = IRQ_MSI;
			else if (!strcmp(v, "intx"))
				g.irq = IRQ_INTX;
			else
				return usage_error("--irq must be msi or intx");
		} else if (!strcmp(a, "--backend")) {
			if (!strcmp(v, "auto"))
				g.backend = BK_AUTO;
			else if (!strcmp(v, "vfio"))
				g.backend = BK_VFIO_TYPE1;
			else if (!strcmp(v, "vfio-noiommu"))
				g.backend = BK_VFIO_NOIOMMU;
			else if (!strcmp(v, "uio"))
				g.backend = BK_UIO;
			else
				return usage_error("--backend must be auto, vfio, vfio-noiommu or uio");
		} else if (!strcmp(a, "--slots")) {
			if (!parse_u(v, &n) || n < 1 || n > 60000)
				return usage_error("--slots must be 1..60000");
			g.slots = (unsigned)n;
		} else if (!strcmp(a, "--size")) {
			if (!parse_u(v, &n) || n < 1 || n > EDU_MAX_DMA)
				return usage_error("--size must be 1..%u (QEMU 7.2 edu kills the VM on a 4096-byte DMA)",
						 EDU_MAX_DMA);
			g.size = (unsigned)n;
		} else if (!strcmp(a, "--irq-timeout-ms")) {
			if (!parse_u(v, &n) || n < 1 || n > 3600000)
				return usage_error("--irq-timeout-ms must be 1..3600000");
			g.irq_timeout_ms = (unsigned)n;
		} else if (!strcmp(a, "--dma-bits")) {
			if (!parse_u(v, &n) || n < 20 || n > 64)
				return usage_error("--dma-bits must be 20..64");
			g.dma_bits = (unsigned)n;
		} else if (!strcmp(a, "--seed")) {
			if (!parse_u(v, &n))
				return usage_error("bad --seed");
			g.seed = n;
		} else {
			return usage_error("unknown option %s", a);
		}
	}
	if (!g.bdf[0] || !g.dir[0])
		return usage_error("start needs --bdf and --dir");
	if (g.naive_unmask && g.backend == BK_AUTO)
		g.backend = BK_UIO;
	if (g.naive_unmask && (g.backend != BK_UIO || g.irq != IRQ_INTX))
		return usage_error("--naive-unmask only applies to --backend uio --irq intx");
	if (mkdir(g.dir, 0755) < 0 && errno != EEXIST) {
		fprintf(stderr, "edutest: cannot create %s: %s\n", g.dir, strerror(errno));
		return 2;
	}
	if (!strchr(g.bdf, ':') || strchr(g.bdf, '/'))
		return usage_error("bad --bdf '%s' (want DDDD:BB:SS.F)", g.bdf);
	if (strlen(g.bdf) == 7) { /* BB:SS.F -> 0000:BB:SS.F */
		char t[64];
		snprintf(t, sizeof(t), "0000:%s", g.bdf);
		snprintf(g.bdf, sizeof(g.bdf), "%s", t);
	}
	dpath(p, sizeof(p), "edutest.pid");
	{
		char b[32];
		if (read_file(p, b, sizeof(b)) == 0 && alive(atoi(b))) {
			fprintf(stderr, "edutest: a daemon (pid %s) already runs for %s\n", b, g.dir);
			return 2;
		}
	}
	{
		const char *stale[] = {"edutest.ready", "edutest.result", "edutest.status",
				       "edutest.corrupt-req", "edutest.corrupt-done"};
		for (size_t i = 0; i < sizeof(stale) / sizeof(stale[0]); i++) {
			dpath(p, sizeof(p), stale[i]);
			unlink(p);
		}
	}

	if (g.foreground) {
		setvbuf(stderr, NULL, _IOLBF, 0);
		int rc = run_daemon(-1);
		if (rc)
			fprintf(stderr, "edutest: setup failed: %s\n", errbuf);
		return rc;
	}

	/* Daemonize BEFORE touching the device: mlock and VFIO DMA pins do not
	 * survive a fork (the child's pages would be COW copies). Setup errors
	 * come back to the waiting parent through a pipe. */
	if (pipe2(pfd, O_CLOEXEC) < 0) {
		perror("pipe");
		return 2;
	}
	pid = fork();
	if (pid < 0) {
		perror("fork");
		return 2;
	}
	if (pid == 0) {
		close(pfd[0]);
		detach();
		dpath(p, sizeof(p), "edutest.log");
		stdout_stderr_to(open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
		stdin_from_devnull();
		setvbuf(stderr, NULL, _IOLBF, 0);
		if (chdir("/") < 0) {
			/* harmless */
		}
		_exit(run_daemon(pfd[1]));
	}
	close(pfd[1]);
	waitpid(pid, NULL, 0);
	{
		char msg[1100];
		ssize_t n, tot = 0;
		while ((n = read(pfd[0], msg + tot, sizeof(msg) - 1 - tot)) > 0)
			tot += n;
		msg[tot > 0 ? tot : 0] = 0;
		close(pfd[0]);
		if (!strcmp(msg, "OK")) {
			char *ready;
			dpath(p, sizeof(p), "edutest.ready");
			ready = slurp(p);
			if (ready) {
				/* print a short summary, not the whole GPA list */
				char *cut = strstr(ready, ",\"slot_gpas\"");
				if (cut)
					strcpy(cut, "}");
				printf("%s\n", ready);
				free(ready);
			}
			return 0;
		}
		fprintf(stderr, "edutest: setup failed: %s\n", tot > 0 ? msg : "daemon died during setup (see edutest.log)");
		return 2;
	}
}

static int print_result_and_exit(bool strict)
{
	char p[PATH_MAX], *res;
	bool pass;

	dpath(p, sizeof(p), "edutest.result");
	res = slurp(p);
	if (!res) {
		fprintf(stderr, "edutest: no result in %s\n", g.dir);
		return 2;
	}
	fputs(res, stdout);
	fflush(stdout);
	pass = strstr(res, "\"pass\":true") != NULL;
	if (strict && pass)
		pass = strstr(res, "\"irq_spurious\":0,") != NULL && strstr(res, "\"gpa_moved\":0,") != NULL;
	free(res);
	return pass ? 0 : 1;
}

static int parse_dir_opts(int argc, char **argv, double *timeout, bool *strict, long *slot)
{
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--strict") && strict) {
			*strict = true;
			continue;
		}
		if (i + 1 >= argc)
			return usage_error("%s needs a value", a);
		const char *v = argv[++i];
		if (!strcmp(a, "--dir")) {
			if (strlen(v) >= sizeof(g.dir) / 2 - 32)
				return usage_error("--dir path too long");
			snprintf(g.dir, sizeof(g.dir), "%s", v);
		} else if (!strcmp(a, "--timeout") && timeout) {
			char *end;
			*timeout = strtod(v, &end);
			if (*end || *timeout <= 0)
				return usage_error("bad --timeout");
		} else if (!strcmp(a, "--slot") && slot) {
			char *end;
			*slot = strtol(v, &end, 0);
			if (*end)
				return usage_error("bad --slot");
		} else {
			return usage_error("unknown option %s", a);
		}
	}
	if (!g.dir[0])
		return usage_error("--dir is required");
	return 0;
}

static int cmd_verify(int argc, char **argv)
{
	double timeout = 30, deadline;
	bool strict = false;
	char p[PATH_MAX];
	int pid, rc;
	struct timespec ts = {0, 20000000};

	rc = parse_dir_opts(argc, argv, &timeout, &strict, NULL);
	if (rc)
		return rc;
	pid = read_pid(g.dir);
	dpath(p, sizeof(p), "edutest.result");
	if (pid <= 0 || !alive(pid)) {
		if (path_exists(p))
			return print_result_and_exit(strict); /* already stopped */
		fprintf(stderr, "edutest: no running daemon and no result in %s (see %s/edutest.log)\n",
			g.dir, g.dir);
		return 2;
	}
	unlink(p);
	if (kill(pid, SIGUSR1) < 0) {
		fprintf(stderr, "edutest: kill(%d, SIGUSR1): %s\n", pid, strerror(errno));
		return 2;
	}
	deadline = now_mono() + timeout;
	while (now_mono() < deadline) {
		if (path_exists(p)) {
			/* give the daemon a moment to finish its teardown */
			while (alive(pid) && now_mono() < deadline)
				nanosleep(&ts, NULL);
			return print_result_and_exit(strict);
		}
		if (!alive(pid)) {
			if (path_exists(p))
				return print_result_and_exit(strict);
			fprintf(stderr, "edutest: daemon %d exited without a result (see %s/edutest.log)\n", pid,
				g.dir);
			return 2;
		}
		nanosleep(&ts, NULL);
	}
	fprintf(stderr, "edutest: no result after %.0f s (daemon %d still %s)\n", timeout, pid,
		alive(pid) ? "running" : "gone");
	return 2;
}

static int cmd_status(int argc, char **argv)
{
	char p[PATH_MAX], *s;
	int rc = parse_dir_opts(argc, argv, NULL, NULL, NULL);

	if (rc)
		return rc;
	dpath(p, sizeof(p), "edutest.status");
	s = slurp(p);
	if (!s) {
		dpath(p, sizeof(p), "edutest.result");
		s = slurp(p);
	}
	if (!s) {
		fprintf(stderr, "edutest: no status in %s\n", g.dir);
		return 2;
	}
	fputs(s, stdout);
	free(s);
	return 0;
}

static int cmd_corrupt(int argc, char **argv)
{
	double timeout = 10, deadline;
	long slot = -1;
	char req[PATH_MAX], done[PATH_MAX], buf[32], *res;
	int pid, rc;
	struct timespec ts = {0, 20000000};

	rc = parse_dir_opts(argc, argv, &timeout, NULL, &slot);
	if (rc)
		return rc;
	pid = read_pid(g.dir);
	if (pid <= 0 || !alive(pid)) {
		fprintf(stderr, "edutest: no running daemon in %s\n", g.dir);
		return 2;
	}
	dpath(req, sizeof(req), "edutest.corrupt-req");
	dpath(done, sizeof(done), "edutest.corrupt-done");
	unlink(done);
	snprintf(buf, sizeof(buf), "%ld\n", slot);
	if (write_atomic_len(req, buf, strlen(buf)) < 0 || kill(pid, SIGUSR2) < 0) {
		fprintf(stderr, "edutest: cannot send the request: %s\n", strerror(errno));
		return 2;
	}
	deadline = now_mono() + timeout;
	while (now_mono() < deadline && !path_exists(done))
		nanosleep(&ts, NULL);
	res = slurp(done);
	if (!res) {
		fprintf(stderr, "edutest: daemon did not answer within %.0f s\n", timeout);
		return 2;
	}
	fputs(res, stdout);
	rc = strstr(res, "\"error\"") ? 2 : 0;
	free(res);
	return rc;
}

/*
 * Wait until edu's DMA engine starts a transfer, and return at once: run right before a guest
 * suspend (or a save), it makes sure that a transfer is in flight when that begins. edu runs
 * each DMA 100 ms after it is started, and the daemon starts them back to back, each with
 * other addresses than the one before: a running DMA whose addresses changed since we
 * started watching is a fresh one, with most of its 100 ms still ahead. If none is seen
 * fresh in time, any running DMA will do.
 */
static int cmd_busy(int argc, char **argv)
{
	double timeout = 2, started, deadline;
	char p[PATH_MAX], bdf[64] = "", *ready, *at;
	struct timespec ts = {0, 200000};
	volatile uint32_t *bar;
	uint32_t src, dst;
	struct stat sb;
	bool running, fresh;
	void *map;
	int fd, rc;

	rc = parse_dir_opts(argc, argv, &timeout, NULL, NULL);
	if (rc)
		return rc;
	dpath(p, sizeof(p), "edutest.ready");
	ready = slurp(p);
	at = ready ? strstr(ready, "\"bdf\":\"") : NULL;
	if (!at || sscanf(at + 7, "%63[^\"]", bdf) != 1) {
		fprintf(stderr, "edutest: no daemon ready in %s\n", g.dir);
		free(ready);
		return 2;
	}
	free(ready);
	snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/resource0", bdf);
	fd = open(p, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &sb) < 0) {
		fprintf(stderr, "edutest: %s: %s\n", p, strerror(errno));
		return 2;
	}
	map = mmap(NULL, sb.st_size, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (map == MAP_FAILED) {
		fprintf(stderr, "edutest: mmap %s: %s\n", p, strerror(errno));
		return 2;
	}
	bar = map;
	started = now_mono();
	deadline = started + timeout;
	src = bar[EDU_DMA_SRC / 4];
	dst = bar[EDU_DMA_DST / 4];
	do {
		running = bar[EDU_DMA_CMD / 4] & EDU_DMA_RUN;
		fresh = running && (bar[EDU_DMA_SRC / 4] != src || bar[EDU_DMA_DST / 4] != dst);
		if (!fresh)
			nanosleep(&ts, NULL);
	} while (!fresh && now_mono() < deadline);
	running = bar[EDU_DMA_CMD / 4] & EDU_DMA_RUN;
	printf("{\"dma_running\":%s,\"fresh\":%s,\"waited_ms\":%.1f}\n", running ? "true" : "false",
	       fresh ? "true" : "false", (now_mono() - started) * 1000);
	munmap(map, sb.st_size);
	return running ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "start"))
		return cmd_start(argc - 2, argv + 2);
	if (!strcmp(argv[1], "verify"))
		return cmd_verify(argc - 2, argv + 2);
	if (!strcmp(argv[1], "status"))
		return cmd_status(argc - 2, argv + 2);
	if (!strcmp(argv[1], "selftest-corrupt"))
		return cmd_corrupt(argc - 2, argv + 2);
	if (!strcmp(argv[1], "busy"))
		return cmd_busy(argc - 2, argv + 2);
	if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
		usage(stdout);
		return 0;
	}
	return usage_error("unknown command %s", argv[1]);
}
