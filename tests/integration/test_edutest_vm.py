"""edutest (guests/workloads/edutest.c) proven in a real VM.

Boots a Debian trixie 6.12 kernel under QEMU/TCG with a busybox initramfs and
QEMU's ``edu`` device at a fixed BDF, drives the guest over its serial console
with pexpect, and shows that:

* a clean run counts transfers > 0, no DMA mismatch and irq_expected ==
  irq_received > 0, for MSI and INTx (vfio-pci, type1 IOMMU behind an emulated
  intel-iommu), for INTx through uio_pci_generic and for MSI through our
  edu_uio module (guests/modules, built for this kernel; no vIOMMU);
* clearing the MSI Enable bit underneath the program (the host-side fault) is
  reported as lost interrupts and exit 1, without hanging;
* a completed payload corrupted after it landed is caught, both when the
  daemon flips a byte (``selftest-corrupt``) and when the guest's RAM backing
  file is written from the host at the reported guest-physical address;
* the docs/design.md §9 "1 of 5 INTx" finding is the uio unmask done through
  ``write(/dev/uioN, 1)``: uio_pci_generic has no irqcontrol (ENOSYS), so INTx
  stays disabled after the first interrupt;
* a guest suspend to RAM and QMP ``system_wakeup`` (what the fast-restart
  harness does around cpr-reboot) leaves the uio_pci_generic device with Bus
  Master Enable off (the PCI core re-enables it only for ``is_busmaster``
  devices); edutest re-enables it like a driver's resume (``pm_resume_reinits``)
  and DMA keeps passing, while the same bit cleared *without* a suspend (as a
  host would) is counted in ``bme_lost`` and fails the run. On edu_uio, whose
  suspend waits for a running DMA, every MSI and every transfer survives S3;
* INTx Disable set underneath the uio loop (the harness's "irq-drop" fault) is
  counted as a lost interrupt, not repaired before, and the loop re-arms.

Artifacts (kernel, modules, busybox initramfs) are cached under
``${XDG_CACHE_HOME:-~/.cache}/fastrestart/edu-selftest``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastrestart.artifacts import guestmodules

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[2]
EDUTEST_SRC = REPO / "guests" / "workloads" / "edutest.c"
# The harness's own suspend script: it re-opens q35's ACPI PM window after a wake, without which
# a second suspend of the same guest never reaches QEMU.
FR_SUSPEND = REPO / "guests" / "l2" / "fr-suspend"
QEMU = shutil.which("qemu-system-x86_64")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastrestart" / "edu-selftest"
SUITE = "trixie"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BDF = "0000:00:03.0"
HOTPLUG_BDF = "0000:01:00.0"  # second edu behind a pcie-root-port (vfio VM only)
# Modules the guest needs; their dependency closure is added automatically.
GUEST_MODULES = (
    "vfio", "vfio_iommu_type1", "vfio-pci-core", "vfio-pci", "irqbypass", "uio", "uio_pci_generic",
)
GUEST_RAM_MB = 512
BOOT_TIMEOUT = 300
CFLAGS = ("-O2", "-static", "-Wall", "-Wextra")

needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
# A vfio.ko built with CONFIG_VFIO_NOIOMMU=y for the same kernel (Debian leaves it unset).
NOIOMMU_VFIO_KO = os.environ.get("FASTRESTART_EDU_NOIOMMU_VFIO_KO")


# --------------------------------------------------------------------------- artifacts


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def _debian_mirror() -> str:
    """The mirror the system already uses (deb822 URIs:), without touching its config."""
    src = Path("/etc/apt/sources.list.d/debian.sources")
    if src.exists():
        for line in src.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split(":", 1)[1].split()[0]
                if "security" not in uri:
                    return uri
    return "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modroot: Path  # contains lib/modules/<version>


def ensure_kernel() -> Kernel:
    """Debian trixie's 6.12 kernel and the guest modules, via a private apt config."""
    kdir = CACHE / "kernel"
    meta = kdir / "kernel.json"
    with _cache_lock():
        if meta.exists():
            m = json.loads(meta.read_text())
            return Kernel(m["version"], kdir / "vmlinuz", kdir / "modroot")
        apt = CACHE / "apt"
        for d in ("lists/partial", "cache/archives/partial", "debs"):
            (apt / d).mkdir(parents=True, exist_ok=True)
        (apt / "status").touch()
        (apt / "sources.list").write_text(f"deb [signed-by={KEYRING}] {_debian_mirror()} {SUITE} main\n")
        opts = [
            f"-o=Dir::Etc::sourcelist={apt / 'sources.list'}",
            "-o=Dir::Etc::sourceparts=/dev/null",
            f"-o=Dir::State::Lists={apt / 'lists'}",
            f"-o=Dir::State::status={apt / 'status'}",
            f"-o=Dir::Cache={apt / 'cache'}",
            "-o=Debug::NoLocking=1",
            "-o=APT::Sandbox::User=root",
        ]
        _run(["apt-get", *opts, "update"])
        deps = _run(["apt-cache", *opts, "depends", "linux-image-amd64"]).stdout
        found = re.search(r"Depends:\s*(linux-image-6\.12\S*-amd64)\b", deps)
        if not found:
            raise RuntimeError(f"no linux-image-6.12*-amd64 in {SUITE}:\n{deps}")
        pkg = found.group(1)
        _run(["apt-get", *opts, "download", pkg], cwd=apt / "debs")
        deb = next((apt / "debs").glob(f"{pkg}_*.deb"))
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp)
            _run(["dpkg-deb", "-x", str(deb), str(root)])
            version = pkg.removeprefix("linux-image-")
            src_mods = root / "usr/lib/modules" / version
            shutil.rmtree(kdir, ignore_errors=True)
            kdir.mkdir(parents=True)
            shutil.copy2(root / "boot" / f"vmlinuz-{version}", kdir / "vmlinuz")
            shutil.copy2(root / "boot" / f"config-{version}", kdir / "config")
            dst_mods = kdir / "modroot/lib/modules" / version
            dst_mods.mkdir(parents=True)
            for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                if (src_mods / f).exists():
                    shutil.copy2(src_mods / f, dst_mods / f)
            index = {p.name.split(".ko")[0].replace("-", "_"): p for p in src_mods.rglob("*.ko*")}
            todo, done = [m.replace("-", "_") for m in GUEST_MODULES], set()
            while todo:
                name = todo.pop()
                if name in done:
                    continue
                done.add(name)
                path = index[name]
                rel = path.relative_to(src_mods)
                out = dst_mods / str(rel).removesuffix(".xz")
                out.parent.mkdir(parents=True, exist_ok=True)
                data = path.read_bytes()
                out.write_bytes(lzma.decompress(data) if path.suffix == ".xz" else data)
                dep = _run(["modinfo", "-F", "depends", str(out)]).stdout.strip()
                todo += [d.replace("-", "_") for d in dep.split(",") if d]
            _run(["depmod", "-b", str(kdir / "modroot"), version])
        shutil.rmtree(apt, ignore_errors=True)
        meta.write_text(json.dumps({"version": version, "package": pkg, "modules": sorted(done)}))
        return Kernel(version, kdir / "vmlinuz", kdir / "modroot")


