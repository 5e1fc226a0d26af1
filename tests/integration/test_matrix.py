"""`fastrestart matrix` and the avocado test cases on cells that probes settle without a boot.

These run the real CLI and the real avocado runner end to end, on cells whose verdict the
capability probes decide (UNSUPPORTED, with the reason), so they stay fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastrestart.campaign import results
from tools import tool as venv_tool

REPO = Path(__file__).resolve().parents[2]
MATRIX = """\
cells: !mux
  kernel: debian:trixie
  bookworm-cpr-reboot: {l1_qemu: bookworm, mode: cpr-reboot, expect: UNSUPPORTED}
  trixie-fsdax-vfio: {l1_qemu: trixie, ram_backend: fsdax, devices: [edu]}
"""


@pytest.fixture
def matrix(tmp_path) -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text(MATRIX)
    return path


def test_matrix_runs_cells_in_parallel_and_reports(tmp_path, matrix):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "fastrestart.cli", "matrix", str(matrix), "--parallel", "2",
                           "--results", str(out)], capture_output=True, text=True, timeout=900, cwd=REPO)
    # 4: a cell came out UNSUPPORTED that nobody expected (trixie-fsdax-vfio); the expected one is fine.
    assert proc.returncode == 4, proc.stdout + proc.stderr
    found = {r["cell"]: r for r in results.collect(out)}
    assert set(found) == {"bookworm-cpr-reboot", "trixie-fsdax-vfio"}
    assert found["bookworm-cpr-reboot"]["verdict"] == "UNSUPPORTED" and "7.2" in found["bookworm-cpr-reboot"]["reason"]
    assert "fsdax" in found["trixie-fsdax-vfio"]["reason"]
    for name in ("report.md", "report.html", "junit.xml", "results.json", "phases.svg"):
        assert (out / name).stat().st_size > 0, name
    assert "bookworm-cpr-reboot" in (out / "report.md").read_text()
    assert "[2/2" in proc.stdout  # progress


@pytest.mark.skipif(not venv_tool("avocado"), reason="avocado is not installed (./setup installs it)")
def test_avocado_job_statuses_match_the_matrix(tmp_path, matrix):
    job = tmp_path / "avocado"
    proc = subprocess.run([venv_tool("avocado"), "run", "--job-results-dir", str(job), "--disable-sysinfo",
                           str(REPO / "testcases" / "restart.py"), "-m", str(matrix)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(next(job.glob("job-*/results.json")).read_text())
    restart = [t for t in data["tests"] if "Restart.test" in t["id"]]
    assert len(restart) == 2 and {t["status"] for t in restart} == {"CANCEL"}
    assert any("7.2" in (t.get("fail_reason") or "") for t in restart)
    assert next(job.glob("job-*/results.xml")).exists()
