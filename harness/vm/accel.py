"""Which accelerator runs L1: KVM only where nested virtualization really works, else TCG.

``/dev/kvm`` alone proves nothing: some machines expose a paravirtual KVM that cannot run a
stock kernel. Nesting needs kvm_intel or kvm_amd loaded with ``nested`` on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastrestart.errors import UsageError


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str
    args: list[str] = field(default_factory=list)


TCG = ["-accel", "tcg,thread=multi,tb-size=512", "-cpu", "EPYC,+svm"]
KVM = ["-accel", "kvm", "-cpu", "host"]


def detect(sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> Accel:
    """Pick the accelerator for L1 and say why."""
    for module in ("kvm_intel", "kvm_amd"):
        nested = sysfs / "module" / module / "parameters" / "nested"
        if nested.exists() and nested.read_text().strip() in ("Y", "1"):
            if not (dev / "kvm").exists():
                return Accel("tcg", f"{module} has nested=on but /dev/kvm is missing", TCG)
            return Accel("kvm", f"{module} is loaded with nested virtualization on", KVM)
    loaded = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if (sysfs / "module" / m).exists()]
    if loaded:
        why = f"{', '.join(loaded)} loaded but without nested virtualization"
    elif (dev / "kvm").exists():
        why = "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded (not a nesting KVM)"
    else:
        why = "no KVM on this machine"
    return Accel("tcg", f"{why}; TCG with an emulated SVM CPU lets L1 run L2 on its own KVM", TCG)


def choose(override: str | None, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> Accel:
    """Honour ``--accel`` when given, else detect."""
    if override in (None, "", "auto"):
        return detect(sysfs, dev)
    if override == "tcg":
        return Accel("tcg", "forced with --accel tcg", TCG)
    if override == "kvm":
        if not (dev / "kvm").exists():
            raise UsageError("--accel kvm was asked for but /dev/kvm does not exist. Load kvm_intel or "
                             "kvm_amd with nested=1, or use --accel tcg.")
        return Accel("kvm", "forced with --accel kvm", KVM)
    raise UsageError(f"Unknown accelerator '{override}'. Use kvm, tcg or auto.")
