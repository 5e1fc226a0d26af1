"""Results of restart runs: read and write `result.json`, collect a results tree, apply the
retry policy, and write JUnit XML for CI.

A cell is one restart run. Its directory holds `result.json` (schema 1) and `logs/`. A cell whose
first attempt ended in ERROR is run once more; the attempts then live side by side:

    results/<cell>/result.json               one attempt
    results/<cell>/attempt-1/result.json     an ERROR ...
    results/<cell>/attempt-2/result.json     ... and its retry, which is what counts
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from fastrestart.errors import UsageError
from fastrestart.paths import atomic_write

SCHEMA = 1
RESULT_FILE = "result.json"

PASS, FAIL, ERROR, UNSUPPORTED, NOT_RUN = "PASS", "FAIL", "ERROR", "UNSUPPORTED", "NOT_RUN"
VERDICTS = (PASS, FAIL, ERROR, UNSUPPORTED)
"""Verdicts of a whole cell."""
CHECK_VERDICTS = (PASS, FAIL, UNSUPPORTED, NOT_RUN)
"""Verdicts of one check inside a cell. NOT_RUN is never counted as a pass."""
CHECKS = ("liveness", "memory", "dma", "interrupts")
"""The checks every report shows, in this order (docs/design.md §7)."""
PHASES = ("prepare", "save", "record", "kexec", "boot", "reserve", "enumerate", "reload", "restore",
          "resume", "verify")
"""The flow's steps in order (docs/design.md §5). A mode may skip some or add its own."""

EXIT_CODES = {PASS: 0, FAIL: 1, ERROR: 3, UNSUPPORTED: 4}
REQUIRED_KEYS = ("schema", "cell", "verdict", "mode", "accel", "params", "phases", "checks")
MAX_ATTEMPTS = 2
"""An ERROR is retried once; a FAIL never."""

_ATTEMPT_DIR = re.compile(r"attempt-(\d+)$")
# Characters XML 1.0 cannot carry at all, not even escaped (console logs are full of them).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class ResultError(UsageError):
    """A result.json that cannot be read: missing, not JSON, another schema, keys missing."""


def exit_code(verdict: str) -> int:
    """The process exit code for a cell verdict: PASS 0, FAIL 1, ERROR 3, UNSUPPORTED 4."""
    try:
        return EXIT_CODES[verdict]
    except KeyError:
        raise ValueError(f"unknown verdict {verdict!r}; expected one of {', '.join(VERDICTS)}") from None


def validate(result: object, source: str = "result") -> dict:
    """Check that `result` is a schema-1 result; return it. Raise ResultError naming `source`."""
    if not isinstance(result, dict):
        raise ResultError(f"{source}: a result must be a JSON object, not {type(result).__name__}")
    if result.get("schema") != SCHEMA:
        raise ResultError(f"{source}: schema {result.get('schema')!r} is not supported; this harness "
                          f"reads schema {SCHEMA}. Re-run the cell or use a matching harness version.")
    missing = [key for key in REQUIRED_KEYS if key not in result]
    if missing:
        raise ResultError(f"{source}: required keys missing: {', '.join(missing)}")
    if not isinstance(result["cell"], str) or not result["cell"]:
        raise ResultError(f"{source}: 'cell' must be a non-empty string")
    if result["verdict"] not in VERDICTS:
        raise ResultError(f"{source}: verdict {result['verdict']!r} is not one of {', '.join(VERDICTS)}")
    for key in ("params", "phases", "checks"):
        if not isinstance(result[key], dict):
            raise ResultError(f"{source}: '{key}' must be an object")
    for name, check in result["checks"].items():
        if not isinstance(check, dict) or check.get("verdict") not in CHECK_VERDICTS:
            raise ResultError(f"{source}: check '{name}' needs a verdict among {', '.join(CHECK_VERDICTS)}")
    return result


def load_result(path: Path) -> dict:
    """Read and validate one result.json. Raise ResultError with the path on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultError(f"{path}: cannot read the result: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from exc
    return validate(data, str(path))


def write_result(result: dict, run_dir: Path) -> None:
    """Write `result` to `run_dir/result.json` atomically (temp file + rename), then validate it.

    An invalid result is still written, so the run's evidence is never lost, and then raises
    ResultError; `collect` later shows such a file as an ERROR cell that says what is wrong.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {key: value for key, value in result.items() if key not in ("run_dir", "attempts", "retried")}
    text = json.dumps(payload, indent=2, default=str) + "\n"
    atomic_write(run_dir / RESULT_FILE, text)
    validate(result, str(run_dir / RESULT_FILE))


