"""`fastrestart matrix`: run a matrix's cells N at a time, each isolated, then build the report.

Each cell runs as its own `fastrestart run` process (its own work directory, sockets, forwarded
ports and process group; its VMs die with it). A cell whose first attempt is an ERROR that names
the rig is run once more, and both attempts are kept; nothing else is retried. A cell whose process
left no result, or whose exit code disagrees with its result, is an ERROR. Interrupting the matrix
interrupts its running cells (each writes its ERROR result) and marks the cells not yet run.
"""

from __future__ import annotations

import fnmatch
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastrestart.campaign import results
from fastrestart.campaign.pipelines import cell_args, load_matrix
from fastrestart.campaign.report import render_report
from fastrestart.errors import UsageError
from fastrestart.vm.machine import interruption

CELL_TIMEOUT_S = 45 * 60
STOP_GRACE_S = 90  # a cell told to stop tears its rig down and writes its result within this
INTERRUPTED_EXIT_CODES = {128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP}


class _Cells:
    """The cell processes under way, so that an interrupted matrix can stop each of them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, command: list[str], log) -> subprocess.Popen | None:
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.running.add(proc)
            return proc

    def done(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.running.discard(proc)

    def stop_all(self) -> None:
        """SIGTERM every cell (each records "interrupted" and tears down), SIGKILL the stragglers."""
        with self.lock:
            self.stopping = True
            procs = list(self.running)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()


def _stand_in(cell: dict, reason: str, kind: str) -> dict:
    """An ERROR result for a cell that has no trustworthy result of its own."""
    return {"schema": 1, "cell": cell["name"], "verdict": "ERROR", "reason": reason, "mode": cell.get("mode", "auto"),
            "accel": "", "params": cell, "l1": {}, "l2": {}, "phases": {}, "downtime_s": {"qmp": None, "guest": None},
            "checks": {}, "cycles": cell.get("cycles", 1), "inject": cell.get("inject"),
            "error": {"kind": kind, "step": "matrix", "message": reason, "evidence": {}}}


def _consistent(result: dict, code: int) -> bool:
    """Does a cell's exit code agree with the verdict its result.json records?"""
    kind = (result.get("error") or {}).get("kind")
    if kind == "interrupted":
        return code in INTERRUPTED_EXIT_CODES
    if kind == "usage":
        return code == 2
    return result["verdict"] in results.EXIT_CODES and code == results.EXIT_CODES[result["verdict"]]


def _run_attempt(cell: dict, cell_dir: Path, attempt: int, cells: _Cells) -> dict:
    run_dir = cell_dir / f"attempt-{attempt}"
    command = [sys.executable, "-m", "fastrestart.cli", "run", *cell_args(cell), "--results", str(run_dir)]
    log_path = cell_dir / f"attempt-{attempt}.log"
    with log_path.open("w") as log:
        proc = cells.start(command, log)
        if proc is None:
            result = _stand_in(cell, "the matrix was interrupted before this cell ran", "interrupted")
            return _record(result, cell, run_dir, attempt)
        try:
            code = proc.wait(CELL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the cell records its interruption and tears down
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
            code = None
        finally:
            cells.done(proc)
    path = run_dir / "result.json"
    try:
        result = results.load_result(path)
    except results.ResultError as exc:
        return _record(_stand_in(cell, f"the cell left no readable result (exit {code}, see {log_path.name}): {exc}",
                                 "harness"), cell, run_dir, attempt)
    if code is None:
        result = {**result, "verdict": "ERROR", "reason": f"the cell ran past {CELL_TIMEOUT_S} s and was stopped",
                  "error": {"kind": "harness", "step": "matrix", "message": "cell timeout", "evidence": {}}}
    elif not _consistent(result, code):
        message = (f"the cell exited {code} but its result.json says {result['verdict']}"
                   f" ({result.get('reason') or 'no reason'}): neither is trusted")
        result = {**result, "verdict": "ERROR", "reason": message,
                  "error": {"kind": "harness", "step": "matrix", "message": message, "evidence": {"exit": code}}}
    return _record(result, cell, run_dir, attempt)


def _record(result: dict, cell: dict, run_dir: Path, attempt: int) -> dict:
    result.update(cell=cell["name"], attempt=attempt)
    if cell.get("expect"):
        result["expect"] = cell["expect"]
    results.write_result(result, run_dir)
    return result


def run_cell_with_retry(cell: dict, out: Path, cells: _Cells | None = None) -> list[dict]:
    cells = cells or _Cells()
    cell_dir = out / cell["name"]
    cell_dir.mkdir(parents=True, exist_ok=True)
    attempts = [_run_attempt(cell, cell_dir, 1, cells)]
    if results.should_retry(attempts) and not cells.stopping:
        attempts.append(_run_attempt(cell, cell_dir, 2, cells))
    return attempts


def run_matrix(matrix: Path, out: Path, parallel: int = 1, only: str | None = None) -> int:
    """Run the cells, build the report; return 0 only when every cell met its expectation (see
    results.matrix_exit_code). An interruption stops the cells, writes the report, and re-raises."""
    cells = load_matrix(matrix)
    if only:
        cells = [c for c in cells if fnmatch.fnmatch(c["name"], only)]
        if not cells:
            raise UsageError(f"No cell of {matrix} matches --only {only!r}.")
    if parallel < 1:
        raise UsageError("--parallel must be at least 1.")
    out.mkdir(parents=True, exist_ok=True)
    started, done, lock, running = time.monotonic(), [0], threading.Lock(), _Cells()

    def one(cell: dict) -> list[dict]:
        attempts = run_cell_with_retry(cell, out, running)
        final = results.final_verdict(attempts)
        verdict, reason = results.effective_verdict(final)
        with lock:
            done[0] += 1
            retried = "".join(f" (attempt {a['attempt']}: {a['verdict']} — {a['reason']})" for a in final["attempts"]
                              if not a["counted"])
            print(f"[{done[0]}/{len(cells)} {time.monotonic() - started:6.0f}s] {cell['name']}: {verdict}"
                  f"{' — ' + reason if reason else ''}{' RETRIED' + retried if retried else ''}", flush=True)
        return attempts

    interrupted: BaseException | None = None
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        try:
            list(pool.map(one, cells))
        except BaseException as exc:
            if not interruption(exc):
                raise
            interrupted = exc
            print(f"matrix: interrupted ({interruption(exc)[0]}): stopping the running cells", flush=True)
            running.stop_all()
    found = results.collect(out)
    written = render_report(found, out)
    summary = {"cells": len(found), "parallel": parallel, "wall_s": round(time.monotonic() - started, 1),
               "retried": sum(1 for r in found if r.get("retried")), **results.counts(found),
               "interrupted": bool(interrupted)}
    (out / "matrix.json").write_text(json.dumps(summary, indent=1))
    print(f"report: {written['html']}  ({summary})")
    if interrupted is not None:
        raise interrupted
    return results.matrix_exit_code(found)
