"""Run one cell: probe, then (if it can run) stand up the rig, run the flow, write the result.

Whatever happens, the result directory gets a ``result.json`` with a verdict, a ``junit.xml``
and every layer's log; the rig is torn down on every exit path.
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from fastrestart.artifacts import images, kernels
from fastrestart.campaign import results
from fastrestart.errors import CheckFailed, FastRestartError, GuestPanic, RigFault, Unsupported, UsageError
from fastrestart.options import Cell
from fastrestart.restart import faults, modes, probes
from fastrestart.restart.checks import CHECKS, not_run, verdict
from fastrestart.restart.flow import PHASES, Flow, FlowOptions, summarize_phases
from fastrestart.vm.machine import interruption, signals_deferred
from fastrestart.vm.rig import L0_AUTO_MIN, Rig, RigConfig, l0_qemu, parse_size_mib

UNFINISHED = "the run did not finish"


def _empty_result(cell: Cell, run_dir: Path) -> dict:
    """A result that fails closed: ERROR until a completed flow proves otherwise."""
    return {
        "schema": 1, "cell": cell.label(), "verdict": "ERROR", "reason": UNFINISHED, "mode": cell.mode, "accel": "",
        "inject": cell.inject,
        "params": {**asdict(cell), "devices": list(cell.devices)},
        "l1": {"kernel_from": "", "kernel_to": "", "qemu": "", "boot_ids": []},
        "l2": {"mem_mib": 0, "kernel": "", "boot_ids": [], "devices": []},
        "phases": dict.fromkeys(PHASES, 0.0), "downtime_s": {"qmp": None, "guest": None},
        "checks": {name: not_run("the run ended before this check") for name in CHECKS},
        "cycles": cell.cycles, "cycles_completed": 0, "completed": False, "per_cycle": [], "attempt": 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": 0.0,
        "host": {"hostname": socket.gethostname(), "cpus": os.cpu_count() or 0, "l0_qemu": "",
                 "python": platform.python_version()},
        "logs": {}, "error": {"kind": "harness", "step": "harness", "message": UNFINISHED, "evidence": {}},
        "results_dir": str(run_dir),
    }


def probe(cell: Cell, config: RigConfig) -> tuple[probes.QemuCaps, modes.Mode, dict]:
    """Everything that can be known without booting: UNSUPPORTED is raised here, in seconds."""
    cell.validate()
    userspace = images.l1_userspace(cell.l1_qemu)
    caps = probes.qemu_caps(userspace)
    kernel_from = kernels.resolve(cell.kernel)
    kernel_to = kernels.resolve(cell.to_kernel) if cell.to_kernel else kernel_from
    backend = cell.ram_backend if cell.ram_backend != "auto" else ("devdax" if cell.devices else "fsdax")
    mode = modes.choose(cell.mode, caps, list(cell.devices), backend, cell.shared_ram)
    fault = faults.fault(cell.inject)
    if fault is not None:
        fault.check_reach(mode.name, mode.restarts_host, list(cell.devices))
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
    """Run one cell and return its result (also written to run_dir/result.json).

    The result fails closed: it is written as ERROR ("the run did not finish") before anything
    else, so a run killed outright leaves no PASS behind. Every exception, interruptions included,
    is recorded by ``attribute`` and the result rewritten before it propagates; bad usage and
    interruptions then re-raise, so that the CLI exits 2 or 128+signal.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = _empty_result(cell, run_dir)
    results.write_result(result, run_dir)
    flow = rig = None
    stage = "probe"
    try:
        progress("probe")
        config = rig_config(cell)
        caps, mode, facts = probe(cell, config)
        result["mode"] = mode.name
        result["l1"].update(kernel_from=facts["kernel_from"], kernel_to=facts["kernel_to"], qemu=facts["qemu"])
        stage = "rig"
        rig = Rig(config, run_dir)
        result["accel"] = rig.accel.name
        result["accel_reason"] = rig.accel.reason
        result["host"]["l0_qemu"] = rig.l0_version
        result["l2"]["mem_mib"] = config.l2_mem_mib
        result["guest_visible"] = mode.guest_visible
        flow = Flow(rig, mode, caps, FlowOptions(cycles=cell.cycles, inject=cell.inject,
                                                 mem_check_mib=cell.mem_check_mib), progress)
        flow.run()
        result["completed"], result["error"], result["reason"] = True, None, ""
    except BaseException as exc:  # recorded, then re-raised where it must be
        attribute(result, exc, step=flow.current_step if flow else stage,
                  restart_begun=bool(flow and flow.restart_begun), rig=rig)
        if isinstance(exc, UsageError) or interruption(exc):
            raise
    finally:
        with signals_deferred():
            _finish(result, flow, rig, run_dir, started)
    return result


