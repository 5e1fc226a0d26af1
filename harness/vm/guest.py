"""The L2 guest: a QEMU process inside L1, described by device objects and driven from L0.

Its console and QMP listen on TCP ports inside L1, which L0's user networking forwards to
127.0.0.1 only. Two port sets exist so that, with cpr-transfer, the new QEMU can listen while
the old one still holds the first set.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastrestart.errors import StepError
from fastrestart.vm.console import Console, connect_tcp
from fastrestart.vm.devices import Device, IntelIommu, _props
from fastrestart.vm.qmp import Qmp

L1_QMP_PORTS = (4444, 4445)
L1_CONSOLE_PORTS = (5555, 5556)
STATE_DIR = "/mnt/state"  # the state region, mounted fsdax in L1; same path in and out of chroot


@dataclass
class RamBackend(Device):
    """Where L2's RAM lives. ``kind``: devdax (a /dev/daxX.Y node), fsdax (a file on a DAX mount),
    memfd (anonymous shared memory; for cpr-transfer, which keeps it by passing the fd), luo (a
    memfd that an L1 helper holds and LUO keeps across the kexec, mapped through its
    /proc/<pid>/fd/<n> path) or ram (plain private RAM, for the RAM-copying comparison)."""

    kind: str
    size_mib: int
    path: str = ""

    def args(self) -> list[str]:
        size = f"{self.size_mib}M"
        if self.kind == "devdax":
            backend = _props("memory-backend-file", id="mem", size=size, mem_path=self.path, align="2M",
                             share=True)
        elif self.kind in ("fsdax", "luo"):
            backend = _props("memory-backend-file", id="mem", size=size, mem_path=self.path, share=True)
        elif self.kind == "memfd":
            backend = _props("memory-backend-memfd", id="mem", size=size, share=True)
        else:
            backend = _props("memory-backend-ram", id="mem", size=size)
        return ["-object", backend]


@dataclass
class VfioPci(Device):
    """A device L1 owns through vfio-pci, behind its own PCIe root port in L2 (hot-pluggable)."""

    name: str
    host: str
    port: int

    @property
    def root_port(self) -> str:
        return f"rp-{self.name}"

    def port_args(self) -> list[str]:
        return ["-device", _props("pcie-root-port", id=self.root_port, chassis=self.port + 1, slot=self.port,
                                  addr=f"{0x10 + self.port:#x}")]

    def device_add_args(self) -> dict:
        return {"driver": "vfio-pci", "host": self.host, "bus": self.root_port, "id": self.name}

    def args(self) -> list[str]:
        return [*self.port_args(), "-device", _props("vfio-pci", host=self.host, bus=self.root_port, id=self.name)]


@dataclass
class L2Spec:
    """Everything that defines L2's QEMU command line (identical before and after a restart)."""

    ram: RamBackend
    kernel: str = "/boot/l2/vmlinuz"
    initrd: str = "/boot/l2/initrd"
    append: str = "console=ttyS0 quiet panic=-1 mitigations=off"
    vfio: list[VfioPci] = field(default_factory=list)
    allow_s3: bool = False
    aux_ram_share: bool = False
    viommu: bool = False  # L2's own intel-iommu: its devices then use vfio-pci and MSI inside L2
    cpus: int = 1

    def args(self, ports: int = 0, incoming: list[str] | None = None, plug_vfio: bool = True) -> list[str]:
        # A first boot waits for the console client so that no boot message is lost; an incoming
        # QEMU must not wait (cpr-transfer creates chardevs only once the old QEMU has connected).
        machine = _props("q35", memory_backend="mem", aux_ram_share=True if self.aux_ram_share else None,
                         kernel_irqchip="split" if self.viommu else None)  # intremap needs the split irqchip
        append = self.append + (" intel_iommu=on" if self.viommu else "")
        args = ["-name", "l2", "-machine", machine, "-accel", "kvm", "-cpu", "host", "-smp", str(self.cpus),
                "-m", f"{self.ram.size_mib}M", "-nodefaults", "-no-user-config", "-display", "none",
                *self.ram.args(), "-kernel", self.kernel, "-initrd", self.initrd, "-append", append,
                "-chardev", f"socket,id=con0,host=0.0.0.0,port={L1_CONSOLE_PORTS[ports]},server=on,"
                            f"wait={'off' if incoming else 'on'}",
                "-serial", "chardev:con0",
                "-qmp", f"tcp:0.0.0.0:{L1_QMP_PORTS[ports]},server=on,wait=off"]
        if self.allow_s3:
            args += ["-global", "ICH9-LPC.disable_s3=0"]
        if self.viommu:  # before the devices it translates for
            args += IntelIommu().args()
        for device in self.vfio:
            args += device.args() if plug_vfio else device.port_args()
        for spec in incoming or []:
            args += ["-incoming", spec]
        return args


