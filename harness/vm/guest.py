"""The L2 guest: a QEMU process inside L1, described by device objects and driven from L0.

``L2Spec`` is its command line; ``L2Machine`` one QEMU generation, with the same lifecycle as L1's
``Machine`` (launch, shutdown, is_running, ``with``). Its console and QMP listen on TCP ports
inside L1, which L0's user networking forwards to 127.0.0.1 only. Two port sets exist so that,
with cpr-transfer, the new QEMU can listen while the old one still holds the first set.
"""

from __future__ import annotations

import shlex
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastrestart.errors import CheckFailed, ConsoleTimeout, StepError
from fastrestart.vm.console import Console, connect_tcp
from fastrestart.vm.devices import Device, IntelIommu, _props
from fastrestart.vm.machine import VirtualMachine
from fastrestart.vm.qmp import Qmp
from fastrestart.waits import wait_until

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
L2_QEMU_FATAL = r"kvm run failed|Aborted|core dumped|Assertion|Segmentation fault"
READY_L2 = r"FASTRESTART-L2-READY boot_id=(\S+) uptime=([\d.]+)"
CONSOLE_STALL_S = 120  # no READY by then while QEMU runs: the console stream may have stalled
QUIT_DEADLINE_S = 30  # a QEMU asked to quit that is still there by then is killed


