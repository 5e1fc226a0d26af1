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


class ConsoleTimeout(FastRestartError):
    """A console wait passed its deadline."""


class GuestPanic(FastRestartError):
    """A kernel panic or oops was seen on a console."""
