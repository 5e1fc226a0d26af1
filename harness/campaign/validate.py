"""`fastrestart validate`: the same cells on a base and a patched kernel, and the verdict diff (docs/design.md §8.5).

Each side is an ordinary `fastrestart matrix` run (`fastrestart.campaign.matrix.run_matrix`: isolated cell
processes, one retry after a rig ERROR, a conformance report per side) of the matrix with every
cell's `kernel` replaced by the side's kernel. The diff is then made from the two results trees:

    <results>/base/...        the base kernel's cells and report
    <results>/patched/...     the patched kernel's cells and report
    <results>/diff.md         the Markdown for a mailing-list reply (also printed)
    <results>/diff.json       the same, machine-readable

The exit code is 1 when any cell regressed (PASS on the base, FAIL or ERROR on the patched
kernel), 0 otherwise.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from fastrestart import DATA
from fastrestart.artifacts import kernels
from fastrestart.campaign import results as res
from fastrestart.campaign.matrix import run_matrix
from fastrestart.campaign.pipelines import load_matrix
from fastrestart.campaign.report import environment
from fastrestart.errors import UsageError

DEFAULT_MATRIX = DATA / "kernels" / "validate.yaml"
SIDES = ("base", "patched")
DOWNTIME_KINDS = ("qmp", "guest")
NOTABLE_RATIO = 1.2
"""A downtime that grew or shrank by at least this factor is listed as a change ..."""
NOTABLE_ABS_S = 0.01
"""... if it also moved by at least this much (timer noise on a 50 ms save is not news)."""

REGRESSION, FIX, NEWLY_SUPPORTED, NEWLY_UNSUPPORTED = "regression", "fix", "newly supported", "newly unsupported"
CHANGED, UNCHANGED, MISSING = "changed", "unchanged", "missing"
CHANGES = (REGRESSION, FIX, NEWLY_SUPPORTED, NEWLY_UNSUPPORTED, CHANGED, MISSING, UNCHANGED)
"""Kinds of change, in the order the diff lists them (worst news first)."""


def classify(base: str | None, patched: str | None) -> str:
    """The kind of change from a base verdict to a patched verdict (None: the cell has no result)."""
    if base is None or patched is None:
        return MISSING
    if base == patched:
        return UNCHANGED
    if base == res.PASS and patched in (res.FAIL, res.ERROR):
        return REGRESSION
    if base in (res.FAIL, res.ERROR) and patched == res.PASS:
        return FIX
    if base == res.UNSUPPORTED:
        return NEWLY_SUPPORTED
    if patched == res.UNSUPPORTED:
        return NEWLY_UNSUPPORTED
    return CHANGED


@dataclass
class CellDiff:
    """One cell on both kernels."""

    cell: str
    change: str
    base: str | None
    patched: str | None
    base_reason: str
    patched_reason: str
    downtime: dict  # kind -> {"base": s, "patched": s, "ratio": patched/base, "notable": bool}


def _downtime(base: dict | None, patched: dict | None) -> dict:
    table = {}
    for kind in DOWNTIME_KINDS:
        before = ((base or {}).get("downtime_s") or {}).get(kind)
        after = ((patched or {}).get("downtime_s") or {}).get(kind)
        ratio = round(after / before, 2) if before and after is not None else None
        notable = bool(ratio is not None and abs(after - before) >= NOTABLE_ABS_S
                       and (ratio >= NOTABLE_RATIO or ratio <= 1 / NOTABLE_RATIO))
        table[kind] = {"base": before, "patched": after, "ratio": ratio, "notable": notable}
    return table


def diff_results(base: list[dict], patched: list[dict]) -> list[CellDiff]:
    """Pair the final results of the two sides by cell name and classify each pair.

    Verdicts are effective ones: a fault-injection cell that is expected to FAIL and FAILs is a PASS.
    """
    by_side = [{r["cell"]: r for r in side} for side in (base, patched)]
    names = list(by_side[0]) + [n for n in by_side[1] if n not in by_side[0]]
    diffs = []
    for name in names:
        before, after = by_side[0].get(name), by_side[1].get(name)
        verdicts = [res.effective_verdict(r) if r else (None, "no result") for r in (before, after)]
        diffs.append(CellDiff(name, classify(verdicts[0][0], verdicts[1][0]), verdicts[0][0], verdicts[1][0],
                              verdicts[0][1], verdicts[1][1], _downtime(before, after)))
    order = {change: i for i, change in enumerate(CHANGES)}
    return sorted(diffs, key=lambda d: (order[d.change], d.cell))


def summarize(diffs: list[CellDiff]) -> dict[str, int]:
    """How many cells of each kind of change (zeros included), in CHANGES order."""
    counts = dict.fromkeys(CHANGES, 0)
    for diff in diffs:
        counts[diff.change] += 1
    return counts


def exit_code(diffs: list[CellDiff]) -> int:
    """1 when any cell regressed or can no longer run (the series lost a capability), else 0."""
    return 1 if any(d.change in (REGRESSION, NEWLY_UNSUPPORTED) for d in diffs) else 0


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _downtime_text(entry: dict) -> str:
    text = f"{_seconds(entry['base'])} → {_seconds(entry['patched'])}"
    return text + (f" (×{entry['ratio']:.2f})" if entry["ratio"] is not None else "")


def render_markdown(diffs: list[CellDiff], base_spec: str, patched_spec: str, matrix: str,
                    releases: dict[str, str] | None = None) -> str:
    """The diff as Markdown: a summary line, one table row per cell, the reasons, the downtime changes."""
    releases = releases or {}
    rows = [{"cell": d.cell, "base": d.base or "–", "patched": d.patched or "–", "change": d.change,
             "flag": d.change in (REGRESSION, NEWLY_UNSUPPORTED, MISSING),
             "qmp": _downtime_text(d.downtime["qmp"]), "guest": _downtime_text(d.downtime["guest"])}
            for d in diffs]
    reasons = []
    for d in diffs:
        sides = [("base", d.base, d.base_reason), ("patched", d.patched, d.patched_reason)]
        if (d.base, d.base_reason) == (d.patched, d.patched_reason):
            sides = [("both", d.base, d.base_reason)]  # say it once
        reasons += [{"cell": d.cell, "side": side, "verdict": verdict, "reason": reason}
                    for side, verdict, reason in sides if verdict != res.PASS and reason]
    downtime_changes = [{"cell": d.cell, "kind": kind, "text": _downtime_text(d.downtime[kind])}
                        for d in diffs for kind in DOWNTIME_KINDS if d.downtime[kind]["notable"]]
    counts = summarize(diffs)
    env = environment()
    # Plain text for a mail: one line per item, no HTML entities; only table cells need their pipes escaped.
    env.filters["line"] = lambda value: " ".join(str(value).split())
    env.filters["cell"] = lambda value: " ".join(str(value).split()).replace("|", "\\|")
    return env.get_template("validate.md.j2").render(base=base_spec, patched=patched_spec, matrix=matrix,
                  base_release=releases.get("base", ""), patched_release=releases.get("patched", ""),
                  counts=[{"change": c, "n": n} for c, n in counts.items() if n or c == REGRESSION],
                  total=len(diffs), rows=rows, reasons=reasons, downtime_changes=downtime_changes,
                  notable_ratio=NOTABLE_RATIO)


def write_diff(diffs: list[CellDiff], out: Path, base_spec: str, patched_spec: str, matrix: str,
               releases: dict[str, str] | None = None) -> str:
    """Write diff.md and diff.json into `out`; return the Markdown."""
    markdown = render_markdown(diffs, base_spec, patched_spec, matrix, releases)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diff.md").write_text(markdown, encoding="utf-8")
    data = {"base": base_spec, "patched": patched_spec, "matrix": matrix, "releases": releases or {},
            "summary": summarize(diffs), "regressions": sum(d.change == REGRESSION for d in diffs),
            "exit_code": exit_code(diffs), "cells": [asdict(d) for d in diffs]}
    (out / "diff.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return markdown


def side_matrix(cells: list[dict], kernel: str) -> dict:
    """The matrix one side runs: every cell on `kernel`. A cell's own `to_kernel` is dropped, since
    validation restarts each kernel into itself; upgrade pairs belong in a matrix of their own."""
    return {"cells": [{**{k: v for k, v in cell.items() if k != "to_kernel"}, "kernel": kernel}
                      for cell in cells]}


def validate(base: str, patched: str, matrix: Path, out: Path, parallel: int = 1) -> int:
    """Run the matrix on both kernels, write and print the diff; 1 on a regression or a cell the
    patched kernel can no longer run, else 0."""
    cells = load_matrix(matrix)
    # Resolve both kernels first: a typo in build:KEY is a usage error now, not N ERROR cells later.
    releases = {side: kernels.resolve(spec).release for side, spec in zip(SIDES, (base, patched), strict=True)}
    out.mkdir(parents=True, exist_ok=True)
    finals = {}
    for side, spec in zip(SIDES, (base, patched), strict=True):
        side_dir = out / side
        side_dir.mkdir(parents=True, exist_ok=True)
        side_file = side_dir / "matrix.yaml"
        side_file.write_text(f"# {matrix} with every cell on the {side} kernel {spec}\n"
                             + yaml.safe_dump(side_matrix(cells, spec), sort_keys=False))
        print(f"== {side}: {spec} ({releases[side]}), {len(cells)} cell(s)", file=sys.stderr, flush=True)
        run_matrix(side_file, side_dir, parallel=parallel)  # its exit code is per side; the diff decides
        finals[side] = res.collect(side_dir)
    if not finals["base"] and not finals["patched"]:
        raise UsageError(f"No results under {out}: nothing to compare.")
    diffs = diff_results(finals["base"], finals["patched"])
    markdown = write_diff(diffs, out, base, patched, str(matrix), releases)
    print(markdown, end="")
    return exit_code(diffs)
