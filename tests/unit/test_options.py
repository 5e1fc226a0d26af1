"""The run options are declared once (fastrestart.options) and every entry point reads them there:
the command line of run, soak, rig check and shell, the matrix keys and the avocado parameters."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fastrestart import options
from fastrestart.campaign import pipelines
from fastrestart.campaign.runner import rig_config
from fastrestart.cli import build_parser
from fastrestart.errors import UsageError
from fastrestart.options import Cell, cell_from_args

MATRIX_CELL = {"name": "c", "kernel": "debian:sid", "to_kernel": "debian:trixie", "l1_qemu": "sid",
               "mode": "cpr-reboot", "devices": ["edu"], "l2_mem": "512M", "inject": "irq-drop", "cycles": 2,
               "ram_backend": "devdax", "l2_kernel": "debian:sid", "l0_qemu": "trixie", "accel": "tcg",
               "shared_ram": False, "mem_check": 64, "l2_iommu": True, "edu_irq": "intx", "keep_images": True}


def test_a_matrix_cell_and_its_command_line_give_the_same_cell():
    argv = ["run", *pipelines.cell_args(MATRIX_CELL)]
    from_cli = cell_from_args(build_parser().parse_args(argv))
    from_matrix = Cell.from_matrix(MATRIX_CELL)
    assert from_cli == replace(from_matrix, name=None) and from_matrix.name == "c"
    assert from_cli.devices == ("edu",) and from_cli.shared_ram is False and from_cli.mem_check_mib == 64


def test_every_option_is_a_matrix_key_and_a_run_flag():
    keys = {spec.key for spec in options.run_options()}
    assert set(pipelines.RUN_OPTIONS) == keys == set(MATRIX_CELL) - {"name"}
    run_help = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert all(spec.flag in run_help for spec in options.run_options())


@pytest.mark.parametrize("command", [["rig", "check"], ["shell"]])
def test_rig_commands_keep_the_rig_options_they_accept(command):
    """`rig check` and `shell` once accepted --l2-iommu and --edu-irq and dropped them."""
    args = build_parser().parse_args([*command, "--l2-iommu", "--edu-irq", "intx", "--devices", "edu",
                                      "--keep-images"])
    config = rig_config(cell_from_args(args))
    assert (config.l2_iommu, config.edu_irq, config.devices, config.keep_images) == (True, "intx", ["edu"], True)


def test_soak_has_its_own_default_cycles():
    assert cell_from_args(build_parser().parse_args(["soak"])).cycles == 20


@pytest.mark.parametrize(("values", "message"), [
    ({"mode": "warp-drive"}, "unknown mode 'warp-drive'; choose one of: auto"),
    ({"cycles": 0}, "cycles must be a whole number of at least 1"),
    ({"cycles": "3x"}, "cycles must be a whole number"),
    ({"mem_check": 1.5}, "mem-check must be a whole number"),
    ({"shared_ram": "no"}, "shared_ram must be true or false"),
    ({"devices": ["gpu"]}, "unknown device(s) gpu"),
    ({"l2_mem": "lots"}, "Cannot read the size 'lots'"),
])
def test_validate_names_the_option_and_what_it_accepts(values, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options.validate(values)
