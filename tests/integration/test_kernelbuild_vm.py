"""The L1 kernel built from Debian's linux-source-7.2 with the rig's fragments (docs/design.md §3.5, §10).

The build takes 20–40 minutes on 2 cores, so these tests never start it: they use the cached build
and skip, naming the command that makes it, when it is not there. The `--mode luo` test on this
kernel lives in test_luo_vm.py.
"""

from __future__ import annotations

import pytest
from fastrestart import REPO
from fastrestart.artifacts import kernelbuild, kernels
from fastrestart.campaign.runner import Cell, run_cell

pytestmark = [pytest.mark.slow, pytest.mark.vm]

SOURCE = "debian-source:7.2"
FRAGMENTS = [REPO / "kernels" / "fragments" / "fast-restart.config", REPO / "kernels" / "fragments" / "luo.config"]
BUILD_COMMAND = (f"fastrestart kernel build --source {SOURCE} "
                 + " ".join(f"--fragment {f.relative_to(REPO)}" for f in FRAGMENTS))


@pytest.fixture(scope="module")
def built() -> kernelbuild.BuildResult:
    build = kernelbuild.cached_build(SOURCE, fragments=FRAGMENTS)
    if build is None:
        pytest.skip(f"the {SOURCE} kernel build is not cached (it takes 20-40 min on 2 cores); "
                    f"build it first with `{BUILD_COMMAND}`")
    return build


def test_cached_build_is_a_complete_kernel_with_the_requested_options(built):
    kernel = kernels.resolve(built.spec)
    assert kernel.release == built.release and kernel.release.endswith(f"-fr{built.key[:8]}")
    assert kernel.image.name == "bzImage" and kernel.image.stat().st_size > 4 * 2**20
    for name in ("modules.dep", "modules.builtin"):  # the initramfs builder reads both
        assert (kernel.modules_dir / name).is_file(), name
    assert not (kernel.modules_dir / "build").exists()  # no link into a deleted build tree
    # The post-check, again, on what the cache holds: every fragment option as requested.
    assert kernelbuild.check_config(kernel.config, FRAGMENTS) == []
    options = kernel.config_options()
    assert options["CONFIG_LIVEUPDATE_MEMFD"] == "y" and options["CONFIG_DEV_DAX_PMEM"] == "y"
    assert "CONFIG_DEFERRED_STRUCT_PAGE_INIT" not in options  # KHO needs it off


def test_second_build_returns_the_cache_at_once(built):
    messages = []
    again = kernelbuild.build_kernel(SOURCE, fragments=FRAGMENTS, progress=messages.append)
    assert again.cached and again.key == built.key
    assert not any(m.startswith(("fetch", "build")) for m in messages), messages


def test_ignore_shared_cell_passes_on_the_built_kernel(tmp_path, built):
    result = run_cell(Cell(kernel=built.spec, devices=(), mode="ignore-shared", mem_check_mib=32), tmp_path / "run")
    print(f"{result['cell']}: {result['verdict']} {result['reason']} (logs: {tmp_path / 'run' / 'logs'})")
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    assert result["l1"]["kernel_from"] == built.release
