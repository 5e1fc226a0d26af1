"""Shared fixtures and the suite's retry policy.

The suite follows the matrix's policy: a VM test whose run ended in an ERROR that names the rig
(L0's QEMU died or asserted, a proven transport stall) raises ``RigFault`` from the run helper and
is run once more; nothing else is retried, a FAIL never. Every rerun is listed at the end of the
session, and a session that needed more than ``MAX_RERUNS`` reruns fails: rig flakiness must show,
not be absorbed.
"""

from __future__ import annotations

import shutil

import pytest
from fastrestart.errors import RigFault

MAX_RERUNS = 2


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
                item.add_marker(pytest.mark.flaky(reruns=1, only_rerun=[RigFault]))


_reruns: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    """Runs in the controller too (xdist forwards reports): count every rerun, with its reason."""
    if report.outcome == "rerun":
        _reruns.append((report.nodeid, str(report.longrepr.reprcrash.message if hasattr(report.longrepr, "reprcrash")
                                            else report.longrepr)[:300]))


def pytest_terminal_summary(terminalreporter):
    if _reruns:
        terminalreporter.section(f"reruns of rig ERRORs ({len(_reruns)}, at most {MAX_RERUNS} allowed)")
        for nodeid, why in _reruns:
            terminalreporter.line(f"RERUN {nodeid}: {why}")


def pytest_sessionfinish(session, exitstatus):
    if len(_reruns) > MAX_RERUNS and exitstatus == 0 and not hasattr(session.config, "workerinput"):
        print(f"\nconftest: {len(_reruns)} reruns of rig ERRORs (more than {MAX_RERUNS}): failing the session")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
