"""`fastrestart bench`: fast restart against the alternatives, measured side by side in one run.

A route is one way to get L2 through an upgrade of L1:

- ``fast-restart``: the default flow: RAM stays in PMEM (x-ignore-shared), L1 kexecs;
- ``ram-copy``: the same, but the save copies L2's RAM into the state file and the restore reads
  it back (x-ignore-shared off, same backend);
- ``firmware-reboot-seabios`` / ``firmware-reboot-ovmf``: as fast-restart, but L1 reboots through
  its firmware instead of kexec (the flow's ``reboot`` step in the ``kexec`` slot);
- ``cpr-transfer``: no host restart at all; a new QEMU takes over L2's fds;
- ``cold-boot``: L2 is shut down (nothing kept), L1 kexecs, a new L2 boots and its workloads
  start again: the outage of an upgrade without any state kept.

Budget: a fresh L1+L2 costs more than a restart, so one rig per (L2 size, L1 firmware) runs its
routes as interleaved restart cycles (A B C A B C ...), and the numbers of a route come from the
same L1, L2 and moment as those of the others. OVMF needs L1 booted under OVMF from the start, so
it gets its own rig, which also runs fast-restart: their ratio is then within one rig too.

A route whose cycle fails is recorded (verdict, reason, the downtime if it was measured) and the
rest of that rig's schedule goes on on a fresh rig: a finding, not a crash of the bench.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastrestart.artifacts import images
from fastrestart.campaign.report import FONT_W, PAD, PHASE_COLOURS, environment, legend_layout
from fastrestart.errors import Unsupported, UsageError
from fastrestart.restart import checks, modes, probes
from fastrestart.restart.flow import CheckFailed, Flow, FlowOptions, step
from fastrestart.vm.rig import Rig, RigConfig, parse_size_mib

SCHEMA = 1
ROUTES = ("fast-restart", "ram-copy", "firmware-reboot-seabios", "firmware-reboot-ovmf", "cpr-transfer",
          "cold-boot")
"""Every route, in the order tables show them."""
DEFAULT_SIZES = "128M,512M,1G,2G"
DEFAULT_MEM_CHECK_MIB = 32
REFERENCE = "fast-restart"
DOWNTIME_PHASES = ("save", "record", "kexec", "reboot", "boot", "reserve", "enumerate", "reload", "restore",
                   "resume")
"""The phases inside the downtime window, in the order the stacked bars draw them."""
MAX_RIG_STARTS = 3
"""A rig that breaks is started again for the rest of its schedule, at most this often in all."""


@dataclass(frozen=True)
class Route:
    """How one restart cycle gets L2 through the upgrade of L1."""

    name: str
    host_restart: str = "kexec"  # kexec | firmware | none
    ignore_shared: bool = True
    firmware: str = "seabios"  # the L1 firmware the route needs
    mode: str | None = None  # a restart mode of its own (else the rig's)
    cold: bool = False
    doc: str = ""


ROUTE_SPECS: dict[str, Route] = {r.name: r for r in (
    Route("fast-restart", doc="RAM kept in PMEM (x-ignore-shared), L1 kexecs"),
    Route("ram-copy", ignore_shared=False, doc="RAM written into the state file and read back, L1 kexecs"),
    Route("firmware-reboot-seabios", host_restart="firmware", doc="L1 reboots through SeaBIOS"),
    Route("firmware-reboot-ovmf", host_restart="firmware", firmware="ovmf", doc="L1 reboots through OVMF (UEFI)"),
    Route("cpr-transfer", host_restart="none", mode="cpr-transfer",
          doc="a new QEMU takes over L2's fds; no host restart"),
    Route("cold-boot", cold=True, doc="L2 shut down, L1 kexecs, a new L2 boots and restarts its workloads"),
)}


@dataclass
class RigPlan:
    """One rig of the bench: an L2 size, an L1 firmware, and the routes it cycles through."""

    l2_mem_mib: int
    firmware: str
    routes: list[str]
    repeat: int

    @property
    def name(self) -> str:
        return f"{_size_label(self.l2_mem_mib)}-{self.firmware}"

    def schedule(self) -> list[tuple[str, int]]:
        """(route, repeat) in the order the cycles run: A B C A B C ... (interleaved)."""
        return [(route, n) for n in range(1, self.repeat + 1) for route in self.routes]


def plan(routes: list[str], sizes_mib: list[int], repeat: int) -> list[RigPlan]:
    """The rigs of a bench, smallest L2 first. Routes that need OVMF get an OVMF rig, which also
    runs fast-restart as the in-rig reference; everything else shares the SeaBIOS rig."""
    unknown = [r for r in routes if r not in ROUTE_SPECS]
    if unknown:
        raise UsageError(f"Unknown route(s) {', '.join(unknown)}. Routes: {', '.join(ROUTES)}.")
    if repeat < 1:
        raise UsageError("--repeat must be at least 1.")
    ordered = [r for r in ROUTES if r in routes]
    plans = []
    for size in sorted(set(sizes_mib)):
        for firmware in ("seabios", "ovmf"):
            own = [r for r in ordered if ROUTE_SPECS[r].firmware == firmware]
            if not own:
                continue
            if firmware == "ovmf" and REFERENCE in ordered and REFERENCE not in own:
                own.insert(0, REFERENCE)
            plans.append(RigPlan(size, firmware, own, repeat))
    return plans


def _size_label(mib: int) -> str:
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def route_label(route: str, firmware: str) -> str:
    """A route as the tables name it: the OVMF rig's own fast-restart is ``fast-restart@ovmf``."""
    return route if ROUTE_SPECS[route].firmware == firmware else f"{route}@{firmware}"


