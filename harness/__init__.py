"""fastrestart: a harness that proves, or disproves, that a VMM fast restart keeps a guest intact.

The import name is ``fastrestart``; its source is the repository's ``harness/`` directory, in layers:
``vm`` (machines, consoles, the rig), ``artifacts`` (kernels, images, workloads), ``restart`` (the
flow under test, modes, faults, checks, probes) and ``campaign`` (cells, results, matrices,
reports). ``cli`` sits on top.
"""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _data_root() -> Path:
    """Where guests/, kernels/ and ci/ live: beside the package in a wheel (``_data``), else the
    source tree this package sits in (a checkout, or an editable install of one)."""
    shipped = PACKAGE / "_data"
    return shipped if (shipped / "guests").is_dir() else PACKAGE.parent


DATA = _data_root()
"""Guest recipes (guests/), kernel fragments and matrices (kernels/), the smoke matrix (ci/)."""
REPO = PACKAGE.parent
"""The source tree, when running from a checkout (pipelines render paths relative to it)."""