def attempt_number(result: dict, run_dir: Path | None = None) -> int:
    """The attempt a result belongs to: its `attempt` key, else its `attempt-N` directory, else 1."""
    if isinstance(result.get("attempt"), int):
        return result["attempt"]
    match = _ATTEMPT_DIR.match(run_dir.name) if run_dir else None
    return int(match.group(1)) if match else 1


def is_rig_error(result: dict) -> bool:
    """An ERROR whose evidence names the rig (L0) as the culprit: the only kind worth retrying."""
    return result["verdict"] == ERROR and (result.get("error") or {}).get("kind") == "rig"


def should_retry(attempts: list[dict]) -> bool:
    """True when the latest attempt is a rig ERROR and the retry budget is not spent. A FAIL, an
    interruption, bad usage or a harness error is never retried."""
    return bool(attempts) and is_rig_error(attempts[-1]) and len(attempts) < MAX_ATTEMPTS


def final_verdict(attempts: list[dict]) -> dict:
    """Apply the retry policy to the attempts of one cell, oldest first.

    A rig ERROR is retried once and the retry is what counts; nothing else is retried, so anything
    after another verdict (or after the retry) is ignored. Returns a copy of the counted attempt with
    `attempts` (a summary of every attempt, counted or not) and `retried` added.
    """
    if not attempts:
        raise ValueError("final_verdict needs at least one attempt")
    counted = attempts[0]
    if is_rig_error(counted) and len(attempts) > 1:
        counted = attempts[1]
    final = dict(counted)
    final["attempts"] = [
        {"attempt": attempt_number(a), "verdict": a["verdict"], "reason": a.get("reason") or "",
         "run_dir": a.get("run_dir"), "counted": a is counted}
        for a in attempts
    ]
    final["retried"] = len(attempts) > 1
    return final


def _broken(path: Path, error: ResultError) -> dict:
    """Stand-in ERROR result for a result.json that cannot be read, so no cell silently vanishes."""
    name = path.parent.parent.name if _ATTEMPT_DIR.match(path.parent.name) else path.parent.name
    return {"schema": SCHEMA, "cell": name, "verdict": ERROR, "reason": str(error), "mode": "unknown",
            "accel": "unknown", "params": {}, "phases": {}, "checks": {},
            "error": {"step": "report", "message": str(error), "evidence": {"path": str(path)}}}


def collect(results_dir: Path) -> list[dict]:
    """Every cell under `results_dir`, one final result each, sorted by cell name.

    Finds `result.json` at any depth, groups a cell's `attempt-N` directories together, and
    applies `final_verdict`. Each result gains `run_dir`, the absolute directory it was read
    from. An unreadable result.json becomes an ERROR cell that says why.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ResultError(f"{results_dir}: no such results directory")
    groups: dict[tuple[str, str], dict[tuple, dict]] = {}
    for path in sorted(results_dir.rglob(RESULT_FILE)):
        run_dir = path.parent.resolve()
        try:
            result = dict(load_result(path))
        except ResultError as exc:
            result = _broken(path, exc)
        result["run_dir"] = str(run_dir)
        result["attempt"] = attempt_number(result, run_dir)
        group_dir = run_dir.parent if _ATTEMPT_DIR.match(run_dir.name) else run_dir
        # A copy of the same attempt (e.g. the counted one copied up to <cell>/) is one attempt.
        key = (result["attempt"], result.get("started"))
        groups.setdefault((result["cell"], str(group_dir)), {}).setdefault(key, result)
    finals = []
    for (_cell, _dir), attempts in sorted(groups.items()):
        ordered = sorted(attempts.values(), key=lambda r: (r["attempt"], str(r.get("started"))))
        finals.append(final_verdict(ordered))
    return finals


def parse_expect(text: str) -> tuple[str, str | None]:
    """`FAIL:memory` -> ("FAIL", "memory"); `PASS` -> ("PASS", None). Raise UsageError when the
    verdict or the check is unknown, or a check is named for anything but FAIL."""
    verdict, _, check = str(text).partition(":")
    verdict, check = verdict.strip().upper(), check.strip() or None
    if verdict not in VERDICTS:
        raise UsageError(f"expect {text!r}: {verdict!r} is not one of {', '.join(VERDICTS)}")
    if check is not None and (verdict != FAIL or check not in CHECKS):
        raise UsageError(f"expect {text!r}: only FAIL names a check, one of {', '.join(CHECKS)} "
                         "(e.g. FAIL:memory)")
    return verdict, check


def expectation(result: dict) -> str | None:
    """What a matrix cell declares it expects (`expect:`), as `VERDICT` or `FAIL:check`. An
    expected FAIL of a cell that injects a fault names that fault's check when it names none."""
    expect = result.get("expect") or (result.get("params") or {}).get("expect")
    if not isinstance(expect, str):
        return None
    verdict, check = parse_expect(expect)
    inject = result.get("inject") or (result.get("params") or {}).get("inject")
    if verdict == FAIL and check is None and inject:
        from fastrestart.restart.faults import FAULTS  # the fault's own declaration says which check must catch it

        check = FAULTS[inject].check if inject in FAULTS else None
    return f"{verdict}:{check}" if check else verdict


