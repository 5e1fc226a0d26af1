"""Mode luo for real: L2's RAM and device state kept across the L1 kexec by the kernel's Live
Update Orchestrator, through the same code path as `fastrestart run --mode luo`.

The real cell needs an L1 kernel built with LUO (`fastrestart kernel build` with
kernels/fragments/luo.config); it is skipped, with that reason, until such a build is cached.
"""

from __future__ import annotations

import pytest
from cellrun import run
from fastrestart.artifacts import kernels
from fastrestart.errors import UsageError
from fastrestart.paths import cache_dir

pytestmark = pytest.mark.vm

BUILD_HINT = ("no cached L1 kernel build with CONFIG_LIVEUPDATE=y: run `fastrestart kernel build "
              "--source debian-source:7.2 --fragment kernels/fragments/fast-restart.config "
              "--fragment kernels/fragments/luo.config` first")


def luo_kernel_spec() -> str | None:
    """The spec (build:KEY) of a cached kernel build that has LUO, newest first; None if none."""
    builds = sorted((cache_dir() / "builds").glob("*/install"), key=lambda p: p.stat().st_mtime, reverse=True)
    for install in builds:
        spec = f"build:{install.parent.name}"
        try:
            kernel = kernels.from_tree(spec, install)
        except UsageError:
            continue  # an unfinished build
        options = kernel.config_options()
        if options.get("CONFIG_LIVEUPDATE") == "y" and options.get("CONFIG_LIVEUPDATE_MEMFD") == "y":
            return spec
    return None


def test_luo_on_a_debian_kernel_is_unsupported_naming_liveupdate_without_booting(tmp_path):
    result = run(tmp_path, kernel="debian:sid", mode="luo", devices=())
    assert result["verdict"] == "UNSUPPORTED", result["reason"] or result["error"]
    assert "CONFIG_LIVEUPDATE " in result["reason"] and "CONFIG_LIVEUPDATE_MEMFD" in result["reason"]
    assert result["wall_s"] < 120 and result["l1"]["boot_ids"] == []


@pytest.mark.slow
def test_luo_keeps_the_guest_and_its_ram_across_the_kexec(tmp_path):
    spec = luo_kernel_spec()
    if spec is None:
        pytest.skip(BUILD_HINT)
    result = run(tmp_path, kernel=spec, mode="luo", devices=())
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    assert result["mode"] == "luo"
    memory = result["checks"]["memory"]
    assert memory["verdict"] == "PASS" and memory["evidence"]["pages_checked"] > 0
    boot_ids = result["l1"]["boot_ids"]
    assert len(boot_ids) == 2 and boot_ids[0] != boot_ids[1]  # L1 really kexec'd
    assert len(result["l2"]["boot_ids"]) == 1  # L2 did not reboot
    evidence = result["per_cycle"][0]["evidence"]
    assert evidence["save"]["luo_preserve"]["preserved"] == 1
    assert evidence["reserve"]["luo_retrieve"]["finished"] == 1
    assert evidence["kexec"]["kexec_flags"] == ["-s"] and "kho=on liveupdate=on" in evidence["kexec"]["append"]
    # L1's digest of the RAM memfd, before the kexec and after: LUO kept every byte.
    assert evidence["record"]["ram_digest_before"]["digest"] == evidence["reserve"]["ram_digest_after"]["digest"]
