"""The VM lifecycle both layers share, and the L1 machine: a QEMU process on L0.

``VirtualMachine`` is the lifecycle (launch = pre-launch → start → post-launch; shutdown = soft
quit, then a hard kill, and logs always closed); ``Machine`` is L1 on L0, and
``fastrestart.vm.guest.L2Machine`` is L2 inside L1. ``with Machine(...) as vm:`` guarantees
shutdown on every exit path. On top of that, every QEMU the harness starts is killed by the
kernel if the harness itself dies (PR_SET_PDEATHSIG), and SIGTERM/SIGHUP are turned into
exceptions so that ``finally`` blocks run and logs are kept.
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
from typing import Self

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


class VirtualMachine:
    """The lifecycle both layers share, after QEMU's own python/qemu/machine ``QEMUMachine``.

    ``launch()`` = ``_pre_launch`` (logs, files) → ``_launch`` (start the process) → ``_post_launch``
    (connect console and QMP, wait for the guest). If any part raises, Ctrl-C and SIGTERM
    included, the VM is shut down and the exception re-raised as it was (not wrapped).
    ``shutdown()`` = ``_soft_shutdown`` (ask QEMU to quit and wait for it), ``_hard_shutdown`` (kill)
    when that was not enough, and always ``_post_shutdown`` (console, QMP and logs closed). It
    returns whether the VM left by itself. ``with vm:`` launches and shuts down.
    """

    name = "vm"
    LAUNCH_CLEANUP_S = 10.0  # how long the cleanup of a failed launch waits for a soft quit

    def __init__(self) -> None:
        self.console: Console | None = None
        self.qmp: Qmp | None = None
        self._launched = False

    # -- what a layer implements -------------------------------------------------------------
    def _pre_launch(self) -> None:
        """Prepare files and logs; nothing runs yet."""

    def _launch(self) -> None:
        raise NotImplementedError

    def _post_launch(self) -> None:
        """Connect to the running QEMU (and wait for its guest, where the layer does)."""

    def _soft_shutdown(self, timeout: float) -> bool:
        """Ask QEMU to quit and wait up to ``timeout``; True when it is gone (or never ran)."""
        raise NotImplementedError

    def _hard_shutdown(self) -> None:
        """Kill QEMU."""
        raise NotImplementedError

    def _post_shutdown(self) -> None:
        """Close console, QMP and logs; never raises, may run twice."""

    def is_running(self) -> bool:
        raise NotImplementedError

    # -- the lifecycle ---------------------------------------------------------------------
    def launch(self) -> Self:
        if self._launched:
            raise RuntimeError(f"{self.name} was launched already; a VM object runs once")
        self._launched = True
        try:
            self._pre_launch()
            self._launch()
            self._post_launch()
        except BaseException:
            # Whatever broke (or interrupted) the launch: no QEMU and no open log is left behind,
            # and the caller sees the exception it would have seen without the cleanup.
            with contextlib.suppress(Exception):
                self.shutdown(timeout=self.LAUNCH_CLEANUP_S)
            raise
        return self

    def shutdown(self, hard: bool = False, timeout: float = 10) -> bool:
        """Stop QEMU however it can be stopped, and always close its console, QMP and logs.

        True when QEMU left by itself, False when it had to be killed. Raises only what the layer's
        own way of stopping raises (L2: L1's shell failing), after the logs are closed."""
        try:
            if not hard and self._soft_shutdown(timeout):
                return True
            self._hard_shutdown()
            return False
        finally:
            self._post_shutdown()

    def __enter__(self) -> Self:
        return self.launch()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self.shutdown()
        except Exception:
            if exc_type is None:
                raise  # otherwise the exception that ends the block stands


class Machine(VirtualMachine):
    """A QEMU virtual machine on L0 (L1) with its serial console and QMP on UNIX sockets.

    ``launch()`` = prepare sockets and logs → Popen → connect console → connect QMP.
    ``shutdown()`` tries QMP ``quit``, then SIGTERM, then SIGKILL, and always closes logs; it never
    raises.
    """

    def __init__(self, name: str, qemu: list[str], args: list[str], log_dir: Path, connect_timeout: float = 30):
        super().__init__()
        self.name = name
        self.qemu = qemu
        self.args = args
        self.log_dir = log_dir
        self.connect_timeout = connect_timeout
        self.proc: subprocess.Popen | None = None
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

    def _pre_launch(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / f"{self.name}-qemu.cmdline").write_text(shlex.join(self.command) + "\n")
        self._stderr = (self.log_dir / f"{self.name}-qemu.log").open("ab")
        self._console_log = (self.log_dir / f"{self.name}-console.log").open("ab", buffering=0)

    def _launch(self) -> None:
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        _children.add(self.proc)

    def _post_launch(self) -> None:
        try:
            sock = connect_unix(self._sockets / "console", self.connect_timeout)
        except OSError as exc:
            raise self._launch_error(f"console socket never appeared: {exc}") from exc
        self.console = Console(self.name, sock, self._console_log)
        qmp = Qmp(str(self._sockets / "qmp"), self.log_dir / "qmp-transcript.jsonl", name=f"{self.name}-qmp")
        try:
            qmp.connect(self.connect_timeout)
        except StepError as exc:
            raise self._launch_error(str(exc)) from exc
        self.qmp = qmp

    def _launch_error(self, why: str) -> StepError:
        time.sleep(0.2)
        exit_code = self.proc.poll() if self.proc else None
        output = (self.log_dir / f"{self.name}-qemu.log").read_text(errors="replace")[-3000:]
        return StepError("launch", f"{self.name} QEMU did not start: {why}",
                         {"command": shlex.join(self.command), "exit code": exit_code, "qemu output": output})

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _soft_shutdown(self, timeout: float) -> bool:
        """QMP ``quit``, then SIGTERM (QEMU exits cleanly on it) with a short grace."""
        if self.proc is None:
            return True
        if self.qmp is not None and self.is_running():
            with contextlib.suppress(Exception):
                self.qmp.cmd("quit", timeout=3)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.is_running():
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(3)
        return not self.is_running()

    def _hard_shutdown(self) -> None:
        if self.proc is not None:
            _stop(self.proc, grace=0)

    def _post_shutdown(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.proc is not None and not self.is_running():
            _children.discard(self.proc)
        if self.console is not None:
            self.console.close()
        for log in (self._console_log, self._stderr):
            if log is not None:
                log.close()
        for path in self._sockets.glob("*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._sockets.rmdir()
