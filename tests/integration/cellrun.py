"""Running one real cell from a test, with the suite's retry policy built in."""

from __future__ import annotations

from pathlib import Path

from fastrestart.campaign.results import is_rig_error
from fastrestart.campaign.runner import Cell, run_cell
from fastrestart.errors import RigFault


def run(tmp_path: Path, name: str = "run", **cell) -> dict:
    """Run a cell end to end, as `fastrestart run` does. A run that the rig (L0) broke raises
    RigFault, which the suite reruns once (tests/conftest.py); every other verdict is returned for
    the test to judge, never retried."""
    run_dir = tmp_path / name
    result = run_cell(Cell(**cell), run_dir)
    print(f"{result['cell']}: {result['verdict']} {result['reason']} (logs: {run_dir / 'logs'})")
    if is_rig_error(result):
        raise RigFault(f"rig ERROR in {result['cell']}: {result['reason']}", result["error"].get("evidence"))
    return result


def checks(result: dict) -> dict[str, str]:
    return {name: check["verdict"] for name, check in result["checks"].items()}


def assert_caught_by_its_check_only(result: dict, check: str, caught_by: str) -> None:
    """An injected fault: the run FAILs in the check made to catch it, saying so, and every other
    check PASSes (a fault caught by the wrong check proves nothing)."""
    assert result["verdict"] == "FAIL", result["reason"] or result["error"]
    verdicts = checks(result)
    assert verdicts[check] == "FAIL", result["checks"][check]
    assert caught_by in result["checks"][check]["reason"]
    others = {name: state for name, state in verdicts.items() if name != check}
    assert set(others.values()) == {"PASS"}, others


def assert_the_default_cell_kept_the_guest(result: dict) -> None:
    """The default cell (cpr-reboot, edu on MSI and NVMe): PASS, a real host restart under the same
    guest, and checks that did real work."""
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    assert result["mode"] == "cpr-reboot"
    assert checks(result) == {"liveness": "PASS", "memory": "PASS", "dma": "PASS", "interrupts": "PASS"}
    # The host really restarted: a new L1 boot_id, into the kernel we asked for.
    boot_ids = result["l1"]["boot_ids"]
    assert len(boot_ids) == 2 and boot_ids[0] != boot_ids[1]
    assert result["l1"]["kernel_to"] == result["l1"]["kernel_from"]
    # ...and the guest did not: one L2 boot_id, its counter carried on.
    assert len(result["l2"]["boot_ids"]) == 1
    live = result["checks"]["liveness"]["evidence"]["cycles"][0]
    assert live["counter_after"] >= live["counter_before"] > 0
    # The checks did real work.
    memory = result["checks"]["memory"]["evidence"]
    assert memory["pages_checked"] > 10_000 and memory["writer_writes"] > 0
    dma = result["checks"]["dma"]["evidence"]
    assert dma["edu"]["transfers"] > 0 and dma["nvme"]["blocks_checked"] > 0
    assert dma["edu"]["suspends_seen"] == 1 and dma["edu"]["suspends_with_dma_in_flight"] in (0, 1)
    fio = dma["nvme"]["fio"]
    assert fio["dataset"]["reads"] == fio["dataset"]["writes"] > 0 and fio["dataset"]["verify_errors"] == 0
    assert fio["across_exited"] and fio["across"]["writes"] > 0
    irqs = result["checks"]["interrupts"]["evidence"]
    # MSI, through our edu_uio module built for the L2 kernel: no vIOMMU needed in L2.
    assert irqs["edu"]["irq"] == "msi"
    assert irqs["edu"]["irq_expected"] == irqs["edu"]["irq_received"] > 0
    assert irqs["edu"]["dma_done_irqs"] > 0 and irqs["edu"]["raised_irqs"] > 0
    assert irqs["nvme"]["ios_submitted"] == irqs["nvme"]["ios_completed"] > 0
    assert result["downtime_s"]["qmp"] > 0 and result["downtime_s"]["guest"] is not None
    assert all(result["phases"][p] > 0 for p in ("save", "kexec", "boot", "restore", "resume"))
