"""QMP through ``qemu.qmp``, with a transcript and timestamped events.

Events keep QEMU's own timestamp (the clock of the host QEMU runs on) and the time L0 received
them, so downtime can be computed across a kexec that resets L1's clock.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastrestart.errors import StepError
from fastrestart.waits import wait_until
from qemu.qmp.legacy import QEMUMonitorProtocol

GIVE_UP_POLL_S = 5


@dataclass
class Event:
    name: str
    qemu_time: float  # seconds, from QEMU's timestamp
    received: float  # time.time() on L0
    data: dict


class _Monitor(QEMUMonitorProtocol):
    """qemu.qmp's sync client, minus the noise its finalizer makes for a link that never came up."""

    def __del__(self) -> None:
        try:
            super().__del__()
        except Exception:
            pass


class Qmp:
    """A synchronous QMP link with a JSON-lines transcript."""

    def __init__(self, address: str | tuple[str, int], transcript: Path, name: str = "qmp"):
        self.address = address
        self.name = name
        self.transcript = transcript
        self.events: list[Event] = []
        self._qmp: _Monitor | None = None

    def _log(self, direction: str, message: Any) -> None:
        with self.transcript.open("a") as out:
            out.write(json.dumps({"t": round(time.time(), 6), "link": self.name, "dir": direction,
                                  "msg": message}, default=str) + "\n")

    def connect(self, timeout: float = 30, give_up: Callable[[], str] | None = None) -> None:
        """Connect and negotiate, retrying while the server comes up (or a forwarder bounces us).

        ``give_up`` is asked every few seconds why waiting is pointless (e.g. QEMU died); a
        non-empty answer ends the wait at once.
        """
        last: list[Exception] = []
        next_ask = [time.monotonic() + GIVE_UP_POLL_S]

        def attempt() -> _Monitor | None:
            if give_up is not None and time.monotonic() >= next_ask[0]:
                next_ask[0] = time.monotonic() + GIVE_UP_POLL_S
                why = give_up()
                if why:
                    raise StepError("qmp", f"{self.name}: gave up connecting: {why}",
                                    {"last error": repr(last[0] if last else None)})
            qmp = _Monitor(self.address)
            try:
                qmp.connect(negotiate=True)
                return qmp
            except Exception as exc:
                last[:] = [exc]
                with contextlib.suppress(Exception):
                    qmp.close()
                return None

        self._qmp = wait_until(attempt, timeout=timeout, every=0.2, failure=lambda: StepError(
            "qmp", f"{self.name}: could not connect to {self.address} within {timeout:.0f} s",
            {"last error": repr(last[0] if last else None)}))
        self._log("open", str(self.address))

    def cmd(self, name: str, step: str = "qmp", timeout: float = 180, **args: Any) -> Any:
        """Execute a command; an error reply is a StepError naming the step."""
        if self._qmp is None:
            raise StepError(step, f"{self.name}: not connected")
        message = {"execute": name, **({"arguments": args} if args else {})}
        self._log("->", message)
        self._qmp.settimeout(timeout)
        try:
            reply = self._qmp.cmd_obj(message)
        except (TimeoutError, OSError, EOFError) as exc:
            raise StepError(step, f"{self.name}: {name} got no reply ({exc!r})") from exc
        finally:
            self._qmp.settimeout(None)
        self._log("<-", reply)
        self._drain()
        if "error" in reply:
            raise StepError(step, f"{self.name}: {name} failed: {reply['error'].get('desc')}",
                            {"command": message, "reply": reply})
        return reply.get("return")

    def _drain(self) -> None:
        if self._qmp is None:
            return
        for raw in self._qmp.get_events(wait=False):
            self._record(raw)
        self._qmp.clear_events()

    def _record(self, raw: dict) -> Event:
        stamp = raw.get("timestamp", {})
        event = Event(raw["event"], stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6,
                      time.time(), raw.get("data", {}))
        self.events.append(event)
        self._log("event", raw)
        return event

    def wait_event(self, names: str | list[str], timeout: float, step: str = "qmp",
                   since: int = 0) -> Event:
        """Wait for one of ``names`` (already received events from index ``since`` count)."""
        wanted = {names} if isinstance(names, str) else set(names)
        for event in self.events[since:]:
            if event.name in wanted:
                return event
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                raw = self._qmp.pull_event(wait=min(left, 1.0)) if self._qmp else None
            except TimeoutError:
                raw = None
            except Exception as exc:
                raise StepError(step, f"{self.name}: link lost waiting for {sorted(wanted)}: {exc!r}") from exc
            if raw:
                event = self._record(raw)
                self._qmp.clear_events()
                if event.name in wanted:
                    return event
        raise StepError(step, f"{self.name}: no {sorted(wanted)} event within {timeout:.0f} s",
                        {"events seen": [e.name for e in self.events[-10:]]})

    def wait_migration(self, timeout: float, step: str) -> dict:
        """Poll query-migrate until it completes or fails."""
        def attempt() -> dict | None:
            info = self.cmd("query-migrate", step=step)
            if info.get("status") in ("failed", "cancelled"):
                raise StepError(step, f"migration {info['status']}: {info.get('error-desc', '')}",
                                {"query-migrate": info})
            return info if info.get("status") == "completed" else None

        return wait_until(attempt, timeout=timeout, every=0.02, failure=lambda: StepError(
            step, f"migration did not complete within {timeout:.0f} s"))

    def close(self) -> None:
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:
                pass
            self._qmp = None
