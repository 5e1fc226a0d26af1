"""The VM lifecycle both layers share (fastrestart.vm.machine.VirtualMachine): L2Machine against a fake
L1 shell, a fake QMP and a fake L2 console; L1's Machine against a process that is not QEMU. A launch
that breaks halfway, Ctrl-C included, leaves no QEMU and no open log, and re-raises what broke it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from fastrestart.errors import CheckFailed, ConsoleTimeout, StepError
from fastrestart.vm import guest, machine
from fastrestart.vm.guest import L2Machine, L2Spec, RamBackend, VfioPci

READY = b"FASTRESTART-L2-READY boot_id=0b0e uptime=1.50\r\n"


class FakeL1:
    """L1's shell as an L2Machine uses it (run/check), with the one L2 QEMU process it starts."""

    def __init__(self, pid: int = 4242, quits: bool = True, fatal: str = ""):
        self.pid, self.quits, self.fatal = pid, quits, fatal
        self.alive = False
        self.commands: list[str] = []
        self.interrupt: tuple[str, BaseException] | None = None  # raise this on a command containing that

    def run(self, cmd: str, timeout: float = 60, step: str = "console") -> tuple[int, str]:
        self.commands.append(cmd)
        if self.interrupt and self.interrupt[0] in cmd:
            raise self.interrupt[1]
        if "setsid chroot /sysroot" in cmd:
            self.alive = True
            return 0, f"L2PID={self.pid}"
        if cmd.startswith("kill -0"):
            return (0 if self.alive else 1), ""
        if cmd.startswith("kill -9") or (cmd.startswith("kill -TERM") and self.quits):
            self.alive = False
        elif cmd.startswith("grep -E"):
            return 0, self.fatal
        elif cmd.startswith("tail"):
            return 0, "qemu-system-x86_64: the last words"
        return 0, ""

    def check(self, cmd: str, timeout: float = 60, step: str = "console") -> str:
        rc, out = self.run(cmd, timeout, step)
        if rc:
            raise StepError(step, f"`{cmd}` exited {rc}")
        return out

    def sent(self, prefix: str) -> list[str]:
        return [c for c in self.commands if c.startswith(prefix)]


class FakeQmp:
    """L2's QMP seen from L0: it answers, and ``quit`` ends the L1 process (when it quits)."""

    l1: FakeL1
    fails = False  # connect() gives up
    runstate = "running"

    def __init__(self, address, transcript: Path, name: str = "qmp"):
        self.address, self.name = address, name
        self.events: list = []
        self.sent: list[str] = []
        self.closed = False

    def connect(self, timeout: float = 30, give_up=None) -> None:
        if FakeQmp.fails:
            raise StepError("qmp", f"{self.name}: gave up connecting: {give_up() if give_up else ''}")

    def cmd(self, name: str, step: str = "qmp", timeout: float = 180, **args):
        self.sent.append(name)
        if name == "quit" and FakeQmp.l1.quits:
            FakeQmp.l1.alive = False
        return {"status": FakeQmp.runstate} if name == "query-status" else {}

    def close(self) -> None:
        self.closed = True


class FakeL2Console(threading.Thread):
    """L2's serial console at the far end of L0's forward: optionally READY, then a shell that
    answers the console's marker protocol."""

    def __init__(self, sock: socket.socket, ready: bool = True):
        super().__init__(daemon=True)
        self.sock, self.ready = sock, ready

    def run(self) -> None:
        try:
            if self.ready:
                self.sock.sendall(READY)
            buffer = b""
            while data := self.sock.recv(4096):
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    start, rest = line.decode().split("; ", 1)
                    _, end = rest.rsplit("; ", 1)
                    begin, finish = start.split()[1].replace("''", ""), end.split()[1].replace("''", "")
                    self.sock.sendall(f"{begin}\r\n{finish} 0\r\n# ".encode())
        except OSError:
            pass


