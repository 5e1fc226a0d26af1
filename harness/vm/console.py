"""One console API for both layers: ``run(cmd) -> (rc, output)`` and ``expect(ok, fail=...)``.

The transport is a connected socket (L1's serial chardev on L0, L2's serial forwarded through
L1); pexpect drives it. Every byte read goes to the layer's log file. A kernel panic fails any
wait at once, with the panic text, instead of waiting out the deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pexpect
import pexpect.fdpexpect
from fastrestart.errors import ConsoleTimeout, GuestPanic, StepError
from fastrestart.waits import wait_until

WATCHDOG_S = 10
PANIC = re.compile(r"Kernel panic - not syncing[^\r\n]*|Attempted to kill init[^\r\n]*")


class Console:
    """A shell on a serial line, with marker-delimited commands."""

    _ids = itertools.count(1)

    def __init__(self, name: str, sock: socket.socket, log: IO[bytes]):
        self.name = name
        self.sock = sock
        self.log = log
        self.child = pexpect.fdpexpect.fdspawn(sock.fileno(), timeout=30, maxread=65536,
                                               encoding="utf-8", codec_errors="replace")
        self.child.logfile_read = _TextTee(log)
        self.history: list[tuple[float, float, int, str]] = []  # (start, seconds, rc, command)
        # Asked every WATCHDOG_S during a long wait why waiting is pointless (e.g. the VM stopped
        # its guest); a non-empty answer ends the wait at once.
        self.watchdog: Callable[[], str] | None = None

    # -- waiting -------------------------------------------------------------------------
    def expect(self, ok: str | list[str], fail: str | list[str] | None = None,
               timeout: float = 30, step: str = "console") -> re.Match:
        """Wait for ``ok``; raise at once on ``fail`` or a kernel panic; raise at the deadline."""
        oks = [ok] if isinstance(ok, str) else list(ok)
        fails = [] if fail is None else [fail] if isinstance(fail, str) else list(fail)
        patterns = [re.compile(p) for p in oks] + [re.compile(p) for p in fails] + [
            PANIC, pexpect.EOF, pexpect.TIMEOUT]
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(deadline - time.monotonic(), 0)
            index = self.child.expect(patterns, timeout=min(remaining, WATCHDOG_S) if self.watchdog else remaining)
            if patterns[index] is not pexpect.TIMEOUT or not self.watchdog or time.monotonic() >= deadline:
                break
            why = self.watchdog()
            if why:
                raise ConsoleTimeout(f"{self.name}: stopped waiting for {oks} (step {step}): {why}\n"
                                     f"console tail:\n{self.tail()}")
        if index < len(oks):
            return self.child.match
        if index < len(oks) + len(fails):
            raise StepError(step, f"{self.name}: failure pattern seen: {self.child.match.group(0)!r}",
                            {"console tail": self.tail()})
        if patterns[index] is PANIC:
            panic = self.child.match.group(0)
            with contextlib.suppress(Exception):  # let the rest of the panic text arrive, for the evidence
                self.child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=2)
            raise GuestPanic(f"{self.name}: kernel panic: {panic}\n{self.tail()}")
        if patterns[index] is pexpect.EOF:
            raise StepError(step, f"{self.name}: console closed while waiting for {oks}",
                            {"console tail": self.tail()})
        raise ConsoleTimeout(f"{self.name}: no {oks} within {timeout:.0f} s (step {step})\n"
                             f"console tail:\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        text = (self.child.before or "") if isinstance(self.child.before, str) else ""
        return "\n".join(text.splitlines()[-lines:])

    # -- commands ------------------------------------------------------------------------
    def run(self, cmd: str, timeout: float = 60, step: str = "console") -> tuple[int, str]:
        """Run one shell command line and return its exit code and output."""
        n = next(self._ids)
        started = time.time()
        # The quotes split the markers in the echoed command line, so only the output matches.
        self.child.sendline(f"echo __FRS{n}''__; {cmd}; echo __FRE{n}''__ $?")
        self.expect(rf"__FRS{n}__\r?\n", timeout=timeout, step=step)
        match = self.expect(rf"__FRE{n}__ (\d+)\r?\n", timeout=timeout, step=step)
        output = self.child.before.replace("\r\n", "\n").replace("\r", "")
        self.history.append((started, time.time() - started, int(match.group(1)), cmd))
        return int(match.group(1)), output.rstrip("\n")

    def check(self, cmd: str, timeout: float = 60, step: str = "console") -> str:
        """Run a command that must succeed; its failure is a StepError with the evidence."""
        rc, output = self.run(cmd, timeout=timeout, step=step)
        if rc != 0:
            raise StepError(step, f"{self.name}: `{cmd}` exited {rc}", {"output": output[-3000:]})
        return output

    def send(self, line: str) -> None:
        """Send a line without waiting (for commands that block, e.g. suspend)."""
        self.child.sendline(line)

    def sync(self, timeout: float = 10) -> None:
        """Make sure a shell is answering (after a reconnect)."""
        self.run("true", timeout=timeout, step="console-sync")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _TextTee:
    """pexpect logs str; the layer log is binary so that it never fails on odd bytes."""

    def __init__(self, sink: IO[bytes]):
        self.sink = sink

    def write(self, text: str) -> None:
        try:
            self.sink.write(text.encode("utf-8", "replace"))
        except ValueError:
            pass  # log closed during teardown

    def flush(self) -> None:
        try:
            self.sink.flush()
        except ValueError:
            pass


def connect_unix(path: Path, timeout: float) -> socket.socket:
    """Connect to a UNIX socket that is about to appear."""
    last: list[OSError] = []

    def attempt() -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError as exc:
            sock.close()
            last[:] = [exc]
            return None

    return wait_until(attempt, timeout=timeout, every=0.05,
                      failure=lambda: last[0] if last else TimeoutError(f"{path} never appeared"))


def connect_tcp(port: int, timeout: float, settle: float = 0.3) -> socket.socket:
    """Connect to a port forwarded by QEMU user networking.

    The forwarder accepts at once even when nothing listens in the guest, then closes; so a
    connection counts only once it has stayed open for ``settle`` seconds.
    """
    def attempt() -> socket.socket | None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.settimeout(settle)
        try:
            data = sock.recv(1, socket.MSG_PEEK)
            if data:
                sock.settimeout(None)
                return sock
        except TimeoutError:
            sock.settimeout(None)
            return sock
        except OSError:
            pass
        sock.close()
        return None

    return wait_until(attempt, timeout=timeout, every=0.2, failure=lambda: ConsoleTimeout(
        f"nothing answered on forwarded port {port} within {timeout:.0f} s"))
