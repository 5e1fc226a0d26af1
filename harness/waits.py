"""The one deadline-aware wait: poll until something is there, or say what never came."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(attempt: Callable[[], T | None], *, timeout: float, every: float,
               failure: Callable[[], BaseException]) -> T:
    """Call ``attempt`` every ``every`` seconds until it returns something other than None, and
    return that. An exception from ``attempt`` ends the wait at once (that is how an attempt says
    waiting is pointless). Past ``timeout`` seconds, raise what ``failure`` makes (it is called
    then, so it can say what the last attempt saw)."""
    deadline = time.monotonic() + timeout
    while True:
        value = attempt()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise failure()
        time.sleep(min(every, max(deadline - time.monotonic(), 0)))