# -- running --------------------------------------------------------------------------------

@dataclass
class BenchOptions:
    routes: list[str] = field(default_factory=lambda: list(ROUTES))
    sizes_mib: list[int] = field(default_factory=lambda: [parse_size_mib(s) for s in DEFAULT_SIZES.split(",")])
    repeat: int = 3
    devices: list[str] = field(default_factory=list)
    mem_check_mib: int = DEFAULT_MEM_CHECK_MIB
    kernel: str = "debian:trixie"
    l1_qemu: str = "trixie"
    l0_qemu: str | None = None
    accel: str | None = None


class BenchFlow(Flow):
    """A Flow whose cycles each take a route; prepare and verify are the Flow's own."""

    def run_route(self, route: Route, cycle: int, base_mode: modes.Mode, transfer_mode: modes.Mode | None) -> None:
        self.begin_cycle(cycle)
        self.cycle_record["route"] = route.name
        self.mode = transfer_mode if route.mode == "cpr-transfer" else base_mode
        self.ignore_shared = route.ignore_shared
        self.options.host_restart = route.host_restart if route.host_restart != "none" else "kexec"
        if route.cold:
            self.cold_boot_cycle()
            return
        self.restart_cycle()

    # -- cold boot: no state kept ---------------------------------------------------------
    def cold_boot_cycle(self) -> None:
        digest, self.options.l1_digest = self.options.l1_digest, False  # no RAM to keep, none to check
        try:
            self.shut_down()
            self.record()
            self.kexec()
            self.boot()
            self.reserve()
            self.enumerate()
            self.reload()
            self.boot_new_l2()
            self.restart_workloads()
        finally:
            self.options.l1_digest = digest

    @step("save")
    def shut_down(self) -> dict:
        self.readings["before"] = checks.liveness_reading(self.l2, self.rig)
        stopped_at = time.time()
        self.l2.quit(step="save")
        return {"stopped_at": stopped_at, "shut_down": "quit: L2 and its state are gone"}

    @step("restore")
    def boot_new_l2(self) -> dict:
        self.use_l2(self.l2_machine().launch())
        return {"ready_at": time.time(), "boot": "a new L2 booted to its init"}

    @step("resume")
    def restart_workloads(self) -> dict:
        ready_at = self.cycle_record["evidence"]["restore"]["ready_at"]
        stopped_at = self.cycle_record["evidence"]["save"]["stopped_at"]
        self.workloads = checks.Workloads(self.rig, self.options.mem_check_mib)
        self.workloads.start(self.l2)
        after = checks.liveness_reading(self.l2, self.rig)
        before = self.readings["before"]
        fresh = after["boot_id"] != before["boot_id"]
        self.cycle_record["liveness"] = checks.verdict(
            "PASS" if fresh else "FAIL", {"boot_id_before": before["boot_id"], "boot_id_after": after["boot_id"]},
            "a new L2 booted, as a cold boot should" if fresh else "L2's boot_id did not change")
        self.cycle_record["downtime_s"] = {"qmp": round(ready_at - stopped_at, 3), "guest": None}
        return {"downtime_qmp_s": round(ready_at - stopped_at, 3), "downtime_ends": "new L2 at its init",
                "workloads_restarted_s": round(time.time() - ready_at, 3)}


