"""`fastrestart rig check` and `fastrestart shell`: the rig alone, without a restart."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fastrestart.campaign.runner import Cell, rig_config
from fastrestart.restart import checks
from fastrestart.vm.rig import Rig


@contextlib.contextmanager
def standing_rig(cell: Cell, run_dir: Path, progress: Callable[[str], None]) -> Iterator[Rig]:
    """L1 booted, PMEM set up, devices on vfio-pci, L2 running; torn down on exit."""
    with Rig(rig_config(cell), run_dir) as rig:
        progress("boot L1")
        rig.boot_l1()
        progress("PMEM and vfio")
        pmem = rig.setup_pmem(fresh=True)
        rig.bind_vfio()
        progress("boot L2")
        rig.l2 = rig.start_l2(rig.l2_spec(pmem["ram_path"], allow_s3=False, aux_ram_share=False))
        rig.pmem = pmem
        yield rig


def rig_check(cell: Cell, run_dir: Path, progress: Callable[[str], None]) -> dict:
    """Boot L1 and L2 and report every part of the rig; ``ok`` only if all of it holds."""
    report: dict = {"ok": False, "results_dir": str(run_dir)}
    started = time.monotonic()
    try:
        with Rig(rig_config(cell), run_dir) as rig:
            report["accel"] = {"name": rig.accel.name, "reason": rig.accel.reason}
            report["l0_qemu"] = rig.l0_version
            progress("boot L1")
            boot = rig.boot_l1()
            report["l1"] = {**rig.l1_facts(), "qemu": rig.artifacts.userspace.qemu_version,
                            "boot_s": round(boot["seconds"], 2)}
            iommu = rig.iommu_state()
            report["iommu"] = {"dmar": iommu["dmar"], "irq_remapping": iommu["irq_remapping"]}
            progress("PMEM and vfio")
            pmem = rig.setup_pmem(fresh=True)
            report["pmem"] = pmem
            drivers = rig.bind_vfio()
            progress("boot L2")
            l2_started = time.monotonic()
            rig.l2 = rig.start_l2(rig.l2_spec(pmem["ram_path"], allow_s3=False, aux_ram_share=False))
            report["l2_boot_s"] = round(time.monotonic() - l2_started, 2)
            seen = checks.Workloads(rig, None).discover(rig.l2)
            report["devices"] = []
            for device in rig.devices:
                bdf = seen[device.name]
                l2_driver = rig.l2.console.run(
                    f"basename $(readlink /sys/bus/pci/devices/{bdf}/driver) 2>/dev/null")[1].strip() or "none"
                report["devices"].append({"name": device.name, "vendor_device": device.vendor_device,
                                          "l1_bdf": device.l1_bdf, "l1_driver": drivers[device.name],
                                          "l2_bdf": bdf, "l2_driver": l2_driver})
            report["ok"] = bool(iommu["dmar"] and iommu["irq_remapping"] and pmem.get("ram_path") is not None
                                and all(d["l1_driver"] == "vfio-pci" for d in report["devices"]))
    except Exception as exc:
        report["error"] = str(exc)
    report["wall_s"] = round(time.monotonic() - started, 2)
    return report
