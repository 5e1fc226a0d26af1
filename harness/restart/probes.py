"""Capability probes: ask QEMU itself and read the kernel's .config, before anything boots.

The L1 QEMU binary is run on L0 through its own tree's loader with ``-machine none`` and a QMP
session on stdio: the QAPI schema says which migration modes and capabilities exist. What the
schema cannot say (whether vfio supports a CPR mode) comes from the documented release that
added it.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fastrestart.artifacts.images import Userspace
from fastrestart.artifacts.kernels import Kernel
from fastrestart.errors import UsageError
from fastrestart.paths import artifact_lock, cache_dir, content_key

# Where the schema cannot tell: the QEMU release that made vfio-pci work with each CPR mode.
VFIO_CPR_SINCE = {"cpr-reboot": (9, 0), "cpr-transfer": (10, 1)}

RIG_KERNEL_OPTIONS = {
    "CONFIG_KEXEC": "kexec into the new kernel",
    "CONFIG_X86_PMEM_LEGACY": "memmap= PMEM regions (nd_e820)",
    "CONFIG_FS_DAX": "fsdax for the state region",
    "CONFIG_DEV_DAX": "device-DAX for L2 RAM",
    "CONFIG_INTEL_IOMMU": "the vIOMMU in L1",
    "CONFIG_IRQ_REMAP": "interrupt remapping",
    "CONFIG_VFIO_PCI": "assigning devices to L2",
}
LUO_KERNEL_OPTIONS = {
    "CONFIG_KEXEC_HANDOVER": "kexec handover (KHO)",
    "CONFIG_LIVEUPDATE": "the Live Update Orchestrator (/dev/liveupdate)",
    "CONFIG_LIVEUPDATE_MEMFD": "memfd preservation through LUO",
}
# Keeping an assigned device live across a LUO kexec: the PCI, vfio-pci and IOMMU live-update
# series (in review in 2026: PCI_LIVEUPDATE, VFIO_PCI_LIVEUPDATE by Matlack/Sharma; IOMMU_LIVEUPDATE).
LUO_PASSTHROUGH_OPTIONS = ("CONFIG_PCI_LIVEUPDATE", "CONFIG_VFIO_PCI_LIVEUPDATE", "CONFIG_IOMMU_LIVEUPDATE")


@dataclass
class QemuCaps:
    version: str
    modes: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    has_file_uri: bool = False
    machines: list[str] = field(default_factory=list)

    @property
    def version_tuple(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    def vfio_supports(self, mode: str) -> bool:
        since = VFIO_CPR_SINCE.get(mode)
        return since is not None and self.version_tuple >= since


def _qmp_session(command: list[str], requests: list[dict], env: dict[str, str], timeout: float = 60) -> list[dict]:
    stdin = "\n".join(json.dumps(r) for r in [{"execute": "qmp_capabilities"}, *requests,
                                               {"execute": "quit"}]) + "\n"
    proc = subprocess.run([*command, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
                          input=stdin, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    replies = []
    for line in proc.stdout.splitlines():
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "return" in message or "error" in message:
            replies.append(message)
    return replies[1:1 + len(requests)]  # drop the replies to qmp_capabilities and quit


def qemu_caps(userspace: Userspace) -> QemuCaps:
    """Probe (and cache) the capabilities of the L1 QEMU in this userspace."""
    cached = cache_dir() / "probes" / f"qemu-{content_key(str(userspace.image), userspace.qemu_version)}.json"
    with artifact_lock():
        return _qemu_caps(userspace, cached)


def _qemu_caps(userspace: Userspace, cached: Path) -> QemuCaps:
    if cached.exists():
        return QemuCaps(**json.loads(cached.read_text()))
    command = userspace.qemu_command()
    replies = _qmp_session(command, [{"execute": "query-qmp-schema"}, {"execute": "query-migrate-capabilities"},
                                     {"execute": "query-machines"}], userspace.qemu_env())
    if len(replies) != 3 or any("error" in r for r in replies):
        raise UsageError(f"QEMU {userspace.qemu_version} did not answer the capability probe: {replies}"
                         f" (from {userspace.tree})")
    result = caps_from_replies(userspace.qemu_version, *replies)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result.__dict__, indent=1))
    return result


def caps_from_replies(version: str, schema: dict, caps: dict, machines: dict) -> QemuCaps:
    """QemuCaps from the replies to query-qmp-schema, query-migrate-capabilities, query-machines."""
    result = QemuCaps(version)
    # Introspection hides type names, so the enums are recognised by their members.
    enums = [e.get("values", []) for e in schema.get("return", []) if e.get("meta-type") == "enum"]
    result.modes = next((v for v in enums if "normal" in v and any(m.startswith("cpr-") for m in v)), ["normal"])
    result.has_file_uri = any({"socket", "exec", "file"} <= set(v) for v in enums)
    result.capabilities = [c["capability"] for c in caps.get("return", [])]
    result.machines = [m["name"] for m in machines.get("return", [])]
    return result


def missing_kernel_options(kernel: Kernel, wanted: dict[str, str]) -> list[str]:
    """Options from ``wanted`` that the kernel's .config lacks, as 'CONFIG_X (why)'."""
    options = kernel.config_options()
    if not options:
        return []  # no .config to read: the boot will tell
    return [f"{name} ({why})" for name, why in wanted.items() if options.get(name) not in ("y", "m")]


def kernel_report(kernel: Kernel) -> dict:
    options = kernel.config_options()
    return {name: options.get(name, "n") for name in [*RIG_KERNEL_OPTIONS, *LUO_KERNEL_OPTIONS]}