def _cycle_summary(record: dict, route: str, plan_: RigPlan, repeat: int, wall: float) -> dict:
    evidence = record.get("evidence", {})
    out = {"route": route, "label": route_label(route, plan_.firmware), "rig": plan_.name,
           "firmware": plan_.firmware, "l2_mem_mib": plan_.l2_mem_mib, "repeat": repeat,
           "cycle": record.get("cycle"), "phases": record.get("phases", {}),
           "downtime_s": record.get("downtime_s") or {"qmp": None, "guest": None}, "cycle_wall_s": round(wall, 3),
           "loadavg_1m": round(os.getloadavg()[0], 2)}
    host = {}
    kexec, boot = evidence.get("kexec") or {}, evidence.get("boot") or {}
    reboot = evidence.get("reboot") or {}
    if kexec:
        host.update(kexec_load_s=kexec.get("load_s"), to_first_line_s=kexec.get("to_first_line_s"))
    if reboot:
        host.update(to_first_line_s=reboot.get("to_first_line_s"))
    for key in ("first_line_to_init_s", "init_to_ready_s", "uptime_at_ready_s"):
        if key in boot:
            host[key] = boot[key]
    out["host_restart"] = host
    save = evidence.get("save") or {}
    if "state_bytes" in save:
        out["state_bytes"] = save["state_bytes"]
    before = (evidence.get("record") or {}).get("ram_digest_before")
    after = (evidence.get("reserve") or {}).get("ram_digest_after")
    if before and after:
        out["ram_digest"] = {"same": before["digest"] == after["digest"],
                             "seconds": round(before.get("seconds", 0) + after.get("seconds", 0), 3)}
    liveness = record.get("liveness")
    problems = []
    if liveness and liveness["verdict"] != "PASS":
        problems.append(f"liveness: {liveness.get('reason', '')}")
    if out.get("ram_digest") and not out["ram_digest"]["same"]:
        problems.append("memory: the PMEM digest of L2's RAM changed across the restart")
    out["verdict"] = "FAIL" if problems else "PASS" if liveness else "ERROR"
    out["reason"] = "; ".join(problems)
    return out


def run_rig(plan_: RigPlan, options: BenchOptions, out_dir: Path, progress: Callable[[str], None],
            caps: probes.QemuCaps, base_mode: modes.Mode, transfer: modes.Mode | str) -> tuple[list[dict], list[dict]]:
    """Run one rig's schedule; returns (cycle records, rig records). A broken rig is started again
    for the rest of its schedule (at most MAX_RIG_STARTS starts)."""
    schedule = plan_.schedule()
    cycles: list[dict] = []
    rigs: list[dict] = []
    unsupported = {"cpr-transfer": transfer} if isinstance(transfer, str) else {}
    for route, repeat in schedule:
        if route in unsupported:
            cycles.append({"route": route, "label": route_label(route, plan_.firmware), "rig": plan_.name,
                           "firmware": plan_.firmware, "l2_mem_mib": plan_.l2_mem_mib, "repeat": repeat,
                           "verdict": "UNSUPPORTED", "reason": unsupported[route], "phases": {},
                           "downtime_s": {"qmp": None, "guest": None}, "cycle_wall_s": None, "host_restart": {}})
    todo = [(r, n) for r, n in schedule if r not in unsupported]
    start = 0
    while todo and start < MAX_RIG_STARTS:
        start += 1
        todo = _run_rig_once(plan_, options, out_dir / (plan_.name if start == 1 else f"{plan_.name}-start{start}"),
                             progress, caps, base_mode, transfer, todo, cycles, rigs)
    for route, repeat in todo:
        cycles.append({"route": route, "label": route_label(route, plan_.firmware), "rig": plan_.name,
                       "firmware": plan_.firmware, "l2_mem_mib": plan_.l2_mem_mib, "repeat": repeat,
                       "verdict": "ERROR", "reason": f"not run: the rig broke {MAX_RIG_STARTS} times",
                       "phases": {}, "downtime_s": {"qmp": None, "guest": None}, "cycle_wall_s": None,
                       "host_restart": {}})
    return cycles, rigs


def _rig_config(plan_: RigPlan, options: BenchOptions) -> RigConfig:
    copies_ram = "ram-copy" in plan_.routes
    return RigConfig(kernel=options.kernel, l1_qemu=options.l1_qemu, l0_qemu=options.l0_qemu, accel=options.accel,
                     devices=list(options.devices), l2_mem_mib=plan_.l2_mem_mib, firmware=plan_.firmware,
                     state_extra_mib=plan_.l2_mem_mib + 64 if copies_ram else 0)


