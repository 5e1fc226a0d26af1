"""fastrestart.campaign.pipelines: matrix files, `fastrestart run` arguments and the rendered CI pipelines.
Golden files: tests/golden/pipelines/; regenerate with FASTRESTART_UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from fastrestart.campaign import pipelines
from fastrestart.errors import UsageError
from goldens import GOLDEN, assert_golden
from tools import tool as venv_tool

MATRIX = GOLDEN / "fixtures" / "matrix.yaml"
NAMES = ["trixie-cpr-reboot", "bookworm-cpr-reboot-unsupported", "trixie-mem-flip",
         "trixie-sid-cpr-reboot-edu"]
SCHEMAS = {"gitlab": "vendor.gitlab-ci", "github": "vendor.github-workflows"}



def write_matrix(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    return path


# cell_args


@pytest.mark.parametrize(("cell", "args"), [
    ({"name": "a", "kernel": "debian:trixie", "l1_qemu": "trixie", "mode": "cpr-reboot",
      "devices": ["edu", "nvme"]},
     ["--kernel", "debian:trixie", "--l1-qemu", "trixie", "--mode", "cpr-reboot", "--devices", "edu,nvme"]),
    ({"name": "b", "expect": "FAIL", "description": "x", "inject": "mem-flip", "kernel": "/k/bzImage"},
     ["--kernel", "/k/bzImage", "--inject", "mem-flip"]),
    ({"ram_backend": "devdax", "cycles": 3, "l2_mem": "512M", "to_kernel": "debian:sid",
      "kernel": "debian:trixie", "devices": "edu"},
     ["--kernel", "debian:trixie", "--to-kernel", "debian:sid", "--devices", "edu", "--l2-mem", "512M",
      "--cycles", "3", "--ram-backend", "devdax"]),
    ({"name": "c", "devices": [], "inject": None}, ["--devices", "none"]),
    ({"shared_ram": False, "mem_check": 64, "accel": "tcg", "l0_qemu": "sid", "l2_kernel": "debian:trixie"},
     ["--l2-kernel", "debian:trixie", "--l0-qemu", "sid", "--accel", "tcg", "--no-shared-ram",
      "--mem-check", "64"]),
    ({"shared_ram": True}, []),
    ({"edu_irq": "intx", "l2_iommu": True}, ["--l2-iommu", "--edu-irq", "intx"]),
    ({}, []),
])
def test_cell_args(cell: dict, args: list[str]) -> None:
    assert pipelines.cell_args(cell) == args


def test_cell_args_rejects_unknown_keys() -> None:
    with pytest.raises(UsageError, match=r"unknown key.*devcies"):
        pipelines.cell_args({"name": "a", "devcies": ["edu"]})


def test_every_cell_of_the_fixture_has_args() -> None:
    cells = pipelines.load_matrix(MATRIX)
    assert [c["name"] for c in cells] == NAMES
    assert pipelines.cell_args(cells[0])[-2:] == ["--l2-mem", "256M"]  # from defaults:
    assert "--l2-mem" not in pipelines.cell_args(cells[1])  # overridden with null
    assert pipelines.cell_args(cells[3]) == [
        "--kernel", "debian:trixie", "--to-kernel", "debian:sid", "--l1-qemu", "sid", "--mode", "cpr-reboot",
        "--devices", "edu", "--l2-mem", "256M", "--cycles", "2", "--ram-backend", "devdax"]


# load_matrix


@pytest.mark.parametrize(("text", "message"), [
    ("cells: [", "not valid YAML"),
    ("{}", "non-empty 'cells:' list"),
    ("cells: []", "non-empty 'cells:' list"),
    ("cells: [a]", "must be a mapping"),
    ("cells: [{kernel: debian:trixie}]", "'name' must be"),
    ("cells: [{name: 'a b'}]", "'name' must be"),
    ("cells: [{name: a}, {name: a}]", "duplicate cell name 'a'"),
    ("cells: [{name: a, devcies: [edu]}]", r"unknown key\(s\) devcies"),
    ("cells: [{name: a, expect: BROKEN}]", "expect 'BROKEN': 'BROKEN' is not one of"),
    ("cells: [{name: a, expect: FAIL}]", "expect FAIL must name the check"),
    ("cells: [{name: a, expect: 'FAIL:cosmic'}]", "only FAIL names a check"),
    ("cells: [{name: a, mode: cpr-rebot}]", "unknown mode 'cpr-rebot'; choose one of: auto"),
    ("cells: [{name: a, inject: cosmic-ray}]", "unknown inject 'cosmic-ray'"),
    ("cells: [{name: a, devices: [gpu]}]", "unknown device"),
    ("cells: [{name: a, cycles: 0}]", "cycles must be a whole number of at least 1"),
    ("cells: [{name: a, devices: {edu: 1}}]", "devices must be"),
    ("cells: [{name: a, mem_check: 1.5}]", "mem-check must be a whole number of at least 1"),
    ("cells: [{name: a, shared_ram: 'no'}]", "shared_ram must be true or false"),
    ("defaults: [1]\ncells: [{name: a}]", "'defaults:' must be a mapping"),
    ("defaults: {bogus: 1}\ncells: [{name: a}]", "defaults: unknown key"),
])
def test_load_matrix_rejects_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = write_matrix(tmp_path, text)
    with pytest.raises(UsageError, match=message) as info:
        pipelines.load_matrix(path)
    assert str(path) in str(info.value)


def test_load_matrix_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the matrix"):
        pipelines.load_matrix(tmp_path / "missing.yaml")


# render_pipeline


@pytest.mark.parametrize(("engine", "golden"), [("gitlab", "gitlab-ci.yml"),
                                               ("github", "github-workflow.yml")])
def test_render_pipeline_golden(tmp_path: Path, engine: str, golden: str) -> None:
    out = pipelines.render_pipeline(engine, MATRIX, tmp_path / golden)
    assert out == tmp_path / golden
    assert_golden(out.read_text(encoding="utf-8"), f"pipelines/{golden}")


@pytest.mark.parametrize("engine", ["gitlab", "github"])
def test_render_pipeline_is_stable(tmp_path: Path, engine: str) -> None:
    first = pipelines.render_pipeline(engine, MATRIX, tmp_path / "a.yml").read_bytes()
    assert first == pipelines.render_pipeline(engine, MATRIX, tmp_path / "b.yml").read_bytes()


@pytest.mark.parametrize("engine", ["gitlab", "github"])
def test_rendered_pipeline_passes_the_engine_schema(tmp_path: Path, engine: str) -> None:
    tool = venv_tool("check-jsonschema")
    if not tool:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]'); it bundles the schemas")
    out = pipelines.render_pipeline(engine, MATRIX, tmp_path / "pipeline.yml")
    proc = subprocess.run([tool, "--builtin-schema", SCHEMAS[engine], str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gitlab_pipeline_structure(tmp_path: Path) -> None:
    doc = yaml.safe_load(pipelines.render_pipeline("gitlab", MATRIX, tmp_path / "p.yml").read_text())
    assert doc["variables"]["MATRIX"] == "tests/golden/fixtures/matrix.yaml"
    assert doc["variables"]["XDG_CACHE_HOME"] == "${CI_PROJECT_DIR}/.cache"
    warm, cells, rep = doc["warm-cache"], doc["cells"], doc["report"]
    assert warm["script"] == ['fastrestart fetch --matrix "$MATRIX"']
    assert warm["cache"]["key"]["files"] == ["tests/golden/fixtures/matrix.yaml"]
    assert warm["cache"]["paths"] == [".cache/"] and warm["cache"]["policy"] == "pull-push"
    assert cells["cache"]["policy"] == "pull"
    assert [entry["CELL"] for entry in cells["parallel"]["matrix"]] == NAMES
    assert cells["script"] == ["fastrestart doctor",
                               'fastrestart matrix "$MATRIX" --only "$CELL" --results "results/$CELL"']
    assert cells["artifacts"]["when"] == "always" and cells["artifacts"]["paths"] == ["results/"]
    assert cells["allow_failure"] == {"exit_codes": [4]}
    assert rep["needs"] == [{"job": "cells", "artifacts": True}] and rep["when"] == "always"
    assert rep["script"] == ["fastrestart report results/"]
    assert rep["artifacts"]["reports"]["junit"] == "results/junit.xml"
    assert rep["artifacts"]["when"] == "always"


def test_github_workflow_structure(tmp_path: Path) -> None:
    doc = yaml.safe_load(pipelines.render_pipeline("github", MATRIX, tmp_path / "p.yml").read_text())
    jobs = doc["jobs"]
    assert list(jobs) == ["warm-cache", "cells", "report"]
    assert jobs["cells"]["strategy"]["matrix"]["cell"] == NAMES
    assert jobs["cells"]["strategy"]["fail-fast"] is False
    uses = {job: [s.get("uses", "").split("@")[0] for s in jobs[job]["steps"]] for job in jobs}
    assert "actions/cache" in uses["warm-cache"]
    assert "actions/cache/restore" in uses["cells"] and "actions/upload-artifact" in uses["cells"]
    assert "actions/download-artifact" in uses["report"] and "actions/upload-artifact" in uses["report"]
    assert jobs["report"]["needs"] == "cells" and jobs["report"]["if"] == "always()"
    runs = "\n".join(s.get("run", "") for s in jobs["cells"]["steps"])
    assert 'fastrestart matrix "$MATRIX" --only "$CELL" --results "results/$CELL"' in runs
    key = next(s["with"]["key"] for s in jobs["warm-cache"]["steps"]
               if s.get("uses", "").startswith("actions/cache"))
    assert key == "fastrestart-${{ hashFiles('tests/golden/fixtures/matrix.yaml') }}"


# what the jobs install, and how they treat `fastrestart matrix`'s exit codes

SETUP = Path(__file__).resolve().parents[2] / "setup"
RUN_CELL = 'fastrestart matrix "$MATRIX" --only "$CELL" --results "results/$CELL"'
MATRIX_EXITS = [0, 1, 2, 3, 4, 130, 143]  # met, FAIL, usage, ERROR, unexpected UNSUPPORTED, interrupted


def test_l0_packages_cover_what_setup_installs_for_the_rig() -> None:
    packages = set(re.search(r"^packages=\(([^)]*)\)", SETUP.read_text(), re.M)[1].split())
    not_the_rig = {"python3", "python3-venv",  # the runner's python and venv
                   "chromium", "rsync", "ovmf"}  # the tests' (report screenshot, gitlab-ci-local, bench)
    assert packages - not_the_rig <= set(pipelines.L0_PACKAGES)
    assert "busybox-static" in pipelines.L0_PACKAGES  # images.py copies /bin/busybox
    assert "debian-archive-keyring" in pipelines.L0_PACKAGES  # Debian's archive, checked on Ubuntu too


def test_github_jobs_install_what_they_run_on_an_ubuntu_runner(tmp_path: Path) -> None:
    doc = yaml.safe_load(pipelines.render_pipeline("github", MATRIX, tmp_path / "p.yml").read_text())
    # Ubuntu's apt sources name no /debian mirror: the harness's private apt must be given Debian's.
    assert doc["env"]["FASTRESTART_DEBIAN_MIRROR"] == "http://deb.debian.org/debian"
    assert doc["env"]["FASTRESTART_DEBIAN_SECURITY_MIRROR"] == "http://deb.debian.org/debian-security"
    for job, command in [("warm-cache", "fastrestart fetch"), ("cells", "fastrestart matrix"),
                         ("report", "fastrestart report")]:
        runs = [step.get("run", "") for step in doc["jobs"][job]["steps"]]
        uses = next(i for i, run in enumerate(runs) if command in run)
        venv = next(i for i, run in enumerate(runs) if "pip install" in run)
        assert venv < uses and "python -m venv .venv" in runs[venv]
        assert "pip install --quiet ." in runs[venv] and " -e " not in runs[venv]  # the package ships its data
        apt = [i for i, run in enumerate(runs) if "apt-get install" in run]
        if job == "report":
            assert apt == []  # the report needs python only
            continue
        assert len(apt) == 1 and apt[0] < uses
        assert runs[apt[0]].split("--no-install-recommends ")[1].split() == list(pipelines.L0_PACKAGES)
        assert any("apparmor_restrict_unprivileged_userns=0" in run for run in runs[:uses])  # unshare
    cells = doc["jobs"]["cells"]
    assert cells["runs-on"] == "${{ vars.FASTRESTART_RUNNER || 'ubuntu-latest' }}"
    runs = [step.get("run", "") for step in cells["steps"]]
    kvm = next(i for i, run in enumerate(runs) if "/dev/kvm" in run)
    assert 'MODE="0666"' in runs[kvm] and kvm < next(i for i, run in enumerate(runs) if RUN_CELL in run)


def test_gitlab_jobs_install_what_they_run(tmp_path: Path) -> None:
    doc = yaml.safe_load(pipelines.render_pipeline("gitlab", MATRIX, tmp_path / "p.yml").read_text())
    before = doc[".fastrestart"]["before_script"]
    assert "python3 -m venv .venv" in before and ". .venv/bin/activate" in before
    assert "python -m pip install --quiet ." in before and not any(" -e " in line for line in before)
    assert doc["variables"]["FASTRESTART_RIG_PACKAGES"] == " ".join(pipelines.L0_PACKAGES)
    assert doc["report"]["variables"]["FASTRESTART_RIG_PACKAGES"] == ""  # the report needs python only
    assert all(doc[job]["extends"] == ".fastrestart" for job in ("warm-cache", "cells", "report"))
    assert "FASTRESTART_DEBIAN_MIRROR=http://deb.debian.org/debian " in before[-1]


def _fake_tools(tmp_path: Path, scripts: dict[str, str]) -> dict[str, str]:
    """An environment whose PATH starts with these stand-in commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize(("missing", "can_sudo", "ok", "installed"), [
    ("", False, True, None),  # everything there: nothing installed, no root needed
    ("kmod", True, True, "kmod"),  # passwordless sudo: the missing package only
    ("kmod", False, False, None),  # neither root nor sudo: stop and name it
])
def test_gitlab_installs_only_missing_packages(tmp_path: Path, missing: str, can_sudo: bool, ok: bool,
                                               installed: str | None) -> None:
    doc = yaml.safe_load(pipelines.render_pipeline("gitlab", MATRIX, tmp_path / "p.yml").read_text())
    log = tmp_path / "apt.log"
    env = _fake_tools(tmp_path, {
        "dpkg-query": f'[ "$3" = "{missing}" ] || printf "install ok installed"',
        "id": "echo 1000",
        "sudo": ("[ \"$1\" = -n ] && shift; exec \"$@\"" if can_sudo else "exit 1"),
        "apt-get": f'echo "$*" >> {log}',
    })
    env["FASTRESTART_RIG_PACKAGES"] = doc["variables"]["FASTRESTART_RIG_PACKAGES"]
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", doc[".fastrestart"]["before_script"][0]],
                          env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) is ok, proc.stderr
    if not ok:
        assert f"lacks Debian packages fastrestart needs: {missing}." in proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    assert calls == ([] if not installed else ["update -qq", f"install -y -qq --no-install-recommends {installed}"])


