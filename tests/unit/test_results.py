"""fastrestart.campaign.results: loading and writing result.json, collecting a results tree, the retry policy
and JUnit XML. Golden files: tests/golden/results/; regenerate with FASTRESTART_UPDATE_GOLDEN=1."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fastrestart.campaign import results
from fastrestart.campaign.results import ResultError
from fastrestart.errors import UsageError
from goldens import FIXTURES, assert_golden


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A private copy of the fixture results tree."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "results"))


def minimal(cell: str = "c1", verdict: str = "PASS", **extra: object) -> dict:
    result = {"schema": 1, "cell": cell, "verdict": verdict, "reason": "", "mode": "cpr-reboot",
              "accel": "tcg", "params": {"kernel": "debian:trixie"}, "phases": {"save": 0.1},
              "checks": {"liveness": {"verdict": "PASS"}}}
    result.update(extra)
    return result


# load_result / write_result


def test_load_result_reads_a_valid_file() -> None:
    result = results.load_result(FIXTURES / "trixie-cpr-reboot" / "result.json")
    assert result["cell"] == "trixie-cpr-reboot"
    assert result["verdict"] == "PASS"


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({**minimal(), "schema": 2}), "schema 2 is not supported"),
    (json.dumps({k: v for k, v in minimal().items() if k not in ("checks", "accel")}),
     "required keys missing: accel, checks"),
    (json.dumps(minimal(verdict="OK")), "verdict 'OK' is not one of"),
    (json.dumps(minimal(checks={"memory": {"verdict": "PASSED"}})), "check 'memory' needs a verdict"),
    (json.dumps(minimal(cell="")), "'cell' must be a non-empty string"),
])
def test_load_result_names_the_file_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "result.json"
    path.write_text(text)
    with pytest.raises(ResultError, match=message) as info:
        results.load_result(path)
    assert str(path) in str(info.value)


def test_load_result_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ResultError, match="cannot read"):
        results.load_result(tmp_path / "nope" / "result.json")


def test_write_result_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = minimal(logs={"l1-console": Path("logs/l1-console.log")})
    results.write_result(result, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["result.json"]
    loaded = results.load_result(run_dir / "result.json")
    assert loaded["logs"] == {"l1-console": "logs/l1-console.log"}
    assert loaded["cell"] == "c1"


def test_write_result_drops_collect_annotations(tree: Path, tmp_path: Path) -> None:
    final = next(r for r in results.collect(tree) if r["retried"])
    results.write_result(final, tmp_path / "copy")
    written = json.loads((tmp_path / "copy" / "result.json").read_text())
    assert not {"run_dir", "attempts", "retried"} & set(written)


def test_write_result_keeps_an_invalid_result_but_raises(tmp_path: Path) -> None:
    with pytest.raises(ResultError, match="required keys missing: checks"):
        results.write_result({k: v for k, v in minimal().items() if k != "checks"}, tmp_path / "c1")
    assert (tmp_path / "c1" / "result.json").exists()  # the evidence is kept ...
    (shown,) = results.collect(tmp_path)  # ... and shows up as an ERROR cell that says why
    assert (shown["cell"], shown["verdict"]) == ("c1", "ERROR")
    assert "required keys missing: checks" in shown["reason"]


def test_write_result_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results.write_result(minimal(verdict="PASS"), tmp_path)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        results.write_result(minimal(verdict="FAIL"), tmp_path)
    assert results.load_result(tmp_path / "result.json")["verdict"] == "PASS"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


# exit codes


@pytest.mark.parametrize(("verdict", "code"), [("PASS", 0), ("FAIL", 1), ("ERROR", 3), ("UNSUPPORTED", 4)])
def test_exit_code(verdict: str, code: int) -> None:
    assert results.exit_code(verdict) == code


def test_exit_code_rejects_unknown_verdicts() -> None:
    with pytest.raises(ValueError, match="unknown verdict 'NOT_RUN'"):
        results.exit_code("NOT_RUN")


# the retry policy


def attempts(*verdicts: str) -> list[dict]:
    """Attempts with these verdicts. ERROR is the rig's (the only kind retried); ERROR/KIND another kind."""
    made = []
    for i, given in enumerate(verdicts, 1):
        verdict, _, kind = given.partition("/")
        error = {"kind": kind or "rig", "step": "boot", "message": "m", "evidence": {}} if verdict == "ERROR" else None
        made.append(minimal(verdict=verdict, attempt=i, reason=f"reason {i}", error=error))
    return made


