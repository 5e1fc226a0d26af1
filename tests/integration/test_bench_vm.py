"""A tiny real bench: one rig (128 MiB of L2 RAM, no devices) that restarts once by kexec and once
through SeaBIOS, then aggregates and renders. The full bench is not run in CI (see
docs/performance.md for how long it takes)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from fastrestart.campaign.bench import BenchOptions, run_bench

pytestmark = pytest.mark.vm


def test_fast_restart_against_a_firmware_reboot(tmp_path):
    out = tmp_path / "bench"
    options = BenchOptions(routes=["fast-restart", "firmware-reboot-seabios"], sizes_mib=[128], repeat=1,
                           devices=[], mem_check_mib=16)
    data = run_bench(options, out, command="pytest tests/integration/test_bench_vm.py")
    print(f"bench: {out} ({data['wall_s']} s)")
    assert [p["schedule"] for p in data["plan"]] == [["fast-restart", "firmware-reboot-seabios"]]
    by_route = {c["route"]: c for c in data["cycles"]}
    for route in ("fast-restart", "firmware-reboot-seabios"):
        cycle = by_route[route]
        assert cycle["verdict"] == "PASS", cycle["reason"]
        assert cycle["downtime_s"]["qmp"] > 0 and cycle["downtime_s"]["guest"] is not None
        assert cycle["host_restart"]["to_first_line_s"] > 0
        assert cycle["ram_digest"]["same"], "L2's RAM changed across the restart"
    assert "kexec" in by_route["fast-restart"]["phases"] and "reboot" not in by_route["fast-restart"]["phases"]
    assert "reboot" in by_route["firmware-reboot-seabios"]["phases"]
    assert by_route["fast-restart"]["host_restart"]["kexec_load_s"] > 0
    ratio = next(r for r in data["ratios"] if r["name"] == "fast-restart / firmware-reboot-seabios")
    assert ratio["value"] is not None and ratio["value"] > 0
    assert data["rigs"][0]["l1_initrd_bytes"] > 0 and data["rigs"][0]["error"] is None
    assert json.loads((out / "bench.json").read_text())["ratios"] == data["ratios"]
    assert "fast-restart / firmware-reboot-seabios" in (out / "bench.md").read_text()
    for svg in ("bench-downtime.svg", "bench-phases.svg"):
        ET.parse(out / svg)
