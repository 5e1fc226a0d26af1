"""Shared fixtures: every test gets its own results directory; VM tests need QEMU."""

from __future__ import annotations

import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    """VM tests are skipped, with the reason, only when this machine cannot run QEMU at all."""
    if shutil.which("qemu-system-x86_64"):
        return
    skip = pytest.mark.skip(reason="qemu-system-x86_64 is not installed (run ./setup)")
    for item in items:
        if "vm" in item.keywords:
            item.add_marker(skip)