def rig_config(cell: Cell) -> RigConfig:
    """The rig a cell stands up."""
    return RigConfig(
        kernel=cell.kernel, to_kernel=cell.to_kernel, l2_kernel=cell.l2_kernel, l1_qemu=cell.l1_qemu,
        l0_qemu=cell.l0_qemu, accel=cell.accel, devices=list(cell.devices),
        l2_mem_mib=parse_size_mib(cell.l2_mem), ram_backend=cell.ram_backend, shared_ram=cell.shared_ram,
        l2_iommu=cell.l2_iommu, edu_irq=cell.edu_irq, keep_images=cell.keep_images)


def _finish(result: dict, flow: Flow | None, rig: Rig | None, run_dir: Path, started: float) -> None:
    """Collect what the flow learned, tear down, decide and write: each part may fail without
    losing the others, and a failure here can only take a verdict away, never give one."""
    try:
        _collect(result, flow, rig)
        for name, found in (flow.cycles_verdicts() if flow else {}).items():
            if result["checks"][name]["verdict"] != "FAIL":  # a FAIL recorded by attribute stands
                result["checks"][name] = found
    except Exception as exc:
        _harness_error(result, "collect", exc)
    for closer in (flow and flow.close, rig and rig.close):
        if closer:
            try:
                closer()
            except Exception as exc:
                _harness_error(result, "teardown", exc)
    result["wall_s"] = round(time.monotonic() - started, 2)
    result["logs"] = {p.stem: str(p.relative_to(run_dir)) for p in sorted((run_dir / "logs").glob("*"))
                      } if (run_dir / "logs").exists() else {}
    decide(result)
    results.write_result(result, run_dir)
    results.write_junit([result], run_dir / "junit.xml", suite="fastrestart")
    result["results_size_bytes"] = results.results_dir_size(run_dir)  # what the run leaves on disk, all told
    results.write_result(result, run_dir)


def _harness_error(result: dict, step: str, exc: BaseException) -> None:
    """Record a harness failure, unless the run already has an error of its own (which stands)."""
    if result.get("error") is None:
        result["error"] = {"kind": "harness", "step": step, "message": repr(exc),
                           "evidence": {"traceback": traceback.format_exc()}}
        result["reason"] = f"harness ({step}): {exc!r}"


def attribute(result: dict, exc: BaseException, *, step: str, restart_begun: bool, rig: Rig | None) -> None:
    """Record what ended the run, and whose fault it is.

    - Unsupported: the cell cannot run here (found before anything is tested).
    - CheckFailed: the named check FAILed.
    - An interruption (Ctrl-C, SIGTERM, SIGHUP, a test runner's timeout): ERROR "interrupted".
    - Bad usage: ERROR "usage" (the CLI exits 2).
    - L0's QEMU died or asserted, a host resource ran out, or a proven transport stall: the rig's
      ERROR, the only kind that may be retried.
    - Anything else before ``save``: the rig's ERROR (nothing under test has happened yet).
    - A Python error of the harness's own: ERROR "harness", with its traceback, never retried.
    - Anything else once ``save`` has started (a panic, a kexec that never reaches the new kernel,
      an L1 that never becomes ready, an L2 that hangs or dies): the restart's FAIL, in liveness,
      with the step in the evidence.
    """
    def error(kind: str, message: str, evidence: dict | None = None) -> None:
        result["error"] = {"kind": kind, "step": step, "message": message, "evidence": evidence or {}}
        result["reason"] = f"{step}: {message.splitlines()[0] if message else kind}"

    interrupted = interruption(exc)
    l0 = rig.l0_fault() if rig is not None and not interrupted else None
    if isinstance(exc, Unsupported):
        result.update(verdict="UNSUPPORTED", reason=exc.reason, error=None)
        for name in CHECKS:
            result["checks"][name] = verdict("UNSUPPORTED", reason=exc.reason)
    elif interrupted:
        error("interrupted", f"interrupted by {interrupted[0]} during step {step}")
    elif isinstance(exc, UsageError):
        error("usage", f"bad usage: {exc}")
    elif l0 is not None:
        error("rig", l0.pop("message"), {**l0, "while": str(exc)[:2000]})
    elif isinstance(exc, RigFault):
        error("rig", exc.message, exc.evidence)
    elif isinstance(exc, OSError) and exc.errno in HOST_RESOURCE_ERRNOS:
        error("rig", f"the host ran out of a resource: {exc}", {"traceback": traceback.format_exc()})
    elif isinstance(exc, CheckFailed):
        result["error"] = None
        result["checks"][exc.check] = verdict("FAIL", {"step": step, **exc.evidence}, str(exc))
    elif not isinstance(exc, FastRestartError):
        error("harness", repr(exc), {"traceback": traceback.format_exc()})
    elif not restart_begun:
        error("rig", str(exc), getattr(exc, "evidence", {}))
    else:
        result["error"] = None
        layer = "L1" if isinstance(exc, GuestPanic) and str(exc).startswith("l1") else "L2" if isinstance(
            exc, GuestPanic) else None
        what = f"{layer}'s kernel panicked" if layer else "the restart did not complete"
        message = str(exc)
        result["checks"]["liveness"] = verdict(
            "FAIL", {"step": step, "error": type(exc).__name__, "message": message[:4000],
                     **getattr(exc, "evidence", {})},
            f"{what} in step {step}: {message.splitlines()[0][:300] if message else type(exc).__name__}")


