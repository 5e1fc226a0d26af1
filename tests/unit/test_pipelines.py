"""fastrestart.campaign.pipelines: matrix files, `fastrestart run` arguments and the rendered CI pipelines.
Golden files: tests/golden/pipelines/; regenerate with FASTRESTART_UPDATE_GOLDEN=1."""

from __future__ import annotations

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
    assert cells["script"] == ['fastrestart matrix "$MATRIX" --only "$CELL" --results "results/$CELL"']
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


def test_pipelines_show_each_cells_run_command(tmp_path: Path) -> None:
    text = pipelines.render_pipeline("gitlab", MATRIX, tmp_path / "p.yml").read_text()
    assert ("# fastrestart run --kernel debian:trixie --l1-qemu trixie --mode auto --l2-mem 256M "
            "--inject mem-flip  (expect FAIL)") in text


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
