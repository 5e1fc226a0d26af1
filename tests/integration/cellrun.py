"""Running one real cell from a test, with the suite's retry policy built in."""

from __future__ import annotations

from pathlib import Path

from fastrestart.campaign.results import is_rig_error
from fastrestart.campaign.runner import Cell, run_cell
from fastrestart.errors import RigFault


def run(tmp_path: Path, name: str = "run", **cell) -> dict:
    """Run a cell end to end, as `fastrestart run` does. A run that the rig (L0) broke raises
    RigFault, which the suite reruns once (tests/conftest.py); every other verdict is returned for
    the test to judge, never retried."""
    run_dir = tmp_path / name
    result = run_cell(Cell(**cell), run_dir)
    print(f"{result['cell']}: {result['verdict']} {result['reason']} (logs: {run_dir / 'logs'})")
    if is_rig_error(result):
        raise RigFault(f"rig ERROR in {result['cell']}: {result['reason']}", result["error"].get("evidence"))
    return result
