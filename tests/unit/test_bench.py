"""fastrestart.campaign.bench: the route schedule, the aggregation (medians, spread, ratios, targets) and the
rendered Markdown and SVGs. Golden files: tests/golden/bench/; regenerate with
FASTRESTART_UPDATE_GOLDEN=1."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import jinja2
import pytest
from fastrestart.campaign import bench
from fastrestart.campaign.report import environment
from fastrestart.errors import UsageError
from goldens import assert_golden


def _cycle(route: str, size: int, repeat: int, qmp: float | None, firmware: str = "seabios",
           verdict: str = "PASS", reason: str = "", phases: dict | None = None, guest: float | None = None) -> dict:
    phases = phases or {"save": 0.1, "record": 0.1, "kexec": qmp * 0.3, "boot": qmp * 0.4, "restore": qmp * 0.2,
                        "resume": 0.5} if qmp else {}
    return {"route": route, "label": bench.route_label(route, firmware), "rig": f"{bench._size_label(size)}-{firmware}",
            "firmware": firmware, "l2_mem_mib": size, "repeat": repeat, "cycle": repeat, "phases": phases,
            "downtime_s": {"qmp": qmp, "guest": guest if guest is not None else (qmp + 0.3 if qmp else None)},
            "cycle_wall_s": qmp + 5 if qmp else None, "verdict": verdict, "reason": reason,
            "host_restart": {"kexec_load_s": 2.0, "to_first_line_s": 6.0 + repeat, "first_line_to_init_s": 9.0,
                             "init_to_ready_s": 3.0, "uptime_at_ready_s": 11.5} if route != "cpr-transfer" else {}}


def _rig(name: str, firmware: str, size: int, prepare: float = 30.0, verify: float = 2.0) -> dict:
    return {"rig": name, "firmware": firmware, "l2_mem_mib": size, "prepare_s": prepare, "verify_s": verify,
            "wall_s": 300.0, "cycles_run": 6, "l1_initrd_bytes": 12 << 20, "l1_kernel_bytes": 10 << 20,
            "checks": {"liveness": {"verdict": "PASS", "reason": ""}, "memory": {"verdict": "PASS", "reason": ""}},
            "error": None}


def crafted() -> dict:
    """A small bench: two sizes; fast-restart flat, ram-copy growing, firmware reboots slower."""
    cycles = []
    values = {
        (128, "fast-restart", "seabios"): [30.0, 32.0, 31.0],
        (128, "ram-copy", "seabios"): [33.0, 34.0, 35.0],
        (128, "firmware-reboot-seabios", "seabios"): [40.0, 41.0, 39.0],
        (128, "cold-boot", "seabios"): [45.0, 44.0, 46.0],
        (128, "fast-restart", "ovmf"): [31.0, 33.0, 32.0],
        (128, "firmware-reboot-ovmf", "ovmf"): [70.0, 72.0, 71.0],
        (1024, "fast-restart", "seabios"): [31.0, 33.0, 32.0],
        (1024, "ram-copy", "seabios"): [50.0, 52.0, 54.0],
        (1024, "firmware-reboot-seabios", "seabios"): [41.0, 42.0, 40.0],
        (1024, "cold-boot", "seabios"): [47.0, 46.0, 48.0],
        (1024, "fast-restart", "ovmf"): [32.0, 34.0, 33.0],
        (1024, "firmware-reboot-ovmf", "ovmf"): [71.0, 73.0, 72.0],
    }
    for (size, route, firmware), downtimes in values.items():
        for i, qmp in enumerate(downtimes, 1):
            cycles.append(_cycle(route, size, i, qmp, firmware))
    for size in (128, 1024):
        cycles.append(_cycle("cpr-transfer", size, 1, None, verdict="UNSUPPORTED",
                             reason="QEMU 7.2's QAPI schema has no cpr-transfer migration mode"))
    # A route whose guest died: its downtime was still measured, its verdict says why.
    cycles[3] = _cycle("ram-copy", 128, 1, 33.0, verdict="FAIL", reason="liveness: L2 stopped after the restart")
    rigs = [_rig("128M-seabios", "seabios", 128), _rig("128M-ovmf", "ovmf", 128, prepare=40.0),
            _rig("1G-seabios", "seabios", 1024, prepare=33.0), _rig("1G-ovmf", "ovmf", 1024, prepare=44.0)]
    data = {"schema": 1, "kind": "bench", "command": "fastrestart bench --l2-mem 128M,1G --repeat 3",
            "started": "2026-11-29T14:00:00Z", "wall_s": 3600.0,
            "options": {"routes": list(bench.ROUTES), "sizes_mib": [128, 1024], "repeat": 3, "devices": [],
                        "mem_check_mib": 32, "kernel": "debian:trixie", "l1_qemu": "trixie"},
            "mode": "cpr-reboot", "l1_qemu_version": "10.0.13",
            "host": {"hostname": "rig", "cpus": 2, "cpu_model": "Test CPU", "mem_gib": 24.0, "kernel": "6.1.0",
                     "python": "3.11", "l0_qemu": "10.0.13"},
            "accel": "tcg", "accel_reason": "no nested KVM",
            "plan": [{"rig": p.name, "routes": p.routes, "schedule": [r for r, _ in p.schedule()]}
                     for p in bench.plan(list(bench.ROUTES), [128, 1024], 3)],
            "rigs": rigs, "cycles": cycles}
    data.update(bench.analyse(data))
    return data


# -- the schedule ---------------------------------------------------------------------------

def test_schedule_interleaves_routes() -> None:
    rig = bench.RigPlan(128, "seabios", ["fast-restart", "ram-copy", "cold-boot"], repeat=2)
    assert rig.schedule() == [("fast-restart", 1), ("ram-copy", 1), ("cold-boot", 1),
                              ("fast-restart", 2), ("ram-copy", 2), ("cold-boot", 2)]


def test_plan_gives_ovmf_its_own_rig_with_a_fast_restart_reference() -> None:
    plans = bench.plan(["cold-boot", "firmware-reboot-ovmf", "fast-restart", "firmware-reboot-seabios"],
                       [1024, 128], 3)
    assert [p.name for p in plans] == ["128M-seabios", "128M-ovmf", "1G-seabios", "1G-ovmf"]
    assert plans[0].routes == ["fast-restart", "firmware-reboot-seabios", "cold-boot"]
    assert plans[1].routes == ["fast-restart", "firmware-reboot-ovmf"]
    assert bench.route_label("fast-restart", "ovmf") == "fast-restart@ovmf"
    assert bench.route_label("firmware-reboot-ovmf", "ovmf") == "firmware-reboot-ovmf"


def test_plan_without_ovmf_routes_has_one_rig_per_size() -> None:
    plans = bench.plan(["fast-restart", "firmware-reboot-seabios"], [128], 1)
    assert [(p.name, p.schedule()) for p in plans] == [
        ("128M-seabios", [("fast-restart", 1), ("firmware-reboot-seabios", 1)])]


@pytest.mark.parametrize("routes,repeat", [(["warp-drive"], 1), (["fast-restart"], 0)])
def test_plan_refuses_bad_input(routes: list[str], repeat: int) -> None:
    with pytest.raises(UsageError):
        bench.plan(routes, [128], repeat)


def test_ram_copy_rig_gets_room_for_the_copy() -> None:
    options = bench.BenchOptions(sizes_mib=[512])
    with_copy = bench._rig_config(bench.RigPlan(512, "seabios", ["fast-restart", "ram-copy"], 1), options)
    without = bench._rig_config(bench.RigPlan(512, "ovmf", ["fast-restart"], 1), options)
    assert with_copy.state_extra_mib == 512 + 64 and without.state_extra_mib == 0
    assert without.firmware == "ovmf" and with_copy.shared_ram


# -- aggregation ------------------------------------------------------------------------------

def _row(data: dict, label: str, size: int) -> dict:
    return next(r for r in data["rows"] if r["label"] == label and r["l2_mem_mib"] == size)


def test_median_and_spread() -> None:
    data = crafted()
    row = _row(data, "fast-restart", 128)
    assert row["downtime_qmp"] == {"median": 31.0, "min": 30.0, "max": 32.0, "n": 3}
    assert row["downtime_guest"]["median"] == pytest.approx(31.3)
    assert row["phases"]["kexec"]["median"] == pytest.approx(9.3)
    assert row["host_restart"]["to_first_line_s"] == {"median": 8.0, "min": 7.0, "max": 9.0, "n": 3}
    # time-to-verdict: the rig's prepare + the median cycle + the rig's verify
    assert row["time_to_verdict_s"] == pytest.approx(30.0 + 36.0 + 2.0)


def test_failed_cycle_keeps_its_downtime_and_reason() -> None:
    row = _row(crafted(), "ram-copy", 128)
    assert row["verdicts"] == {"FAIL": 1, "PASS": 2}
    assert row["downtime_qmp"]["n"] == 3
    assert row["reasons"] == ["liveness: L2 stopped after the restart"]


def test_unsupported_route_has_no_numbers() -> None:
    row = _row(crafted(), "cpr-transfer", 128)
    assert row["verdicts"] == {"UNSUPPORTED": 1}
    assert row["downtime_qmp"] is None and row["time_to_verdict_s"] is None


def test_ratios_and_growth() -> None:
    data = crafted()
    ratios = {(r["name"], r["size"]): r["value"] for r in data["ratios"]}
    assert ratios[("fast-restart / firmware-reboot-seabios", "128M")] == pytest.approx(31 / 40, abs=1e-3)
    # The OVMF route is compared with the fast restart of its own rig.
    assert ratios[("fast-restart@ovmf / firmware-reboot-ovmf", "1G")] == pytest.approx(33 / 72, abs=1e-3)
    assert ratios[("fast-restart / cpr-transfer", "128M")] is None
    growth = {g["label"]: g["value"] for g in data["growth"]}
    assert growth["fast-restart"] == pytest.approx(32 / 31, abs=1e-3)
    assert growth["ram-copy"] == pytest.approx(52 / 34, abs=1e-3)


def test_targets() -> None:
    targets = {t["name"]: t for t in crafted()["targets"]}
    flat = targets["fast-restart downtime at the largest size ≤ 1.2× the smallest, while ram-copy grows"]
    assert flat["state"] == "met"
    assert targets["fast-restart ≤ 0.5× firmware-reboot-ovmf"]["state"] == "met"
    assert targets["one cell ≤ 60 s wall (time-to-verdict)"]["state"] == "missed"


def test_targets_missed_and_not_measured() -> None:
    data = crafted()
    for cycle in data["cycles"]:
        if cycle["route"] == "fast-restart" and cycle["l2_mem_mib"] == 1024:
            cycle["downtime_s"]["qmp"] *= 2
    data["cycles"] = [c for c in data["cycles"] if c["route"] != "firmware-reboot-ovmf"]
    states = {t["name"]: t["state"] for t in bench.analyse(data)["targets"]}
    assert states["fast-restart downtime at the largest size ≤ 1.2× the smallest, while ram-copy grows"] == "missed"
    assert states["fast-restart ≤ 0.5× firmware-reboot-ovmf"] == "not measured"


def test_breakdown_carries_initrd_size() -> None:
    first = crafted()["breakdown"][0]
    assert first["label"] == "fast-restart" and first["initrd_mib"] == 12.0
    assert first["kexec_load_s"] == 2.0 and first["first_line_to_init_s"] == 9.0


# -- rendering --------------------------------------------------------------------------------

@pytest.fixture
def rendered(tmp_path: Path) -> dict[str, Path]:
    return bench.render_bench(crafted(), tmp_path, docs_dir=tmp_path / "docs")


def test_markdown_golden(rendered: dict[str, Path]) -> None:
    assert_golden(rendered["md"].read_text(), "bench/bench.md")


def test_svgs_golden_and_well_formed(rendered: dict[str, Path]) -> None:
    for key in ("downtime", "phases"):
        text = rendered[key].read_text()
        ET.fromstring(text)
        assert_golden(text, f"bench/{rendered[key].name}")


def test_docs_copy_points_at_its_svgs(rendered: dict[str, Path]) -> None:
    text = rendered["docs_md"].read_text()
    assert "(performance-downtime.svg)" in text and "(performance-phases.svg)" in text
    assert rendered["docs_downtime"].read_text() == rendered["downtime"].read_text()


def test_templates_are_strict() -> None:
    context = bench.markdown_context(crafted())
    del context["wall"]
    with pytest.raises(jinja2.UndefinedError):
        environment().get_template("bench.md.j2").render(**context)


# -- the hooks the routes use ---------------------------------------------------------------

class _Qmp:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def cmd(self, name: str, step: str = "qmp", **args):
        self.sent.append((name, args))
        return {}


@pytest.mark.parametrize("ignore_shared", [True, False])
def test_each_cycle_sets_x_ignore_shared_both_ways(ignore_shared: bool) -> None:
    """A QEMU that came in with x-ignore-shared on keeps it: a ram-copy cycle must turn it off."""
    from types import SimpleNamespace

    from fastrestart.restart.modes import MODES, RestartContext

    l2 = SimpleNamespace(qmp=_Qmp())
    ctx = RestartContext(rig=None, caps=SimpleNamespace(capabilities={"x-ignore-shared"}), l2=l2, ram_path="",
                         ignore_shared=ignore_shared, workloads=None, new_l2=lambda **_: None)
    MODES["cpr-reboot"].set_migration_options(l2, ctx, "save")
    assert ("migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]}) in l2.qmp.sent
    assert ("migrate-set-parameters", {"mode": "cpr-reboot"}) in l2.qmp.sent
