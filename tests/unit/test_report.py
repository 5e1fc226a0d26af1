"""fastrestart.campaign.report: the conformance report (Markdown, HTML, SVG, results.json). Golden files:
tests/golden/report/; regenerate with FASTRESTART_UPDATE_GOLDEN=1."""

from __future__ import annotations

import copy
import html.parser
import json
import shutil
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

import jinja2
import pytest
from fastrestart.campaign import report, results
from goldens import FIXTURES, assert_golden

SVG_NS = "{http://www.w3.org/2000/svg}"



@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A private copy of the fixture results tree; the report is written into it, as in CI."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "results"))


@pytest.fixture
def rendered(tree: Path) -> dict[str, Path]:
    return report.render_report(results.collect(tree), tree)


class _Links(html.parser.HTMLParser):
    """Collects hrefs/srcs and checks that every opened element is closed in order."""

    VOID = frozenset({"meta", "br", "link", "img", "input", "hr"})  # HTML void elements; SVG ones self-close

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.stack: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        self.links += [v for k, v in attrs if k in ("href", "src") and v]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()


def test_render_report_golden(rendered: dict[str, Path]) -> None:
    assert sorted(rendered) == ["html", "json", "junit", "md", "svg"]
    for kind, name in (("md", "report.md"), ("html", "report.html"), ("svg", "phases.svg"),
                       ("json", "results.json")):
        assert rendered[kind].name == name
        assert_golden(rendered[kind].read_text(encoding="utf-8"), f"report/{name}")


def test_render_report_is_stable(tree: Path, tmp_path: Path) -> None:
    found = results.collect(tree)
    first = report.render_report(found, tree)
    texts = {k: p.read_text() for k, p in first.items()}
    second = report.render_report(found, tree)
    assert texts == {k: p.read_text() for k, p in second.items()}


def test_html_is_self_contained_and_its_links_resolve(tree: Path) -> None:
    for path in tree.rglob("result.json"):  # give the fixture cells the logs they name
        for log in json.loads(path.read_text())["logs"].values():
            (path.parent / log).parent.mkdir(parents=True, exist_ok=True)
            (path.parent / log).write_text("log\n")
    page = report.render_report(results.collect(tree), tree)["html"]
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    assert parser.stack == [], parser.stack
    assert {"style", "svg", "table"} <= parser.tags
    assert "link" not in parser.tags and "script" not in parser.tags and "img" not in parser.tags
    for link in parser.links:
        parsed = urllib.parse.urlsplit(link)
        assert not parsed.scheme and not parsed.netloc and not link.startswith("/"), link
        assert (tree / urllib.parse.unquote(parsed.path)).exists(), f"dangling link {link}"
    assert "sid-cpr-transfer/attempt-1/result.json" in parser.links  # both attempts are linked
    assert "trixie-cpr-reboot/logs/" in parser.links


def test_markdown_links_resolve(rendered: dict[str, Path], tree: Path) -> None:
    text = rendered["md"].read_text(encoding="utf-8")
    for target in {part.split(")")[0] for part in text.split("](")[1:]}:
        if target.endswith("result.json") or target == "phases.svg":
            assert (tree / urllib.parse.unquote(target)).exists(), target
    # every footnote used is defined, and the other way round
    used = {part.split("]")[0] for part in text.split("[^")[1:] if not part.split("]")[1].startswith(":")}
    defined = {line[2:].split("]")[0] for line in text.splitlines() if line.startswith("[^")}
    assert used == defined and used


def test_svg_has_one_bar_per_cell(rendered: dict[str, Path]) -> None:
    root = ET.parse(rendered["svg"]).getroot()
    assert root.tag == f"{SVG_NS}svg"
    labels = [g.find(f"{SVG_NS}text").text for g in root.iter(f"{SVG_NS}g")]
    assert labels == sorted(labels) and len(labels) == 6
    bars = {g.find(f"{SVG_NS}text").text: g for g in root.iter(f"{SVG_NS}g")}
    phases = [r.find(f"{SVG_NS}title").text for r in bars["trixie-cpr-reboot"].iter(f"{SVG_NS}rect")]
    assert phases[0] == "trixie-cpr-reboot · save: 0.20 s"
    assert not any("prepare" in p or "verify" in p for p in phases)  # outside the downtime window
    assert len(phases) == 9


def test_results_json_is_portable(rendered: dict[str, Path]) -> None:
    data = json.loads(rendered["json"].read_text())
    assert [r["cell"] for r in data] == sorted(r["cell"] for r in data)
    assert all(not Path(r["run_dir"]).is_absolute() for r in data)
    retried = next(r for r in data if r["cell"] == "sid-cpr-transfer")
    assert [a["run_dir"] for a in retried["attempts"]] == ["sid-cpr-transfer/attempt-1",
                                                          "sid-cpr-transfer/attempt-2"]


def test_junit_is_written_beside_the_report(rendered: dict[str, Path]) -> None:
    assert ET.parse(rendered["junit"]).getroot().get("tests") == "6"


@pytest.mark.parametrize("template", ["report.md.j2", "report.html.j2", "phases.svg.j2"])
def test_strict_undefined_catches_a_missing_variable(tree: Path, template: str) -> None:
    context = report.build_context(results.collect(tree), tree)
    context["svg"] = ""
    report.render(template, **context)  # complete context renders
    del context["chart"]
    with pytest.raises(jinja2.UndefinedError, match="chart"):
        report.render(template, **context)


