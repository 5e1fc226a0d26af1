"""CI pipelines rendered from a matrix file (docs/design.md §8.4): GitLab CI and GitHub Actions, one job per
cell, a job that warms the artifact cache first and a job that builds the conformance report last.

A matrix file is YAML with an explicit list of cells. Each key of a cell is a `fastrestart run`
option, except `name` (required, unique), `expect` (the verdict the cell should reach; an expected
FAIL names the check that must fail, e.g. FAIL:memory, and no other check may fail) and
`description`. An optional `defaults:` mapping applies to every cell:

    defaults: {l2_mem: 256M}
    cells:
      - {name: trixie-cpr-reboot, kernel: debian:trixie, mode: cpr-reboot, devices: [edu, nvme]}
      - {name: trixie-mem-flip, kernel: debian:trixie, inject: mem-flip, expect: FAIL:memory}
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from fastrestart import REPO, options
from fastrestart.campaign.report import environment
from fastrestart.campaign.results import CHECKS, parse_expect
from fastrestart.errors import UsageError
from fastrestart.paths import atomic_write

RUN_OPTIONS = tuple(spec.key for spec in options.run_options())
"""Cell keys that are `fastrestart run` options (`to_kernel` → `--to-kernel`), in argument order:
the run options declared in fastrestart.options. A switch that is on by default is turned off by
its `--no-` flag (`shared_ram: false` → `--no-shared-ram`); one that is off is turned on by its
flag (`l2_iommu: true` → `--l2-iommu`)."""
META_KEYS = ("name", "expect", "description")
"""Cell keys that describe the cell rather than the run."""
CELL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
MATRIX_REF = re.compile(r"[A-Za-z0-9._+-][A-Za-z0-9._/+-]*")
ENGINES = {
    # engine: (template, default file name, most jobs one matrix may expand to)
    "gitlab": ("gitlab-ci.yml.j2", ".gitlab-ci.yml", 200),
    "github": ("github-workflow.yml.j2", "fastrestart.yml", 256),
}
L0_PACKAGES = ("qemu-system-x86", "busybox-static", "cpio", "kmod", "e2fsprogs", "xz-utils", "zstd", "gcc",
               "libc6-dev", "binutils", "dpkg", "apt", "util-linux", "debian-archive-keyring")
"""Debian/Ubuntu packages the rig needs on L0 (./setup's, less python and what only the tests use):
the GitHub jobs that fetch or run cells install them, the GitLab jobs those their runner lacks.
debian-archive-keyring checks Debian's archive on a runner that is not Debian (Ubuntu ships it too)."""
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
"""The Debian mirrors a pipeline gives the harness's private apt configuration when the runner's
apt names none (FASTRESTART_DEBIAN_MIRROR, FASTRESTART_DEBIAN_SECURITY_MIRROR): GitHub's Ubuntu runners."""


def _check_cell(cell: object, where: str) -> dict:
    if not isinstance(cell, dict):
        raise UsageError(f"{where}: a cell must be a mapping of options, not {type(cell).__name__}")
    unknown = sorted(set(cell) - set(RUN_OPTIONS) - set(META_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; a cell may use "
                         f"{', '.join(META_KEYS + RUN_OPTIONS)}")
    name = cell.get("name")
    if not isinstance(name, str) or not CELL_NAME.fullmatch(name):
        raise UsageError(f"{where}: 'name' must be letters, digits and . _ + - (it names jobs, "
                         f"artifacts and result directories), got {name!r}")
    expect = cell.get("expect")
    if expect is not None:
        try:
            verdict, check = parse_expect(str(expect))
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if verdict == "FAIL" and check is None and not cell.get("inject"):
            raise UsageError(f"{where}: expect FAIL must name the check that must fail, e.g. FAIL:dma "
                             f"(checks: {', '.join(CHECKS)}); with inject:, the fault's own check is meant")
    options.validate(cell, where)  # types, choices, devices, sizes, counts: as declared for `fastrestart run`
    return cell


class _MuxLoader(yaml.SafeLoader):
    """Reads avocado's yaml-to-mux files too: ``!mux`` marks a mapping whose children are variants."""


_MuxLoader.add_constructor("!mux", lambda loader, node: loader.construct_mapping(node, deep=True))


def _from_mux(data: dict) -> dict:
    """The avocado varianter form (``cells: !mux`` of name -> parameters, with the parameters that
    all cells share on the mux node itself) to the list form."""
    shared = {k: v for k, v in data["cells"].items() if not isinstance(v, dict)}
    cells = [{"name": name, **params} for name, params in data["cells"].items() if isinstance(params, dict)]
    return {"defaults": {**(data.get("defaults") or {}), **shared}, "cells": cells}


def load_matrix(path: Path) -> list[dict]:
    """Read a matrix file and return its cells, `defaults:` applied. Raise UsageError on a bad file."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_MuxLoader)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the matrix: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("cells"), dict):
        data = _from_mux(data)
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list) or not data["cells"]:
        raise UsageError(f"{path}: a matrix needs a non-empty 'cells:' list")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"{path}: 'defaults:' must be a mapping")
    _check_cell({"name": "defaults", **defaults}, f"{path}: defaults")
    cells, seen = [], set()
    for i, raw in enumerate(data["cells"]):
        where = f"{path}: cells[{i}]"
        cell = _check_cell({**defaults, **raw} if isinstance(raw, dict) else raw, where)
        if cell["name"] in seen:
            raise UsageError(f"{where}: duplicate cell name {cell['name']!r}")
        seen.add(cell["name"])
        cells.append(cell)
    return cells


def cell_args(cell: dict) -> list[str]:
    """The `fastrestart run` arguments for one matrix cell, e.g.
    `['--kernel', 'debian:trixie', '--mode', 'cpr-reboot', '--devices', 'edu,nvme']`.

    Keys left out or null are not passed (the run's own default applies); an empty device list is
    `--devices none`. Meta keys (name, expect, description) are ignored.
    """
    _check_cell({"name": "cell", **cell}, f"cell {cell.get('name', '?')!r}")
    args = []
    for spec in options.run_options():
        value = cell.get(spec.key)
        if value is None:
            continue
        if isinstance(spec.default, bool):
            args += [spec.flag] if value != spec.default else []
            continue
        if isinstance(value, list):
            value = ",".join(value) or "none"
        args += [spec.flag, str(value)]
    return args


def _matrix_ref(matrix_path: Path) -> str:
    """The matrix path as CI jobs see it: relative to the checkout (the source tree)."""
    path = Path(matrix_path)
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        if not path.is_absolute():
            return path.as_posix()
        raise UsageError(f"{path} is outside the source tree {REPO}, so CI jobs cannot read it; "
                         "put the matrix under the repository or pass matrix_ref") from None


def render_pipeline(engine: str, matrix_path: Path, out: Path, *, matrix_ref: str | None = None) -> Path:
    """Render the `engine` ("gitlab" or "github") pipeline for the matrix at `matrix_path` into
    `out` (a file, or a directory that gets the engine's default file name). Returns the path.

    `matrix_ref` is the matrix path written into the pipeline; by default `matrix_path` relative
    to the source tree. The output has no timestamps: the same matrix renders the same file.
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown CI engine {engine!r}; choose one of {', '.join(ENGINES)}")
    template, default_name, max_jobs = ENGINES[engine]
    cells = load_matrix(matrix_path)
    if len(cells) > max_jobs:
        raise UsageError(f"{matrix_path}: {len(cells)} cells, but a {engine} matrix expands to at most "
                         f"{max_jobs} jobs; split the matrix")
    ref = matrix_ref or _matrix_ref(matrix_path)
    if not MATRIX_REF.fullmatch(ref):
        raise UsageError(f"matrix path {ref!r} must be a relative path of letters, digits and . _ + - /")
    context = {
        "matrix": ref,
        "gh": lambda expression: "${{ " + expression + " }}",
        "cells": [{"name": c["name"],
                   # FAIL:memory, not FAIL:MEMORY: the verdict upper case, the check as matrices name it
                   "expect": ":".join(filter(None, parse_expect(str(c["expect"])))) if c.get("expect") else None,
                   # shown in a YAML comment, which must stay on one line
                   "command": shlex.join(["fastrestart", "run", *cell_args(c)]).replace("\n", "\\n")}
                  for c in cells],
        "l0_packages": list(L0_PACKAGES),
        "debian_mirror": DEBIAN_MIRROR,
        "debian_security_mirror": DEBIAN_SECURITY_MIRROR,
    }
    text = environment().get_template(template).render(**context)
    try:
        rendered = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # a template bug, not a user error: say where
        raise RuntimeError(f"{template} rendered invalid YAML: {exc}") from exc
    if not isinstance(rendered, dict) or "cells" not in (rendered.get("jobs") or rendered):
        raise RuntimeError(f"{template} rendered no 'cells' job")
    out = Path(out)
    if out.is_dir():
        out = out / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)
    return out