def _run_rig_once(plan_: RigPlan, options: BenchOptions, run_dir: Path, progress: Callable[[str], None],
                  caps: probes.QemuCaps, base_mode: modes.Mode, transfer: modes.Mode | str,
                  todo: list[tuple[str, int]], cycles: list[dict], rigs: list[dict]) -> list[tuple[str, int]]:
    """Start a rig and run as much of ``todo`` as it survives; returns what is left."""
    started = time.monotonic()
    record: dict = {"rig": plan_.name, "firmware": plan_.firmware, "l2_mem_mib": plan_.l2_mem_mib,
                    "run_dir": str(run_dir), "mode": base_mode.name, "error": None}
    rigs.append(record)
    flow = rig = None
    left = list(todo)
    try:
        rig = Rig(_rig_config(plan_, options), run_dir)
        record.update(accel=rig.accel.name, accel_reason=rig.accel.reason, l0_qemu=rig.l0_version)
        flow = BenchFlow(rig, base_mode, caps, FlowOptions(mem_check_mib=options.mem_check_mib),
                         lambda msg: progress(f"{plan_.name}: {msg}"))
        # Every L2 generation of the rig has the same arguments, whatever route the cycle takes.
        flow.l2_overrides = {"aux_ram_share": any(ROUTE_SPECS[r].mode == "cpr-transfer" for r, _ in todo)
                             and not isinstance(transfer, str)}
        flow.prepare()
        record["prepare_s"] = flow.prepare_record["phases"]["prepare"]
        record["l1_initrd_bytes"] = rig.artifacts.initrd_to.stat().st_size
        record["l1_kernel_bytes"] = rig.artifacts.kernel_to.image.stat().st_size
        record["l1_kernel"] = flow.l1_releases[0]
        cycle_no = 0
        while left:
            route, repeat = left[0]
            cycle_no += 1
            began = time.monotonic()
            try:
                flow.run_route(ROUTE_SPECS[route], cycle_no, base_mode,
                               transfer if not isinstance(transfer, str) else None)
            except Exception as exc:  # the route's finding, recorded; the rig starts again
                summary = _cycle_summary(flow.cycle_record, route, plan_, repeat, time.monotonic() - began)
                summary["verdict"] = "FAIL" if isinstance(exc, CheckFailed) else "ERROR"
                step_name = getattr(exc, "step", None) or getattr(exc, "check", None) or type(exc).__name__
                summary["reason"] = f"{step_name}: {str(exc).splitlines()[0] if str(exc) else repr(exc)}"
                cycles.append(summary)
                left.pop(0)
                flow.log(f"bench: route {route} broke the rig: {summary['reason']}")
                raise
            cycles.append(_cycle_summary(flow.cycle_record, route, plan_, repeat, time.monotonic() - began))
            left.pop(0)
        flow.cycle_record = flow.verify_record
        flow.verify()
        record["verify_s"] = flow.verify_record["phases"]["verify"]
        record["checks"] = {name: {"verdict": c["verdict"], "reason": c.get("reason", "")}
                            for name, c in flow.cycles_verdicts().items()}
    except Exception as exc:
        record["error"] = {"step": getattr(exc, "step", "harness"), "message": str(exc)[:2000],
                           "traceback": traceback.format_exc()[-3000:]}
    finally:
        if flow is not None:
            flow.close()
        if rig is not None:
            rig.close()
        record["wall_s"] = round(time.monotonic() - started, 2)
        record["cycles_run"] = len(todo) - len(left)
    return left


