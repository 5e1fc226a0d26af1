"""`fastrestart matrix` trusts a cell only when its exit code and its result.json agree, and a
cell that left nothing is an ERROR (a fake cell process stands in for `fastrestart run`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastrestart.campaign import matrix, results

PASSING = {"schema": 1, "cell": "c", "verdict": "PASS", "reason": "", "mode": "cpr-reboot", "accel": "tcg",
           "params": {}, "phases": {}, "checks": {"liveness": {"verdict": "PASS"}}, "error": None}


def fake_cell(monkeypatch, result: dict | None, code: int) -> None:
    """The cell process writes ``result`` (if any) to its --results directory and exits ``code``."""
    def start(self, command, log):
        run_dir = command[command.index("--results") + 1]
        script = (f"import json, pathlib, sys; d = pathlib.Path({run_dir!r}); d.mkdir(parents=True); "
                  + (f"(d / 'result.json').write_text(json.dumps({result!r})); " if result else "")
                  + f"sys.exit({code})")
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT)
        self.running.add(proc)
        return proc

    monkeypatch.setattr(matrix._Cells, "start", start)


@pytest.mark.parametrize(("result", "code", "verdict", "says"), [
    (PASSING, 0, "PASS", ""),
    (PASSING, 1, "ERROR", "exited 1 but its result.json says PASS"),
    (PASSING, 143, "ERROR", "exited 143 but its result.json says PASS"),
    ({**PASSING, "verdict": "FAIL", "reason": "dma: x"}, 1, "FAIL", "dma"),
    ({**PASSING, "verdict": "ERROR", "error": {"kind": "interrupted"}}, 143, "ERROR", ""),
    (None, -9, "ERROR", "left no readable result"),
])
def test_a_cell_is_trusted_only_when_its_exit_and_result_agree(tmp_path, monkeypatch, result, code, verdict, says):
    fake_cell(monkeypatch, result, code)
    attempts = matrix.run_cell_with_retry({"name": "c"}, tmp_path)
    assert attempts[-1]["verdict"] == verdict and says in attempts[-1]["reason"]
    assert len(attempts) == 1  # none of these is the rig's: nothing is retried
    on_disk = json.loads((tmp_path / "c" / "attempt-1" / "result.json").read_text())
    assert on_disk["verdict"] == verdict


def test_only_a_rig_error_is_retried_and_both_attempts_are_kept(tmp_path, monkeypatch):
    fake_cell(monkeypatch, {**PASSING, "verdict": "ERROR", "error": {"kind": "rig"}}, 3)
    attempts = matrix.run_cell_with_retry({"name": "c"}, tmp_path)
    assert [a["attempt"] for a in attempts] == [1, 2]
    final = results.final_verdict(attempts)
    assert final["retried"] and [a["verdict"] for a in final["attempts"]] == ["ERROR", "ERROR"]


def test_a_stopping_matrix_runs_no_more_cells(tmp_path, monkeypatch):
    fake_cell(monkeypatch, PASSING, 0)
    cells = matrix._Cells()
    cells.stopping = True
    monkeypatch.setattr(matrix._Cells, "start", lambda self, command, log: None)
    attempts = matrix.run_cell_with_retry({"name": "c"}, tmp_path, cells)
    assert attempts[0]["verdict"] == "ERROR" and attempts[0]["error"]["kind"] == "interrupted"