def build_edutest() -> Path:
    """Static build, cached by the source hash. Fails on any compiler warning."""
    digest = hashlib.sha256(EDUTEST_SRC.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = CACHE / "bin" / f"edutest-{digest}"
    with _cache_lock():
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            res = _run(["gcc", *CFLAGS, "-o", str(tmp), str(EDUTEST_SRC)])
            warnings = [
                ln for ln in res.stderr.splitlines() if "warning:" in ln and "statically linked" not in ln
            ]
            if warnings:
                tmp.unlink()
                raise RuntimeError("edutest.c has compiler warnings:\n" + res.stderr)
            tmp.rename(out)
            for old in out.parent.glob("edutest-*"):
                if old != out:
                    old.unlink()
    return out


RCS = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
dmesg -n 1
echo EDU-RCS-DONE
"""

INITTAB = """::sysinit:/etc/init.d/rcS
ttyS0::respawn:/bin/sh
::shutdown:/bin/true
"""


def build_initrd(kernel: Kernel, edutest: Path, tag: str = "stock", extra_modules: tuple[Path, ...] = ()) -> Path:
    """``extra_modules``: our own .ko files for this kernel, loadable by modprobe (lib/modules/*/extra)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    h = hashlib.sha256()
    for part in (edutest.read_bytes(), Path(busybox).read_bytes(), RCS.encode(), INITTAB.encode(),
                 kernel.version.encode(), FR_SUSPEND.read_bytes(), *(ko.read_bytes() for ko in extra_modules)):
        h.update(hashlib.sha256(part).digest())
    for ko in sorted(kernel.modroot.rglob("*.ko")):
        h.update(hashlib.sha256(ko.read_bytes()).digest())
    out = CACHE / f"initrd-{tag}-{h.hexdigest()[:16]}.cpio"
    with _cache_lock():
        if out.exists():
            return out
        for old in CACHE.glob(f"initrd-{tag}-*.cpio"):
            old.unlink()
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp)
            for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/init.d", "proc", "sys", "dev", "run", "tmp",
                      "root", "lib"):
                (root / d).mkdir(parents=True, exist_ok=True)
            shutil.copy2(busybox, root / "bin/busybox")
            applets = _run([busybox, "--list-full"]).stdout.split()
            for a in applets:
                link = root / a
                if not link.exists() and not link.is_symlink():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to("/bin/busybox")
            (root / "init").symlink_to("/bin/busybox")
            (root / "etc/init.d/rcS").write_text(RCS)
            (root / "etc/init.d/rcS").chmod(0o755)
            (root / "etc/inittab").write_text(INITTAB)
            (root / "etc/profile").write_text("export PATH=/usr/bin:/usr/sbin:/bin:/sbin\n")
            shutil.copy2(edutest, root / "usr/bin/edutest")
            shutil.copy2(FR_SUSPEND, root / "usr/bin/fr-suspend")
            shutil.copytree(kernel.modroot / "lib/modules", root / "lib/modules", symlinks=True)
            for ko in extra_modules:
                (root / "lib/modules" / kernel.version / "extra").mkdir(exist_ok=True)
                shutil.copy2(ko, root / "lib/modules" / kernel.version / "extra" / ko.name)
            if extra_modules:
                _run(["depmod", "-b", str(root), kernel.version])
            files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True)
            tmp_out = out.with_suffix(".tmp")
            with open(tmp_out, "wb") as f:
                subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root,
                               input=files.stdout, stdout=f, check=True)
            tmp_out.rename(out)
    return out


# --------------------------------------------------------------------------- the VM


class GuestVM:
    """One QEMU/TCG guest on the serial console. Always killed by close()."""

    def __init__(self, name: str, kernel: Kernel, initrd: Path, logdir: Path, viommu: bool,
                 extra_args: tuple[str, ...] = ()):
        self.name = name
        self.logdir = logdir
        self.shm = Path(tempfile.mkdtemp(prefix=f"fr-edu-{name}-", dir="/dev/shm"))
        self.ram = self.shm / "ram"
        append = "console=ttyS0 panic=-1 loglevel=4"
        machine = "q35,memory-backend=ram0"
        args = [
            "nice", "-n", "5", QEMU or "qemu-system-x86_64",
            "-machine", machine, "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", f"{GUEST_RAM_MB}M",
            "-object", f"memory-backend-file,id=ram0,size={GUEST_RAM_MB}M,mem-path={self.ram},share=on",
            "-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio", "-monitor", "none",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        ]
        if viommu:
            # Interrupt remapping keeps vfio_iommu_type1 happy without
            # allow_unsafe_interrupts; under TCG it needs no split irqchip.
            args += ["-device", "intel-iommu,intremap=on"]
            append += " intel_iommu=on"
        args += ["-device", f"edu,id=edu0,bus=pcie.0,addr={BDF.split(':')[2]}"]
        if viommu:
            args += ["-device", "pcie-root-port,id=rp1,bus=pcie.0,addr=0x4,chassis=1",
                     "-device", "edu,id=edu1,bus=rp1"]
        self.qmp_path = self.shm / "qmp.sock"
        args += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra_args]
        args += ["-append", append]
        self.argv = args
        self.console_log = open(logdir / f"{name}-console.log", "w", encoding="utf-8")  # noqa: SIM115
        self.child = pexpect.spawn(args[0], args[1:], encoding="utf-8", codec_errors="replace", timeout=60,
                                   echo=False, dimensions=(50, 500))
        self.child.logfile_read = self.console_log
        self._n = 0
        self.child.expect("EDU-RCS-DONE", timeout=BOOT_TIMEOUT)
        time.sleep(1.0)
        self.child.sendline("stty -echo; export PS1=''")
        self.run("true")

    def run(self, cmd: str, timeout: float = 120) -> tuple[int, str]:
        self._n += 1
        marker = f"__RC_{self._n}__"
        self.child.sendline(f"{cmd}; printf '__%s_%d__=%d\\n' RC {self._n} $?")
        self.child.expect(rf"{marker}=(\d+)", timeout=timeout)
        out = self.child.before.replace("\r", "")
        return int(self.child.match.group(1)), out

    def check(self, cmd: str, timeout: float = 120) -> str:
        rc, out = self.run(cmd, timeout)
        assert rc == 0, f"`{cmd}` failed with {rc}:\n{out}"
        return out

    def qmp(self, command: str, **arguments) -> dict:
        """One QMP command on a fresh connection; returns its "return" value."""
        with socket.socket(socket.AF_UNIX) as sk:
            sk.settimeout(30)
            sk.connect(str(self.qmp_path))
            f = sk.makefile("rw", encoding="utf-8")
            json.loads(f.readline())  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(cmd) + "\n")
                f.flush()
                while True:
                    msg = json.loads(f.readline())
                    if "return" in msg or "error" in msg:
                        break
                assert "error" not in msg, msg
            return msg["return"]

    def close(self) -> None:
        try:
            if self.child.isalive():
                self.child.terminate(force=True)
        finally:
            with contextlib.suppress(ProcessLookupError):
                if self.child.pid:
                    os.kill(self.child.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.child.close(force=True)
            self.console_log.close()
            shutil.rmtree(self.shm, ignore_errors=True)


def _last_json(out: str) -> dict:
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON in output:\n{out}")


class Edutest:
    """Drives one edutest daemon inside the guest."""

    def __init__(self, vm: GuestVM, tag: str, bdf: str = BDF):
        self.vm = vm
        self.dir = f"/run/edu-{tag}"
        self.bdf = bdf

    def start(self, *opts: str) -> dict:
        rc, out = self.vm.run(f"edutest start --bdf {self.bdf} --dir {self.dir} {' '.join(opts)}")
        assert rc == 0, f"edutest start failed ({rc}):\n{out}\n{self.log()}"
        return _last_json(out)

    def ready(self) -> dict:
        return json.loads(self.vm.check(f"cat {self.dir}/edutest.ready").strip().splitlines()[-1])

    def status(self) -> dict:
        return _last_json(self.vm.check(f"edutest status --dir {self.dir}"))

    def wait(self, key: str, at_least: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st[key] >= at_least:
                return st
            assert time.monotonic() < deadline, f"{key} stuck at {st[key]} < {at_least}:\n{st}\n{self.log()}"
            time.sleep(1)

    def verify(self) -> tuple[int, dict]:
        rc, out = self.vm.run(f"edutest verify --dir {self.dir} --timeout 60", timeout=120)
        assert rc in (0, 1), f"edutest verify: {rc}\n{out}\n{self.log()}"
        return rc, _last_json(out)

    def log(self) -> str:
        return self.vm.run(f"tail -n 40 {self.dir}/edutest.log")[1]


def _modify_command(vm: GuestVM, clear: int = 0, set_: int = 0, bdf: str = BDF) -> int:
    """Read-modify-write the PCI Command register through sysfs in one shell line (a
    short window against the daemon's own INTx re-enable), as a host-side fault would
    change it underneath the driver. Returns the value written."""
    cfg = f"/sys/bus/pci/devices/{bdf}/config"
    out = vm.check(
        f"v=$(dd if={cfg} bs=2 skip=2 count=1 2>/dev/null | od -An -tu2 | tr -d ' '); "
        f"v=$(( (v & ~{clear}) | {set_} )); "
        f"printf \"$(printf '\\\\%03o\\\\%03o' $((v & 255)) $((v >> 8)))\" | "
        f"dd of={cfg} bs=2 seek=2 count=1 conv=notrunc 2>/dev/null; echo CMD=$v"
    )
    return int(re.findall(r"CMD=(\d+)", out)[-1])


def _read_command(vm: GuestVM, bdf: str = BDF) -> int:
    cfg = f"/sys/bus/pci/devices/{bdf}/config"
    return int(vm.check(f"dd if={cfg} bs=2 skip=2 count=1 2>/dev/null | od -An -tu2").strip())


PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400


def _resync_console(vm: GuestVM, timeout: float = 90) -> None:
    """After an S3 wake-up the guest's 8250 is re-initialized and drops what was
    typed meanwhile, and init may have respawned the console shell (echo on, a
    prompt): set the shell up again and wait until two commands in a row come back
    intact."""
    deadline = time.monotonic() + timeout
    good = 0
    time.sleep(2)
    while good < 2:
        vm.child.sendline("stty -echo; export PS1=''")
        assert time.monotonic() < deadline, "the serial console did not come back after wake-up"
        try:
            good = good + 1 if vm.run("true", timeout=10)[0] == 0 else 0
        except pexpect.TIMEOUT:
            good = 0


def _kill_leftovers(vm: GuestVM) -> None:
    vm.run("for p in /run/edu-*/edutest.pid; do [ -f $p ] && kill $(cat $p); done; sleep 1")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def artifacts() -> tuple[Kernel, Path]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    kernel = ensure_kernel()
    return kernel, build_initrd(kernel, build_edutest(),
                                extra_modules=(guestmodules.build_for_release("edu_uio", kernel.version),))


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edu-vm")


@contextlib.contextmanager
def _vm(name: str, artifacts: tuple[Kernel, Path], logdir: Path, viommu: bool,
        extra_args: tuple[str, ...] = ()) -> Iterator[GuestVM]:
    kernel, initrd = artifacts
    vm = None
    try:
        vm = GuestVM(name, kernel, initrd, logdir, viommu, extra_args)
        yield vm
    finally:
        if vm is not None:
            vm.close()


@pytest.fixture(scope="class")
def vfio_vm(artifacts, logdir) -> Iterator[GuestVM]:
    with _vm("vfio", artifacts, logdir, viommu=True) as vm:
        vm.check("modprobe vfio-pci && modprobe vfio_iommu_type1")
        yield vm


@pytest.fixture(scope="class")
def uio_vm(artifacts, logdir) -> Iterator[GuestVM]:
    # S3 enabled: TestUio suspends this guest to RAM (q35 hides S3 by default).
    with _vm("uio", artifacts, logdir, viommu=False, extra_args=("-global", "ICH9-LPC.disable_s3=0")) as vm:
        vm.check("modprobe uio_pci_generic")
        yield vm


@pytest.fixture(scope="class")
def noiommu_vm(artifacts, logdir) -> Iterator[GuestVM]:
    if not NOIOMMU_VFIO_KO:
        pytest.skip("set FASTRESTART_EDU_NOIOMMU_VFIO_KO to a vfio.ko built with CONFIG_VFIO_NOIOMMU=y "
                    "(recipe in TestNoiommu's docstring)")
    kernel, _ = artifacts
    ko = Path(NOIOMMU_VFIO_KO)
    variant = CACHE / f"noiommu-{hashlib.sha256(ko.read_bytes()).hexdigest()[:16]}"
    with _cache_lock():
        if not (variant / "done").exists():
            shutil.rmtree(variant, ignore_errors=True)
            shutil.copytree(kernel.modroot, variant / "modroot", symlinks=True)
            target = next((variant / "modroot").rglob("vfio.ko"))
            shutil.copy2(ko, target)
            _run(["depmod", "-b", str(variant / "modroot"), kernel.version])
            (variant / "done").touch()
    nkernel = Kernel(kernel.version, kernel.vmlinuz, variant / "modroot")
    initrd = build_initrd(nkernel, build_edutest(), tag="noiommu")
    with _vm("noiommu", (nkernel, initrd), logdir, viommu=False) as vm:
        vm.check("modprobe vfio enable_unsafe_noiommu_mode=1 && modprobe vfio-pci")
        yield vm


def _report(name: str, res: dict) -> None:
    print(f"\n[{name}] backend={res['backend']} irq={res['irq']} transfers={res['transfers']} "
          f"irq {res['irq_received']}/{res['irq_expected']} lost={res['irq_lost']} "
          f"spurious={res['irq_spurious']} mismatches={res['dma_mismatches']} "
          f"bme_lost={res['bme_lost']} pm_resume_reinits={res['pm_resume_reinits']} "
          f"suspends={res['suspends_seen']} "
          f"{res['transfers_per_s']:.2f} transfers/s {res['irqs_per_s']:.2f} irqs/s")


def _assert_clean(res: dict, rc: int, log: str = "") -> None:
    """``log``: edutest's own log, shown when an assertion fails."""
    assert rc == 0, log or res
    assert res["pass"] is True, log
    assert res["transfers"] > 0
    assert res["dma_mismatches"] == 0, log
    assert res["irq_expected"] == res["irq_received"] > 0
    assert res["irq_lost"] == 0, log
    assert res["irq_spurious"] == 0, log
    assert res["bme_lost"] == 0, log
    assert res["dma_done_irqs"] > 0 and res["raised_irqs"] > 0
    assert res["final_checked"] == min(res["transfers"], res["slots"])


def _assert_msi_disabled_underneath_is_lost(e: Edutest, backend: str) -> None:
    """What the harness's irq-drop does from L1 to the physical device: clear MSI Enable."""
    e.start("--irq", "msi", "--irq-timeout-ms", "1000")
    cap = int(e.ready()["msi_cap"], 16)
    before = e.wait("transfers", 3)
    assert before["irq_lost"] == 0
    cfg = f"/sys/bus/pci/devices/{BDF}/config"
    off = cap + 2
    e.vm.check(
        f"b=$(dd if={cfg} bs=1 skip={off} count=1 2>/dev/null | od -An -tu1 | tr -d ' '); "
        f"printf \"$(printf '\\\\%03o' $((b & 254)))\" | "
        f"dd of={cfg} bs=1 seek={off} count=1 conv=notrunc 2>/dev/null"
    )
    flags = e.vm.check(f"dd if={cfg} bs=1 skip={off} count=1 2>/dev/null | od -An -tu1").strip()
    assert int(flags) & 1 == 0
    e.wait("irq_lost", 3, timeout=60)
    rc, res = e.verify()
    _report(f"{backend} msi, MSI enable cleared", res)
    assert rc == 1
    assert res["pass"] is False
    assert res["irq_lost"] >= 3
    assert res["irq_expected"] == res["irq_received"] + res["irq_lost"]
    assert res["dma_mismatches"] == 0  # the DMA itself still completes
    assert "LOST: no" in e.log()


# --------------------------------------------------------------------------- tests


def test_edutest_compiles_without_warnings() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    assert build_edutest().exists()


@pytest.mark.vm
@needs_qemu
class TestVfio:
    """vfio-pci + type1 IOMMU (guest has intel-iommu): MSI and INTx."""

    @pytest.mark.parametrize(("irq", "slots"), [("msi", 1024), ("intx", 8)])
    def test_clean_run(self, vfio_vm: GuestVM, irq: str, slots: int) -> None:
        e = Edutest(vfio_vm, f"clean-{irq}")
        ready = e.start("--irq", irq, "--slots", str(slots))
        assert ready["backend"] == "vfio-type1" and ready["irq"] == irq
        assert ready["id"] == "0x010000ed"
        e.wait("transfers", 20)
        rc, res = e.verify()
        _report(f"vfio {irq}", res)
        _assert_clean(res, rc, e.log())
        if slots < res["transfers"]:  # the ring wrapped: each reused slot was re-checked first
            assert res["retire_checks"] == res["transfers"] - slots

    def test_msi_disabled_underneath_is_lost(self, vfio_vm: GuestVM) -> None:
        _assert_msi_disabled_underneath_is_lost(Edutest(vfio_vm, "msi-off"), "vfio")

    def test_selftest_corrupt_is_caught(self, vfio_vm: GuestVM) -> None:
        e = Edutest(vfio_vm, "corrupt")
        e.start("--irq", "msi")
        e.wait("transfers", 3)
        out = vfio_vm.check(f"edutest selftest-corrupt --dir {e.dir} --slot 1")
        info = _last_json(out)
        assert info["slot"] == 1
        rc, res = e.verify()
        assert rc == 1
        assert res["dma_mismatches"] == 1
        bad = res["first_mismatch"][0]
        assert bad["slot"] == 1 and bad["gpa"] == info["gpa"] and bad["expected"] != bad["actual"]
        assert res["irq_expected"] == res["irq_received"]

    def test_backing_file_corruption_is_caught(self, vfio_vm: GuestVM) -> None:
        """Write into the guest RAM file from the host at the slot's reported GPA."""
        e = Edutest(vfio_vm, "hostcorrupt")
        e.start("--irq", "intx")
        ready = e.ready()
        e.wait("transfers", 3)
        gpa = int(ready["slot_gpas"][2], 16)
        with open(vfio_vm.ram, "r+b") as f:
            f.seek(gpa + 100)
            old = f.read(1)
            f.seek(gpa + 100)
            f.write(bytes([old[0] ^ 0x5A]))
        rc, res = e.verify()
        _report("vfio intx, host-side corruption", res)
        assert rc == 1
        assert res["dma_mismatches"] == 1
        bad = res["first_mismatch"][0]
        assert (bad["slot"], int(bad["gpa"], 16), bad["offset"]) == (2, gpa, 100)

    def test_hot_unplug_stops_cleanly(self, vfio_vm: GuestVM) -> None:
        """device_del while running: the VFIO device request stops the daemon, which
        writes its result and releases the device instead of blocking the unplug."""
        e = Edutest(vfio_vm, "unplug", bdf=HOTPLUG_BDF)
        e.start("--irq", "msi")
        e.wait("transfers", 3)
        vfio_vm.qmp("device_del", id="edu1")
        deadline = time.monotonic() + 120
        while vfio_vm.run(f"test -e /sys/bus/pci/devices/{HOTPLUG_BDF}")[0] == 0:
            assert time.monotonic() < deadline, "edu1 was never removed:\n" + e.log()
            time.sleep(1)
        rc, res = e.verify()
        _report("vfio msi, hot-unplug", res)
        assert res["stopped_by"] == "vfio-device-request"
        _assert_clean(res, rc, e.log())


@pytest.mark.vm
@needs_qemu
class TestUio:
    """No vIOMMU, stock Debian kernel: INTx through uio_pci_generic, MSI through edu_uio."""

    def test_clean_intx(self, uio_vm: GuestVM) -> None:
        e = Edutest(uio_vm, "uio")
        ready = e.start("--irq", "intx")
        assert ready["backend"] == "uio"
        gpas = [int(g, 16) for g in e.ready()["slot_gpas"]]
        assert all(g + 4096 <= 1 << 28 for g in gpas)  # edu's 28-bit DMA mask
        e.wait("transfers", 8)
        rc, res = e.verify()
        _report("uio intx", res)
        _assert_clean(res, rc, e.log())
        assert res["gpa_moved"] == 0

    def test_clean_msi_on_edu_uio(self, uio_vm: GuestVM) -> None:
        e = Edutest(uio_vm, "uio-msi")
        ready = e.start("--irq", "msi")
        assert ready["backend"] == "uio" and ready["irq"] == "msi"
        assert uio_vm.check(f"basename $(readlink /sys/bus/pci/devices/{BDF}/driver)").strip() == "edu_uio"
        e.wait("transfers", 8)
        rc, res = e.verify()
        _report("uio msi (edu_uio)", res)
        _assert_clean(res, rc, e.log())

    def test_busy_returns_once_a_dma_is_in_flight(self, uio_vm: GuestVM) -> None:
        """What the harness runs right before the guest suspends: it must see the engine running
        while the daemon works, and say no (exit 1) once nothing runs DMA."""
        e = Edutest(uio_vm, "uio-busy")
        e.start("--irq", "msi")
        e.wait("transfers", 2)
        rc, out = uio_vm.run(f"edutest busy --dir {e.dir} --timeout 2")
        assert rc == 0 and _last_json(out)["dma_running"] is True, out
        rc, res = e.verify()
        _assert_clean(res, rc, e.log())
        rc, out = uio_vm.run(f"edutest busy --dir {e.dir} --timeout 0.5")
        assert rc == 1 and _last_json(out)["dma_running"] is False, out

    def test_msi_disabled_underneath_is_lost_on_edu_uio(self, uio_vm: GuestVM) -> None:
        _assert_msi_disabled_underneath_is_lost(Edutest(uio_vm, "uio-msi-off"), "uio")

    def test_msi_without_edu_uio_is_refused_clearly(self, uio_vm: GuestVM) -> None:
        hidden = "/run/edu_uio.ko.hidden"
        uio_vm.check(f"rmmod edu_uio 2>/dev/null; mv /lib/modules/*/extra/edu_uio.ko {hidden}")
        try:
            rc, out = uio_vm.run(f"edutest start --bdf {BDF} --dir /run/edu-nomsi --irq msi")
        finally:
            uio_vm.check(f"mv {hidden} /lib/modules/$(uname -r)/extra/edu_uio.ko")
        assert rc == 2
        assert "needs the edu_uio module" in out

    def test_usage_errors_exit_2(self, uio_vm: GuestVM) -> None:
        assert uio_vm.run("edutest verify --dir /run/nothing-here")[0] == 2
        rc, out = uio_vm.run(f"edutest start --bdf {BDF} --dir /run/x --size 4096")
        assert rc == 2 and "4095" in out

    def test_naive_uio_unmask_reproduces_one_interrupt(self, uio_vm: GuestVM) -> None:
        """docs/design.md §9: 'received 1 of 5'. The unmask via /dev/uioN is a no-op."""
        e = Edutest(uio_vm, "naive")
        e.start("--irq", "intx", "--naive-unmask", "--irq-timeout-ms", "300")
        e.wait("irq_lost", 4, timeout=60)
        rc, res = e.verify()
        _report("uio intx, naive unmask", res)
        assert rc == 1
        assert res["irq_received"] == 1
        assert res["irq_lost"] == res["irq_expected"] - 1
        assert res["irq_spurious"] == 0
        assert res["dma_mismatches"] == 0
        assert "ENOSYS" in e.log() or "not implemented" in e.log()

    def test_backing_file_corruption_is_caught(self, uio_vm: GuestVM) -> None:
        e = Edutest(uio_vm, "uio-hostcorrupt")
        e.start("--irq", "intx", "--slots", "64")
        e.wait("transfers", 4)
        gpa = int(e.ready()["slot_gpas"][1], 16)
        with open(uio_vm.ram, "r+b") as f:
            f.seek(gpa)
            old = f.read(1)
            f.seek(gpa)
            f.write(bytes([old[0] ^ 0xFF]))
        rc, res = e.verify()
        assert rc == 1 and res["dma_mismatches"] == 1
        assert res["first_mismatch"][0]["slot"] == 1 and res["first_mismatch"][0]["offset"] == 0


    def test_bme_cleared_without_suspend_is_lost(self, uio_vm: GuestVM) -> None:
        """BME cleared with no system suspend (what a host clearing it looks like from
        inside): counted in bme_lost with evidence, re-enabled, run continues, exit 1."""
        e = Edutest(uio_vm, "uio-bme")
        e.start("--irq", "intx", "--slots", "64")
        e.wait("transfers", 3)
        st: dict = {}
        for _ in range(4):  # our own INTx re-enable is a read-modify-write: retry a lost race
            _modify_command(uio_vm, clear=PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)
            with contextlib.suppress(AssertionError):
                st = e.wait("bme_lost", 1, timeout=20)
                break
        assert st.get("bme_lost", 0) >= 1, e.log()
        e.wait("transfers", st["transfers"] + 3)  # re-enabled, DMA lands again
        assert _read_command(uio_vm) & PCI_COMMAND_MASTER
        rc, res = e.verify()
        _report("uio intx, BME cleared underneath", res)
        assert rc == 1
        assert res["pass"] is False
        assert res["bme_lost"] >= 1
        assert res["pm_resume_reinits"] == 0 and res["suspends_seen"] == 0
        ev = [x for x in res["pci_events"] if x["kind"] == "bme-lost"]
        assert ev and int(ev[0]["cmd"], 16) & PCI_COMMAND_MASTER == 0
        assert int(ev[0]["cmd_after"], 16) & PCI_COMMAND_MASTER
        assert res["irq_lost"] == 0 and res["irq_expected"] == res["irq_received"]
        assert "BME LOST" in e.log()

    def test_intx_disabled_underneath_is_lost(self, uio_vm: GuestVM) -> None:
        """The harness's irq-drop fault in uio/INTx mode: INTx Disable set from outside.
        The next interrupt is never delivered and is counted lost (not silently
        repaired first); the loop then re-arms INTx and finishes."""
        e = Edutest(uio_vm, "uio-irqdrop")
        e.start("--irq", "intx", "--slots", "64", "--irq-timeout-ms", "1000")
        e.wait("transfers", 3)
        st: dict = {}
        for _ in range(4):
            _modify_command(uio_vm, set_=PCI_COMMAND_INTX_DISABLE)
            with contextlib.suppress(AssertionError):
                st = e.wait("irq_lost", 1, timeout=20)
                break
        assert st.get("irq_lost", 0) >= 1, e.log()
        e.wait("irq_received", st["irq_received"] + 4)  # re-armed: interrupts flow again
        rc, res = e.verify()
        _report("uio intx, INTx Disable set underneath", res)
        assert rc == 1
        assert res["pass"] is False
        assert res["irq_lost"] >= 1
        assert res["irq_expected"] == res["irq_received"] + res["irq_lost"]
        assert res["dma_mismatches"] == 0 and res["bme_lost"] == 0
        assert "LOST: no" in e.log()

    @pytest.mark.parametrize("irq", ["intx", "msi"])
    def test_suspend_resume_keeps_dma(self, uio_vm: GuestVM, irq: str) -> None:
        """echo mem > /sys/power/state, QMP system_wakeup. INTx (uio_pci_generic): the PCI core
        leaves BME off (edutest never made the kernel set is_busmaster); edutest re-enables it
        like a driver's resume and DMA keeps passing. MSI (edu_uio, which has PM callbacks):
        the PCI core restores the device itself, and no MSI or transfer is lost."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        e = Edutest(uio_vm, f"uio-s3-{irq}")
        e.start("--irq", irq, "--slots", "64")
        before = e.wait("transfers", 4)
        assert before["pm_resume_reinits"] == 0 and before["suspends_seen"] == 0
        assert "mem" in uio_vm.check("cat /sys/power/state")
        qmp = QEMUMonitorProtocol(str(uio_vm.qmp_path))
        qmp.connect()
        try:
            # Backgrounded with a delay so the shell's marker is read before the console sleeps.
            # As the harness does: suspend right after a DMA started, so that one is in flight.
            uio_vm.check(f"(sleep 1; fr-suspend edutest busy --dir {e.dir}) >/dev/null 2>&1 & true")
            suspended = False
            deadline = time.monotonic() + 60
            while not suspended and time.monotonic() < deadline:
                ev = None
                with contextlib.suppress(TimeoutError):  # pull_event raises when nothing came
                    ev = qmp.pull_event(wait=1.0)
                suspended = ev is not None and ev.get("event") == "SUSPEND"
                if not suspended:
                    suspended = qmp.cmd("query-status")["status"] == "suspended"
            assert suspended, "the guest never entered S3"
            time.sleep(3)  # asleep for a while, as across a cpr-reboot
            qmp.cmd("system_wakeup")
        finally:
            qmp.close()
        _resync_console(uio_vm)
        after_wake = e.wait("pm_resume_reinits" if irq == "intx" else "suspends_seen", 1, timeout=120)
        assert after_wake["bme_lost"] == 0, e.log()
        e.wait("transfers", after_wake["transfers"] + 8)
        assert _read_command(uio_vm) & PCI_COMMAND_MASTER
        rc, res = e.verify()
        _report(f"uio {irq}, suspend to RAM + system_wakeup", res)
        print("pci_events:", res["pci_events"], "pm_retried_transfers:", res["pm_retried_transfers"],
              "irq_resume_kicks:", res["irq_resume_kicks"])
        assert rc == 0, e.log()
        _assert_clean(res, rc, e.log())
        assert res["suspends_seen"] >= 1
        assert res["transfers"] >= after_wake["transfers"] + 8
        if irq == "intx":
            assert res["pm_resume_reinits"] >= 1
            assert "PM-RESUME" in e.log()
        else:  # the driver's PM callbacks kept the device: nothing for edutest to repair or redo
            assert res["pm_resume_reinits"] == 0 and res["pm_retried_transfers"] == 0, e.log()
            assert res["irq_resume_kicks"] == 0
            # edutest busy made a transfer be in flight, and edu_uio's suspend waited for it.
            assert "edu_uio: DMA in flight at suspend" in uio_vm.run("dmesg | grep 'edu_uio: DMA'")[1]

@pytest.mark.vm
@needs_qemu
class TestNoiommu:
    """vfio-pci in no-IOMMU mode, no vIOMMU: MSI and INTx, DMA to guest-physical addresses.

    Debian's kernels leave CONFIG_VFIO_NOIOMMU unset; only vfio.ko depends on it, so a
    rebuilt vfio.ko suffices. Recipe (about 2 minutes on 2 cores; needs flex bison
    libelf-dev libssl-dev bc and linux-source-6.12 of the *same* Debian version):

        tar xf linux-source-6.12.tar.xz && cd linux-source-6.12
        cp /boot/config-<ver> .config     # from the linux-image package
        scripts/config --enable VFIO_NOIOMMU --set-str SYSTEM_TRUSTED_KEYS "" \\
            --set-str SYSTEM_REVOCATION_KEYS "" --disable MODULE_SIG_ALL
        make olddefconfig && make -j2 modules_prepare KERNELRELEASE=<ver>
        cp <linux-headers-<ver>>/Module.symvers .
        make -j2 M=drivers/vfio modules KERNELRELEASE=<ver> KCFLAGS=-DCONFIG_DEBUG_INFO_BTF_MODULES=1

    KCFLAGS matters: without pahole, olddefconfig drops DEBUG_INFO_BTF_MODULES, which
    changes struct module's layout, and the kernel refuses the module ("Invalid
    relocation target, existing value is nonzero").
    """

    @pytest.mark.parametrize(("irq", "slots"), [("msi", 1024), ("intx", 8)])
    def test_clean_run(self, noiommu_vm: GuestVM, irq: str, slots: int) -> None:
        e = Edutest(noiommu_vm, f"noiommu-{irq}")
        ready = e.start("--irq", irq, "--slots", str(slots))
        assert ready["backend"] == "vfio-noiommu"
        e.wait("transfers", 20)
        rc, res = e.verify()
        _report(f"noiommu {irq}", res)
        _assert_clean(res, rc, e.log())