HOST_RESOURCE_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EDQUOT}


def _collect(result: dict, flow: Flow | None, rig: Rig | None) -> None:
    """Copy what the flow learned into the result, however far it got."""
    if flow is None:
        return
    result["cycles_completed"] = flow.cycles_completed
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


def decide(result: dict) -> None:
    """The run's verdict, failing closed.

    FAIL when a check FAILed (a real finding stands, whatever happened after it). Otherwise ERROR
    when an error was recorded. Otherwise PASS only for a run that completed, ran at least one
    restart cycle, whose liveness is PASS and whose every other check is PASS or UNSUPPORTED with
    a reason; anything short of that is ERROR, saying what is missing.
    """
    checks = result["checks"]
    failed = [name for name, c in checks.items() if c["verdict"] == "FAIL"]
    error = result.get("error")
    if failed:
        result["verdict"] = "FAIL"
        reasons = "; ".join(f"{n}: {checks[n].get('reason', '')}" for n in failed)
        result["reason"] = reasons + (f" (then {result['reason']})" if error and result.get("reason") else "")
        return
    if result["verdict"] == "UNSUPPORTED" and not error:
        return
    if error:
        result["verdict"] = "ERROR"
        result["reason"] = result.get("reason") or f"{error.get('step')}: {error.get('message')}"
        return
    missing = []
    if not result.get("completed"):
        missing.append(UNFINISHED)
    if result.get("cycles_completed", 0) < 1:
        missing.append("no restart cycle completed")
    if checks.get("liveness", {}).get("verdict") != "PASS":
        missing.append("liveness did not PASS")
    missing += [f"check {n} is {c['verdict']}" + ("" if c.get("reason") else " without a reason")
                for n, c in checks.items() if c["verdict"] != "PASS" and not (
                    c["verdict"] == "UNSUPPORTED" and c.get("reason"))]
    if missing:
        result["verdict"] = "ERROR"
        result["error"] = {"kind": "harness", "step": "verdict", "message": "; ".join(missing), "evidence": {}}
        result["reason"] = "no verdict: " + "; ".join(missing)
        return
    result["verdict"] = "PASS"
    # What a PASS did not cover, or covered otherwise (UNSUPPORTED checks, an INTx fallback), is said.
    result["reason"] = "; ".join(f"{n}: {c['reason']}" for n, c in checks.items() if c.get("reason"))


def doctor_facts() -> dict:
    """What `fastrestart doctor` reports (no boot)."""
    from fastrestart.paths import cache_dir
    from fastrestart.vm import accel as accel_mod

    facts: dict = {"accel": asdict(accel_mod.detect())}
    try:
        system = l0_qemu("system")[1]
    except UsageError as exc:
        system = None
        facts.setdefault("missing", []).append(str(exc))
    facts["l0_qemu_system"] = system
    # What a run will use (--l0-qemu auto), said without fetching anything.
    if system and tuple(int(x) for x in system.split(".")[:2]) >= L0_AUTO_MIN:
        facts["l0_qemu"] = f"{system} (the system's)"
    else:
        why = f"{system} is older than {'.'.join(map(str, L0_AUTO_MIN))}" if system else "is missing"
        facts["l0_qemu"] = f"Debian trixie's 10.0, from the cache (the system's {why})"
    base = cache_dir()
    facts["cache"] = str(base)
    facts["kernels"] = sorted(p.name for p in (base / "kernels").glob("*") if (p / "kernel.json").exists())
    facts["userspaces"] = sorted(p.name for p in (base / "userspace").glob("*") if (p / "userspace.json").exists())
    import shutil

    for tool, package in [("busybox", "busybox-static"), ("cpio", "cpio"), ("mkfs.ext4", "e2fsprogs"),
                          ("depmod", "kmod"), ("gcc", "gcc"), ("apt-get", "apt"), ("dpkg-deb", "dpkg"),
                          ("unshare", "util-linux"), ("zstd", "zstd"), ("readelf", "binutils"), ("xz", "xz-utils")]:
        if not shutil.which(tool):
            facts.setdefault("missing", []).append(f"{tool}: apt-get install {package}")
    return facts