def run_bench(options: BenchOptions, out_dir: Path, progress: Callable[[str], None] = lambda _m: None,
              command: str = "") -> dict:
    """Run every rig of the plan, then aggregate and render. Returns the bench result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    plans = plan(options.routes, options.sizes_mib, options.repeat)
    progress("probe")
    userspace = images.l1_userspace(options.l1_qemu)
    caps = probes.qemu_caps(userspace)
    backend = "devdax" if options.devices else "fsdax"
    base_mode = modes.choose("auto", caps, list(options.devices), backend, True)
    transfer: modes.Mode | str
    try:
        transfer = modes.choose("cpr-transfer", caps, list(options.devices), backend, True)
    except Unsupported as exc:
        transfer = exc.reason
    bench: dict = {
        "schema": SCHEMA, "kind": "bench", "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": {"routes": [r for r in ROUTES if r in options.routes], "sizes_mib": sorted(options.sizes_mib),
                    "repeat": options.repeat, "devices": list(options.devices),
                    "mem_check_mib": options.mem_check_mib, "kernel": options.kernel, "l1_qemu": options.l1_qemu},
        "mode": base_mode.name, "l1_qemu_version": caps.version,
        "host": _host_facts(),
        "plan": [{"rig": p.name, "routes": p.routes, "schedule": [r for r, _ in p.schedule()]} for p in plans],
        "rigs": [], "cycles": [],
    }
    for plan_ in plans:
        cycles, rigs = run_rig(plan_, options, out_dir, progress, caps, base_mode, transfer)
        bench["cycles"] += cycles
        bench["rigs"] += rigs
        _write_json(out_dir / "bench.json", bench)  # partial results survive an interrupted bench
    bench["wall_s"] = round(time.monotonic() - started, 1)
    first = next((r for r in bench["rigs"] if r.get("accel")), {})
    bench["accel"], bench["accel_reason"] = first.get("accel", ""), first.get("accel_reason", "")
    bench["host"]["l0_qemu"] = first.get("l0_qemu", "")
    loads = [c["loadavg_1m"] for c in bench["cycles"] if c.get("loadavg_1m") is not None]
    bench["host"]["loadavg_1m_during"] = _spread(loads)  # the rig shares L0's CPUs with whatever else runs
    bench.update(analyse(bench))
    _write_json(out_dir / "bench.json", bench)
    render_bench(bench, out_dir)
    return bench


def _host_facts() -> dict:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    return {"hostname": socket.gethostname(), "cpus": os.cpu_count() or 0, "cpu_model": cpu, "mem_gib": mem_gib,
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# -- aggregation ----------------------------------------------------------------------------

def _spread(values: list[float]) -> dict | None:
    values = [v for v in values if isinstance(v, int | float)]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def _median(value: dict | None) -> float | None:
    return value["median"] if value else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) and b > 0 else None


def aggregate(cycles: list[dict], rigs: list[dict]) -> list[dict]:
    """One row per (route label, L2 size): medians and min/max of downtime, phases, cycle wall time,
    and the estimated time-to-verdict of a cell of that route (the rig's prepare + the route's
    median cycle + the rig's verify)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for cycle in cycles:
        groups.setdefault((cycle["label"], cycle["l2_mem_mib"]), []).append(cycle)
    order = {label: i for i, label in enumerate(_label_order([c["label"] for c in cycles]))}
    rows = []
    for (label, size), members in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        measured = [c for c in members if c["verdict"] in ("PASS", "FAIL", "ERROR")]
        phases = sorted({p for c in measured for p in c.get("phases", {})},
                        key=lambda p: DOWNTIME_PHASES.index(p) if p in DOWNTIME_PHASES else 99)
        rig_rows = [r for r in rigs if r["rig"] == members[0]["rig"]]
        prepare = _spread([r.get("prepare_s") for r in rig_rows])
        verify = _spread([r.get("verify_s") for r in rig_rows])
        wall = _spread([c.get("cycle_wall_s") for c in measured if c["verdict"] == "PASS"]
                       or [c.get("cycle_wall_s") for c in measured])
        ttv = None
        if prepare and wall:
            ttv = round(prepare["median"] + wall["median"] + (verify["median"] if verify else 0), 1)
        verdicts: dict[str, int] = {}
        for c in members:
            verdicts[c["verdict"]] = verdicts.get(c["verdict"], 0) + 1
        host = {key: _spread([c.get("host_restart", {}).get(key) for c in measured])
                for key in ("kexec_load_s", "to_first_line_s", "first_line_to_init_s", "init_to_ready_s",
                            "uptime_at_ready_s")}
        rows.append({
            "label": label, "route": members[0]["route"], "rig": members[0]["rig"], "l2_mem_mib": size,
            "size": _size_label(size), "n": len(members), "verdicts": verdicts,
            "reasons": sorted({c["reason"] for c in members if c.get("reason")}),
            "downtime_qmp": _spread([c["downtime_s"].get("qmp") for c in measured]),
            "downtime_guest": _spread([c["downtime_s"].get("guest") for c in measured]),
            "phases": {p: _spread([c["phases"].get(p) for c in measured]) for p in phases},
            "cycle_wall": wall, "time_to_verdict_s": ttv,
            "host_restart": {k: v for k, v in host.items() if v},
            "state_bytes": _spread([c.get("state_bytes") for c in measured]),
        })
    return rows


def _label_order(labels: list[str]) -> list[str]:
    seen = list(dict.fromkeys(labels))
    base = [r for r in ROUTES if r in seen]
    return base + sorted(set(seen) - set(base))


def analyse(bench: dict) -> dict:
    """Rows, ratios, targets and the host-restart breakdown from a bench's cycles and rigs."""
    rows = aggregate(bench["cycles"], bench["rigs"])
    by = {(r["label"], r["l2_mem_mib"]): r for r in rows}
    sizes = sorted({r["l2_mem_mib"] for r in rows})
    labels = _label_order([r["label"] for r in rows])

    def qmp(label: str, size: int) -> float | None:
        row = by.get((label, size))
        return _median(row["downtime_qmp"]) if row else None

    ratios = []
    for size in sizes:
        for label in labels:
            if label == REFERENCE:
                continue
            reference = f"{REFERENCE}@ovmf" if label.endswith("-ovmf") and (f"{REFERENCE}@ovmf", size) in by \
                else REFERENCE
            ratios.append({"name": f"{reference} / {label}", "size": _size_label(size), "l2_mem_mib": size,
                           "value": _ratio(qmp(reference, size), qmp(label, size)), "kind": "vs-route"})
    growth = []
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        for label in labels:
            growth.append({"name": f"{label}: {_size_label(large)} / {_size_label(small)}", "label": label,
                           "value": _ratio(qmp(label, large), qmp(label, small)), "kind": "growth"})
    return {"rows": rows, "ratios": ratios, "growth": growth, "targets": targets(by, sizes, bench),
            "breakdown": breakdown(rows, bench["rigs"])}


def targets(by: dict, sizes: list[int], bench: dict) -> list[dict]:
    """The issue's targets, each met, missed or not measured, with the numbers behind it."""
    out = []
    growth = {}
    if len(sizes) > 1:
        for label in (REFERENCE, "ram-copy"):
            a, b = by.get((label, sizes[-1])), by.get((label, sizes[0]))
            growth[label] = _ratio(_median(a["downtime_qmp"]) if a else None, _median(b["downtime_qmp"]) if b else None)
    fr, rc = growth.get(REFERENCE), growth.get("ram-copy")
    if fr is None:
        state, why = "not measured", "needs fast-restart at two or more L2 sizes"
    else:
        met = fr <= 1.2 and (rc is None or rc > fr)
        state = "met" if met else "missed"
        why = f"fast-restart grows ×{fr:.2f}" + (f", ram-copy ×{rc:.2f}" if rc is not None else
                                                  ", ram-copy not measured")
    out.append({"name": "fast-restart downtime at the largest size ≤ 1.2× the smallest, while ram-copy grows",
                "state": state, "detail": why})
    ovmf_ratios = []
    for size in sizes:
        ref = by.get((f"{REFERENCE}@ovmf", size)) or by.get((REFERENCE, size))
        fw = by.get(("firmware-reboot-ovmf", size))
        value = _ratio(_median(ref["downtime_qmp"]) if ref else None, _median(fw["downtime_qmp"]) if fw else None)
        if value is not None:
            ovmf_ratios.append((size, value, ref["label"]))
    if not ovmf_ratios:
        out.append({"name": "fast-restart ≤ 0.5× firmware-reboot-ovmf", "state": "not measured",
                    "detail": "firmware-reboot-ovmf was not measured"})
    else:
        worst = max(v for _, v, _ in ovmf_ratios)
        out.append({"name": "fast-restart ≤ 0.5× firmware-reboot-ovmf", "state": "met" if worst <= 0.5 else "missed",
                    "detail": ", ".join(f"{_size_label(s)}: ×{v:.2f} ({label})" for s, v, label in ovmf_ratios)})
    ref_rows = [by[(REFERENCE, s)] for s in sizes if (REFERENCE, s) in by and by[(REFERENCE, s)]["time_to_verdict_s"]]
    if ref_rows:
        ttv = ref_rows[0]["time_to_verdict_s"]
        out.append({"name": "one cell ≤ 60 s wall (time-to-verdict)", "state": "met" if ttv <= 60 else "missed",
                    "detail": f"fast-restart at {ref_rows[0]['size']}: ~{ttv:.0f} s (this rig's prepare + one "
                              "cycle + verify; a default `fastrestart run` also assigns edu+nvme)"})
    else:
        out.append({"name": "one cell ≤ 60 s wall (time-to-verdict)", "state": "not measured", "detail": ""})
    return out


def breakdown(rows: list[dict], rigs: list[dict]) -> list[dict]:
    """How the host restart of each route splits: load, to the first kernel line, kernel to init,
    init to ready (medians), with the L1 initrd's size."""
    initrd = next((r.get("l1_initrd_bytes") for r in rigs if r.get("l1_initrd_bytes")), None)
    kernel = next((r.get("l1_kernel_bytes") for r in rigs if r.get("l1_kernel_bytes")), None)
    out = []
    for row in rows:
        host = row["host_restart"]
        if not host:
            continue
        out.append({"label": row["label"], "size": row["size"],
                    "kexec_load_s": _median(host.get("kexec_load_s")),
                    "to_first_line_s": _median(host.get("to_first_line_s")),
                    "first_line_to_init_s": _median(host.get("first_line_to_init_s")),
                    "init_to_ready_s": _median(host.get("init_to_ready_s")),
                    "uptime_at_ready_s": _median(host.get("uptime_at_ready_s")),
                    "initrd_mib": round(initrd / (1 << 20), 1) if initrd else None,
                    "kernel_mib": round(kernel / (1 << 20), 1) if kernel else None})
    return out


# -- rendering ------------------------------------------------------------------------------

ROUTE_COLOURS = {"fast-restart": "#2ca02c", "fast-restart@ovmf": "#98df8a", "ram-copy": "#1f77b4",
                 "firmware-reboot-seabios": "#ff7f0e", "firmware-reboot-ovmf": "#d62728",
                 "cpr-transfer": "#9467bd", "cold-boot": "#7f7f7f"}


def _fmt(value: float | None, unit: str = "s") -> str:
    if not isinstance(value, int | float):
        return "–"
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"


def _fmt_spread(spread: dict | None) -> str:
    if not spread:
        return "–"
    if spread["n"] == 1:
        return _fmt(spread["median"])
    return f"{_fmt(spread['median'])} ({spread['min']:.2f}–{spread['max']:.2f})"


def _fmt_load(spread: dict | None) -> str:
    if not spread:
        return "–"
    return f"median {spread['median']:.1f} (min {spread['min']:.1f}, max {spread['max']:.1f}) at the end of the cycles"


def _nice_max(value: float) -> tuple[float, float]:
    import math
    raw = max(value, 1e-9) / 5
    power = 10 ** math.floor(math.log10(raw))
    stepv = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return stepv, stepv * max(1, math.ceil(value / stepv - 1e-9))


def downtime_chart(bench: dict) -> dict:
    """Geometry of the line plot: median QMP downtime (min–max whiskers) against L2 RAM size."""
    rows = [r for r in bench["rows"] if r["downtime_qmp"]]
    sizes = sorted({r["l2_mem_mib"] for r in bench["rows"]})
    labels = _label_order([r["label"] for r in rows])
    left, top, plot_w, plot_h = 70, 40, 520, 300
    highest = max([r["downtime_qmp"]["max"] for r in rows] + [1.0])
    stepv, axis_max = _nice_max(highest)

    def x_of(size: int) -> float:
        if len(sizes) == 1:
            return left + plot_w / 2
        return left + 30 + (plot_w - 60) * sizes.index(size) / (len(sizes) - 1)

    def y_of(value: float) -> float:
        return top + plot_h - value / axis_max * plot_h

    series = []
    for i, label in enumerate(labels):
        points = []
        for row in sorted((r for r in rows if r["label"] == label), key=lambda r: r["l2_mem_mib"]):
            d = row["downtime_qmp"]
            points.append({"x": f"{x_of(row['l2_mem_mib']):.1f}", "y": f"{y_of(d['median']):.1f}",
                           "y_min": f"{y_of(d['min']):.1f}", "y_max": f"{y_of(d['max']):.1f}",
                           "title": f"{label} · {row['size']}: median {d['median']:.2f} s "
                                    f"(min {d['min']:.2f}, max {d['max']:.2f}, n={d['n']})"})
        series.append({"label": label, "colour": ROUTE_COLOURS.get(label, "#17becf"), "points": points,
                       "path": " ".join(f"{p['x']},{p['y']}" for p in points),
                       "legend_x": left + plot_w + 20, "legend_y": top + 10 + i * 18})
    decimals = 0 if stepv >= 1 else 1
    ticks = [{"y": f"{y_of(k * stepv):.1f}", "label": f"{k * stepv:.{decimals}f}"}
             for k in range(round(axis_max / stepv) + 1)]
    return {"title": "Downtime (QMP, median; whiskers min–max) against L2 RAM", "width": left + plot_w + 230,
            "height": top + plot_h + 60, "left": left, "top": top, "plot_w": plot_w, "plot_h": plot_h,
            "bottom": top + plot_h, "series": series, "y_ticks": ticks,
            "x_ticks": [{"x": f"{x_of(s):.1f}", "label": _size_label(s)} for s in sizes]}


def phases_chart(bench: dict) -> dict:
    """Geometry of the stacked bars: the median of each downtime phase, one bar per route and size."""
    rows = [r for r in bench["rows"] if r["phases"]]
    used = [p for p in DOWNTIME_PHASES if any(p in r["phases"] and r["phases"][p] for r in rows)]
    font_w, bar_h, gap, plot_w, pad = FONT_W, 16, 8, 520, PAD
    names = [f"{r['label']} · {r['size']}" for r in rows]
    label_w = round(max([len(n) for n in names] + [12]) * font_w + 2 * pad)
    width = label_w + plot_w + 90
    legend, top = legend_layout(used, PHASE_COLOURS, width)

    def total(row: dict) -> float:
        return sum(row["phases"][p]["median"] for p in used if row["phases"].get(p))

    highest = max([total(r) for r in rows] + [_median(r["downtime_qmp"]) or 0 for r in rows] + [1.0])
    stepv, axis_max = _nice_max(highest)
    scale = plot_w / axis_max
    bars = []
    for i, (row, name) in enumerate(zip(rows, names, strict=True)):
        y0 = top + i * (bar_h + gap)
        segments, x0 = [], float(label_w)
        for phase in used:
            spread = row["phases"].get(phase)
            if not spread or spread["median"] <= 0:
                continue
            w = spread["median"] * scale
            segments.append({"x": f"{x0:.1f}", "w": f"{w:.1f}", "colour": PHASE_COLOURS[phase],
                             "title": f"{name} · {phase}: {spread['median']:.2f} s"})
            x0 += w
        qmp = _median(row["downtime_qmp"])
        bars.append({"label": name, "y": y0, "text_y": y0 + bar_h - 4, "segments": segments,
                     "total": f"{total(row):.1f} s", "total_x": f"{x0 + 6:.1f}",
                     "downtime_x": f"{label_w + qmp * scale:.1f}" if qmp is not None else None,
                     "downtime_title": f"{name} · downtime (QMP): {qmp:.2f} s" if qmp is not None else ""})
    axis_y = top + len(bars) * (bar_h + gap) + 4
    decimals = 0 if stepv >= 1 else 1
    ticks = [{"x": f"{label_w + k * stepv * scale:.1f}", "label": f"{k * stepv:.{decimals}f}"}
             for k in range(round(axis_max / stepv) + 1)]
    return {"title": "Restart phases per route (medians, seconds)", "width": width, "height": axis_y + 34,
            "label_w": label_w, "top": top - 6, "bar_h": bar_h, "legend": legend, "bars": bars, "ticks": ticks,
            "axis_y": axis_y, "plot_end": label_w + plot_w,
            "note": "Stacked: the phases between L2's stop and its resume. Black tick: downtime reported by QMP."}


def markdown_context(bench: dict, svg_prefix: str = "bench-") -> dict:
    """Everything bench.md.j2 prints."""
    rows = []
    for row in bench["rows"]:
        verdicts = ", ".join(f"{n} {v}" for v, n in sorted(row["verdicts"].items()))
        rows.append({"label": row["label"], "size": row["size"], "n": row["n"], "verdicts": verdicts,
                     "qmp": _fmt_spread(row["downtime_qmp"]), "guest": _fmt_spread(row["downtime_guest"]),
                     "wall": _fmt_spread(row["cycle_wall"]), "ttv": _fmt(row["time_to_verdict_s"]),
                     "reasons": "; ".join(row["reasons"])})
    phase_names = [p for p in DOWNTIME_PHASES if any(p in r["phases"] for r in bench["rows"])]
    phase_rows = [{"label": r["label"], "size": r["size"],
                   "cells": [_fmt(_median(r["phases"].get(p))) for p in phase_names]} for r in bench["rows"]]
    host = bench["host"]
    options = bench["options"]
    return {
        "bench": bench, "rows": rows, "phase_names": phase_names, "phase_rows": phase_rows,
        "ratios": [{"name": r["name"], "size": r["size"], "value": "–" if r["value"] is None else f"{r['value']:.2f}"}
                   for r in bench["ratios"]],
        "growth": [{"name": g["name"], "value": "–" if g["value"] is None else f"{g['value']:.2f}"}
                   for g in bench["growth"]],
        "targets": bench["targets"],
        "breakdown": [{k: "–" if v is None else f"{v:.2f}" if isinstance(v, float) and k.endswith("_s") else v
                       for k, v in b.items()} for b in bench["breakdown"]],
        "machine": f"{host.get('hostname')} · {host.get('cpus')} CPUs ({host.get('cpu_model') or '?'}) · "
                   f"{host.get('mem_gib')} GiB · Linux {host.get('kernel')}",
        "accel": f"{bench.get('accel') or '?'} ({bench.get('accel_reason') or ''})",
        "load": _fmt_load(host.get("loadavg_1m_during")),
        "date": bench["started"], "command": bench["command"] or "fastrestart bench",
        "wall": _fmt(bench.get("wall_s")), "devices": "+".join(options["devices"]) or "none",
        "mode": bench["mode"], "l1_qemu": bench["l1_qemu_version"], "l0_qemu": host.get("l0_qemu") or "?",
        "mem_check": options["mem_check_mib"], "routes": [{"name": r, "doc": ROUTE_SPECS[r].doc}
                                                          for r in options["routes"]],
        "plan": bench["plan"],
        "rigs": [{"rig": r["rig"], "prepare": _fmt(r.get("prepare_s")), "verify": _fmt(r.get("verify_s")),
                  "wall": _fmt(r.get("wall_s")), "cycles": r.get("cycles_run", 0),
                  "checks": ", ".join(f"{n} {c['verdict']}" for n, c in (r.get("checks") or {}).items()) or "–",
                  "error": ((r.get("error") or {}).get("message") or "").splitlines()[0][:300]
                  if r.get("error") else ""} for r in bench["rigs"]],
        "svg_prefix": svg_prefix,
        "notes": "",
    }


SVG_FILES = {"downtime": "bench-downtime.svg", "phases": "bench-phases.svg"}


def render_bench(bench: dict, out_dir: Path, docs_dir: Path | None = None) -> dict[str, Path]:
    """Write bench.md and the two SVGs into ``out_dir``; with ``docs_dir`` also performance.md and
    copies of the SVGs there."""
    env = environment()
    written = {
        "downtime": out_dir / SVG_FILES["downtime"], "phases": out_dir / SVG_FILES["phases"],
        "md": out_dir / "bench.md",
    }
    written["downtime"].write_text(env.get_template("bench-downtime.svg.j2").render(chart=downtime_chart(bench)))
    written["phases"].write_text(env.get_template("bench-phases.svg.j2").render(chart=phases_chart(bench)))
    written["md"].write_text(env.get_template("bench.md.j2").render(**markdown_context(bench)))
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        for key in ("downtime", "phases"):
            target = docs_dir / f"performance-{SVG_FILES[key].removeprefix('bench-')}"
            shutil.copyfile(written[key], target)
            written[f"docs_{key}"] = target
        context = markdown_context(bench, svg_prefix="performance-")
        # Hand-written reading of the numbers survives a re-render (--render-only --docs DIR).
        notes = docs_dir / "performance-notes.md"
        context["notes"] = notes.read_text() if notes.exists() else ""
        written["docs_md"] = docs_dir / "performance.md"
        written["docs_md"].write_text(env.get_template("bench.md.j2").render(**context))
    return written


def load_bench(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the bench result: {exc}") from exc
    if data.get("kind") != "bench" or data.get("schema") != SCHEMA:
        raise UsageError(f"{path}: not a schema-{SCHEMA} bench.json")
    return data