def effective_verdict(result: dict) -> tuple[str, str]:
    """(verdict, reason) after the cell's expectation: an injected fault expected to FAIL that
    FAILs in its own check, and in no other, is a PASS of the harness; a fault caught by another
    check, or a mismatch, is a FAIL. ERROR and UNSUPPORTED stand as they are."""
    verdict, reason = result["verdict"], result.get("reason") or ""
    expect = expectation(result)
    if expect is None or verdict == ERROR:
        return verdict, reason
    wanted, check = parse_expect(expect)
    if verdict == wanted:
        failed = [name for name, c in (result.get("checks") or {}).items() if c.get("verdict") == FAIL]
        if check is not None and check not in failed:
            return FAIL, _join(f"expected {check} to FAIL, but {', '.join(failed) or 'no check'} failed", reason)
        if check is not None and len(failed) > 1:
            others = ", ".join(name for name in failed if name != check)
            return FAIL, _join(f"expected only {check} to FAIL, but {others} failed too", reason)
        return (UNSUPPORTED if verdict == UNSUPPORTED else PASS), _join(f"expected {expect}", reason)
    if verdict == UNSUPPORTED:
        return verdict, reason
    return FAIL, _join(f"expected {expect}, got {verdict}", reason)


def met_expectation(result: dict) -> bool:
    """True when a cell with an `expect:` reached it (in the check it names)."""
    return expectation(result) is not None and effective_verdict(result)[0] in (PASS, UNSUPPORTED) and (
        result["verdict"] == parse_expect(expectation(result))[0])


def cell_exit_code(result: dict) -> int:
    """What a CI job of this one cell exits with: 0 when it PASSed or met its expectation, 1 FAIL
    (a mismatch included), 3 ERROR, 4 UNSUPPORTED that nobody expected (a warning in CI)."""
    verdict, _ = effective_verdict(result)
    if verdict == UNSUPPORTED and met_expectation(result):
        return 0
    return EXIT_CODES[verdict]


def matrix_exit_code(found: list[dict]) -> int:
    """A whole matrix: the worst of its cells, FAIL before ERROR before an unexpected UNSUPPORTED."""
    codes = {cell_exit_code(result) for result in found}
    return next((code for code in (1, 3, 4) if code in codes), 0)


def _join(head: str, reason: str) -> str:
    return f"{head}: {reason}" if reason else head


def counts(results: list[dict]) -> dict[str, int]:
    """How many cells have each verdict, in VERDICTS order (zeros included)."""
    tally = dict.fromkeys(VERDICTS, 0)
    for result in results:
        tally[result["verdict"]] += 1
    return tally


def xml_text(value: object) -> str:
    """`value` as text XML 1.0 can hold: control characters from consoles are dropped."""
    return _XML_INVALID.sub("", str(value))


def _relative(target: str | Path, base: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), base.resolve())).as_posix()


