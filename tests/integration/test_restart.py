"""Real restarts: real QEMU, real kernels, real kexec, real L1 and L2.

Each test is one cell run end to end through the same code path as `fastrestart run`, so the
suite proves the product, and each injected fault proves that the check made to catch it can
fail (and that the checks it cannot reach still pass).
"""

from __future__ import annotations

import os

import pytest
from cellrun import assert_caught_by_its_check_only, checks, run
from fastrestart.campaign import results

pytestmark = pytest.mark.vm


@pytest.mark.parametrize(("fault", "check", "cell", "caught_by"), [
    # mem-flip, and the default cell, boot in the smoke matrix (test_smoke_matrix.py), with the same assertions.
    ("dma-corrupt", "dma", {}, "edu: "),
    ("dma-corrupt", "dma", {"devices": ("nvme",)}, "fio found 3 bad block(s)"),
    ("irq-drop", "interrupts", {}, "edu: "),
    ("irq-drop", "interrupts", {"devices": ("edu",), "edu_irq": "intx"}, "edu: "),
], ids=["dma-corrupt-edu+nvme", "dma-corrupt-nvme", "irq-drop-msi", "irq-drop-intx"])
def test_injected_fault_is_caught_by_its_check_only(tmp_path, fault, check, cell, caught_by):
    result = run(tmp_path, inject=fault, **cell)
    assert_caught_by_its_check_only(result, check, caught_by)
    if fault == "irq-drop":
        assert result["checks"]["interrupts"]["evidence"]["edu"]["irq"] == cell.get("edu_irq", "msi")


def test_edu_on_intx_passes(tmp_path):
    # INTx through uio_pci_generic: the other interrupt path users choose with --edu-irq intx.
    result = run(tmp_path, devices=("edu",), edu_irq="intx")
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    edu = result["checks"]["interrupts"]["evidence"]["edu"]
    assert edu["irq"] == "intx" and edu["irq_expected"] == edu["irq_received"] > 0


def test_memory_lost_across_kexec_is_a_memory_fail(tmp_path):
    result = run(tmp_path, inject="mem-lost")
    assert result["verdict"] == "FAIL"
    memory = result["checks"]["memory"]
    assert memory["verdict"] == "FAIL"
    # Judged from what the new kernel shows, not from the flag: no memmap= on its command line, no
    # PMEM region where L2's RAM was, found in the reserve step.
    assert memory["evidence"]["step"] == "reserve" and "memmap=" not in memory["evidence"]["cmdline"]
    assert "no PMEM region at" in memory["evidence"]["reason"]
    # What could not run is never reported as a pass.
    assert result["checks"]["dma"]["verdict"] == "NOT_RUN"


@pytest.mark.parametrize(("fault", "layer"), [("l1-panic", "L1"), ("l2-panic", "L2")])
def test_a_panic_after_the_restart_is_a_liveness_fail_not_a_rig_error(tmp_path, fault, layer):
    """A crash of the host or the guest once the restart began is what the run found: a FAIL of
    liveness that names the layer and the step, never an ERROR that a retry could wash away."""
    result = run(tmp_path, devices=(), mode="ignore-shared", mem_check_mib=16, inject=fault)
    assert result["verdict"] == "FAIL", result["reason"] or result["error"]
    assert checks(result)["liveness"] == "FAIL" and result["error"] is None
    liveness = result["checks"]["liveness"]
    assert f"{layer}'s kernel panicked in step" in liveness["reason"], liveness["reason"]
    assert "Kernel panic" in liveness["evidence"]["message"]
    assert results.cell_exit_code(result) == 1 and not results.should_retry([result])


def test_a_fault_that_cannot_reach_its_check_is_unsupported_before_booting(tmp_path):
    result = run(tmp_path, devices=("nvme",), inject="irq-drop")
    assert result["verdict"] == "UNSUPPORTED" and "needs edu" in result["reason"]
    assert result["l1"]["boot_ids"] == []


def test_cpr_reboot_on_qemu_7_2_is_unsupported_without_booting(tmp_path):
    result = run(tmp_path, l1_qemu="bookworm", mode="cpr-reboot")
    assert result["verdict"] == "UNSUPPORTED"
    assert "7.2" in result["reason"]
    assert result["wall_s"] < 120 and result["l1"]["boot_ids"] == []


def test_forced_fsdax_with_assigned_devices_is_unsupported(tmp_path):
    result = run(tmp_path, ram_backend="fsdax")
    assert result["verdict"] == "UNSUPPORTED"
    assert "fsdax" in result["reason"] and "VFIO" in result["reason"]


def test_ignore_shared_without_devices_on_fsdax(tmp_path):
    result = run(tmp_path, devices=(), mode="ignore-shared", mem_check_mib=32)
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    assert checks(result)["dma"] == "UNSUPPORTED"
    assert result["per_cycle"][0]["evidence"]["save"]["state_bytes"] < 16 << 20  # RAM was not copied


