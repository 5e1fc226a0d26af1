"""waits.wait_until: the one deadline-aware poll."""

from __future__ import annotations

import time

import pytest
from fastrestart.waits import wait_until


def test_returns_the_first_answer():
    answers = iter([None, None, "ready"])
    assert wait_until(lambda: next(answers), timeout=5, every=0.01, failure=lambda: AssertionError()) == "ready"


def test_says_what_never_came_at_the_deadline():
    seen = []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"nothing after \d tries"):
        wait_until(lambda: seen.append(1), timeout=0.25, every=0.1,
                   failure=lambda: TimeoutError(f"nothing after {len(seen)} tries"))
    assert 0.25 <= time.monotonic() - started < 1 and len(seen) >= 3


def test_an_attempt_that_raises_ends_the_wait_at_once():
    def attempt():
        raise RuntimeError("its QEMU exited")

    with pytest.raises(RuntimeError, match="exited"):
        wait_until(attempt, timeout=60, every=1, failure=lambda: AssertionError())
