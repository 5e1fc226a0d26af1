"""Shared fixtures: every test gets its own results directory; VM tests need QEMU."""

from __future__ import annotations

import shutil

import pytest

# The suite follows the matrix's flakiness policy: a VM test that failed because the *rig* broke
# (its failure text carries an ERROR verdict: a TCG crash of L0's QEMU, a stalled forward) is run
# once more, and pytest reports the rerun; a FAIL of a check is never retried into a PASS.
RIG_ERROR = r"ERROR"


def pytest_collection_modifyitems(config, items):
    """VM tests are skipped, with the reason, only when this machine cannot run QEMU at all."""
    if not shutil.which("qemu-system-x86_64"):
        skip = pytest.mark.skip(reason="qemu-system-x86_64 is not installed (run ./setup)")
        for item in items:
            if "vm" in item.keywords:
                item.add_marker(skip)
        return
    if config.pluginmanager.hasplugin("rerunfailures"):
        for item in items:
            if "vm" in item.keywords:
                item.add_marker(pytest.mark.flaky(reruns=1, only_rerun=[RIG_ERROR]))