DEAD_RUNSTATES = ("internal-error", "guest-panicked", "shutdown", "io-error")


class L2:
    """A running (or about to run) L2 QEMU generation: its PID in L1, console and QMP from L0."""

    def __init__(self, generation: int, pid: int, ports: int, log: IO[bytes], run_dir: Path):
        self.generation = generation
        self.pid = pid
        self.ports = ports
        self.log = log
        self.run_dir = run_dir
        self.console: Console | None = None
        self.qmp: Qmp | None = None
        self.log_path = ""
        self.console_reconnects = 0

    def connect(self, l0_console_port: int, l0_qmp_port: int, timeout: float = 60,
                give_up: Callable[[], str] | None = None) -> None:
        sock = connect_tcp(l0_console_port, timeout)
        self.console = Console(f"l2[{self.generation}]", sock, self.log)
        self.console.watchdog = self.stopped_guest
        self.connect_qmp(l0_qmp_port, timeout, give_up)

    def reconnect_console(self, l0_console_port: int, timeout: float = 60) -> None:
        """A fresh connection to the same console chardev (what the guest wrote meanwhile is lost)."""
        self.console.close()
        self.log.write(b"\n[fastrestart: the console stream stalled; reconnected]\n")
        self.console = Console(f"l2[{self.generation}]", connect_tcp(l0_console_port, timeout), self.log)
        self.console.watchdog = self.stopped_guest

    def stopped_guest(self) -> str:
        """Why this guest will never answer again, if its QEMU says so ('' otherwise)."""
        if self.qmp is None:
            return ""
        try:
            status = self.qmp.cmd("query-status", step="watchdog", timeout=10)["status"]
        except StepError:
            return ""  # QMP busy or gone: the caller's deadline decides
        return f"its QEMU reports runstate {status}" if status in DEAD_RUNSTATES else ""

    def connect_qmp(self, l0_qmp_port: int, timeout: float = 60, give_up: Callable[[], str] | None = None) -> None:
        self.qmp = Qmp(("127.0.0.1", l0_qmp_port), self.run_dir / "qmp-transcript.jsonl",
                       name=f"l2[{self.generation}]-qmp")
        self.qmp.connect(timeout, give_up)

    def close(self) -> None:
        if self.qmp:
            self.qmp.close()
        if self.console:
            self.console.close()


def wait_listening(port: int, seconds: float, pid: str = "") -> str:
    """An L1 shell snippet that waits until something listens on a TCP port (or ``pid`` dies)."""
    alive = f" && kill -0 {pid} 2>/dev/null" if pid else ""
    return (f"i=0; while ! netstat -ltn 2>/dev/null | grep -q ':{port} ' && [ $i -lt {int(seconds * 10)} ]{alive}; "
            "do sleep 0.1; i=$((i+1)); done")


def start_command(qemu: str, spec_args: list[str], log_path: str, generation: int,
                  wait_port: int | None = None, wait_s: float = 300) -> str:
    """The L1 shell line that starts L2's QEMU in the background, prints its PID and (optionally)
    waits until its console listens: all in one line, so no input reaches the shell while it is
    busy with a fresh background job.

    setsid keeps QEMU out of the console's session; since a background job leads its process
    group, busybox's setsid forks, so ``$!`` is not QEMU: QEMU's own -pidfile gives the PID.
    """
    pidfile = f"/run/l2-{generation}.pid"  # inside the chroot; /sysroot{pidfile} outside
    line = (f"rm -f /sysroot{pidfile}; setsid chroot /sysroot {qemu} {shlex.join(spec_args)} -pidfile {pidfile} "
            f">> {shlex.quote(log_path)} 2>&1 </dev/null & "
            f"i=0; while [ ! -s /sysroot{pidfile} ] && [ $i -lt {int(wait_s * 10)} ]; do sleep 0.1; i=$((i+1)); done; "
            f"p=$(cat /sysroot{pidfile} 2>/dev/null); echo L2PID=$p")
    return f"{line}; {wait_listening(wait_port, wait_s, '$p')}" if wait_port else line


def parse_pid(output: str) -> int:
    for line in output.splitlines():
        if line.startswith("L2PID=") and line.split("=", 1)[1].strip().isdigit():
            return int(line.split("=", 1)[1])
    raise StepError("start-l2", "the L1 shell did not report L2's PID", {"output": output})