def test_cpr_transfer_keeps_the_host_and_changes_the_qemu(tmp_path):
    """The hand-over itself must work; what it does to the assigned devices is the finding.

    Measured here (QEMU 11.1 in L1, kernel 6.12): while the new QEMU takes over it clears I/O,
    Memory and Bus Master in the physical functions' Command register (traced in L1:
    vfio_pci_write_config @0x4 0x100, then "Cannot reset device"), and registers edu's INTx irqfd
    twice ("failed to setup resample irqfd: Device or resource busy"). The guest then loses DMA
    and interrupts, or its QEMU stops it ("kvm run failed Bad address" on edu's BAR). So this
    asserts the hand-over and an honest verdict that names the cause, read from L1; when a QEMU
    gets this right, the PASS branch holds.
    """
    result = run(tmp_path, l1_qemu="sid", mode="cpr-transfer")
    assert result["verdict"] in ("PASS", "FAIL"), result["reason"] or result["error"]  # never ERROR
    assert len(result["l1"]["boot_ids"]) == 1  # no host reboot
    save = result["per_cycle"][0]["evidence"]["save"]
    assert save["old_pid"] != save["new_pid"] and save["migration"]["status"] == "completed"
    commands = result["per_cycle"][0]["evidence"]["restore"]["pci_command"]
    assert set(commands) == {"edu", "nvme"}
    if result["verdict"] == "PASS":
        assert result["checks"]["dma"]["evidence"]["edu"]["transfers"] > 0  # DMA exercised before and after
        assert result["downtime_s"]["qmp"] < 30
    else:
        assert "PCI Command register in L1 lost" in result["reason"], result["reason"]
        assert any(c["cleared"] for c in commands.values()), commands


def test_hotplug_on_qemu_7_2_is_the_guest_visible_baseline(tmp_path):
    result = run(tmp_path, l1_qemu="bookworm")
    assert result["mode"] == "hotplug"
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    assert result["guest_visible"] is True


def test_kernel_upgrade_kexecs_into_the_target_release(tmp_path):
    result = run(tmp_path, kernel="debian:trixie", to_kernel="debian:sid")
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    assert result["l1"]["kernel_to"].startswith("7.") and result["l1"]["kernel_from"].startswith("6.12")


def test_three_cycles_four_host_boots_one_guest(tmp_path):
    # With devices assigned, cpr-reboot suspends the guest once per cycle. QEMU's S3 wake turns off
    # q35's ACPI PM window and SeaBIOS leaves it off, so the guest's fr-suspend restores it: without
    # that, the second suspend never reached QEMU.
    result = run(tmp_path, cycles=3)
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    assert len(set(result["l1"]["boot_ids"])) == 4
    assert len(result["l2"]["boot_ids"]) == 1 and len(result["per_cycle"]) == 3
    assert all(c["evidence"]["resume"]["resumed_with"] == "system_wakeup" for c in result["per_cycle"])
    assert checks(result) == {"liveness": "PASS", "memory": "PASS", "dma": "PASS", "interrupts": "PASS"}
    # Each suspend was requested right after edu started a DMA (edutest busy): edu_uio's suspend
    # found it in flight and waited for it (5 of 5 here; the timing is the guest's, so not all).
    edu = result["checks"]["dma"]["evidence"]["edu"]
    assert edu["suspends_seen"] == 3 and edu["suspends_with_dma_in_flight"] >= 1


viommu = pytest.mark.skipif(
    os.environ.get("FASTRESTART_VIOMMU_TESTS") != "1",
    reason="L2 with its own vIOMMU did not come up in 2 of 11 boots here (stuck at PCI enumeration of edu) "
           "(README, known findings): too flaky for CI. Run with FASTRESTART_VIOMMU_TESTS=1.")


def edu_interrupts(result: dict) -> list[dict]:
    """edu's interrupt counts, per segment when the devices were hot-plugged."""
    evidence = result["checks"]["interrupts"]["evidence"]
    segments = [s["evidence"] for s in evidence.values() if isinstance(s, dict) and "evidence" in s]
    return [s["edu"] for s in segments or [evidence]]


@viommu
def test_edu_msi_in_l2_with_its_own_viommu(tmp_path):
    # With an intel-iommu of its own, L2 drives edu through vfio-pci and MSI.
    # hotplug needs no guest S3, which breaks DMA behind a guest vIOMMU (next test).
    result = run(tmp_path, l2_iommu=True, mode="hotplug")
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    for edu in edu_interrupts(result):
        assert edu["irq"] == "msi" and edu["irq_expected"] == edu["irq_received"] > 0


@viommu
def test_msi_dropped_across_the_restart_is_caught(tmp_path):
    result = run(tmp_path, l2_iommu=True, mode="hotplug", inject="irq-drop")
    assert result["verdict"] == "FAIL", result["reason"] or result["error"]
    verdicts = checks(result)
    assert verdicts["interrupts"] == "FAIL" and edu_interrupts(result)[-1]["irq"] == "msi"
    assert {verdicts[name] for name in ("liveness", "memory", "dma")} == {"PASS"}


@viommu
def test_guest_s3_behind_a_guest_viommu_loses_dma(tmp_path):
    """A finding, pinned: with a vIOMMU in L2, the guest's S3 wake (which cpr-reboot needs for vfio)
    leaves vfio's shadow of L2's IOMMU mappings empty in QEMU 10.0: DMA after the resume faults in
    L1's IOMMU ("PTE Read access is not set") and lands nowhere. One QEMU and a suspend without
    any restart show the same, so it is S3 behind a vIOMMU, not CPR. The harness must call it a
    DMA FAIL with the DMAR faults as evidence, never a broken rig."""
    result = run(tmp_path, l2_iommu=True)
    assert result["mode"] == "cpr-reboot" and result["verdict"] == "FAIL", result["reason"] or result["error"]
    assert checks(result)["dma"] == "FAIL" and checks(result)["memory"] == "PASS"
    assert result["checks"]["interrupts"]["evidence"]["l1_dmar_faults"]
