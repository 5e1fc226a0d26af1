"""Faults injected for real, at the step where they would happen in production.

- ``mem-flip``: bytes of L2's RAM flipped in PMEM between save and restore (in L1, by mmap).
- ``mem-lost``: the new kernel boots without the memmap= reservation (flow.kexec drops it).
- ``dma-corrupt``: DMA payloads that edu wrote into L2 RAM are corrupted in PMEM while L2 is down
  (after L1's "after" digest, so that only the DMA check can catch it); with nvme, blocks of fio's
  data set are corrupted in the namespace's backing file on L0, i.e. on the device's side.
- ``irq-drop``: right after the resume, the assigned edu's interrupt is masked in the physical device
  (from L1, under vfio-pci) and never unmasked, so interrupts raised after the resume are lost.
- ``l1-panic`` / ``l2-panic``: the new L1 kernel, or L2 after the resume, crashes (sysrq c); the
  liveness check must catch it, as a FAIL of the restart (never a rig ERROR, never retried).

``FAULTS`` declares each one (its step, the check it must trip, where it can reach); ``HOOKS``
injects it.

Also the L1-side digest of the PMEM that holds L2's RAM.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastrestart.artifacts.workloads import FIO_BS, FIO_DATASET_MIB, parse_l1tool
from fastrestart.errors import StepError, Unsupported, UsageError

if TYPE_CHECKING:
    from fastrestart.restart.flow import Flow
    from fastrestart.vm.rig import Rig


@dataclass(frozen=True)
class Fault:
    """A fault the harness injects for real, declared once: the step that injects it, the check
    that exists to catch it, and where it can reach that check. Everywhere else it is UNSUPPORTED
    with the reason, before anything boots."""

    name: str
    check: str  # the check that must FAIL when the fault is injected (and no other)
    step: str  # the flow step whose hook injects it
    what: str
    needs_any_device: tuple[str, ...] = ()  # at least one of these must be assigned
    needs_host_restart: bool = False  # only a mode that kexecs L1 can reach it
    not_in_modes: tuple[tuple[str, str], ...] = ()  # (mode, why the fault cannot reach its check there)
    kexec_without_memmap: bool = False  # the new kernel boots without the PMEM reservation

    def check_reach(self, mode: str, restarts_host: bool, devices: list[str]) -> None:
        """Raise Unsupported when this fault cannot reach its check in this cell."""
        if self.needs_any_device and not set(self.needs_any_device) & set(devices):
            raise Unsupported(f"fault {self.name} needs {' or '.join(self.needs_any_device)} assigned "
                              f"(devices: {', '.join(devices) or 'none'}): it cannot reach the {self.check} check")
        if self.needs_host_restart and not restarts_host:
            raise Unsupported(f"fault {self.name} happens at L1's kexec; mode {mode} keeps the host running")
        for excluded, why in self.not_in_modes:
            if mode == excluded:
                raise Unsupported(f"fault {self.name} cannot reach the {self.check} check in mode {mode}: {why}")


FAULTS: dict[str, Fault] = {fault.name: fault for fault in (
    Fault("mem-flip", "memory", "record", "bytes of L2's RAM flipped in PMEM by L1 right after the save"),
    Fault("mem-lost", "memory", "kexec", "the new kernel boots without the memmap= reservation",
          needs_host_restart=True, kexec_without_memmap=True,
          not_in_modes=(("luo", "L2's RAM lives in a LUO memfd, not in PMEM"),)),
    Fault("dma-corrupt", "dma", "restore", "DMA payloads corrupted in L2's RAM (edu) and on the NVMe media "
          "while L2 is down", needs_any_device=("edu", "nvme"),
          not_in_modes=(("hotplug", "the workloads that wrote the corrupted data are verified and retired before "
                                    "the unplug, and fresh ones write over it after the re-plug"),)),
    Fault("irq-drop", "interrupts", "resume", "edu's interrupt masked in the physical function from L1 right "
          "after the resume", needs_any_device=("edu",)),
    Fault("l1-panic", "liveness", "boot", "the new L1 kernel panics right after its kexec boot",
          needs_host_restart=True),
    Fault("l2-panic", "liveness", "resume", "L2's kernel panics right after the resume"),
)}
"""Every fault, by name: the one place that says what each fault is and what must catch it."""


def fault(name: str | None) -> Fault | None:
    """The declared fault called ``name`` (None for none); a UsageError listing them otherwise."""
    if name is None:
        return None
    if name not in FAULTS:
        raise UsageError(f"Unknown fault '{name}'. Faults: {', '.join(FAULTS)}.")
    return FAULTS[name]


def inject(flow: Flow, step: str) -> dict:
    """Run the injected fault's hook if it belongs to ``step``; its facts join the step's evidence."""
    declared = fault(flow.options.inject)
    if declared is None or declared.step != step or declared.name not in HOOKS:
        return {}
    return {"injected": declared.name, **HOOKS[declared.name](flow)}


MIB = 1 << 20
Q35_LOWMEM_SPLIT = 0xB0000000  # q35 keeps all RAM below 4 GiB up to this size
Q35_LOWMEM = 0x80000000


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


def flip_pmem(flow: Flow) -> dict:
    """mem-flip: L2's RAM corrupted in PMEM right after the save (in the record step, after the
    "before" digest, so both the guest's check and L1's digest can see it)."""
    samples = [s for s in flow.workloads.ready["memory"]["samples"] if s.get("paddr")]
    target = samples[len(samples) // 2]
    offset = gpa_to_offset(int(target["paddr"], 16), flow.rig.config.l2_mem_mib * MIB) + 123
    return {"target": target, "flips": _flip(flow.rig, flow.ram_path, [offset])}


def corrupt_dma(flow: Flow) -> dict:
    """dma-corrupt: payloads edu landed in L2's RAM are corrupted while L2 is down, after the
    new kernel took its PMEM digest: only the DMA check's own re-verification can see it."""
    rig = flow.rig
    facts: dict = {}
    if flow.workloads.edu_slots:
        offsets = [gpa_to_offset(int(gpa, 16), rig.config.l2_mem_mib * MIB) + 17 for gpa in flow.workloads.edu_slots]
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


def mask_edu_irq(flow: Flow) -> dict:
    """irq-drop: once L2 runs again (a guest's own resume would re-enable what we mask), edu's
    interrupt is masked in the physical function."""
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
    return {"msi": out.strip() if rc == 0 else "no MSI enabled", "intx_mask": command.strip()}


def panic_l1(flow: Flow) -> dict:
    """l1-panic: the new L1 kernel crashes as soon as its init is up (sysrq c). What follows is
    the flow's to notice: the next command on L1's console meets the panic."""
    flow.rig.sh.send("echo c > /proc/sysrq-trigger")
    return {"sysrq": "c", "layer": "L1"}


def panic_l2(flow: Flow) -> dict:
    """l2-panic: L2's kernel crashes right after the resume (sysrq c on its console)."""
    flow.l2.console.send("echo c > /proc/sysrq-trigger")
    return {"sysrq": "c", "layer": "L2"}


HOOKS: dict[str, Callable[[Flow], dict]] = {
    "mem-flip": flip_pmem,
    "dma-corrupt": corrupt_dma,
    "irq-drop": mask_edu_irq,
    "l1-panic": panic_l1,
    "l2-panic": panic_l2,
}
"""What injects each fault at its step (mem-lost has no hook: the kexec step boots the new kernel
without the reservation, as its declaration says)."""
