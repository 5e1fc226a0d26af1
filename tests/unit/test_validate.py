"""`fastrestart validate`'s verdict diff, fed crafted results (no VM)."""

from __future__ import annotations

import json

import pytest
import yaml
from fastrestart.campaign import validate as va
from fastrestart.campaign.pipelines import cell_args, load_matrix
from goldens import assert_golden


def result(cell: str, verdict: str, reason: str = "", qmp: float | None = 0.05, guest: float | None = 1.5,
           **extra) -> dict:
    return {"cell": cell, "verdict": verdict, "reason": reason, "params": {},
            "downtime_s": {"qmp": qmp, "guest": guest}, **extra}


BASE = [
    result("cpr-reboot", "PASS"),
    result("ignore-shared", "FAIL", "memory: 12 bad pages, first at 0x1000"),
    result("luo", "UNSUPPORTED", "kernel 7.2.13 lacks CONFIG_LIVEUPDATE", qmp=None, guest=None),
    result("hotplug", "PASS", qmp=0.05, guest=2.0),
    result("mem-flip", "FAIL", "memory: 1 bad page", expect="FAIL"),
    result("cpr-transfer", "PASS"),
    result("cpr-exec", "UNSUPPORTED", "mode cpr-exec needs QEMU >= 10.2 | L1 QEMU is 10.0", qmp=None, guest=None),
]
PATCHED = [
    result("cpr-reboot", "FAIL", "interrupts: 3 of 100 MSIs lost"),
    result("ignore-shared", "PASS"),
    result("luo", "PASS", qmp=0.03, guest=0.9),
    result("hotplug", "PASS", qmp=0.05, guest=4.1),
    result("mem-flip", "FAIL", "memory: 1 bad page", expect="FAIL"),
    result("cpr-transfer", "UNSUPPORTED", "kernel 7.2.13-fr lacks CONFIG_VFIO_PCI", qmp=None, guest=None),
    result("cpr-exec", "UNSUPPORTED", "mode cpr-exec needs QEMU >= 10.2 | L1 QEMU is 10.0", qmp=None, guest=None),
]


@pytest.mark.parametrize("base, patched, change", [
    ("PASS", "FAIL", va.REGRESSION), ("PASS", "ERROR", va.REGRESSION), ("FAIL", "PASS", va.FIX),
    ("ERROR", "PASS", va.FIX), ("UNSUPPORTED", "PASS", va.NEWLY_SUPPORTED),
    ("UNSUPPORTED", "FAIL", va.NEWLY_SUPPORTED), ("PASS", "UNSUPPORTED", va.NEWLY_UNSUPPORTED),
    ("FAIL", "ERROR", va.CHANGED), ("PASS", "PASS", va.UNCHANGED), ("FAIL", "FAIL", va.UNCHANGED),
    (None, "PASS", va.MISSING), ("PASS", None, va.MISSING),
])
def test_classify(base, patched, change):
    assert va.classify(base, patched) == change


def test_diff_kinds_and_order():
    diffs = va.diff_results(BASE, PATCHED)
    assert [(d.cell, d.change) for d in diffs] == [
        ("cpr-reboot", va.REGRESSION), ("ignore-shared", va.FIX), ("luo", va.NEWLY_SUPPORTED),
        ("cpr-transfer", va.NEWLY_UNSUPPORTED), ("cpr-exec", va.UNCHANGED), ("hotplug", va.UNCHANGED),
        ("mem-flip", va.UNCHANGED)]
    mem_flip = next(d for d in diffs if d.cell == "mem-flip")
    assert (mem_flip.base, mem_flip.patched) == ("PASS", "PASS")  # an expected FAIL is the harness passing
    hotplug = next(d for d in diffs if d.cell == "hotplug")
    assert hotplug.downtime["guest"] == {"base": 2.0, "patched": 4.1, "ratio": 2.05, "notable": True}
    assert hotplug.downtime["qmp"]["notable"] is False
    assert va.summarize(diffs)[va.REGRESSION] == 1


def test_small_downtime_moves_are_noise():
    diffs = va.diff_results([result("a", "PASS", qmp=0.010, guest=1.50)],
                            [result("a", "PASS", qmp=0.015, guest=1.60)])
    assert diffs[0].downtime["qmp"]["ratio"] == 1.5
    assert not diffs[0].downtime["qmp"]["notable"]  # ×1.5 but only 5 ms
    assert not diffs[0].downtime["guest"]["notable"]  # 100 ms but only ×1.07


def test_missing_cell_on_one_side():
    diffs = va.diff_results([result("a", "PASS")], [result("a", "PASS"), result("b", "PASS")])
    assert [(d.cell, d.change, d.base) for d in diffs] == [("b", va.MISSING, None), ("a", va.UNCHANGED, "PASS")]
    assert va.exit_code(diffs) == 0