@pytest.fixture
def rig(tmp_path, monkeypatch):
    """A fake L1 and the forwards to it; ``rig.consoles`` says what each console connection does
    (True: READY then a shell; False: silent until spoken to)."""

    class Rig:
        def __init__(self) -> None:
            self.l1 = FakeL1()
            self.consoles: list[bool] = []
            self.opened: list[socket.socket] = []
            self.ports_asked: list[int] = []

        def machine(self, generation: int = 0, **options) -> L2Machine:
            spec = L2Spec(RamBackend("devdax", 256, "/dev/dax0.0"), vfio=[VfioPci("edu", "0000:00:04.0", 0)])
            return L2Machine(self.l1, spec, generation, 10000 + generation % 2, 20000 + generation % 2, tmp_path,
                             timeout=5, console_stall_s=0.5, **options)

    fake = Rig()

    def connect_tcp(port: int, timeout: float) -> socket.socket:
        fake.ports_asked.append(port)
        ours, theirs = socket.socketpair()
        FakeL2Console(theirs, fake.consoles.pop(0) if fake.consoles else True).start()
        fake.opened.append(ours)
        return ours

    FakeQmp.l1, FakeQmp.fails, FakeQmp.runstate = fake.l1, False, "running"
    monkeypatch.setattr(guest, "connect_tcp", connect_tcp)
    monkeypatch.setattr(guest, "Qmp", FakeQmp)
    return fake


def _closed(sock: socket.socket) -> bool:
    return sock.fileno() == -1


def test_launch_starts_in_l1_connects_through_the_forwards_and_waits_for_ready(rig, tmp_path):
    consoles = []
    l2 = rig.machine(generation=1, on_console=consoles.append).launch()
    start = rig.l1.commands[0]
    assert "setsid chroot /sysroot qemu-system-x86_64" in start and "-pidfile /run/l2-1.pid" in start
    assert ":5556 " in start  # the line itself waits for the console to listen, on generation 1's port set
    assert l2.pid == 4242 and l2.ports == 1 and rig.ports_asked == [10001]
    assert l2.qmp.address == ("127.0.0.1", 20001) and l2.is_running()
    assert consoles == [l2.console] and l2.console_reconnects == 0
    assert l2.log_path == "/mnt/state/logs/l2-qemu-1.log"
    assert (tmp_path / "l2-qemu-1.cmdline").read_text().startswith("-name l2 ")
    assert b"FASTRESTART-L2-READY" in (tmp_path / "l2-console.log").read_bytes()
    with pytest.raises(RuntimeError, match="launched already"):
        l2.launch()

    assert l2.shutdown() is True  # QMP quit, and the process left by itself
    assert "quit" in l2.qmp.sent and rig.l1.sent("kill -9") == []
    assert l2.qmp.closed and _closed(rig.opened[0]) and l2.log.closed


def test_a_launch_that_fails_halfway_leaves_no_qemu_and_re_raises(rig):
    FakeQmp.fails = True
    l2 = rig.machine()
    with pytest.raises(StepError, match="L2 QEMU did not come up") as caught:
        l2.launch()
    assert caught.value.evidence["alive"] is True  # the evidence is taken before the cleanup
    assert "the last words" in caught.value.evidence["l2 qemu log"]
    # QMP never came up: SIGTERM in L1, which it obeyed; console and log closed.
    assert rig.l1.sent("kill -TERM 4242") and not rig.l1.alive
    assert _closed(rig.opened[0]) and l2.log.closed


def test_a_qemu_that_stopped_its_guest_after_a_restart_is_a_liveness_fail(rig):
    FakeQmp.fails = True
    rig.l1.fatal = "error: kvm run failed Bad address"
    with pytest.raises(CheckFailed, match="stopped the guest as it took over: error: kvm run failed") as caught:
        rig.machine(generation=1).launch()
    assert caught.value.check == "liveness"
    with pytest.raises(StepError, match="did not come up"):  # on a first boot: the rig's
        rig.machine(generation=0).launch()


@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), machine.Terminated(15)])
def test_an_interruption_while_waiting_for_ready_stops_l2_and_is_re_raised_as_it_is(rig, monkeypatch, interruption):
    def interrupted(self):
        raise interruption

    monkeypatch.setattr(L2Machine, "wait_ready", interrupted)
    l2 = rig.machine()
    with pytest.raises(type(interruption)) as caught:
        l2.launch()
    assert caught.value is interruption
    assert "quit" in l2.qmp.sent and l2.qmp.closed and not rig.l1.alive and l2.log.closed


