"""The rendered GitLab pipeline, run for real by gitlab-ci-local with its shell executor.

The pipeline is rendered from a smoke matrix whose cells the capability probes settle (real QEMU
binaries asked for their QAPI schema, real kernel configs), so every job runs the real
`fastrestart` without booting a VM: warm-cache, one job per cell, then the merge job that
builds the report from the cells' artifacts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fastrestart.campaign import pipelines, results

pytestmark = pytest.mark.vm  # the cells probe real QEMU binaries

REPO = Path(__file__).resolve().parents[2]
GITLAB_CI_LOCAL = "gitlab-ci-local@4.60.1"  # the newest that runs on Node 20 (4.75 needs Node 22)
MATRIX = """\
# Cells the probes settle in seconds: the pipeline's plumbing is what is under test here.
cells: !mux
  kernel: debian:trixie
  bookworm-cpr-reboot: {l1_qemu: bookworm, mode: cpr-reboot}
  trixie-fsdax-vfio: {l1_qemu: trixie, ram_backend: fsdax, devices: [edu]}
"""


@pytest.fixture(scope="module")
def gitlab_ci_local() -> list[str]:
    if not shutil.which("npx"):
        pytest.skip("npx is not installed (Debian: apt-get install npm), so gitlab-ci-local cannot run")
    command = ["npx", "--yes", GITLAB_CI_LOCAL]
    try:
        probe = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{GITLAB_CI_LOCAL} could not be installed from the npm registry within 15 min")
    if probe.returncode != 0:
        pytest.skip(f"{GITLAB_CI_LOCAL} cannot be installed here: {probe.stderr.strip()[-300:]}")
    return command


def checkout(tmp_path: Path) -> Path:
    """A git checkout of the working tree, as a CI runner would clone it."""
    tree = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    (tree / "ci" / "probe-smoke.yaml").write_text(MATRIX)
    pipelines.render_pipeline("gitlab", tree / "ci" / "probe-smoke.yaml", tree / ".gitlab-ci.yml",
                              matrix_ref="ci/probe-smoke.yaml")
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=tree, check=True)
    subprocess.run([*git, "remote", "add", "origin", "https://gitlab.example/fastrestart/fastrestart.git"],
                   cwd=tree, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tree, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "pipeline under test"], cwd=tree, check=True)
    return tree


def test_rendered_gitlab_pipeline_runs_in_gitlab_ci_local(tmp_path, gitlab_ci_local):
    tree = checkout(tmp_path)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    # The job cache would start empty; point the jobs at this machine's warm artifact and pip caches.
    proc = subprocess.run([*gitlab_ci_local, "--shell-isolation", "--variable", f"XDG_CACHE_HOME={home}",
                           "--variable", f"PIP_CACHE_DIR={home / 'pip'}"],
                          cwd=tree, capture_output=True, text=True, timeout=2400)
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for job in ("warm-cache", "report"):
        assert job in proc.stdout
    # The merge job built the report from both cells' artifacts, copied back into the checkout.
    found = {r["cell"]: r for r in results.collect(tree / "results")}
    assert set(found) == {"bookworm-cpr-reboot", "trixie-fsdax-vfio"}
    assert found["bookworm-cpr-reboot"]["verdict"] == "UNSUPPORTED" and "7.2" in found["bookworm-cpr-reboot"]["reason"]
    assert "fsdax" in found["trixie-fsdax-vfio"]["reason"]
    report = (tree / "results" / "report.html").read_text()
    assert "bookworm-cpr-reboot" in report and "trixie-fsdax-vfio" in report