@pytest.mark.parametrize(("verdicts", "counted", "final"), [
    (["PASS"], 1, "PASS"),
    (["FAIL"], 1, "FAIL"),
    (["UNSUPPORTED"], 1, "UNSUPPORTED"),
    (["ERROR"], 1, "ERROR"),
    (["ERROR", "PASS"], 2, "PASS"),  # an ERROR is retried, and the retry counts
    (["ERROR", "FAIL"], 2, "FAIL"),
    (["ERROR", "ERROR"], 2, "ERROR"),
    (["FAIL", "PASS"], 1, "FAIL"),  # a FAIL is never retried: a later run does not clear it
    (["ERROR", "ERROR", "PASS"], 2, "ERROR"),  # retried once, not until it passes
    (["PASS", "ERROR"], 1, "PASS"),
    (["ERROR/harness", "PASS"], 1, "ERROR"),  # only the rig's ERROR is retried
    (["ERROR/interrupted", "PASS"], 1, "ERROR"),
])
def test_final_verdict(verdicts: list[str], counted: int, final: str) -> None:
    result = results.final_verdict(attempts(*verdicts))
    assert result["verdict"] == final
    assert result["attempt"] == counted
    assert result["reason"] == f"reason {counted}"
    assert [a["verdict"] for a in result["attempts"]] == [v.partition("/")[0] for v in verdicts]
    assert [a["counted"] for a in result["attempts"]] == [i == counted for i in range(1, len(verdicts) + 1)]
    assert result["retried"] is (len(verdicts) > 1)


def test_final_verdict_does_not_modify_the_attempts() -> None:
    given = attempts("ERROR", "PASS")
    results.final_verdict(given)
    assert "attempts" not in given[1]


def test_final_verdict_needs_an_attempt() -> None:
    with pytest.raises(ValueError):
        results.final_verdict([])


@pytest.mark.parametrize(("verdicts", "retry"), [
    ([], False), (["PASS"], False), (["FAIL"], False), (["UNSUPPORTED"], False),
    (["ERROR"], True), (["ERROR", "ERROR"], False), (["ERROR", "PASS"], False),
    (["ERROR/harness"], False), (["ERROR/interrupted"], False), (["ERROR/usage"], False),
])
def test_should_retry(verdicts: list[str], retry: bool) -> None:
    assert results.should_retry(attempts(*verdicts)) is retry


# expectations


@pytest.mark.parametrize(("verdict", "expect", "effective"), [
    ("PASS", None, "PASS"),
    ("FAIL", None, "FAIL"),
    ("FAIL", "FAIL", "PASS"),  # the injected fault was caught
    ("PASS", "FAIL", "FAIL"),  # the injected fault went unnoticed
    ("ERROR", "FAIL", "ERROR"),
    ("UNSUPPORTED", "FAIL", "UNSUPPORTED"),
    ("UNSUPPORTED", "UNSUPPORTED", "UNSUPPORTED"),
    ("PASS", "UNSUPPORTED", "FAIL"),
    ("FAIL", "pass", "FAIL"),
])
def test_effective_verdict(verdict: str, expect: str | None, effective: str) -> None:
    assert results.effective_verdict(minimal(verdict=verdict, expect=expect))[0] == effective


def checks_failing(*names: str) -> dict:
    return {name: {"verdict": "FAIL" if name in names else "PASS"} for name in results.CHECKS}


@pytest.mark.parametrize(("expect", "inject", "failing", "effective", "says"), [
    ("FAIL:memory", None, ["memory"], "PASS", "expected FAIL:memory"),
    ("FAIL:memory", None, ["interrupts"], "FAIL", "expected memory to FAIL, but interrupts failed"),
    ("FAIL:memory", None, ["memory", "dma"], "FAIL", "expected only memory to FAIL, but dma failed too"),
    ("FAIL", "mem-flip", ["memory"], "PASS", "expected FAIL:memory"),  # the fault names its check
    ("FAIL", "irq-drop", ["liveness"], "FAIL", "expected interrupts to FAIL, but liveness failed"),
    ("FAIL", "l1-panic", ["liveness"], "PASS", "expected FAIL:liveness"),
])
def test_an_expected_fail_must_come_from_the_named_check(expect, inject, failing, effective, says) -> None:
    result = minimal(verdict="FAIL", expect=expect, inject=inject, checks=checks_failing(*failing))
    verdict, reason = results.effective_verdict(result)
    assert (verdict, says in reason) == (effective, True), reason
    assert results.met_expectation(result) is (effective == "PASS")


@pytest.mark.parametrize("expect", ["FAIL:cosmic", "PASS:memory", "MAYBE"])
def test_a_bad_expectation_is_refused(expect) -> None:
    with pytest.raises(UsageError):
        results.parse_expect(expect)


@pytest.mark.parametrize(("cells", "code"), [
    ([("PASS", None)], 0),
    ([("PASS", None), ("UNSUPPORTED", None)], 4),  # nobody expected it: a warning in CI
    ([("UNSUPPORTED", "UNSUPPORTED")], 0),
    ([("FAIL", "FAIL:memory")], 0),
    ([("PASS", "FAIL:memory")], 1),
    ([("UNSUPPORTED", None), ("ERROR", None)], 3),
    ([("ERROR", None), ("FAIL", None)], 1),
])
def test_matrix_exit_code_is_0_only_when_every_cell_met_its_expectation(cells, code) -> None:
    found = [minimal(verdict=v, expect=e, checks=checks_failing("memory" if v == "FAIL" else ""))
             for v, e in cells]
    assert results.matrix_exit_code(found) == code


