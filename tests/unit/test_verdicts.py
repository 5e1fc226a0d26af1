"""Every way a run can end, and the verdict it leaves: `fastrestart run` driven with a fake rig and
a fake flow that fail at each step in each way (seconds, no VM).

The rules under test (harness/campaign/runner.py, attribute and decide):
- only a completed flow with a restart, liveness PASS and every other check PASS or UNSUPPORTED
  with a reason is PASS;
- before `save`, a failure is the rig's ERROR; from `save` on it is the restart's liveness FAIL,
  unless L0 is shown to be at fault; a Python error of the harness is ERROR "harness";
- an interruption is ERROR "interrupted" (exit 128+signal), bad usage exit 2, never a PASS.
"""

from __future__ import annotations

import json
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fastrestart import cli
from fastrestart.campaign import runner
from fastrestart.campaign.results import is_rig_error, should_retry
from fastrestart.errors import (
    CheckFailed,
    ConsoleTimeout,
    GuestPanic,
    RigFault,
    StepError,
    Unsupported,
    UsageError,
)
from fastrestart.restart.checks import CHECKS, verdict
from fastrestart.vm.machine import Terminated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

STEPS = ["prepare", "save", "record", "kexec", "boot", "reserve", "enumerate", "reload", "restore", "resume",
         "end_cycle", "verify"]
BEFORE_SAVE = {"prepare"}
L0_DIED = {"message": "L0's QEMU was killed by SIGABRT: iotlb_to_section: Assertion failed", "exit_code": -6}


class FakeRig:
    """What run_cell needs of a Rig; ``l0`` is what l0_fault reports (L0's QEMU died)."""

    l0: dict | None = None

    def __init__(self, config, run_dir: Path):
        self.accel = type("Accel", (), {"name": "tcg", "reason": "fake"})()
        self.l0_version, self.artifacts, self.devices, self.closed = "10.0", None, [], False
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "logs" / "l1-console.log").write_text("kept\n")

    def l0_fault(self) -> dict | None:
        return dict(self.l0) if self.l0 else None

    def close(self) -> None:
        self.closed = True


class FakeFlow:
    """Walks the flow's steps; raises ``failure`` when it reaches ``fail_at``; ``verify_checks``
    is what verify finds."""

    fail_at: str | None = None
    failure: BaseException | None = None
    verify_checks: dict | None = None

    def __init__(self, rig, mode, caps, options, progress):
        self.options, self.progress = options, progress
        self.current_step, self.restart_begun, self.cycles_completed = "prepare", False, 0
        self.l1_boot_ids, self.l1_releases, self.cycles, self.workloads = [], [], [], None
        self.prepare_record, self.verify_record = {"cycle": 0}, {"cycle": "verify"}

    def _step(self, name: str) -> None:
        self.current_step = name
        self.restart_begun = self.restart_begun or name == "save"
        if name == self.fail_at:
            raise self.failure

    def run(self) -> None:
        self._step("prepare")
        for cycle in range(1, self.options.cycles + 1):
            record = {"cycle": cycle}
            self.cycles.append(record)
            for name in STEPS[1:-2]:
                self._step(name)
            self._step("end_cycle")
            record["liveness"] = verdict("PASS", {"boot_id_before": "b", "boot_id_after": "b"})
            self.cycles_completed += 1
        self._step("verify")
        self.verify_record["evidence"] = {"verify": {"checks": self.verify_checks or {
            name: verdict("PASS") for name in CHECKS if name != "liveness"}}}

    def cycles_verdicts(self) -> dict:
        lives = [c["liveness"] for c in self.cycles if "liveness" in c]
        found = {"liveness": lives[-1]} if lives else {}
        return {**found, **self.verify_record.get("evidence", {}).get("verify", {}).get("checks", {})}

    def cycles_summary(self) -> list[dict]:
        return [{"cycle": c["cycle"]} for c in self.cycles]

    def close(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch):
    """Patch the rig and the flow; return a function that runs the CLI and reads what it left."""
    caps = type("Caps", (), {"version": "10.0"})()
    mode = type("Mode", (), {"name": "cpr-reboot", "guest_visible": False})()
    facts = {"qemu": "10.0", "kernel_from": "6.12", "kernel_to": "6.12", "backend": "devdax"}
    probe_failure: list[BaseException] = []

    def fake_probe(cell, config):
        cell.validate()
        if probe_failure:
            raise probe_failure[0]
        return caps, mode, facts

    monkeypatch.setattr(runner, "probe", fake_probe)
    monkeypatch.setattr(runner, "Rig", FakeRig)
    monkeypatch.setattr(runner, "Flow", FakeFlow)
    monkeypatch.setattr(FakeRig, "l0", None)
    for name in ("fail_at", "failure", "verify_checks"):
        monkeypatch.setattr(FakeFlow, name, None)

    def run(tmp_path: Path, capsys, *argv: str, fail_at=None, failure=None, l0=None, verify_checks=None,
            at_probe=None) -> dict:
        FakeFlow.fail_at, FakeFlow.failure, FakeFlow.verify_checks, FakeRig.l0 = fail_at, failure, verify_checks, l0
        probe_failure[:] = [at_probe] if at_probe else []
        out = tmp_path / "r"
        try:
            code = cli.main(["run", "--results", str(out), *argv])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else None
        junit = ET.parse(out / "junit.xml").getroot().find("testsuite/testcase") if (out / "junit.xml").exists() \
            else None
        status = None if junit is None else next(
            (e.tag for e in junit if e.tag in ("failure", "error", "skipped")), "passed")
        return {"code": code, "stderr": err, "result": result, "junit": status}

    return run