class L2Machine(VirtualMachine):
    """One L2 QEMU generation: a process in L1 that L1's shell starts, its console and QMP reached
    from L0 through L1's forwarded ports (docs/design.md §4). Generations alternate between the
    two port sets (``ports`` = generation % 2), so that a new QEMU can listen while the old one
    still holds the other set (cpr-transfer).

    ``launch()`` = the L1 shell line (``start_command``: QEMU in the background, its PID, and its
    console listening) → console and QMP connected from L0 → (``wait_ready``) the guest's READY,
    reconnecting the console once if the stream stalls. ``connect=False`` stops after the shell
    line: cpr-transfer's incoming QEMU creates its chardevs only once the old QEMU has handed
    over, and ``connect()`` follows then. ``shutdown()`` = QMP ``quit`` (SIGTERM when QMP never
    came up) → wait in L1 for the process to leave → ``kill -9`` after the deadline; console, QMP
    and the console log are always closed. Its QEMU log stays in L1 under ``STATE_DIR/logs``
    (``Rig.collect_l1_logs`` copies it back).
    """

    def __init__(self, shell: Console, spec: L2Spec, generation: int, l0_console_port: int, l0_qmp_port: int,
                 log_dir: Path, *, incoming: list[str] | None = None, plug_vfio: bool = True, connect: bool = True,
                 wait_ready: bool | None = None, timeout: float = 300, ready: str = READY_L2,
                 console_stall_s: float = CONSOLE_STALL_S, qemu: str = "qemu-system-x86_64",
                 on_console: Callable[[Console], None] | None = None):
        super().__init__()
        self.shell = shell
        self.spec = spec
        self.generation = generation
        self.name = f"l2[{generation}]"
        self.ports = generation % 2
        self.l0_console_port = l0_console_port
        self.l0_qmp_port = l0_qmp_port
        self.log_dir = log_dir
        self.incoming = incoming
        self.plug_vfio = plug_vfio
        self.connects = connect
        self.waits_ready = incoming is None if wait_ready is None else wait_ready
        self.timeout = timeout
        self.ready = ready
        self.console_stall_s = console_stall_s
        self.qemu = qemu
        self.on_console = on_console
        self.log_path = f"{STATE_DIR}/logs/l2-qemu-{generation}.log"  # in L1
        self.pid: int | None = None
        self.log: IO[bytes] | None = None  # L2's console, on L0 (every generation appends to one file)
        self.console_reconnects = 0
        self._started = False  # the shell line that starts QEMU was sent

    # -- launch ----------------------------------------------------------------------------
    def args(self) -> list[str]:
        return self.spec.args(ports=self.ports, incoming=self.incoming, plug_vfio=self.plug_vfio)

    def _pre_launch(self) -> None:
        ram = self.spec.ram
        if ram.kind == "fsdax":
            self.shell.check(f"[ -e {ram.path} ] || {{ chroot /sysroot truncate -s {ram.size_mib}M {ram.path}; }}",
                             step="start-l2")
        (self.log_dir / f"l2-qemu-{self.generation}.cmdline").write_text(" ".join(self.args()) + "\n")
        self.log = (self.log_dir / "l2-console.log").open("ab", buffering=0)

    def _launch(self) -> None:
        command = start_command(self.qemu, self.args(), self.log_path, self.generation,
                                L1_CONSOLE_PORTS[self.ports] if self.connects else None, self.timeout)
        self._started = True
        output = self.shell.check(command, timeout=self.timeout + 30, step="start-l2")
        try:
            self.pid = parse_pid(output)
        except StepError as exc:
            exc.evidence["l2 qemu log"] = self.shell.run(f"tail -20 {self.log_path}", timeout=20)[1]
            raise

    def _post_launch(self) -> None:
        if self.connects:
            self.connect(check_listening=False)  # the shell line waited for the console to listen
        if self.waits_ready:
            self.wait_ready()

    def connect(self, check_listening: bool = True) -> None:
        """Connect L0 to this generation's console and QMP through L1's forwarded ports.

        L0's forwarder accepts before anything listens in L1, so first make sure, in L1, that the
        QEMU listens on its console port: a connection made earlier may be dropped later. (QMP is
        not awaited here: a first boot's QMP listens only once the console is connected, and the
        QMP client retries anyway.) A QEMU that dies meanwhile ends the QMP wait at once.
        """
        if check_listening:
            self.shell.run(wait_listening(L1_CONSOLE_PORTS[self.ports], self.timeout), timeout=self.timeout + 30)
        try:
            self._open_console(connect_tcp(self.l0_console_port, self.timeout))
            qmp = Qmp(("127.0.0.1", self.l0_qmp_port), self.log_dir / "qmp-transcript.jsonl", name=f"{self.name}-qmp")
            qmp.connect(self.timeout, give_up=self.fatal)
            self.qmp = qmp
        except Exception as exc:
            fatal = self.fatal()
            evidence = {"l2 qemu log": self.shell.run(f"tail -20 {self.log_path}")[1], "alive": self.is_running()}
            if fatal and self.generation > 0:
                # After a restart, a QEMU that stops its guest is what the run found, not a rig fault.
                raise CheckFailed("liveness", f"L2's new QEMU stopped the guest as it took over: {fatal}",
                                  evidence) from exc
            raise StepError("start-l2", f"L2 QEMU did not come up: {exc}", evidence) from exc

    def wait_ready(self) -> None:
        """Wait for L2's init to say it is ready; if the console stream stalls, reconnect it once.

        Seen here: L0 received the first byte of the READY line and then nothing, while the guest ran
        on and its QMP answered. A new connection to the same chardev gets a shell that answers.
        """
        first = min(self.timeout, self.console_stall_s)
        try:
            self.console.expect(self.ready, timeout=first, step="boot-l2")
        except ConsoleTimeout:
            if self.qmp.cmd("query-status", step="boot-l2", timeout=10)["status"] != "running":
                raise
            self.reconnect_console()
            try:  # a boot still under way: input typed before its shell starts would be mangled
                self.console.expect(self.ready, timeout=min(max(self.timeout - first, 30), 60), step="boot-l2")
            except ConsoleTimeout:
                pass  # the READY line went with the old stream; a shell that answers is the proof
            self.console.sync(timeout=60)
            return
        self.console.sync()

    def _open_console(self, sock: socket.socket) -> None:
        self.console = Console(self.name, sock, self.log)
        self.console.watchdog = self.stopped_guest
        if self.on_console is not None:
            self.on_console(self.console)

    def reconnect_console(self, timeout: float = 60) -> None:
        """A fresh connection to the same console chardev (what the guest wrote meanwhile is lost);
        counted in ``console_reconnects``."""
        self.console.close()
        self.log.write(b"\n[fastrestart: the console stream stalled; reconnected]\n")
        self._open_console(connect_tcp(self.l0_console_port, timeout))
        self.console_reconnects += 1

    # -- state -----------------------------------------------------------------------------
    def is_running(self) -> bool:
        """Whether the QEMU process is still there, as L1 sees it."""
        return self.pid is not None and self.shell.run(f"kill -0 {self.pid}", timeout=20)[0] == 0

    def stopped_guest(self) -> str:
        """Why this guest will never answer again, if its QEMU says so ('' otherwise)."""
        if self.qmp is None:
            return ""
        try:
            status = self.qmp.cmd("query-status", step="watchdog", timeout=10)["status"]
        except StepError:
            return ""  # QMP busy or gone: the caller's deadline decides
        return f"its QEMU reports runstate {status}" if status in DEAD_RUNSTATES else ""

    def fatal(self) -> str:
        """What this QEMU's log says killed its guest or itself ('' when nothing did)."""
        _, lines = self.shell.run(f"grep -E '{L2_QEMU_FATAL}' {self.log_path} | head -3 | cut -c1-300", timeout=20)
        if lines.strip():
            return "; ".join(lines.split("\n"))
        return "" if self.is_running() else "the QEMU process exited"

    # -- devices ---------------------------------------------------------------------------
    def unplug_vfio(self, step: str) -> list[str]:
        """Hot-unplug every assigned device, each confirmed by DEVICE_DELETED."""
        names = []
        for device in self.spec.vfio:
            since = len(self.qmp.events)
            self.qmp.cmd("device_del", step=step, id=device.name)
            self.qmp.wait_event("DEVICE_DELETED", timeout=60, step=step, since=since)
            names.append(device.name)
        return names

    def replug_vfio(self, step: str) -> list[str]:
        for device in self.spec.vfio:
            self.qmp.cmd("device_add", step=step, **device.device_add_args())
        return [d.name for d in self.spec.vfio]

    # -- shutdown --------------------------------------------------------------------------
    def quit(self, step: str, timeout: float = QUIT_DEADLINE_S) -> None:
        """``shutdown()`` that insists: a QEMU that had to be killed is a StepError of ``step``."""
        if not self.shutdown(timeout=timeout):
            raise StepError(step, f"L2 QEMU (pid {self.pid}) did not quit")

    def shutdown(self, hard: bool = False, timeout: float = QUIT_DEADLINE_S) -> bool:
        return super().shutdown(hard, timeout)

    def _soft_shutdown(self, timeout: float) -> bool:
        if not self._started:
            return True
        if self.pid is None:
            return False  # never told its PID: only the pidfile is left (_hard_shutdown)
        if self.qmp is not None:
            try:
                self.qmp.cmd("quit", step="shutdown", timeout=10)
            except StepError:
                pass  # the link may drop before the reply
        else:
            self.shell.run(f"kill -TERM {self.pid}", timeout=20)  # QEMU quits cleanly on SIGTERM
        try:
            return wait_until(lambda: None if self.is_running() else True, timeout=timeout, every=0.05,
                              failure=lambda: TimeoutError(f"{self.name} still runs"))
        except TimeoutError:
            return False

    def _hard_shutdown(self) -> None:
        if self._started:
            target = self.pid if self.pid is not None else f"$(cat /sysroot{pidfile(self.generation)} 2>/dev/null)"
            self.shell.run(f"kill -9 {target}", timeout=20)

    def _post_shutdown(self) -> None:
        self.close()

    def close(self) -> None:
        """Close L0's console and QMP connections and the console log, without stopping the QEMU
        (a teardown's: it goes with L1). Never raises; may run twice."""
        if self.qmp is not None:
            self.qmp.close()
        if self.console is not None:
            self.console.close()
        if self.log is not None:
            self.log.close()