def test_expectation_may_sit_in_params() -> None:
    assert results.expectation(minimal(params={"expect": "fail"})) == "FAIL"


# collect


def test_collect_groups_attempts_and_applies_the_policy(tree: Path) -> None:
    found = results.collect(tree)
    assert [r["cell"] for r in found] == [
        "bookworm-cpr-reboot-unsupported", "bookworm-ignore-shared", "sid-cpr-transfer",
        "trixie-cpr-reboot", "trixie-mem-flip", "trixie-sid-cpr-reboot-edu"]
    by_name = {r["cell"]: r for r in found}
    retried = by_name["sid-cpr-transfer"]
    assert retried["verdict"] == "PASS"
    assert [(a["attempt"], a["verdict"], a["counted"]) for a in retried["attempts"]] == [
        (1, "ERROR", False), (2, "PASS", True)]
    assert retried["run_dir"] == str((tree / "sid-cpr-transfer" / "attempt-2").resolve())
    assert by_name["bookworm-ignore-shared"]["verdict"] == "ERROR"
    assert by_name["trixie-cpr-reboot"]["retried"] is False
    assert results.counts(found) == {"PASS": 2, "FAIL": 2, "ERROR": 1, "UNSUPPORTED": 1}


def test_collect_finds_cells_at_any_depth(tree: Path, tmp_path: Path) -> None:
    # `fastrestart matrix --results results/$CELL` may add a level: results/<cell>/<cell>/result.json
    nested = tmp_path / "nested"
    shutil.copytree(tree / "trixie-cpr-reboot", nested / "trixie-cpr-reboot" / "trixie-cpr-reboot")
    assert [r["cell"] for r in results.collect(nested)] == ["trixie-cpr-reboot"]


def test_collect_counts_a_copied_attempt_once(tree: Path) -> None:
    cell = tree / "sid-cpr-transfer"
    shutil.copy(cell / "attempt-2" / "result.json", cell / "result.json")
    (found,) = [r for r in results.collect(tree) if r["cell"] == "sid-cpr-transfer"]
    assert [a["attempt"] for a in found["attempts"]] == [1, 2]


def test_collect_turns_an_unreadable_result_into_an_error(tree: Path) -> None:
    (tree / "trixie-cpr-reboot" / "result.json").write_text('{"schema": 1, "cell": ')
    (broken,) = [r for r in results.collect(tree) if r["cell"] == "trixie-cpr-reboot"]
    assert broken["verdict"] == "ERROR"
    assert "not valid JSON" in broken["reason"]
    assert "trixie-cpr-reboot/result.json" in broken["reason"]


def test_collect_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ResultError, match="no such results directory"):
        results.collect(tmp_path / "missing")
    assert results.collect(tmp_path) == []


# JUnit


def test_write_junit_golden(tree: Path) -> None:
    path = tree / "junit.xml"
    results.write_junit(results.collect(tree), path, suite="smoke")
    assert_golden(path.read_text(encoding="utf-8"), "results/junit.xml")


def test_write_junit_counts_and_elements(tree: Path) -> None:
    path = tree / "out" / "junit.xml"
    results.write_junit(results.collect(tree), path, suite="smoke")
    root = ET.parse(path).getroot()  # well-formed despite control characters in the evidence
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == (
        "6", "1", "1", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert len(cases) == 6
    # FAIL → failure, ERROR → error (typed by the step), UNSUPPORTED → skipped with its reason.
    assert cases["trixie-sid-cpr-reboot-edu"].find("failure").get("message").startswith("dma: 2 of 50")
    assert cases["bookworm-ignore-shared"].find("error").get("type") == "prepare"
    assert cases["bookworm-cpr-reboot-unsupported"].find("skipped").get("message").startswith("QEMU 7.2.22")
    # An expected FAIL (injected fault caught) passes; a retried ERROR that passed is a pass.
    for name in ("trixie-mem-flip", "sid-cpr-transfer", "trixie-cpr-reboot"):
        assert not [e for e in cases[name] if e.tag in ("failure", "error", "skipped")], name
    props = {p.get("name"): p.get("value") for p in cases["trixie-cpr-reboot"].iter("property")}
    assert props["downtime.qmp_s"] == "8.1"
    assert props["phase.kexec_s"] == "3.0"
    assert props["check.memory"] == "PASS"
    out = cases["trixie-cpr-reboot"].find("system-out").text
    assert "l1-console: ../trixie-cpr-reboot/logs/l1-console.log" in out
    retried = cases["sid-cpr-transfer"].find("system-out").text
    assert "attempt 1: ERROR" in retried and "attempt 2: PASS (counted)" in retried


def test_write_junit_without_results(tmp_path: Path) -> None:
    results.write_junit([], tmp_path / "junit.xml", suite="empty")
    assert ET.parse(tmp_path / "junit.xml").getroot().get("tests") == "0"


def test_xml_text_drops_what_xml_cannot_hold() -> None:
    assert results.xml_text("a\x1b[0mb\x07c\td\n") == "a[0mbc\td\n"
