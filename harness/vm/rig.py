"""The rig: L1 on L0 with a vIOMMU and assigned devices, L2 inside L1 on PMEM-backed RAM.

``Rig`` owns every process and log of one run. Its methods are the building blocks the flow
uses (boot L1, set up PMEM, bind vfio, make L2 machines); the flow decides their order.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastrestart.artifacts import guestmodules, images, kernels
from fastrestart.errors import ConsoleTimeout, GuestPanic, ReservationMissing, StepError, UsageError
from fastrestart.paths import cache_dir
from fastrestart.vm import accel as accel_mod
from fastrestart.vm.devices import DEVICE_CLASSES, IntelIommu, PassthroughDevice, UserNet, VirtioDisk
from fastrestart.vm.guest import (
    CONSOLE_STALL_S,
    L1_CONSOLE_PORTS,
    L1_QMP_PORTS,
    READY_L2,
    STATE_DIR,
    L2Machine,
    L2Spec,
    RamBackend,
    VfioPci,
)
from fastrestart.vm.machine import Machine

MIB = 1 << 20
SECTION_MIB = 128  # memory hotplug section: PMEM regions are aligned to it
STATE_REGION_MIB = 128
EDU_IRQ_MODES = ("auto", "msi", "intx")
L1_OWN_MIB = 1024
LOWMEM_LIMIT_MIB = 2816  # q35 splits RAM at 2 GiB once it reaches 2.75 GiB
READY_L1 = r"FASTRESTART-L1-READY uptime=([\d.]+)"
# Deadlines, not expectations: under TCG on 2 shared cores a boot can take several times longer.
BOOT_DEADLINE_S = 300
L1_FIRST_BOOT_ATTEMPTS = 2
NO_USERSPACE = r"fastrestart-l1: no userspace disk"


@dataclass(frozen=True)
class Layout:
    """L1's memory: its own RAM plus two DRAM-as-PMEM regions (L2 RAM, device state)."""

    l1_mem_mib: int
    ram_offset_mib: int
    ram_size_mib: int
    state_offset_mib: int
    state_size_mib: int

    @classmethod
    def for_l2(cls, l2_mem_mib: int, state_mib: int = STATE_REGION_MIB) -> Layout:
        if l2_mem_mib % 2 or l2_mem_mib < 64:
            raise UsageError(f"L2 memory must be an even number of MiB, at least 64 (got {l2_mem_mib}).")
        # devdax keeps its struct pages inside the namespace (1/64 of it) plus an info block.
        ram = _round_up(int(l2_mem_mib * 66 / 64) + 16, SECTION_MIB)
        state = _round_up(state_mib, SECTION_MIB)
        # One spare section on top: firmware reserves the last pages of RAM, and a region that
        # straddles them is split and misaligned.
        top = ram + state + SECTION_MIB
        if L1_OWN_MIB + top <= LOWMEM_LIMIT_MIB:
            layout = cls(L1_OWN_MIB + top, L1_OWN_MIB, ram, L1_OWN_MIB + ram, state)
        else:  # above 4 GiB, clear of the PCI hole
            layout = cls(2048 + top, 4096, ram, 4096 + ram, state)
        if layout.l1_mem_mib > 16384:
            raise UsageError(f"L2 memory of {l2_mem_mib} MiB needs an L1 of {layout.l1_mem_mib} MiB, more than "
                             "the 16 GiB the rig allows. Use a smaller --l2-mem.")
        return layout

    def memmap(self) -> str:
        return (f"memmap={self.ram_size_mib}M!{self.ram_offset_mib}M "
                f"memmap={self.state_size_mib}M!{self.state_offset_mib}M")


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def parse_size_mib(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([MmGg]?)i?[Bb]?", text.strip())
    if not match:
        raise UsageError(f"Cannot read the size '{text}'. Use e.g. 256M or 2G.")
    value = int(match[1])
    return value * 1024 if match[2].lower() == "g" else value


OVMF_PATHS = ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF.fd", "/usr/share/qemu/OVMF.fd")


def firmware_args(config: RigConfig) -> list[str]:
    """L1's firmware: nothing for SeaBIOS (QEMU's default), ``-bios OVMF.fd`` for UEFI. -kernel still
    works under OVMF (fw_cfg), so only the firmware in front of the kernel changes."""
    if config.firmware == "seabios":
        return []
    if config.firmware != "ovmf":
        raise UsageError(f"Unknown L1 firmware '{config.firmware}'. Use seabios or ovmf.")
    found = next((path for path in OVMF_PATHS if Path(path).exists()), None)
    if not found:
        raise UsageError("OVMF is not installed (no OVMF.fd in " + ", ".join(OVMF_PATHS) + "). Install it with "
                         "`apt-get install ovmf` (./setup does).")
    return ["-bios", found]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RigConfig:
    kernel: str = "debian:trixie"
    to_kernel: str | None = None
    l2_kernel: str = "debian:trixie"
    l1_qemu: str = "trixie"
    l0_qemu: str | None = None
    accel: str | None = None
    devices: list[str] = field(default_factory=lambda: ["edu", "nvme"])
    l2_mem_mib: int = 256
    ram_backend: str = "auto"  # auto | devdax | fsdax | memfd
    shared_ram: bool = True
    l2_iommu: bool = False  # give L2 an intel-iommu, so its edu runs on vfio-pci with MSI
    edu_irq: str = "auto"  # msi | intx | auto (MSI when L2 can drive it: a vIOMMU or our edu_uio module)
    l1_cpus: int = 2
    firmware: str = "seabios"  # L1's firmware: seabios (QEMU's default) | ovmf (UEFI, Debian's ovmf package)
    state_extra_mib: int = 0  # more room in the state region (the bench copies RAM there on some cycles)
    keep_images: bool = False  # keep boot.img (L1's and L2's kernels and initrds, ~100 MB) in the run directory

    def __post_init__(self) -> None:
        if "nvme" in self.devices and self.l2_mem_mib < images.L2_MIN_MIB_WITH_FIO:
            raise UsageError(f"With nvme assigned, L2 needs at least {images.L2_MIN_MIB_WITH_FIO} MiB (got "
                             f"{self.l2_mem_mib}): fio, which checks the NVMe data, lives in its initramfs. "
                             "Use --l2-mem 256M, or --devices edu.")
        if self.edu_irq not in EDU_IRQ_MODES:
            raise UsageError(f"Unknown edu interrupt mode '{self.edu_irq}'; use one of {', '.join(EDU_IRQ_MODES)}.")


@dataclass
class Artifacts:
    kernel_from: kernels.Kernel
    kernel_to: kernels.Kernel
    l2_kernel: kernels.Kernel
    initrd_from: Path
    initrd_to: Path
    l2_initrd: Path
    userspace: images.Userspace
    edu_irq: str = "intx"  # what L2's edutest uses: msi or intx
    edu_irq_why: str = ""  # why not MSI, when auto fell back to INTx

    def boot_files(self) -> dict[str, Path]:
        return {"from/vmlinuz": self.kernel_from.image, "from/initrd": self.initrd_from,
                "to/vmlinuz": self.kernel_to.image, "to/initrd": self.initrd_to,
                "l2/vmlinuz": self.l2_kernel.image, "l2/initrd": self.l2_initrd}


def prepare_artifacts(config: RigConfig) -> Artifacts:
    """Resolve kernels and build images (all cached)."""
    kernel_from = kernels.resolve(config.kernel)
    kernel_to = kernels.resolve(config.to_kernel) if config.to_kernel else kernel_from
    l2_kernel = kernels.resolve(config.l2_kernel)
    initrd_from = images.l1_initramfs(kernel_from)
    initrd_to = images.l1_initramfs(kernel_to) if kernel_to != kernel_from else initrd_from
    edu_irq, why, l2_modules = _edu_interrupts(config, l2_kernel)
    return Artifacts(kernel_from, kernel_to, l2_kernel, initrd_from, initrd_to,
                     images.l2_initramfs(l2_kernel, with_fio="nvme" in config.devices, extra_modules=l2_modules),
                     images.l1_userspace(config.l1_qemu), edu_irq, why)


def _edu_interrupts(config: RigConfig, l2_kernel: kernels.Kernel) -> tuple[str, str, tuple[Path, ...]]:
    """How L2 takes edu's interrupts: (msi|intx, why not MSI, L2 modules that needs).

    With its own vIOMMU, L2 runs edu on vfio-pci. Without one, MSI needs our edu_uio module
    built for the L2 kernel (uio_pci_generic only does INTx); INTx needs nothing of ours."""
    if "edu" not in config.devices or config.edu_irq == "intx":
        return "intx", "", ()
    if config.l2_iommu:
        return "msi", "", ()
    try:
        return "msi", "", (guestmodules.build("edu_uio", l2_kernel),)
    except guestmodules.Unavailable as error:
        if config.edu_irq == "msi":
            raise UsageError(f"--edu-irq msi: L2 cannot run edu on MSI: {error}. Use --edu-irq intx, "
                             "or --l2-iommu.") from error
        return "intx", f"edu_uio (MSI) unavailable: {error}", ()


L0_AUTO_MIN = (9, 0)


def l0_qemu(spec: str | None) -> tuple[list[str], str]:
    """The L0 QEMU command prefix and its version: the system's, or one from a Debian suite.

    ``auto`` (the default) takes the system QEMU when it is 9.0 or newer, else trixie's: QEMU 7.2's
    edu kills the VM on a 4 KiB DMA (docs/design.md §9), and its multi-threaded TCG was seen to crash L1
    while the kernel patched its own text at boot (an int3 oops in sched_clock_cpu).
    """
    if spec in (None, "", "auto"):
        try:
            prefix, version = l0_qemu("system")
        except UsageError:
            return l0_qemu("trixie")
        if tuple(int(x) for x in version.split(".")[:2]) >= L0_AUTO_MIN:
            return prefix, version
        return l0_qemu("trixie")
    if spec == "system":
        binary = shutil.which("qemu-system-x86_64")
        if not binary:
            raise UsageError("qemu-system-x86_64 is not installed. Install it with "
                             "`apt-get install qemu-system-x86`, or use --l0-qemu trixie|sid.")
        prefix = [binary]
    else:
        userspace = images.l1_userspace(spec)
        prefix = ["env", *(f"{k}={v}" for k, v in userspace.qemu_env().items()), *userspace.qemu_command()]
    out = subprocess.run([*prefix, "--version"], capture_output=True, text=True, timeout=30)
    match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out.stdout)
    if out.returncode != 0 or not match:
        raise UsageError(f"{' '.join(prefix)} --version failed: {out.stderr.strip() or out.stdout.strip()}")
    version = match[1]
    if tuple(int(x) for x in version.split(".")[:2]) < (7, 2):
        raise UsageError(f"L0 QEMU {version} is too old; the rig needs 7.2 or newer (edu, intel-iommu "
                         "intremap). Use --l0-qemu trixie.")
    return prefix, version