def test_strict_undefined_catches_a_missing_key_in_a_cell(tree: Path) -> None:
    context = report.build_context(results.collect(tree), tree)
    del context["rows"][0]["slots"][0][0]["downtime_qmp"]
    with pytest.raises(jinja2.UndefinedError, match="downtime_qmp"):
        report.render("report.html.j2", svg="", **context)


def test_not_run_is_never_shown_as_pass(tree: Path) -> None:
    context = report.build_context(results.collect(tree), tree)
    cell = next(c for c in context["cells"] if c["name"] == "bookworm-cpr-reboot-unsupported")
    assert {(c["verdict"], c["label"], c["css"]) for c in cell["checks"]} == {
        ("NOT_RUN", "not run", "v-not-run")}
    md = report.render("report.md.j2", **context)
    assert "⚪ [not run](bookworm-cpr-reboot-unsupported/result.json)" in md


def test_missing_checks_show_as_not_run(tmp_path: Path) -> None:
    result = results.load_result(FIXTURES / "trixie-cpr-reboot" / "result.json")
    del result["checks"]["dma"]
    context = report.build_context([result], tmp_path)
    assert [c["verdict"] for c in context["cells"][0]["checks"]] == ["PASS", "PASS", "NOT_RUN", "PASS"]


def test_expectations_are_labelled(tree: Path) -> None:
    found = results.collect(tree)
    flipped = next(r for r in found if r["cell"] == "trixie-mem-flip")
    flipped_pass = copy.deepcopy(flipped) | {"verdict": "PASS", "cell": "trixie-mem-flip-missed"}
    context = report.build_context([flipped, flipped_pass], tree)
    labels = {c["name"]: (c["label"], c["css"]) for c in context["cells"]}
    assert labels == {"trixie-mem-flip": ("FAIL as expected (memory)", "v-pass"),
                      "trixie-mem-flip-missed": ("PASS, expected FAIL:memory", "v-fail")}
    assert context["summary"]["expectations"] == {"total": 2, "met": 1, "missed": 1}


def test_two_cells_in_one_slot_are_both_shown(tree: Path, tmp_path: Path) -> None:
    found = results.collect(tree)
    twin = copy.deepcopy(next(r for r in found if r["cell"] == "trixie-cpr-reboot"))
    twin["cell"] = "trixie-cpr-reboot-again"
    twin["verdict"] = "FAIL"
    context = report.build_context([*found, twin], tree)
    slots = [slot for row in context["rows"] for slot in row["slots"] if len(slot) == 2]
    assert [[c["name"] for c in slot] for slot in slots] == [["trixie-cpr-reboot", "trixie-cpr-reboot-again"]]
    page = report.render("report.html.j2", svg="", **context)
    assert page.count('href="trixie-cpr-reboot/result.json"') >= 5


def test_markup_is_escaped(tmp_path: Path) -> None:
    result = results.load_result(FIXTURES / "trixie-sid-cpr-reboot-edu" / "result.json")
    result["reason"] = "<script>alert(1)</script> | & more"
    paths = report.render_report([result], tmp_path / "out")
    page = paths["html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    md = paths["md"].read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; \\| &amp; more" in md
    ET.parse(paths["svg"])


def test_empty_report(tmp_path: Path) -> None:
    paths = report.render_report([], tmp_path)
    assert "No results." in paths["md"].read_text()
    assert "No results." in paths["html"].read_text()
    ET.parse(paths["svg"])
    assert json.loads(paths["json"].read_text()) == []


def test_downtime_formatting() -> None:
    assert [report._seconds(v) for v in (0.03, 0.999, 1, 8.14, None)] == [
        "30 ms", "999 ms", "1.0 s", "8.1 s", "–"]


@pytest.mark.parametrize(("span", "step"), [(1, 0.2), (8, 2), (10.9, 5), (60.15, 20), (0.03, 0.01)])
def test_nice_axis_step(span: float, step: float) -> None:
    assert report._nice_step(span) == pytest.approx(step)


def test_html_renders_in_headless_chromium(rendered: dict[str, Path], tmp_path: Path) -> None:
    if not report.chromium():
        pytest.skip("headless Chromium is not installed (apt-get install chromium; ./setup does it)")
    shot = report.screenshot(rendered["html"], tmp_path / "report.png")
    assert shot.stat().st_size > 20_000  # a blank page is a few KiB


def test_a_run_that_broke_early_renders(tmp_path: Path) -> None:
    """A result written before the rig came up: no accel, zero phases, no downtime, mode unresolved."""
    early = {"schema": 1, "cell": "trixie-qtrixie-auto-edu+nvme-256M", "verdict": "ERROR",
             "reason": "rig: boom", "mode": "auto", "accel": "",
             "params": {"kernel": "debian:trixie", "devices": ["edu", "nvme"]},
             "l1": {"kernel_from": "", "kernel_to": "", "qemu": "", "boot_ids": []},
             "phases": dict.fromkeys(results.PHASES, 0.0), "downtime_s": {"qmp": None, "guest": None},
             "checks": {name: {"verdict": "NOT_RUN", "reason": "the run ended early", "evidence": {}}
                        for name in results.CHECKS},
             "host": {"hostname": "lab1", "cpus": 2, "l0_qemu": ""}, "logs": {}, "error": None}
    results.write_result(early, tmp_path / early["cell"])
    paths = report.render_report(results.collect(tmp_path), tmp_path)
    md = paths["md"].read_text()
    assert "| Accelerator | – |" in md and "🟠 [ERROR]" in md
    assert "no timings" in paths["svg"].read_text()
    props = {p.get("name") for p in ET.parse(paths["junit"]).iter("property")}
    assert "downtime.qmp_s" not in props and "phase.save_s" in props
