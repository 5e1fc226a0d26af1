"""Faults injected for real, at the step where they would happen in production.

- ``mem-flip``: bytes of L2's RAM flipped in PMEM between save and restore (in L1, by mmap).
- ``mem-lost``: the new kernel boots without the memmap= reservation (flow.kexec drops it).
- ``dma-corrupt``: DMA payloads that edu wrote into L2 RAM are corrupted in PMEM while L2 is down
  (after L1's "after" digest, so that only the DMA check can catch it); with nvme, blocks of fio's
  data set are corrupted in the namespace's backing file on L0, i.e. on the device's side.
- ``irq-drop``: right after the resume, the assigned edu's interrupt is masked in the physical device
  (from L1, under vfio-pci) and never unmasked, so interrupts raised after the resume are lost.

Also the L1-side digest of the PMEM that holds L2's RAM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import StepError, UsageError
from .workloads import FIO_BS, FIO_DATASET_MIB, parse_l1tool

if TYPE_CHECKING:
    from .flow import Flow
    from .rig import Rig

FAULTS = {
    "mem-flip": "memory",
    "mem-lost": "memory",
    "dma-corrupt": "dma",
    "irq-drop": "interrupts",
}
"""Each fault and the check that exists to catch it."""

MIB = 1 << 20
Q35_LOWMEM_SPLIT = 0xB0000000  # q35 keeps all RAM below 4 GiB up to this size
Q35_LOWMEM = 0x80000000


def check_fault(name: str | None, devices: list[str]) -> None:
    if name is None:
        return
    if name not in FAULTS:
        raise UsageError(f"Unknown fault '{name}'. Faults: {', '.join(FAULTS)}.")
    if name == "irq-drop" and "edu" not in devices:
        raise UsageError(f"--inject {name} needs the edu device (--devices edu,...).")
    if name == "dma-corrupt" and not {"edu", "nvme"} & set(devices):
        raise UsageError(f"--inject {name} needs a DMA device: edu or nvme (--devices edu,nvme).")


def gpa_to_offset(gpa: int, ram_bytes: int) -> int:
    """Offset in the RAM backend of a q35 guest-physical address."""
    if ram_bytes < Q35_LOWMEM_SPLIT or gpa < Q35_LOWMEM:
        return gpa
    return Q35_LOWMEM + (gpa - (1 << 32))


def digest(rig: Rig, path: str, mib: int) -> dict:
    out = rig.sh.check(f"l1tool digest {path} --size {mib * MIB}", timeout=300, step="digest")
    return parse_l1tool(out.splitlines()[-1])


def _flip(rig: Rig, path: str, offsets: list[int]) -> list[str]:
    lines = []
    for offset in offsets:
        lines.append(rig.sh.check(f"l1tool flip {path} --offset {offset}", step="inject").strip())
    return lines


def inject_after_save(flow: Flow) -> dict:
    """mem-flip: L2's RAM corrupted in PMEM right after the save (called from the record step,
    after the "before" digest, so both the guest's check and L1's digest can see it)."""
    fault, rig = flow.options.inject, flow.rig
    if fault != "mem-flip":
        return {}
    samples = [s for s in flow.workloads.ready["memory"]["samples"] if s.get("paddr")]
    target = samples[len(samples) // 2]
    offset = gpa_to_offset(int(target["paddr"], 16), rig.config.l2_mem_mib * MIB) + 123
    return {"injected": fault, "target": target, "flips": _flip(rig, flow.ram_path, [offset])}


def inject_before_restore(flow: Flow) -> dict:
    """dma-corrupt: payloads edu landed in L2's RAM are corrupted while L2 is down, after the
    new kernel took its PMEM digest: only the DMA check's own re-verification can see it."""
    fault, rig = flow.options.inject, flow.rig
    ram_bytes = rig.config.l2_mem_mib * MIB
    if fault != "dma-corrupt":
        return {}
    facts: dict = {"injected": fault}
    if flow.workloads.edu_slots:
        offsets = [gpa_to_offset(int(gpa, 16), ram_bytes) + 17 for gpa in flow.workloads.edu_slots]
        flips = _flip(rig, flow.ram_path, offsets)
        facts.update(slots=len(offsets), first_flip=flips[0] if flips else None)
    nvme = next((d for d in rig.devices if d.name == "nvme"), None)
    if nvme is not None and "fio" in flow.workloads.ready:
        facts["nvme_flips"] = corrupt_fio_dataset(nvme.backing)
    return facts


def corrupt_fio_dataset(backing: Path) -> list[dict]:
    """Invert one byte in the first, a middle and the last block of fio's data set, in the
    NVMe namespace's backing file on L0 (what a device that corrupts its media would do)."""
    offset_mib, size_mib = FIO_DATASET_MIB
    blocks = size_mib * MIB // FIO_BS
    flips = []
    with open(backing, "r+b") as disk:
        for block in (0, blocks // 2, blocks - 1):
            offset = offset_mib * MIB + block * FIO_BS + 1001
            disk.seek(offset)
            before = disk.read(1)[0]
            disk.seek(offset)
            disk.write(bytes([before ^ 0xFF]))
            flips.append({"offset": offset, "block": block, "before": f"{before:#04x}",
                          "after": f"{before ^ 0xFF:#04x}"})
        disk.flush()
        os.fsync(disk.fileno())
    return flips


def inject_after_resume(flow: Flow) -> dict:
    """Faults that hit the device once L2 runs again (called from the resume step)."""
    if flow.options.inject != "irq-drop":
        return {}
    edu = next(d for d in flow.rig.devices if d.name == "edu")
    # INTx: set Interrupt Disable in the physical function's command register; MSI: clear MSI
    # Enable. Either way, vfio-pci in L1 never sees the interrupt again.
    rc, out = flow.rig.sh.run(f"l1tool msi-disable {edu.l1_bdf}")
    # vfio-pci in L1 masks INTx with the same Interrupt Disable bit and clears it again when an
    # in-flight interrupt is unmasked: set it three times over a second, so that it sticks (once
    # it holds, no interrupt is in flight any more).
    command = flow.rig.sh.check(
        f"for i in 1 2 3; do "
        f"c=$(dd if=/sys/bus/pci/devices/{edu.l1_bdf}/config bs=1 skip=4 count=2 2>/dev/null | od -An -tu2); "
        f"n=$((c | 0x400)); printf \"$(printf '\\\\%03o\\\\%03o' $((n & 255)) $((n >> 8)))\" | "
        f"dd of=/sys/bus/pci/devices/{edu.l1_bdf}/config bs=1 seek=4 count=2 conv=notrunc 2>/dev/null; "
        f"[ $i = 1 ] && b=$c; sleep 0.5; done; echo before=$b after=$n", step="inject")
    if "after=" not in command:
        raise StepError("inject", "could not mask edu's INTx in L1", {"output": command})
    return {"injected": "irq-drop", "msi": out.strip() if rc == 0 else "no MSI enabled", "intx_mask": command.strip()}
