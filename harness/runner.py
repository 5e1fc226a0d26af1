"""Run one cell: probe, then (if it can run) stand up the rig, run the flow, write the result.

Whatever happens, the result directory gets a ``result.json`` with a verdict, a ``junit.xml``
and every layer's log; the rig is torn down on every exit path.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from . import faults, images, kernels, modes, probes, results
from .checks import CHECKS, not_run, verdict
from .errors import FastRestartError, GuestPanic, StepError, Unsupported, UsageError
from .flow import PHASES, CheckFailed, Flow, FlowOptions, summarize_phases
from .rig import Rig, RigConfig, l0_qemu, parse_size_mib


@dataclass
class Cell:
    """One restart run's parameters (a row of a matrix)."""

    kernel: str = "debian:trixie"
    to_kernel: str | None = None
    l1_qemu: str = "trixie"
    l0_qemu: str | None = None
    accel: str | None = None
    mode: str = "auto"
    devices: tuple[str, ...] = ("edu", "nvme")
    l2_mem: str = "256M"
    l2_kernel: str = "debian:trixie"
    ram_backend: str = "auto"
    shared_ram: bool = True
    l2_iommu: bool = False
    edu_irq: str = "auto"
    cycles: int = 1
    inject: str | None = None
    mem_check_mib: int | None = None
    name: str | None = None

    def label(self) -> str:
        if self.name:
            return self.name
        kernel = self.kernel.split(":")[-1] + (f"-to-{self.to_kernel.split(':')[-1]}" if self.to_kernel else "")
        parts = [kernel, f"q{self.l1_qemu}", self.mode, "+".join(self.devices) or "nodev", self.l2_mem]
        if self.l2_iommu:
            parts.append("l2iommu")
        if self.edu_irq != "auto":
            parts.append(self.edu_irq)
        if self.inject:
            parts.append(self.inject)
        return "-".join(parts)


def _empty_result(cell: Cell, run_dir: Path) -> dict:
    return {
        "schema": 1, "cell": cell.label(), "verdict": "ERROR", "reason": "", "mode": cell.mode, "accel": "",
        "inject": cell.inject,
        "params": {**asdict(cell), "devices": list(cell.devices)},
        "l1": {"kernel_from": "", "kernel_to": "", "qemu": "", "boot_ids": []},
        "l2": {"mem_mib": 0, "kernel": "", "boot_ids": [], "devices": []},
        "phases": dict.fromkeys(PHASES, 0.0), "downtime_s": {"qmp": None, "guest": None},
        "checks": {name: not_run("the run ended before this check") for name in CHECKS},
        "cycles": cell.cycles, "per_cycle": [], "attempt": 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": 0.0,
        "host": {"hostname": socket.gethostname(), "cpus": os.cpu_count() or 0, "l0_qemu": "",
                 "python": platform.python_version()},
        "logs": {}, "error": None, "results_dir": str(run_dir),
    }


def probe(cell: Cell, rig_config: RigConfig) -> tuple[probes.QemuCaps, modes.Mode, dict]:
    """Everything that can be known without booting: UNSUPPORTED is raised here, in seconds."""
    faults.check_fault(cell.inject, list(cell.devices))
    if cell.mode != "auto" and cell.mode not in modes.MODES:
        raise UsageError(f"Unknown mode '{cell.mode}'. Modes: auto, {', '.join(modes.MODES)}.")
    userspace = images.l1_userspace(cell.l1_qemu)
    caps = probes.qemu_caps(userspace)
    kernel_from = kernels.resolve(cell.kernel)
    kernel_to = kernels.resolve(cell.to_kernel) if cell.to_kernel else kernel_from
    backend = cell.ram_backend if cell.ram_backend != "auto" else ("devdax" if cell.devices else "fsdax")
    mode = modes.choose(cell.mode, caps, list(cell.devices), backend, cell.shared_ram)
    for kernel in {kernel_from, kernel_to}:
        missing = probes.missing_kernel_options(kernel, probes.RIG_KERNEL_OPTIONS)
        if missing:
            raise Unsupported(f"kernel {kernel.release} lacks {', '.join(missing)}")
    for kernel in (kernel_from, kernel_to):  # both: the mode must work before and after the kexec
        mode.check_kernel(kernel, list(cell.devices))
    facts = {"qemu": caps.version, "kernel_from": kernel_from.release, "kernel_to": kernel_to.release,
             "backend": backend}
    return caps, mode, facts