@pytest.mark.parametrize("code", MATRIX_EXITS)
def test_github_cell_passes_only_when_the_matrix_exits_0_or_4(tmp_path: Path, code: int) -> None:
    doc = yaml.safe_load(pipelines.render_pipeline("github", MATRIX, tmp_path / "p.yml").read_text())
    step = next(s for s in doc["jobs"]["cells"]["steps"] if RUN_CELL in s.get("run", ""))
    env = {**_fake_tools(tmp_path, {"fastrestart": f"exit {code}"}), "MATRIX": "m.yaml", "CELL": "c1"}
    # GitHub runs a step's script with bash -e.
    proc = subprocess.run(["bash", "-e", "-c", step["run"]], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (0 if code in (0, 4) else code)
    assert ("::warning title=c1 is UNSUPPORTED::" in proc.stdout) is (code == 4)


@pytest.mark.parametrize("code", MATRIX_EXITS)
def test_gitlab_cell_passes_only_when_the_matrix_exits_0_or_4(tmp_path: Path, code: int) -> None:
    doc = yaml.safe_load(pipelines.render_pipeline("gitlab", MATRIX, tmp_path / "p.yml").read_text())
    cells = doc["cells"]
    env = {**_fake_tools(tmp_path, {"fastrestart": f'[ "$1" = matrix ] && exit {code}; exit 0'}),
           "MATRIX": "m.yaml", "CELL": "c1"}
    # GitLab's runner runs the script lines in one bash with errexit and pipefail.
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", "\n".join(cells["script"])], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code  # nothing in the script swallows an exit code
    warning = proc.returncode in cells["allow_failure"]["exit_codes"]  # failed, allowed: a warning
    assert (proc.returncode == 0 or warning) is (code in (0, 4)) and warning is (code == 4)


def test_pipelines_show_each_cells_run_command(tmp_path: Path) -> None:
    text = pipelines.render_pipeline("gitlab", MATRIX, tmp_path / "p.yml").read_text()
    assert ("# fastrestart run --kernel debian:trixie --l1-qemu trixie --mode auto --l2-mem 256M "
            "--inject mem-flip  (expect FAIL)") in text


@pytest.mark.parametrize("engine", ["gitlab", "github"])
def test_an_expected_check_keeps_its_name(tmp_path: Path, engine: str) -> None:
    matrix = write_matrix(tmp_path, "cells: [{name: a, inject: mem-flip, expect: 'fail:memory'}]")
    text = pipelines.render_pipeline(engine, matrix, tmp_path / "p.yml", matrix_ref="m.yaml").read_text()
    assert "--inject mem-flip  (expect FAIL:memory)" in text


@pytest.mark.parametrize(("engine", "committed"), [("gitlab", "ci/nightly.gitlab-ci.yml"),
                                                  ("github", "ci/nightly.github-workflow.yml")])
def test_committed_nightly_pipelines_are_current(tmp_path: Path, engine: str, committed: str) -> None:
    repo = SETUP.parent
    out = pipelines.render_pipeline(engine, repo / "kernels" / "matrix.yaml", tmp_path / "p.yml")
    assert out.read_text() == (repo / committed).read_text(), (
        f"{committed} is stale: fastrestart ci render --engine {engine} --matrix kernels/matrix.yaml -o {committed}")


def test_render_into_a_directory_uses_the_default_name(tmp_path: Path) -> None:
    assert pipelines.render_pipeline("gitlab", MATRIX, tmp_path).name == ".gitlab-ci.yml"
    assert pipelines.render_pipeline("github", MATRIX, tmp_path).name == "fastrestart.yml"


def test_matrix_outside_the_tree_needs_a_ref(tmp_path: Path) -> None:
    matrix = write_matrix(tmp_path, "cells: [{name: a, kernel: debian:trixie}]")
    with pytest.raises(UsageError, match="outside the source tree"):
        pipelines.render_pipeline("gitlab", matrix, tmp_path / "p.yml")
    out = pipelines.render_pipeline("gitlab", matrix, tmp_path / "p.yml", matrix_ref="ci/nightly.yaml")
    assert yaml.safe_load(out.read_text())["variables"]["MATRIX"] == "ci/nightly.yaml"
    with pytest.raises(UsageError, match="must be a relative path"):
        pipelines.render_pipeline("gitlab", matrix, tmp_path / "p.yml", matrix_ref="ci/my matrix.yaml")


def test_unknown_engine(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown CI engine 'jenkins'"):
        pipelines.render_pipeline("jenkins", MATRIX, tmp_path)


@pytest.mark.parametrize(("engine", "limit"), [("gitlab", 200), ("github", 256)])
def test_too_many_cells_for_one_matrix(tmp_path: Path, engine: str, limit: int) -> None:
    matrix = write_matrix(tmp_path, "cells:\n" + "".join(f"  - {{name: c{i}}}\n" for i in range(limit + 1)))
    with pytest.raises(UsageError, match=f"at most {limit} jobs"):
        pipelines.render_pipeline(engine, matrix, tmp_path / "p.yml", matrix_ref="m.yaml")
