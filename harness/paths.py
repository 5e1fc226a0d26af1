"""Where things live: the content-keyed artifact cache and per-run directories."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/fastrestart``, created on first use."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "fastrestart"
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(*parts: object, files: tuple[Path, ...] = ()) -> str:
    """A short digest over values and file contents: the cache key of a built artifact."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
    for path in files:
        digest.update(str(path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_held = threading.local()


@contextlib.contextmanager
def artifact_lock() -> Iterator[None]:
    """Serialise building and fetching of cached artifacts across processes (xdist workers,
    matrix cells) and threads. Re-entrant within a thread."""
    depth = getattr(_held, "depth", 0)
    if depth:
        _held.depth = depth + 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    with (cache_dir() / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``path`` whole or not at all: a temporary file beside it, flushed to disk, renamed
    over it. A reader (or a run killed halfway) never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def socket_dir(prefix: str = "fr") -> Path:
    """A short, unique directory for AF_UNIX sockets (their paths are limited to 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
