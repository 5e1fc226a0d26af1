"""`fastrestart matrix`: run a matrix's cells N at a time, each isolated, then build the report.

Each cell runs as its own `fastrestart run` process (its own work directory, sockets, forwarded
ports and process group; its VMs die with it). A cell that ends in ERROR is retried once, and
both attempts are kept; a FAIL is never retried.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import results
from .errors import UsageError
from .pipelines import cell_args, load_matrix
from .report import render_report

CELL_TIMEOUT_S = 45 * 60


def _run_attempt(cell: dict, cell_dir: Path, attempt: int) -> dict:
    run_dir = cell_dir / f"attempt-{attempt}"
    command = [sys.executable, "-m", "harness.cli", "run", *cell_args(cell), "--results", str(run_dir)]
    with (cell_dir / f"attempt-{attempt}.log").open("w") as log:
        try:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=CELL_TIMEOUT_S,
                           stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass  # the child's VMs die with it (PR_SET_PDEATHSIG); the missing result says ERROR below
    path = run_dir / "result.json"
    if path.exists():
        result = json.loads(path.read_text())
    else:
        result = {"schema": 1, "verdict": "ERROR", "reason": f"the cell produced no result (see {log.name})",
                  "mode": cell.get("mode", "auto"), "accel": "", "params": cell, "l1": {}, "l2": {},
                  "phases": {}, "downtime_s": {"qmp": None, "guest": None}, "checks": {}, "cycles": 1}
    result.update(cell=cell["name"], attempt=attempt)
    if cell.get("expect"):
        result["expect"] = cell["expect"]
    results.write_result(result, run_dir)
    return result


def run_cell_with_retry(cell: dict, out: Path) -> list[dict]:
    cell_dir = out / cell["name"]
    cell_dir.mkdir(parents=True, exist_ok=True)
    attempts = [_run_attempt(cell, cell_dir, 1)]
    if results.should_retry(attempts):
        attempts.append(_run_attempt(cell, cell_dir, 2))
    return attempts


def run_matrix(matrix: Path, out: Path, parallel: int = 1, only: str | None = None) -> int:
    cells = load_matrix(matrix)
    if only:
        cells = [c for c in cells if fnmatch.fnmatch(c["name"], only)]
        if not cells:
            raise UsageError(f"No cell of {matrix} matches --only {only!r}.")
    if parallel < 1:
        raise UsageError("--parallel must be at least 1.")
    out.mkdir(parents=True, exist_ok=True)
    started, done, lock = time.monotonic(), [0], threading.Lock()

    def one(cell: dict) -> list[dict]:
        attempts = run_cell_with_retry(cell, out)
        final = results.final_verdict(attempts)
        verdict, reason = results.effective_verdict(final)
        with lock:
            done[0] += 1
            retried = " (after a retry)" if len(attempts) > 1 else ""
            print(f"[{done[0]}/{len(cells)} {time.monotonic() - started:6.0f}s] {cell['name']}: {verdict}{retried}"
                  f"{' — ' + reason if reason else ''}", flush=True)
        return attempts

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, cells))
    found = results.collect(out)
    written = render_report(found, out)
    summary = {"cells": len(found), "parallel": parallel, "wall_s": round(time.monotonic() - started, 1),
               **results.counts(found)}
    (out / "matrix.json").write_text(json.dumps(summary, indent=1))
    print(f"report: {written['html']}  ({summary})")
    verdicts = [results.effective_verdict(r)[0] for r in found]
    if "FAIL" in verdicts:
        return 1
    return 3 if "ERROR" in verdicts else 0