L2 = L2Machine  # the name the checks' type hints use


def wait_listening(port: int, seconds: float, pid: str = "") -> str:
    """An L1 shell snippet that waits until something listens on a TCP port (or ``pid`` dies)."""
    alive = f" && kill -0 {pid} 2>/dev/null" if pid else ""
    return (f"i=0; while ! netstat -ltn 2>/dev/null | grep -q ':{port} ' && [ $i -lt {int(seconds * 10)} ]{alive}; "
            "do sleep 0.1; i=$((i+1)); done")


def pidfile(generation: int) -> str:
    """Where L2's QEMU of a generation writes its PID: inside the chroot; /sysroot{pidfile} outside."""
    return f"/run/l2-{generation}.pid"


def start_command(qemu: str, spec_args: list[str], log_path: str, generation: int,
                  wait_port: int | None = None, wait_s: float = 300) -> str:
    """The L1 shell line that starts L2's QEMU in the background, prints its PID and (optionally)
    waits until its console listens: all in one line, so no input reaches the shell while it is
    busy with a fresh background job.

    setsid keeps QEMU out of the console's session; since a background job leads its process
    group, busybox's setsid forks, so ``$!`` is not QEMU: QEMU's own -pidfile gives the PID.
    """
    pid = pidfile(generation)
    line = (f"rm -f /sysroot{pid}; setsid chroot /sysroot {qemu} {shlex.join(spec_args)} -pidfile {pid} "
            f">> {shlex.quote(log_path)} 2>&1 </dev/null & "
            f"i=0; while [ ! -s /sysroot{pid} ] && [ $i -lt {int(wait_s * 10)} ]; do sleep 0.1; i=$((i+1)); done; "
            f"p=$(cat /sysroot{pid} 2>/dev/null); echo L2PID=$p")
    return f"{line}; {wait_listening(wait_port, wait_s, '$p')}" if wait_port else line


def parse_pid(output: str) -> int:
    for line in output.splitlines():
        if line.startswith("L2PID=") and line.split("=", 1)[1].strip().isdigit():
            return int(line.split("=", 1)[1])
    raise StepError("start-l2", "the L1 shell did not report L2's PID", {"output": output})
