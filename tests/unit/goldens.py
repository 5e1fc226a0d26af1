"""Golden files shared by the report, results and pipeline tests."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FIXTURES = GOLDEN / "fixtures" / "results"
UPDATE = os.environ.get("FASTRESTART_UPDATE_GOLDEN") == "1"


def assert_golden(actual: str, name: str) -> None:
    """Compare with tests/golden/<name>, or rewrite it when FASTRESTART_UPDATE_GOLDEN=1."""
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; create it with FASTRESTART_UPDATE_GOLDEN=1"
    assert actual == path.read_text(encoding="utf-8"), (
        f"{name} differs from the golden file; if the change is intended, regenerate with "
        "FASTRESTART_UPDATE_GOLDEN=1 pytest tests/unit")