def run_cell(cell: Cell, run_dir: Path, progress=lambda _msg: None) -> dict:
    """Run one cell and return its result (also written to run_dir/result.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = _empty_result(cell, run_dir)
    rig_config = RigConfig(
        kernel=cell.kernel, to_kernel=cell.to_kernel, l2_kernel=cell.l2_kernel, l1_qemu=cell.l1_qemu,
        l0_qemu=cell.l0_qemu, accel=cell.accel, devices=list(cell.devices),
        l2_mem_mib=parse_size_mib(cell.l2_mem), ram_backend=cell.ram_backend, shared_ram=cell.shared_ram,
        l2_iommu=cell.l2_iommu, edu_irq=cell.edu_irq)
    flow = rig = None
    try:
        progress("probe")
        caps, mode, facts = probe(cell, rig_config)
        result["mode"] = mode.name
        result["l1"].update(kernel_from=facts["kernel_from"], kernel_to=facts["kernel_to"], qemu=facts["qemu"])
        rig = Rig(rig_config, run_dir)
        result["accel"] = rig.accel.name
        result["accel_reason"] = rig.accel.reason
        result["host"]["l0_qemu"] = rig.l0_version
        result["l2"]["mem_mib"] = rig_config.l2_mem_mib
        result["guest_visible"] = mode.guest_visible
        flow = Flow(rig, mode, caps, FlowOptions(cycles=cell.cycles, inject=cell.inject,
                                                 mem_check_mib=cell.mem_check_mib), progress)
        flow.run()
        _collect(result, flow, rig)
        result["checks"].update(flow.cycles_verdicts())
    except Unsupported as exc:
        result.update(verdict="UNSUPPORTED", reason=exc.reason)
        for name in CHECKS:
            result["checks"][name] = verdict("UNSUPPORTED", reason=exc.reason)
    except CheckFailed as exc:
        _collect(result, flow, rig)
        result["checks"][exc.check] = verdict("FAIL", exc.evidence, str(exc))
    except (StepError, GuestPanic, FastRestartError) as exc:
        if isinstance(exc, UsageError):
            raise
        _collect(result, flow, rig)
        step = getattr(exc, "step", "rig")
        result["error"] = {"step": step, "message": str(exc), "evidence": getattr(exc, "evidence", {})}
        result["reason"] = f"{step}: {str(exc).splitlines()[0]}"
    except Exception as exc:
        _collect(result, flow, rig)
        result["error"] = {"step": "harness", "message": repr(exc), "evidence": {"traceback": traceback.format_exc()}}
        result["reason"] = f"harness: {exc!r}"
    finally:
        if flow is not None:
            flow.close()
        if rig is not None:
            rig.close()
        result["wall_s"] = round(time.monotonic() - started, 2)
        result["logs"] = {p.stem: str(p.relative_to(run_dir)) for p in sorted((run_dir / "logs").glob("*"))
                          } if (run_dir / "logs").exists() else {}
        _decide(result)
        results.write_result(result, run_dir)
        results.write_junit([result], run_dir / "junit.xml", suite="fastrestart")
    return result


def _collect(result: dict, flow: Flow | None, rig: Rig | None) -> None:
    """Copy what the flow learned into the result, however far it got."""
    if flow is None:
        return
    result["l1"]["boot_ids"] = flow.l1_boot_ids
    if flow.l1_releases:
        result["l1"]["kernel_from"] = flow.l1_releases[0]
        result["l1"]["kernel_to"] = flow.l1_releases[-1]
    result["per_cycle"] = flow.cycles_summary()
    result["phases"] = {**dict.fromkeys(PHASES, 0.0), **summarize_phases([flow.prepare_record, *flow.cycles,
                                                                          flow.verify_record])}
    lives = [c.get("liveness", {}) for c in flow.cycles if c.get("liveness")]
    result["l2"]["boot_ids"] = sorted({lv["evidence"]["boot_id_before"] for lv in lives} |
                                      {lv["evidence"]["boot_id_after"] for lv in lives})
    if flow.workloads:
        result["l2"]["devices"] = [{"name": d.name, "vendor_device": d.vendor_device,
                                    "l2_bdf": flow.workloads.devices.get(d.name)} for d in rig.devices]
    downtimes = [c["downtime_s"] for c in flow.cycles if c.get("downtime_s")]
    if downtimes:
        result["downtime_s"] = {key: round(sum(d[key] for d in downtimes if d[key] is not None) / len(downtimes), 3)
                                for key in ("qmp", "guest")}
    result["l2"]["kernel"] = rig.artifacts.l2_kernel.release if rig and rig.artifacts else ""


def _decide(result: dict) -> None:
    """The run's verdict from its checks (FAIL beats ERROR only when a check really failed)."""
    if result["verdict"] == "UNSUPPORTED":
        return
    states = {name: c["verdict"] for name, c in result["checks"].items()}
    failed = [name for name, state in states.items() if state == "FAIL"]
    if failed:
        result["verdict"] = "FAIL"
        reasons = [f"{n}: {result['checks'][n].get('reason', '')}" for n in failed]
        result["reason"] = "; ".join(reasons) + (f" (then {result['reason']})" if result.get("error") else "")
    elif result.get("error"):
        result["verdict"] = "ERROR"
    else:
        result["verdict"] = "PASS"
        result["reason"] = "; ".join(f"{n}: {c.get('reason')}" for n, c in result["checks"].items()
                                     if c["verdict"] != "PASS" and c.get("reason"))


def doctor_facts() -> dict:
    """What `fastrestart doctor` reports (no boot)."""
    from . import accel as accel_mod
    from .paths import cache_dir

    facts: dict = {"accel": asdict(accel_mod.detect())}
    try:
        facts["l0_qemu"] = l0_qemu("system")[1]
    except UsageError as exc:
        facts["l0_qemu"] = None
        facts.setdefault("missing", []).append(str(exc))
    base = cache_dir()
    facts["cache"] = str(base)
    facts["kernels"] = sorted(p.name for p in (base / "kernels").glob("*") if (p / "kernel.json").exists())
    facts["userspaces"] = sorted(p.name for p in (base / "userspace").glob("*") if (p / "userspace.json").exists())
    import shutil

    for tool, package in [("busybox", "busybox-static"), ("cpio", "cpio"), ("mkfs.ext4", "e2fsprogs"),
                          ("depmod", "kmod"), ("gcc", "gcc"), ("apt-get", "apt"), ("dpkg-deb", "dpkg")]:
        if not shutil.which(tool):
            facts.setdefault("missing", []).append(f"{tool}: apt-get install {package}")
    return facts