def test_exit_code_is_1_on_a_regression_or_a_lost_capability():
    assert va.exit_code(va.diff_results(BASE, PATCHED)) == 1
    fixes_only = va.diff_results([result("a", "FAIL", "memory: 1 bad page"), result("b", "UNSUPPORTED")],
                                 [result("a", "PASS"), result("b", "FAIL", "dma: 1 bad payload")])
    assert va.exit_code(fixes_only) == 0  # a fix and a newly supported cell that fails: no regression
    assert va.exit_code(va.diff_results(BASE, BASE)) == 0
    errors = va.diff_results([result("a", "PASS")], [result("a", "ERROR", "rig: L1 did not boot")])
    assert va.exit_code(errors) == 1
    lost = va.diff_results([result("a", "PASS")], [result("a", "UNSUPPORTED", "kernel lacks CONFIG_KEXEC")])
    assert va.exit_code(lost) == 1  # the series took a capability away


def test_markdown_golden(tmp_path):
    diffs = va.diff_results(BASE, PATCHED)
    markdown = va.write_diff(diffs, tmp_path, "build:0123456789abcdef", "build:fedcba9876543210",
                             "kernels/validate.yaml", {"base": "7.2.13-fr01234567", "patched": "7.2.13-frfedcba98"})
    assert_golden(markdown, "validate/diff.md")
    assert (tmp_path / "diff.md").read_text() == markdown
    data = json.loads((tmp_path / "diff.json").read_text())
    assert data["regressions"] == 1 and data["exit_code"] == 1
    assert data["summary"] == {"regression": 1, "fix": 1, "newly supported": 1, "newly unsupported": 1,
                               "changed": 0, "missing": 0, "unchanged": 3}
    assert data["cells"][0]["cell"] == "cpr-reboot" and data["cells"][0]["patched"] == "FAIL"


def test_markdown_without_changes_has_no_empty_sections(tmp_path):
    markdown = va.render_markdown(va.diff_results([result("a", "PASS")], [result("a", "PASS")]),
                                  "debian:sid", "build:x", "m.yaml")
    assert "**0 regression(s)**, 1 unchanged." in markdown
    assert "Reasons" not in markdown and "Downtime changes" not in markdown


def test_side_matrix_overrides_kernel_and_reloads(tmp_path):
    cells = load_matrix(va.DEFAULT_MATRIX)
    assert {"cpr-reboot", "luo"} <= {c["name"] for c in cells}
    side = va.side_matrix([*cells, {"name": "up", "kernel": "debian:bookworm", "to_kernel": "debian:sid"}],
                          "build:abc")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(side))
    reloaded = load_matrix(path)  # what run_matrix reads back
    assert all(c["kernel"] == "build:abc" and "to_kernel" not in c for c in reloaded)
    luo = next(c for c in reloaded if c["name"] == "luo")
    assert cell_args(luo)[:2] == ["--kernel", "build:abc"] and "--devices" in cell_args(luo)


def test_validate_runs_each_side_on_its_kernel_and_exits_1_on_a_regression(monkeypatch, tmp_path, capsys):
    """The orchestration, with the matrix runner replaced: each side's matrix names its kernel,
    both result trees are diffed, diff.md is printed and the exit code follows the diff."""
    from fastrestart.campaign import results as res

    matrix = tmp_path / "m.yaml"
    matrix.write_text("cells:\n  - {name: a, mode: ignore-shared, devices: []}\n  - {name: b, mode: luo}\n")
    verdicts = {"build:base": {"a": "PASS", "b": "UNSUPPORTED"}, "build:patched": {"a": "ERROR", "b": "PASS"}}
    ran = []

    def fake_run_matrix(path, out, parallel=1):
        cells = load_matrix(path)
        ran.append((out.name, [c["kernel"] for c in cells], parallel))
        for cell in cells:
            verdict = verdicts[cell["kernel"]][cell["name"]]
            res.write_result({"schema": 1, "cell": cell["name"], "verdict": verdict, "reason": f"{verdict} why",
                              "mode": cell["mode"], "accel": "tcg", "params": cell, "phases": {}, "checks": {},
                              "downtime_s": {"qmp": 0.05, "guest": 1.0}}, out / cell["name"])
        return 0

    monkeypatch.setattr(va, "run_matrix", fake_run_matrix)
    monkeypatch.setattr(va.kernels, "resolve", lambda spec: type("K", (), {"release": spec.upper()})())
    code = va.validate("build:base", "build:patched", matrix, tmp_path / "out", parallel=2)
    assert code == 1
    assert ran == [("base", ["build:base"] * 2, 2), ("patched", ["build:patched"] * 2, 2)]
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "out" / "diff.md").read_text()
    assert "| a | PASS | ERROR | **regression** |" in printed
    assert "| b | UNSUPPORTED | PASS | newly supported |" in printed
    assert json.loads((tmp_path / "out" / "diff.json").read_text())["releases"] == {
        "base": "BUILD:BASE", "patched": "BUILD:PATCHED"}
