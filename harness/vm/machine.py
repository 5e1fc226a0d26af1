"""The L1 machine: a QEMU process on L0, with an explicit lifecycle.

``with Machine(...) as vm:`` guarantees shutdown on every exit path. On top of that, every QEMU
the harness starts is killed by the kernel if the harness itself dies (PR_SET_PDEATHSIG), and
SIGTERM/SIGHUP are turned into exceptions so that ``finally`` blocks run and logs are kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

from fastrestart.errors import StepError
from fastrestart.paths import socket_dir
from fastrestart.vm.console import Console, connect_unix
from fastrestart.vm.qmp import Qmp

PR_SET_PDEATHSIG = 1
_children: set[subprocess.Popen] = set()


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGKILL when the harness dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgrp()  # a Ctrl-C in the terminal reaches the harness, which then shuts QEMU down itself


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwind like KeyboardInterrupt so that teardown and logs happen."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def interruption(exc: BaseException) -> tuple[str, int] | None:
    """(what interrupted the run, the exit code a shell expects) for an exception that is an
    interruption rather than a failure: Ctrl-C, SIGTERM/SIGHUP, a test runner's timeout. None for
    anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT", 128 + signal.SIGINT
    if isinstance(exc, Terminated):
        return signal.Signals(exc.signum).name, 128 + exc.signum
    if isinstance(exc, (Exception, GeneratorExit)):
        return None
    # pytest-timeout's Failed, SystemExit: a BaseException that is not an error of the run.
    return f"{type(exc).__name__} ({str(exc).splitlines()[0] if str(exc) else 'no message'})", 128 + signal.SIGTERM


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP while the body runs (e.g. writing a verdict), so that a
    second Ctrl-C cannot leave a half-written result; a held signal is delivered right after."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def install_signal_handlers() -> None:
    """Turn SIGINT into KeyboardInterrupt and SIGTERM/SIGHUP into Terminated (idempotent).

    SIGINT is set explicitly: a parent that ignores it (a background job of a script, a test
    runner's worker) would otherwise pass SIG_IGN on, and Python then never raises
    KeyboardInterrupt, so `timeout -s INT` could not stop the harness.
    """

    def handler(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, handler)


def kill_all_children() -> None:
    """Last resort, e.g. from atexit: no QEMU started by this process survives it."""
    for proc in list(_children):
        _stop(proc, grace=0)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        if grace:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _children.discard(proc)


class Machine:
    """A QEMU virtual machine on L0 with its serial console and QMP.

    ``launch()`` = prepare sockets → Popen → connect console → connect QMP.
    ``shutdown()`` tries QMP ``quit``, then SIGTERM, then SIGKILL, and always closes logs.
    """

    def __init__(self, name: str, qemu: list[str], args: list[str], log_dir: Path):
        self.name = name
        self.qemu = qemu
        self.args = args
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.console: Console | None = None
        self.qmp: Qmp | None = None
        self._sockets = socket_dir(name)
        self._console_log = None
        self._stderr = None

    @property
    def command(self) -> list[str]:
        return [*self.qemu, *self.args,
                "-chardev", f"socket,id=console0,path={self._sockets / 'console'},server=on,wait=on",
                "-serial", "chardev:console0",
                "-qmp", f"unix:{self._sockets / 'qmp'},server=on,wait=off",
                # The PID beside the logs: it also puts the run directory on QEMU's command line,
                # which is how a leaked QEMU is traced back to its run.
                "-pidfile", str(self.log_dir / f"{self.name}-qemu.pid")]

    def launch(self, timeout: float = 30) -> Machine:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / f"{self.name}-qemu.cmdline").write_text(shlex.join(self.command) + "\n")
        self._stderr = (self.log_dir / f"{self.name}-qemu.log").open("ab")
        self._console_log = (self.log_dir / f"{self.name}-console.log").open("ab", buffering=0)
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        _children.add(self.proc)
        try:
            sock = connect_unix(self._sockets / "console", timeout)
        except OSError as exc:
            raise self._launch_error(f"console socket never appeared: {exc}") from exc
        self.console = Console(self.name, sock, self._console_log)
        self.qmp = Qmp(str(self._sockets / "qmp"), self.log_dir / "qmp-transcript.jsonl", name=f"{self.name}-qmp")
        try:
            self.qmp.connect(timeout)
        except StepError as exc:
            raise self._launch_error(str(exc)) from exc
        return self

    def _launch_error(self, why: str) -> StepError:
        time.sleep(0.2)
        exit_code = self.proc.poll() if self.proc else None
        output = (self.log_dir / f"{self.name}-qemu.log").read_text(errors="replace")[-3000:]
        return StepError("launch", f"{self.name} QEMU did not start: {why}",
                         {"command": shlex.join(self.command), "exit code": exit_code, "qemu output": output})

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def shutdown(self, timeout: float = 10) -> None:
        """Stop QEMU however it can be stopped; never raises."""
        if self.qmp is not None and self.is_running():
            with contextlib.suppress(Exception):
                self.qmp.cmd("quit", timeout=3)
        if self.qmp is not None:
            self.qmp.close()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
            _stop(self.proc, grace=3)
        if self.console is not None:
            self.console.close()
        for log in (self._console_log, self._stderr):
            if log is not None:
                log.close()
        for path in self._sockets.glob("*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._sockets.rmdir()

    def __enter__(self) -> Machine:
        return self.launch()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
