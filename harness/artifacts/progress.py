"""Progress of the artifact work that takes long: downloads and builds.

The artifact modules call :func:`download` around a download and :func:`build` around a build;
both write to stderr:

- on a terminal: a tqdm bar while the work runs (for a download: bytes, rate and the file now
  being fetched; for a build: the time so far), then one line saying what was done;
- off a terminal (CI logs, pipes, a matrix cell's log): one plain line when the work starts and
  one when it ends; no bar and no carriage return.

Downloaded bytes are not estimated: they are what the downloader writes, measured as the growth
of the directories it writes to (apt: its archive cache and ``partial/``), and the total shown
beforehand is the one the caller got from the downloader itself (apt's ``--print-uris``). Where
the files written are not what was fetched (apt's package lists), the downloader's own count is.
Work found in the cache runs none of this, so a warm run prints nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

POLL_S = 0.25
"""How often a bar re-reads the directories it watches (and a build's bar its clock)."""
_UNITS = ("B", "kB", "MB", "GB", "TB")
DOWNLOAD_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
DOWNLOAD_COUNTER = "{desc}: {n_fmt}B [{elapsed}, {rate_fmt}{postfix}]"
CLOCK = "{desc} [{elapsed}]"


# -- formatting --------------------------------------------------------------------------------

def format_bytes(count: float) -> str:
    """Decimal units, as apt prints them: '950 B', '4.5 kB', '91 MB', '1.2 GB'."""
    value, unit = max(float(count), 0.0), 0
    while unit < len(_UNITS) - 1 and round(value, 1 if value < 10 else 0) >= 1000:
        value /= 1000
        unit += 1
    if unit == 0:
        return f"{value:.0f} B"
    return f"{value:.1f} {_UNITS[unit]}" if round(value, 1) < 10 else f"{value:.0f} {_UNITS[unit]}"


def parse_bytes(text: str) -> int | None:
    """'48.4 kB' (or '3,224 kB', '91 MB', '0 B') -> bytes; None when it is no size."""
    match = re.fullmatch(r"\s*([\d,]+(?:\.\d+)?)\s*([kMGT]?B)\s*", text)
    if not match:
        return None
    return round(float(match[1].replace(",", "")) * 1000 ** _UNITS.index(match[2]))


def format_duration(seconds: float) -> str:
    """'0.4 s', '20 s', '2 min 05 s', '1 h 02 min'."""
    seconds = max(seconds, 0.0)
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def format_rate(count: float, seconds: float) -> str:
    """'4.5 MB/s'."""
    return format_bytes(count / max(seconds, 1e-3)) + "/s"


# -- where it goes -----------------------------------------------------------------------------

def interactive(stream: TextIO | None = None) -> bool:
    """Bars only on a terminal that can redraw a line (a pseudo-terminal with no width cannot)."""
    stream = stream if stream is not None else sys.stderr
    try:
        if not stream.isatty() or os.environ.get("TERM") == "dumb":
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return True  # a terminal whose width we cannot read: tqdm picks one


def note(message: str, stream: TextIO | None = None) -> None:
    """One line, above any bar that is showing. On a terminal it first clears the line it
    starts on, which may hold a status line without its newline (the CLI's step line)."""
    stream = stream if stream is not None else sys.stderr
    if interactive(stream):
        tqdm.write("\r\033[K" + message, file=stream)
    else:
        print(message, file=stream, flush=True)


class _Ticker:
    """Calls ``tick`` every POLL_S seconds in a thread until stopped (a bar's redraws)."""

    def __init__(self, tick: Callable[[], None]):
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastrestart-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            with contextlib.suppress(Exception):  # a redraw must never break the work it shows
                self._tick()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- downloads ---------------------------------------------------------------------------------

def _scan(directories: Sequence[Path]) -> dict[str, tuple[int, float]]:
    """path -> (size, mtime) of the regular files directly in these directories."""
    files: dict[str, tuple[int, float]] = {}
    for directory in directories:
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        stat = entry.stat(follow_symlinks=False)
                        files[entry.path] = (stat.st_size, stat.st_mtime)
                except OSError:  # renamed or removed while we looked
                    continue
    return files


class Download:
    """One download being measured: the growth of the directories the downloader writes to.

    ``watch`` lists the directory a finished file lands in before the one it is written in
    (``archives``, then ``archives/partial``): a file renamed between the two reads is then
    missed once, never counted twice."""

    def __init__(self, watch: Sequence[Path], item: Callable[[str], str] | None = None):
        self.watch = [Path(d) for d in watch]
        self.item = item
        self._before = _scan(self.watch)
        self._baseline = sum(size for size, _ in self._before.values())
        self._reported: int | None = None

    def written(self) -> tuple[int, str]:
        """Bytes written since the start, and the item now being fetched ('' if unknown)."""
        files = _scan(self.watch)
        grown = max(sum(size for size, _ in files.values()) - self._baseline, 0)
        new = [(mtime, path) for path, (size, mtime) in files.items() if self._before.get(path, (None,))[0] != size]
        current = self.item(Path(max(new)[1]).name) if new and self.item else ""
        return grown, current

    def report(self, count: int | None) -> None:
        """The downloader's own count of the bytes it fetched (e.g. apt's 'Fetched 12.3 MB'), for a
        download whose files are not what it fetched (apt re-encodes its lists as they land)."""
        self._reported = count

    def fetched(self) -> int | None:
        """What was fetched: the downloader's own count if it gave one, else the growth of the
        watched directories (None when nothing is watched)."""
        if self._reported is not None:
            return self._reported
        return self.written()[0] if self.watch else None


@contextlib.contextmanager
def download(what: str, *, watch: Sequence[Path], total: int | None = None,
             item: Callable[[str], str] | None = None, stream: TextIO | None = None) -> Iterator[Download]:
    """Show a download of ``what`` ('69 packages for the L1 userspace (trixie)') while the body
    runs; ``watch``: the directories it writes to, or none when their growth is not the download
    (apt's lists are re-encoded as they land: the bar is then a clock, and the body reports the
    downloader's own count); ``total``: the bytes it will fetch, as the downloader said; ``item``:
    the name to show for the file being written (from its file name)."""
    stream = stream if stream is not None else sys.stderr
    task = Download(watch, item)
    tty = interactive(stream)
    started = time.monotonic()
    bar = ticker = None
    if tty:
        bar = tqdm(desc=f"fetching {what}", total=total, unit="B", unit_scale=True, unit_divisor=1000,
                   file=stream, leave=False, dynamic_ncols=True, mininterval=POLL_S,
                   bar_format=DOWNLOAD_BAR if total else DOWNLOAD_COUNTER if watch else CLOCK)

        def tick() -> None:
            if not watch:
                bar.refresh()
                return
            count, current = task.written()
            bar.n = max(bar.n, min(count, total) if total else count)  # a file being renamed is missed once
            bar.set_postfix_str(current, refresh=False)
            bar.refresh()

        ticker = _Ticker(tick)
    else:
        note(f"fetching {what}" + (f" ({format_bytes(total)})" if total else ""), stream)
    try:
        yield task
    finally:
        if ticker is not None:
            ticker.stop()
        if bar is not None:
            bar.close()
    elapsed = time.monotonic() - started
    count = task.fetched()
    if count is None:
        note(f"fetched {what} in {format_duration(elapsed)}", stream)
    else:
        note(f"fetched {what}: {format_bytes(count)} in {format_duration(elapsed)} ({format_rate(count, elapsed)})",
             stream)


# -- builds ------------------------------------------------------------------------------------

@contextlib.contextmanager
def build(what: str, *, verb: str = "building", done: str = "built", stream: TextIO | None = None) -> Iterator[None]:
    """Show that ``what`` ('the L1 initramfs for 6.12.118+deb13-amd64') is being built while the
    body runs, and how long it took."""
    stream = stream if stream is not None else sys.stderr
    tty = interactive(stream)
    started = time.monotonic()
    bar = ticker = None
    if tty:
        bar = tqdm(desc=f"{verb} {what}", total=None, bar_format=CLOCK, file=stream, leave=False,
                   dynamic_ncols=True)
        ticker = _Ticker(bar.refresh)
    else:
        note(f"{verb} {what}", stream)
    try:
        yield
    finally:
        if ticker is not None:
            ticker.stop()
        if bar is not None:
            bar.close()
    note(f"{done} {what} in {format_duration(time.monotonic() - started)}", stream)