class Rig:
    """One run's L1 and L2, their processes, logs and ports."""

    def __init__(self, config: RigConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.log_dir = run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.layout = Layout.for_l2(config.l2_mem_mib, STATE_REGION_MIB + config.state_extra_mib + (
            0 if config.shared_ram else config.l2_mem_mib + 64))
        self.accel = accel_mod.choose(config.accel)
        self.devices: list[PassthroughDevice] = [self._device(name) for name in config.devices]
        self.l0_prefix, self.l0_version = l0_qemu(config.l0_qemu)
        self.artifacts: Artifacts | None = None
        self.l1: Machine | None = None
        self.l2: L2Machine | None = None  # the generation that runs the guest now
        self.l2_generation = 0  # the next generation's number
        self.l2_consoles: list = []  # every console of every generation (console-timing.tsv)
        self.ports = {"qmp": [free_port(), free_port()], "console": [free_port(), free_port()]}
        self.timings: dict[str, float] = {}
        self.extra_cmdline: list[str] = []  # L1 kernel parameters a restart mode needs (luo: kho=on ...)
        self.l1_tsc_khz: int | None = None  # under TCG: L1's first TSC calibration, kept for every kexec
        self.scratch: Path | None = None  # per-run disk images outside the results (see image_dir)

    def _device(self, name: str) -> PassthroughDevice:
        if name not in DEVICE_CLASSES:
            raise UsageError(f"Unknown device '{name}'. Known devices: {', '.join(DEVICE_CLASSES)}.")
        device = DEVICE_CLASSES[name]()
        if name == "nvme":
            device.backing = self.run_dir / "nvme.img"
        return device

    # -- L1 --------------------------------------------------------------------------------
    def l1_cmdline(self, with_memmap: bool = True) -> str:
        parts = ["console=ttyS0,115200", "intel_iommu=on", "iommu=pt", "panic=0", "mitigations=off"]
        if self.accel.name == "tcg":
            # Under TCG on loaded cores the IO-APIC timer check at boot can miss its window and
            # panic ("timer doesn't work through Interrupt-remapped IO-APIC"): a rig flake, not
            # something a restart did.
            parts.append("no_timer_check")
        if self.l1_tsc_khz:
            # Under TCG the early TSC calibration varies from boot to boot by more than KVM's
            # 250 ppm tolerance (seen: 2596.147 then 2592.600 MHz). L2's saved TSC rate then no
            # longer matches and, without TSC scaling, its timers stopped after the reload
            # ("TSC frequency mismatch"). A real host reads its TSC rate from CPUID; pinning it
            # here keeps that rig artifact out of the verdict.
            parts.append(f"tsc_early_khz={self.l1_tsc_khz}")
        if with_memmap:
            parts.append(self.layout.memmap())
        return " ".join(parts + self.extra_cmdline)

    def l1_args(self, boot_img: Path) -> list[str]:
        forwards = {self.ports["qmp"][i]: L1_QMP_PORTS[i] for i in range(2)}
        forwards |= {self.ports["console"][i]: L1_CONSOLE_PORTS[i] for i in range(2)}
        parts = [IntelIommu(), *self.devices,
                 VirtioDisk(self.artifacts.userspace.image, "fr-usr"), VirtioDisk(boot_img, "fr-boot"),
                 UserNet(forwards)]
        args = ["-name", "l1", "-machine", "q35,kernel-irqchip=split", *self.accel.args,
                *firmware_args(self.config),
                "-smp", str(self.config.l1_cpus), "-m", f"{self.layout.l1_mem_mib}M",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-kernel", str(self.artifacts.kernel_from.image), "-initrd", str(self.artifacts.initrd_from),
                "-append", self.l1_cmdline()]
        for part in parts:
            args += part.args()
        return args

    def image_dir(self) -> Path:
        """Where this run's disk images go. With ``keep_images``, the run directory; otherwise a
        scratch directory outside the results, under the cache (so that the cached kernels and
        initrds can be hard-linked into the image's staging tree), which ``close()`` removes:
        a result directory stays small even when its run is killed before ``close()``."""
        if self.config.keep_images:
            return self.run_dir
        if self.scratch is None:
            root = cache_dir() / "scratch"
            root.mkdir(parents=True, exist_ok=True)
            self.scratch = Path(tempfile.mkdtemp(prefix="run-", dir=root))
        return self.scratch

    def boot_disk(self) -> Path:
        """``boot.img``: the kernels and initrds L1 kexecs into and starts L2 with (~100 MB)."""
        return images.boot_disk(self.image_dir(), self.artifacts.boot_files())

    def remove_scratch(self) -> None:
        """Remove the scratch directory of ``image_dir`` (never the run directory); never raises."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def boot_l1(self, timeout: float = BOOT_DEADLINE_S) -> dict:
        """Start L1 and wait for its init; returns boot facts."""
        self.artifacts = self.artifacts or prepare_artifacts(self.config)
        boot_img = self.boot_disk()
        for device in self.devices:
            if getattr(device, "backing", None) is not None and not device.backing.exists():
                with device.backing.open("wb") as scratch:
                    scratch.truncate(device.size_mib * MIB)
        failed: list[str] = []
        while True:
            started = time.monotonic()
            self.l1 = Machine("l1", self.l0_prefix, self.l1_args(boot_img), self.log_dir)
            self.l1.launch()
            try:
                match = self.l1.console.expect(READY_L1, fail=NO_USERSPACE, timeout=timeout, step="boot-l1")
                break
            except (ConsoleTimeout, GuestPanic) as exc:
                # Nothing under test has happened yet: a first boot that hangs or panics is a rig flake
                # (seen under loaded TCG: CPU0's tick stopped, "rcu_preempt kthread timer wakeup didn't
                # happen"). One more try; the log keeps both. kexec boots are never retried.
                failed.append(str(exc).splitlines()[0])
                if len(failed) >= L1_FIRST_BOOT_ATTEMPTS:
                    raise
                self.l1.shutdown()
        self.l1.console.sync()
        tsc_khz = self.tsc_khz()
        if self.accel.name == "tcg":
            self.l1_tsc_khz = tsc_khz
        return {"seconds": time.monotonic() - started, "guest_uptime": float(match.group(1)),
                "failed_attempts": failed, "tsc_khz": tsc_khz}

    def l0_fault(self) -> dict | None:
        """Evidence that L0's QEMU itself broke (it died of a signal or exited with an error, e.g.
        TCG's "iotlb_to_section: Assertion ... failed"), or None while it runs or when it exited
        cleanly (a guest that powered off is the guest's business, not the rig's)."""
        if self.l1 is None or self.l1.proc is None or self.l1.is_running():
            return None
        code = self.l1.proc.returncode
        if code == 0:
            return None
        path = self.log_dir / "l1-qemu.log"
        log = path.read_text(errors="replace") if path.exists() else ""
        lines = [line for line in log.splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if "Assertion" in line or "qemu-system" in line),
                    lines[-1] if lines else "")
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return {"message": f"L0's QEMU {how}" + (f": {said.strip()[:300]}" if said else ""),
                "exit_code": code, "l0 qemu log tail": "\n".join(lines[-15:])}

    @property
    def sh(self):
        """L1's console."""
        return self.l1.console

    def l1_facts(self) -> dict:
        output = self.sh.check("uname -r; cat /proc/sys/kernel/random/boot_id", step="l1-facts")
        out = output.split("\n")
        if len(out) < 2:
            raise StepError("l1-facts", "L1's release and boot_id came back unreadable", {"output": output})
        return {"release": out[0].strip(), "boot_id": out[1].strip()}

    def tsc_khz(self) -> int | None:
        """The TSC rate L1's kernel settled on at boot, the one KVM hands to L2 (kHz)."""
        _, log = self.sh.run("dmesg | grep 'tsc: Detected'")
        # "Detected N MHz TSC" appears only when the TSC rate differs from the CPU's; it wins.
        rates = {kind: int(mhz) * 1000 + int(khz)
                 for mhz, khz, kind in re.findall(r"Detected (\d+)\.(\d{3}) MHz (TSC|processor)", log)}
        return rates.get("TSC") or rates.get("processor")

    def pci_commands(self) -> dict[str, int]:
        """Each assigned device's PCI Command register, as L1 (the host) sees the function."""
        script = "; ".join(f"dd if=/sys/bus/pci/devices/{d.l1_bdf}/config bs=1 skip=4 count=2 2>/dev/null | od -An -tu2"
                           for d in self.devices)
        values = self.sh.check(script, step="pci-command").split()
        return {d.name: int(v) for d, v in zip(self.devices, values, strict=True)}

    def iommu_state(self) -> dict:
        """DMAR and interrupt remapping, from L1's kernel log."""
        _, log = self.sh.run("dmesg | grep -iE 'DMAR|IOMMU|remapping' | head -40")
        return {"dmar": bool(re.search(r"DMAR: (IOMMU enabled|Intel\(R\) Virtualization)", log)),
                "irq_remapping": "Enabled IRQ remapping" in log, "log": log}

    # -- PMEM ------------------------------------------------------------------------------
    def _region(self, offset_mib: int) -> str:
        out = self.sh.check("for r in /sys/bus/nd/devices/region*/resource; do [ -e $r ] && echo $r $(cat $r); done; "
                            "true", step="reserve")
        for line in out.splitlines():
            path, _, resource = line.partition(" ")
            if re.fullmatch(r"0x[0-9a-f]+", resource.strip()) and int(resource, 16) == offset_mib * MIB:
                return path.split("/")[-2]
        raise ReservationMissing("reserve", f"no PMEM region at {offset_mib} MiB: the memmap= reservation is missing",
                        {"regions": out, "cmdline": self.sh.run("cat /proc/cmdline")[1]})

    def ram_backend_kind(self) -> str:
        kind = self.config.ram_backend
        if kind == "auto":
            kind = "devdax" if self.devices else "fsdax"
        return kind

    def setup_pmem(self, fresh: bool) -> dict:
        """Make the RAM region devdax (or fsdax with a file) and mount the state region.

        ``fresh`` formats them (first boot); after a kexec they must come back as they were.
        """
        kind = self.ram_backend_kind()
        ram_region, state_region = self._region(self.layout.ram_offset_mib), self._region(self.layout.state_offset_mib)
        ram_ns, state_ns = f"namespace{ram_region[6:]}.0", f"namespace{state_region[6:]}.0"
        facts: dict = {"ram_region": ram_region, "state_region": state_region, "backend": kind}
        if kind == "devdax":
            if fresh:
                self.sh.check(f"chroot /sysroot ndctl create-namespace -f -e {ram_ns} --mode=devdax --align=2M",
                              timeout=120, step="prepare")
            dax = self.sh.check(f"ls /sys/bus/dax/devices/ 2>/dev/null | grep '^dax{ram_region[6:]}\\.' | head -1",
                                step="reserve").strip()
            if not dax or self.sh.run(f"test -c /dev/{dax}")[0] != 0:
                raise StepError("reserve", f"device-DAX node for {ram_ns} is missing",
                                {"namespaces": self.sh.run("chroot /sysroot ndctl list -N")[1]})
            facts["ram_path"] = f"/dev/{dax}"
        elif kind == "fsdax":
            block = self._pmem_block(ram_ns)
            if fresh:
                self.sh.check(f"chroot /sysroot mkfs.ext4 -q -F -b 4096 {block}", timeout=120, step="prepare")
            self.sh.check(f"mount -o dax {block} /sysroot/mnt/ram", step="reserve")
            facts["ram_path"] = "/mnt/ram/l2-ram"
        else:
            facts["ram_path"] = ""
        block = self._pmem_block(state_ns)
        if fresh:
            self.sh.check(f"chroot /sysroot mkfs.ext4 -q -F -b 4096 {block}", timeout=120, step="prepare")
        self.sh.check(f"mount -o dax {block} /sysroot/mnt/state && mkdir -p {STATE_DIR}/logs", step="reserve")
        facts["state_block"] = block
        return facts

    def _pmem_block(self, namespace: str) -> str:
        name = self.sh.check(f"cat /sys/bus/nd/devices/{namespace}/block/*/uevent 2>/dev/null | "
                             f"sed -n 's/^DEVNAME=//p' | head -1", step="reserve").strip()
        if not name:
            name = self.sh.check(f"ls /sys/bus/nd/devices/{namespace}/block/ | head -1", step="reserve").strip()
        if not name:
            raise StepError("reserve", f"{namespace} has no pmem block device",
                            {"nd": self.sh.run("ls -l /sys/bus/nd/devices/")[1]})
        return f"/dev/{name}"

    # -- devices ---------------------------------------------------------------------------
    def bind_vfio(self) -> dict:
        """Give every assigned device to vfio-pci (no native driver may claim it)."""
        drivers = {}
        for device in self.devices:
            bdf = device.l1_bdf
            self.sh.check(
                f"echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override && "
                f"{{ [ -e /sys/bus/pci/devices/{bdf}/driver ] && "
                f"echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; "
                f"echo {bdf} > /sys/bus/pci/drivers_probe; }}", step="enumerate")
            drivers[device.name] = self.device_driver(device)
        return drivers

    def device_driver(self, device: PassthroughDevice) -> str:
        out = self.sh.run(f"basename $(readlink /sys/bus/pci/devices/{device.l1_bdf}/driver) 2>/dev/null")[1]
        return out.strip() or "none"

    # -- L2 --------------------------------------------------------------------------------
    def l2_spec(self, ram_path: str, allow_s3: bool, aux_ram_share: bool, memfd: bool = False) -> L2Spec:
        kind = "memfd" if memfd else self.ram_backend_kind() if self.config.shared_ram else "ram"
        vfio = [VfioPci(d.name, d.l1_bdf, i) for i, d in enumerate(self.devices)]
        return L2Spec(RamBackend(kind, self.config.l2_mem_mib, ram_path), vfio=vfio, allow_s3=allow_s3,
                      aux_ram_share=aux_ram_share, viommu=self.config.l2_iommu)

    def l2_machine(self, spec: L2Spec, incoming: list[str] | None = None, plug_vfio: bool = True,
                   connect: bool = True, wait_ready: bool | None = None,
                   timeout: float = BOOT_DEADLINE_S) -> L2Machine:
        """The next L2 QEMU generation, not launched yet: its number picks its port set (they
        alternate), its QEMU log goes to the state region in L1, its console to l2-console.log.
        ``wait_ready`` defaults to a first boot's (no ``incoming``)."""
        generation = self.l2_generation
        self.l2_generation += 1
        ports = generation % 2
        return L2Machine(self.sh, spec, generation, self.ports["console"][ports], self.ports["qmp"][ports],
                         self.log_dir, incoming=incoming, plug_vfio=plug_vfio, connect=connect,
                         wait_ready=wait_ready, timeout=timeout, ready=READY_L2, console_stall_s=CONSOLE_STALL_S,
                         on_console=self.l2_consoles.append)

    def start_l2(self, spec: L2Spec, **options) -> L2Machine:
        """Launch the next L2 generation (``l2_machine``'s options); it is not made ``self.l2``."""
        return self.l2_machine(spec, **options).launch()

    def collect_l1_logs(self) -> None:
        """Copy L2 QEMU's stderr logs (kept on the state region) from L1 into the run directory."""
        if not (self.l1 and self.l1.is_running()):
            return
        with contextlib.suppress(Exception):
            _, names = self.sh.run(f"ls {STATE_DIR}/logs/ 2>/dev/null", timeout=10)
            for name in names.split():
                _, text = self.sh.run(f"cat {STATE_DIR}/logs/{name}", timeout=20)
                (self.log_dir / name).write_text(text + "\n")
            _, dmesg = self.sh.run("dmesg", timeout=20)
            (self.log_dir / "l1-dmesg.log").write_text(dmesg + "\n")

    def write_console_timings(self) -> None:
        """Every console command with its duration: where a run's wall time goes."""
        consoles = [c for c in (self.l1 and self.l1.console, *self.l2_consoles) if c]
        rows = sorted((start, seconds, rc, console.name, cmd) for console in consoles
                      for start, seconds, rc, cmd in console.history)
        with (self.log_dir / "console-timing.tsv").open("a") as out:
            for start, seconds, rc, name, cmd in rows:
                out.write(f"{start:.3f}\t{seconds:.3f}\t{rc}\t{name}\t{cmd[:200]}\n")

    def close(self) -> None:
        """Tear everything down; never raises. Logs stay in the run directory."""
        with contextlib.suppress(Exception):
            self.write_console_timings()
        self.collect_l1_logs()
        if self.l2:
            self.l2.close()  # L0's side only: the QEMU goes with L1
        if self.l1:
            self.l1.shutdown()
        self.remove_scratch()  # boot.img, unless keep_images put it in the run directory
        with contextlib.suppress(OSError):
            for device in self.devices:
                if getattr(device, "backing", None) is not None:
                    device.backing.unlink(missing_ok=True)
        (self.log_dir / "ports.json").write_text(json.dumps(self.ports))

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