def test_an_interruption_during_the_shell_line_kills_by_the_pidfile(rig):
    rig.l1.interrupt = ("setsid chroot", KeyboardInterrupt())
    l2 = rig.machine(generation=3)
    with pytest.raises(KeyboardInterrupt):
        l2.launch()
    assert l2.pid is None and rig.l1.sent("kill -9 $(cat /sysroot/run/l2-3.pid")
    assert l2.console is None and l2.log.closed


def test_a_stalled_console_is_reconnected_once_while_qemu_runs(rig, tmp_path):
    rig.consoles = [False, True]  # the first stream never shows READY
    l2 = rig.machine().launch()
    assert l2.console_reconnects == 1 and rig.ports_asked == [10000, 10000]
    assert _closed(rig.opened[0]) and not _closed(rig.opened[1])
    assert b"reconnected" in (tmp_path / "l2-console.log").read_bytes()
    l2.shutdown()


def test_no_ready_from_a_stopped_guest_is_not_retried(rig):
    rig.consoles = [False]
    FakeQmp.runstate = "internal-error"
    l2 = rig.machine()
    with pytest.raises(ConsoleTimeout):
        l2.launch()
    assert l2.console_reconnects == 0 and len(rig.opened) == 1 and l2.log.closed


def test_an_incoming_qemu_connects_later_after_it_listens(rig):
    l2 = rig.machine(generation=1, incoming=["defer"], connect=False).launch()
    assert ":5556 " not in rig.l1.commands[0] and l2.console is None and l2.qmp is None
    l2.connect()
    assert "netstat -ltn" in rig.l1.commands[-1] and ":5556 " in rig.l1.commands[-1]
    assert l2.console is not None and l2.qmp is not None


def test_quit_insists_a_qemu_that_had_to_be_killed_is_a_step_error(rig):
    l2 = rig.machine().launch()
    rig.l1.quits = False
    with pytest.raises(StepError, match=r"L2 QEMU \(pid 4242\) did not quit") as caught:
        l2.quit(step="save", timeout=0.2)
    assert caught.value.step == "save" and rig.l1.sent("kill -9 4242") and l2.qmp.closed and l2.log.closed


def test_the_context_manager_shuts_down_and_an_error_inside_stands(rig):
    with rig.machine() as l2:
        assert l2.is_running()
    assert not rig.l1.alive and l2.log.closed
    # The shutdown fails too (L1's shell is gone): the error that ended the block is the one seen.
    with pytest.raises(ValueError, match="inside"), rig.machine(generation=1) as l2:
        rig.l1.interrupt = ("kill -0", StepError("console", "L1's shell is gone"))
        raise ValueError("inside")
    assert l2.log.closed


def test_devices_come_and_go_by_the_spec(rig):
    l2 = rig.machine().launch()
    assert l2.replug_vfio(step="resume") == ["edu"]
    assert l2.qmp.sent[-1] == "device_add"


# -- L1's Machine ----------------------------------------------------------------------------------

def test_an_l1_launch_that_fails_stops_the_process_and_closes_its_logs(tmp_path):
    vm = machine.Machine("unit-l1", ["sh", "-c", "sleep 30", "qemu"], [], tmp_path, connect_timeout=0.3)
    with pytest.raises(StepError, match="console socket never appeared"):
        vm.launch()
    assert not vm.is_running() and vm.proc.returncode is not None and vm.proc not in machine._children
    assert (tmp_path / "unit-l1-qemu.cmdline").exists() and not vm._sockets.exists()


def test_an_interrupted_l1_launch_re_raises_the_interruption(tmp_path, monkeypatch):
    def interrupted(path, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(machine, "connect_unix", interrupted)
    vm = machine.Machine("unit-l1", ["sh", "-c", "sleep 30", "qemu"], [], tmp_path)
    with pytest.raises(KeyboardInterrupt):
        vm.launch()
    assert not vm.is_running()
