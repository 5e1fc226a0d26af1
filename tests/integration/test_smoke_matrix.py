"""The smoke matrix for real: booted cells, and the report a reader sees.

`ci/smoke.yaml` holds a cell that must PASS, one that the probes settle as UNSUPPORTED (and says
it expects so), and one that injects a fault the memory check must catch. Avocado reads the same
file format through its varianter; tests/integration/test_matrix.py compares the two runners on
cells the probes settle, so that this booted matrix runs once, not twice.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cellrun import assert_caught_by_its_check_only, assert_the_default_cell_kept_the_guest
from fastrestart.campaign import report, results

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "ci" / "smoke.yaml"


def test_smoke_matrix_for_real(tmp_path):
    out = tmp_path / "matrix"
    proc = subprocess.run([sys.executable, "-m", "fastrestart.cli", "matrix", str(SMOKE), "--parallel", "2",
                           "--results", str(out)], capture_output=True, text=True, timeout=3600, cwd=REPO)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout + proc.stderr  # every cell met its expectation

    found = {r["cell"]: r for r in results.collect(out)}
    effective = {cell: results.effective_verdict(r)[0] for cell, r in found.items()}
    # The default cell: it passes, with a real host restart under the same guest, and real work done.
    assert_the_default_cell_kept_the_guest(found["trixie-cpr-reboot"])
    # One cell the probes settle, with the reason, without a boot.
    unsupported = found["bookworm-qemu-cpr-reboot"]
    assert unsupported["verdict"] == "UNSUPPORTED" and "7.2" in unsupported["reason"]
    assert unsupported["l1"]["boot_ids"] == []
    # One injected fault, caught by the check made for it: the cell is a PASS of the harness.
    assert_caught_by_its_check_only(found["trixie-inject-mem-flip"], "memory", "bad page")
    assert effective["trixie-inject-mem-flip"] == "PASS"

    # The report a reader opens, as a picture kept beside it.
    shot = report.screenshot(out / "report.html", out / "report.png")
    assert shot.stat().st_size > 20_000, "a blank page is a few KiB"
    html = (out / "report.html").read_text()
    assert all(cell in html for cell in found)
    print(f"report: {out / 'report.html'}  screenshot: {shot}")
