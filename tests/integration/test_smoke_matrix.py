"""The smoke matrix for real: booted cells, the report a reader sees, and avocado agreeing with it.

`ci/smoke.yaml` holds a cell that must PASS, one that the probes settle as UNSUPPORTED, and one
that injects a fault the memory check must catch. The same file is run by `fastrestart matrix`
and by avocado's varianter; both must reach the same verdict for every cell.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastrestart.campaign import report, results
from tools import tool as venv_tool

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "ci" / "smoke.yaml"
AVOCADO_STATUS = {results.PASS: "PASS", results.FAIL: "FAIL", results.ERROR: "ERROR", results.UNSUPPORTED: "CANCEL"}
"""What testcases/restart.py makes of a cell's verdict (after its `expect:`)."""


def avocado_statuses(job_dir: Path) -> dict[str, tuple[str, str]]:
    """cell -> (status, reason) from an avocado job, leaving out the cancels of the other families
    (every family class sees every variant and cancels those that are not its own)."""
    data = json.loads(next(job_dir.glob("job-*/results.json")).read_text())
    statuses = {}
    for test in data["tests"]:
        reason = test.get("fail_reason") or ""
        if test["status"] == "CANCEL" and reason.startswith("not a "):
            continue
        variant = test["id"].split(";", 1)[1]
        cell = re.sub(r"^run-cells-|-[0-9a-f]{4}$", "", variant)
        assert cell not in statuses, f"{cell} was judged by two families"
        statuses[cell] = (test["status"], reason)
    return statuses


@pytest.mark.skipif(not venv_tool("avocado"), reason="avocado is not installed (./setup installs it)")
def test_smoke_matrix_for_real_and_avocado_agrees(tmp_path):
    out = tmp_path / "matrix"
    proc = subprocess.run([sys.executable, "-m", "fastrestart.cli", "matrix", str(SMOKE), "--parallel", "2",
                           "--results", str(out)], capture_output=True, text=True, timeout=3600, cwd=REPO)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout + proc.stderr

    found = {r["cell"]: r for r in results.collect(out)}
    effective = {cell: results.effective_verdict(r)[0] for cell, r in found.items()}
    # One booted cell that passes, with a real host restart under it.
    passed = found["trixie-cpr-reboot"]
    assert passed["verdict"] == "PASS", passed["reason"]
    assert len(set(passed["l1"]["boot_ids"])) == 2 and passed["downtime_s"]["qmp"] > 0
    # One cell the probes settle, with the reason, without a boot.
    unsupported = found["bookworm-qemu-cpr-reboot"]
    assert unsupported["verdict"] == "UNSUPPORTED" and "7.2" in unsupported["reason"]
    assert unsupported["l1"]["boot_ids"] == []
    # One injected fault, caught by the check made for it: the cell is a PASS of the harness.
    fault = found["trixie-inject-mem-flip"]
    assert fault["verdict"] == "FAIL" and fault["checks"]["memory"]["verdict"] == "FAIL"
    assert effective["trixie-inject-mem-flip"] == "PASS"

    # The report a reader opens, as a picture kept beside it.
    shot = report.screenshot(out / "report.html", out / "report.png")
    assert shot.stat().st_size > 20_000, "a blank page is a few KiB"
    html = (out / "report.html").read_text()
    assert all(cell in html for cell in found)
    print(f"report: {out / 'report.html'}  screenshot: {shot}")

    # avocado's varianter reads the same file; its statuses must say the same.
    job = tmp_path / "avocado"
    proc = subprocess.run([venv_tool("avocado"), "run", "--job-results-dir", str(job), "--disable-sysinfo",
                           str(REPO / "testcases" / "restart.py"), "-m", str(SMOKE)],
                          capture_output=True, text=True, timeout=3600, cwd=REPO)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    statuses = avocado_statuses(job)
    assert {cell: status for cell, (status, _) in statuses.items()} == {
        cell: AVOCADO_STATUS[verdict] for cell, verdict in effective.items()}
    assert "7.2" in statuses["bookworm-qemu-cpr-reboot"][1]