def _failure_text(result: dict) -> str:
    lines = [_join(f"{result['cell']}: {result['verdict']}", result.get("reason") or "")]
    for name, check in result["checks"].items():
        if check["verdict"] != PASS:
            lines.append(f"  {name}: {check['verdict']} {check.get('reason') or ''}".rstrip())
            if check.get("evidence"):
                lines.append("    evidence: " + json.dumps(check["evidence"], sort_keys=True, default=str))
    error = result.get("error")
    if error:
        lines.append(f"  step: {error.get('step')}")
        lines.append(f"  message: {error.get('message')}")
        for key, value in (error.get("evidence") or {}).items():
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _testcase(result: dict, suite: str, base: Path) -> ET.Element:
    case = ET.Element("testcase", classname=f"{suite}.{result['mode']}", name=result["cell"],
                      time=f"{float(result.get('wall_s') or 0):.3f}")
    props = ET.SubElement(case, "properties")

    def prop(name: str, value: object) -> None:
        ET.SubElement(props, "property", name=name, value=xml_text(value))

    prop("verdict", result["verdict"])
    if expectation(result):
        prop("expect", expectation(result))
    prop("accel", result["accel"] or "none")
    for name, seconds in (result.get("downtime_s") or {}).items():
        if seconds is not None:
            prop(f"downtime.{name}_s", seconds)
    for name, seconds in result["phases"].items():
        if seconds is not None:
            prop(f"phase.{name}_s", seconds)
    for name, check in result["checks"].items():
        prop(f"check.{name}", check["verdict"])
    if result.get("error"):
        prop("error.kind", result["error"].get("kind") or "unknown")
    for attempt in result.get("attempts") or []:
        prop(f"attempt.{attempt['attempt']}", attempt["verdict"])

    verdict, reason = effective_verdict(result)
    if verdict == FAIL:
        ET.SubElement(case, "failure", message=xml_text(reason), type=FAIL).text = xml_text(
            _failure_text(result))
    elif verdict == ERROR:
        step = (result.get("error") or {}).get("step") or "harness"
        ET.SubElement(case, "error", message=xml_text(reason), type=xml_text(step)).text = xml_text(
            _failure_text(result))
    elif verdict == UNSUPPORTED:
        ET.SubElement(case, "skipped", message=xml_text(reason))

    run_dir = Path(result["run_dir"]) if result.get("run_dir") else None
    out = []
    if run_dir:
        out.append(f"result: {_relative(run_dir / RESULT_FILE, base)}")
    for name, log in (result.get("logs") or {}).items():
        out.append(f"{name}: {_relative(run_dir / log, base) if run_dir else log}")
    retries = (result.get("attempts") or []) if result.get("retried") else []
    for attempt in retries:
        line = f"attempt {attempt['attempt']}: {attempt['verdict']}"
        line += " (counted)" if attempt["counted"] else ""
        line += f" — {attempt['reason']}" if attempt["reason"] else ""
        line += f" [{_relative(attempt['run_dir'], base)}]" if attempt.get("run_dir") else ""
        out.append(line)
    if out:
        ET.SubElement(case, "system-out").text = xml_text("\n".join(out) + "\n")
    return case


def write_junit(results: list[dict], path: Path, suite: str) -> None:
    """Write JUnit XML: one testcase per cell. FAIL is a failure, ERROR an error, UNSUPPORTED a skip
    (after the cell's `expect`). Properties carry verdicts, downtime and phase timings; system-out
    lists the paths of the result and logs, relative to the XML file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    verdicts = [effective_verdict(r)[0] for r in results]
    stats = {"tests": str(len(results)), "failures": str(verdicts.count(FAIL)),
             "errors": str(verdicts.count(ERROR)), "skipped": str(verdicts.count(UNSUPPORTED)),
             "time": f"{sum(float(r.get('wall_s') or 0) for r in results):.3f}"}
    root = ET.Element("testsuites", name=suite, **stats)
    hosts = sorted({(r.get("host") or {}).get("hostname") or "" for r in results} - {""})
    attrs = {"name": suite, **stats}
    if hosts:
        attrs["hostname"] = ", ".join(hosts)
    started = sorted(r["started"] for r in results if r.get("started"))
    if started:
        attrs["timestamp"] = started[0].removesuffix("Z")
    testsuite = ET.SubElement(root, "testsuite", attrs)
    for result in sorted(results, key=lambda r: r["cell"]):
        testsuite.append(_testcase(result, suite, path.parent))
    ET.indent(root)
    atomic_write(path, ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n")


def results_dir_size(run_dir: Path) -> int:
    """Bytes in the regular files under `run_dir`, at any depth: their apparent sizes (a sparse
    file counts in full), symlinks not followed. 0 when `run_dir` does not exist; a file that
    vanishes while it is counted is skipped."""
    total = 0
    pending = [Path(run_dir)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total