# -- every exit path -----------------------------------------------------------------------------

def after(step: str) -> bool:
    return step not in BEFORE_SAVE


FAILURES = {
    "StepError": lambda: StepError("kexec", "no new kernel banner in 60 s", {"console tail": "..."}),
    "ConsoleTimeout": lambda: ConsoleTimeout("l2: no ['__FRE7__'] within 60 s (step liveness)"),
    "GuestPanic-L1": lambda: GuestPanic("l1: kernel panic: Kernel panic - not syncing: sysrq triggered crash"),
    "GuestPanic-L2": lambda: GuestPanic("l2: kernel panic: Kernel panic - not syncing: Fatal exception"),
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failure_is_the_rigs_error_before_save_and_the_restarts_fail_after(tmp_path, capsys, fake, step, failure):
    seen = fake(tmp_path, capsys, fail_at=step, failure=FAILURES[failure]())
    result = seen["result"]
    assert "Traceback" not in seen["stderr"]
    if after(step):
        assert (seen["code"], result["verdict"], seen["junit"]) == (1, "FAIL", "failure")
        liveness = result["checks"]["liveness"]
        assert liveness["verdict"] == "FAIL" and liveness["evidence"]["step"] == step
        assert f"in step {step}" in liveness["reason"]
        if failure.startswith("GuestPanic"):
            assert f"{failure[-2:]}'s kernel panicked" in liveness["reason"]
        assert result["error"] is None and not should_retry([result])
    else:
        assert (seen["code"], result["verdict"], seen["junit"]) == (3, "ERROR", "error")
        assert result["error"]["kind"] == "rig" and result["error"]["step"] == step
        assert should_retry([result])  # nothing under test had happened yet: the rig's, retried once


@pytest.mark.parametrize("step", STEPS)
def test_a_check_that_failed_is_a_fail_of_that_check_at_any_step(tmp_path, capsys, fake, step):
    seen = fake(tmp_path, capsys, fail_at=step, failure=CheckFailed("memory", "L2 RAM is gone", {"regions": ""}))
    assert (seen["code"], seen["result"]["verdict"], seen["junit"]) == (1, "FAIL", "failure")
    memory = seen["result"]["checks"]["memory"]
    assert memory["verdict"] == "FAIL" and memory["evidence"]["step"] == step
    assert seen["result"]["checks"]["dma"]["verdict"] in ("NOT_RUN", "PASS")


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(("interrupt", "name", "code"), [
    (KeyboardInterrupt, "SIGINT", 130),
    (lambda: Terminated(signal.SIGTERM), "SIGTERM", 143),
    (lambda: Terminated(signal.SIGHUP), "SIGHUP", 129),
])
def test_an_interruption_is_an_error_with_its_signal_and_step(tmp_path, capsys, fake, step, interrupt, name, code):
    seen = fake(tmp_path, capsys, fail_at=step, failure=interrupt())
    result = seen["result"]
    assert seen["code"] == code and "Traceback" not in seen["stderr"] and f"interrupted by {name}" in seen["stderr"]
    assert (result["verdict"], seen["junit"]) == ("ERROR", "error")
    assert result["error"]["kind"] == "interrupted"
    assert result["reason"] == f"{step}: interrupted by {name} during step {step}"
    assert not should_retry([result])
    assert (tmp_path / "r" / "logs" / "l1-console.log").exists()  # logs are kept


def test_an_interruption_at_the_probe(tmp_path, capsys, fake):
    seen = fake(tmp_path, capsys, at_probe=KeyboardInterrupt())
    assert seen["code"] == 130 and seen["result"]["verdict"] == "ERROR"
    assert seen["result"]["reason"] == "probe: interrupted by SIGINT during step probe"


def test_a_test_runners_timeout_is_an_interruption(tmp_path, fake):
    FakeFlow.fail_at, FakeFlow.failure = "kexec", pytest.fail.Exception("Timeout >2400.0s")
    with pytest.raises(pytest.fail.Exception):
        runner.run_cell(runner.Cell(), tmp_path / "r")
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["verdict"] == "ERROR" and result["error"]["kind"] == "interrupted"
    assert "Timeout >2400.0s" in result["reason"] and "during step kexec" in result["reason"]


@pytest.mark.parametrize("step", STEPS)
def test_bad_usage_found_inside_a_run_exits_2_and_leaves_no_pass(tmp_path, capsys, fake, step):
    seen = fake(tmp_path, capsys, fail_at=step, failure=UsageError("--edu-irq msi: edu_uio cannot be built"))
    assert seen["code"] == 2 and "Traceback" not in seen["stderr"]
    assert seen["result"]["verdict"] == "ERROR" and seen["result"]["error"]["kind"] == "usage"


@pytest.mark.parametrize("argv", [["--mode", "cpr-rebot"], ["--cycles", "0"], ["--inject", "cosmic-ray"],
                                  ["--devices", "gpu"], ["--l2-mem", "lots"]])
def test_bad_usage_on_the_command_line_exits_2_before_any_result(tmp_path, capsys, fake, argv):
    seen = fake(tmp_path, capsys, *argv)
    assert seen["code"] == 2 and "Traceback" not in seen["stderr"]
    assert seen["result"] is None or seen["result"]["verdict"] != "PASS"


@pytest.mark.parametrize("step", STEPS)
def test_l0_qemu_death_is_the_rigs_error_at_any_step(tmp_path, capsys, fake, step):
    seen = fake(tmp_path, capsys, fail_at=step, failure=ConsoleTimeout("l1: no READY within 300 s"), l0=L0_DIED)
    result = seen["result"]
    assert (seen["code"], result["verdict"]) == (3, "ERROR")
    assert result["error"]["kind"] == "rig" and "iotlb_to_section" in result["reason"]
    assert result["checks"]["liveness"]["verdict"] != "FAIL" and is_rig_error(result) and should_retry([result])


@pytest.mark.parametrize("step", STEPS)
def test_a_proven_transport_stall_is_the_rigs_error(tmp_path, capsys, fake, step):
    seen = fake(tmp_path, capsys, fail_at=step, failure=RigFault("L2's console forward stalled", {"runstate": "x"}))
    assert (seen["code"], seen["result"]["verdict"], seen["result"]["error"]["kind"]) == (3, "ERROR", "rig")


@pytest.mark.parametrize("step", STEPS)
def test_a_harness_bug_is_an_error_with_its_traceback_never_retried(tmp_path, capsys, fake, step):
    seen = fake(tmp_path, capsys, fail_at=step, failure=KeyError("transfers"))
    result = seen["result"]
    assert (seen["code"], result["verdict"], result["error"]["kind"]) == (3, "ERROR", "harness")
    assert "KeyError" in result["error"]["evidence"]["traceback"] and not should_retry([result])


def test_a_host_out_of_space_is_the_rigs(tmp_path, capsys, fake):
    seen = fake(tmp_path, capsys, fail_at="save", failure=OSError(28, "No space left on device"))
    assert (seen["result"]["verdict"], seen["result"]["error"]["kind"]) == ("ERROR", "rig")


def test_unsupported_at_the_probe(tmp_path, capsys, fake):
    seen = fake(tmp_path, capsys, at_probe=Unsupported("QEMU 7.2 has no cpr-reboot"))
    assert (seen["code"], seen["result"]["verdict"], seen["junit"]) == (4, "UNSUPPORTED", "skipped")
    assert {c["verdict"] for c in seen["result"]["checks"].values()} == {"UNSUPPORTED"}


def test_a_clean_run_passes(tmp_path, capsys, fake):
    seen = fake(tmp_path, capsys)
    result = seen["result"]
    assert (seen["code"], result["verdict"], seen["junit"]) == (0, "PASS", "passed")
    assert result["completed"] and result["cycles_completed"] == 1 and result["error"] is None


def test_a_check_that_never_ran_keeps_a_completed_run_from_passing(tmp_path, capsys, fake):
    seen = fake(tmp_path, capsys, verify_checks={"memory": verdict("PASS"), "dma": verdict("PASS")})
    assert (seen["code"], seen["result"]["verdict"]) == (3, "ERROR")
    assert "check interrupts is NOT_RUN" in seen["result"]["reason"]


def test_unsupported_without_a_reason_is_not_a_pass(tmp_path, capsys, fake):
    checks = {"memory": verdict("PASS"), "dma": verdict("UNSUPPORTED"), "interrupts": verdict("PASS")}
    seen = fake(tmp_path, capsys, verify_checks=checks)
    assert seen["result"]["verdict"] == "ERROR" and "without a reason" in seen["result"]["reason"]


def test_collect_raising_takes_the_pass_away(tmp_path, capsys, fake, monkeypatch):
    def broken(*_):
        raise RuntimeError("collect broke")

    monkeypatch.setattr(runner, "_collect", broken)
    seen = fake(tmp_path, capsys)
    assert seen["result"]["verdict"] == "ERROR" and seen["result"]["error"]["step"] == "collect"


def test_a_run_killed_outright_leaves_an_error_not_a_pass(tmp_path, fake, monkeypatch):
    """SIGKILL runs no handler and no finally: the result written before anything else stands."""
    seen_at_start = {}

    def peek(self, *args):
        seen_at_start.update(json.loads((tmp_path / "r" / "result.json").read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeFlow, "run", peek)
    with pytest.raises(KeyboardInterrupt):
        runner.run_cell(runner.Cell(), tmp_path / "r")
    assert seen_at_start["verdict"] == "ERROR" and seen_at_start["reason"] == "the run did not finish"


# -- the property: nothing but a complete, clean run is PASS --------------------------------------

CHECK_STATES = st.sampled_from(["PASS", "FAIL", "NOT_RUN", "UNSUPPORTED", "UNSUPPORTED-with-reason"])
ENDINGS = st.sampled_from([None, *FAILURES, "CheckFailed", "KeyboardInterrupt", "Terminated", "UsageError",
                           "KeyError", "RigFault"])


def make(ending: str) -> BaseException:
    if ending in FAILURES:
        return FAILURES[ending]()
    return {"CheckFailed": lambda: CheckFailed("dma", "corrupted", {}), "KeyboardInterrupt": KeyboardInterrupt,
            "Terminated": lambda: Terminated(signal.SIGTERM), "UsageError": lambda: UsageError("bad"),
            "KeyError": lambda: KeyError("x"), "RigFault": lambda: RigFault("stall")}[ending]()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step=st.sampled_from(STEPS), ending=ENDINGS, l0=st.booleans(), cycles=st.integers(1, 3),
       states=st.fixed_dictionaries({name: CHECK_STATES for name in CHECKS if name != "liveness"}))
def test_no_path_yields_pass_unless_every_check_passed_and_a_restart_ran(tmp_path_factory, fake, step, ending, l0,
                                                                         cycles, states):
    tmp_path = tmp_path_factory.mktemp("p")
    FakeFlow.fail_at, FakeFlow.failure = (step, make(ending)) if ending else (None, None)
    FakeFlow.verify_checks = {name: verdict(state.split("-")[0], reason="why" if "reason" in state else "")
                              for name, state in states.items() if state != "NOT_RUN"}
    FakeRig.l0 = L0_DIED if l0 else None
    try:
        result = runner.run_cell(runner.Cell(cycles=cycles), tmp_path / "r")
    except BaseException:
        result = json.loads((tmp_path / "r" / "result.json").read_text())
    if result["verdict"] == "PASS":
        assert ending is None and result["completed"] and result["cycles_completed"] == cycles >= 1
        assert result["checks"]["liveness"]["verdict"] == "PASS"
        assert all(c["verdict"] == "PASS" or (c["verdict"] == "UNSUPPORTED" and c.get("reason"))
                   for c in result["checks"].values())
    on_disk = json.loads((tmp_path / "r" / "result.json").read_text())
    assert on_disk["verdict"] == result["verdict"]
