"""Typed errors. The type of an error is its verdict, as in avocado: a broken rig is an
ERROR, an unavailable feature is UNSUPPORTED, bad input is a usage error."""

from __future__ import annotations

from dataclasses import dataclass, field


class FastRestartError(Exception):
    """Base of every error the harness raises on purpose."""

    exit_code = 3


class CheckFailed(FastRestartError):
    """A check failed in a way that ends the run (e.g. guest RAM lost): a FAIL, not an ERROR."""

    exit_code = 1

    def __init__(self, check: str, message: str, evidence: dict):
        super().__init__(message)
        self.check, self.evidence = check, evidence


class UsageError(FastRestartError):
    """The user asked for something that cannot be: bad spec, missing tool, impossible layout.

    The message is one paragraph that says what to do; the CLI prints it without a traceback.
    """

    exit_code = 2


class Unsupported(FastRestartError):
    """A capability the cell needs is missing from the QEMU or kernel under test."""

    exit_code = 4

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class StepError(FastRestartError):
    """A step of the rig or the flow broke. Carries the step name and the evidence."""

    step: str
    message: str
    evidence: dict = field(default_factory=dict)

    exit_code = 3

    def __post_init__(self) -> None:
        super().__init__(f"[{self.step}] {self.message}")

    def __str__(self) -> str:
        lines = [f"step '{self.step}' failed: {self.message}"]
        for key, value in self.evidence.items():
            text = str(value).rstrip()
            if "\n" in text:
                text = "\n    " + text.replace("\n", "\n    ")
            lines.append(f"  {key}: {text}")
        return "\n".join(lines)


class RigFault(FastRestartError):
    """A failure shown to be the rig's (L0's), not the system under test's: L0's QEMU died or
    asserted, a host resource ran out, or a transport stall proven by a layer that still answers.

    It is the only ERROR that may be retried (by the matrix, once; by the test suite, once), and
    only because the evidence names the rig.
    """

    exit_code = 3

    def __init__(self, message: str, evidence: dict | None = None, step: str = ""):
        super().__init__(message)
        self.message, self.evidence, self.step = message, evidence or {}, step


class ReservationMissing(StepError):
    """The new kernel has no PMEM region where the memmap= reservation put it: L2's RAM is gone."""


class ConsoleTimeout(FastRestartError):
    """A console wait passed its deadline."""


class GuestPanic(FastRestartError):
    """A kernel panic or oops was seen on a console."""
