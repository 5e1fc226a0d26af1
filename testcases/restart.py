"""Fast-restart test cases for avocado, one class per scenario family.

    avocado run testcases/restart.py -m ci/smoke.yaml
    avocado run testcases/restart.py -m kernels/matrix.yaml

Parameters come from avocado's varianter (yaml-to-mux here; CIT for pairwise coverage of big
matrices). The verdict maps onto avocado's statuses: a check that failed is FAIL, a broken rig is
ERROR, an unsupported cell is CANCEL with the reason. A cell that injects a fault declares
``expect: FAIL:CHECK`` and passes only when that check, and no other, catches the fault.
"""

from __future__ import annotations

import re
from pathlib import Path

from avocado import Test
from fastrestart.campaign import results
from fastrestart.campaign.runner import Cell, run_cell


def cell_from_params(params, name: str) -> Cell:
    """A Cell from the variant's parameters, keyed as in a matrix; absent keys keep `fastrestart
    run`'s defaults (the run options are declared once, in fastrestart.options)."""
    return Cell.from_values(lambda key, default: params.get(key, default=default), name=name)


def family(params) -> str:
    """Which family a variant belongs to: each class runs its own and cancels the others."""
    if params.get("inject", default=None):
        return "fault"
    if params.get("to_kernel", default=None):
        return "upgrade"
    if int(params.get("cycles", default=1)) > 1:
        return "cycles"
    return "restart"


class FastRestartTest(Test):
    """Runs one cell and turns its verdict into an avocado status."""

    family = ""

    def setUp(self):
        if family(self.params) != self.family:
            self.cancel(f"not a {self.family} cell (it is run by the {family(self.params)} family)")

    def run_and_judge(self) -> dict:
        # The variant's leaf is the cell's name in the matrix: run-cells-<name>-<hash>.
        variant = re.sub(r"^run-cells-|-[0-9a-f]{4}$", "", self.name.variant or "cell")
        cell = cell_from_params(self.params, self.params.get("name", default=None) or variant)
        self.log.info("cell: %s", cell)
        result = run_cell(cell, Path(self.outputdir) / "run", progress=lambda step: self.log.info("step: %s", step))
        self.log.info("verdict %s (%s); result.json in %s", result["verdict"], result["reason"], self.outputdir)
        # The same rule as the matrix: an expected FAIL must come from its check (results.effective_verdict).
        verdict, reason = results.effective_verdict({**result, "expect": self.params.get("expect", default=None)})
        if verdict == "UNSUPPORTED":
            self.cancel(reason)
        if verdict == "ERROR":
            self.error(reason)
        if verdict == "FAIL":
            self.fail(reason)
        return result


class Restart(FastRestartTest):
    """Save L2 into PMEM, kexec L1, restore L2: every check passes.

    :avocado: tags=restart
    """

    family = "restart"

    def test(self):
        result = self.run_and_judge()
        boot_ids = result["l1"]["boot_ids"]
        if result["mode"] != "cpr-transfer" and len(set(boot_ids)) != len(boot_ids):
            self.fail(f"L1 did not restart: boot_ids {boot_ids}")
        if len(result["l2"]["boot_ids"]) != 1:
            self.fail(f"L2 rebooted: boot_ids {result['l2']['boot_ids']}")


class KernelUpgrade(FastRestartTest):
    """kexec into a different kernel (``to_kernel``): L1 comes back on the target release.

    :avocado: tags=upgrade
    """

    family = "upgrade"

    def test(self):
        result = self.run_and_judge()
        if result["l1"]["kernel_to"] == result["l1"]["kernel_from"] and self.params.get("to_kernel", default=None):
            self.fail(f"L1 is still on {result['l1']['kernel_from']}")


class Cycles(FastRestartTest):
    """N restarts on one rig; N+1 distinct L1 boot_ids.

    :avocado: tags=cycles
    """

    family = "cycles"

    def test(self):
        result = self.run_and_judge()
        if len(set(result["l1"]["boot_ids"])) != result["cycles"] + 1:
            self.fail(f"expected {result['cycles'] + 1} L1 boot_ids, got {result['l1']['boot_ids']}")


class FaultCaught(FastRestartTest):
    """An injected fault (``inject``) must be caught by its check: the cell FAILs, as expected.

    :avocado: tags=fault
    """

    family = "fault"

    def test(self):
        self.run_and_judge()
