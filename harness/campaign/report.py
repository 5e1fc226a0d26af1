"""The conformance report: the results of many cells rendered to Markdown, HTML, an SVG chart of
the restart phases, JUnit XML and one merged results.json (docs/design.md §8.3).

Python builds a plain view of the results (`build_context`); the jinja2 templates in
`harness/templates/` only print it. StrictUndefined turns a missing variable into an error at
render time instead of a blank cell.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

import jinja2
from fastrestart import PACKAGE
from fastrestart.campaign import results as res
from fastrestart.errors import UsageError
from fastrestart.paths import atomic_write
from markupsafe import Markup

TEMPLATES = PACKAGE / "templates"
DEFAULT_TITLE = "fastrestart conformance"
MODES = ("ignore-shared", "cpr-reboot", "cpr-transfer", "cpr-exec", "luo")
"""Restart modes in the order the report shows them (docs/design.md §6); others follow, sorted."""
OUTSIDE_DOWNTIME = ("prepare", "verify")
"""Phases before the save and after the resume: timed, but not part of the guest's downtime."""

BADGES = {res.PASS: "🟢", res.FAIL: "🔴", res.ERROR: "🟠", res.UNSUPPORTED: "⚪", res.NOT_RUN: "⚪"}
LABELS = {res.NOT_RUN: "not run"}
PHASE_COLOURS = {"save": "#1f77b4", "record": "#aec7e8", "kexec": "#ff7f0e", "reboot": "#e377c2",
                 "boot": "#ffbb78", "reserve": "#2ca02c", "enumerate": "#98df8a", "reload": "#9467bd",
                 "restore": "#d62728", "resume": "#8c564b", "prepare": "#c7c7c7", "verify": "#7f7f7f"}
SPARE_COLOURS = ("#17becf", "#bcbd22", "#f7b6d2", "#9edae5", "#dbdb8d", "#c49c94")


def _autoescape(name: str | None) -> bool:
    """Escape for markup outputs, judged by the name without `.j2` (report.html.j2 → html)."""
    return bool(name) and name.removesuffix(".j2").rsplit(".", 1)[-1] in ("html", "xml", "svg")


def _md(value: object) -> str:
    """Text safe inside a Markdown table cell or footnote: one line, no pipes, no raw HTML."""
    text = " ".join(str(value).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def environment() -> jinja2.Environment:
    """The jinja2 environment for every template of the harness: StrictUndefined, markup escaped."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        autoescape=_autoescape,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["md"] = _md
    env.filters["xml_text"] = res.xml_text
    # A double-quoted JSON string is also a valid YAML scalar: no YAML surprises (on, 1.10, *x).
    env.filters["yaml_str"] = lambda value: json.dumps(str(value), ensure_ascii=False)
    return env


def render(template: str, **context: object) -> str:
    """Render one template of `harness/templates` with `context`."""
    return environment().get_template(template).render(**context)


def _relative(target: Path, base: Path) -> str:
    return Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()


def _href(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


def _seconds(value: object) -> str:
    if not isinstance(value, int | float):
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _devices(params: dict) -> str:
    devices = params.get("devices")
    if isinstance(devices, list | tuple):
        return "+".join(str(d) for d in devices) or "no devices"
    return str(devices) if devices else "no devices"


def _row_key(result: dict) -> tuple:
    params = result["params"]
    kernel = params.get("kernel") or "?"
    to_kernel = params.get("to_kernel") or kernel
    variant = [_devices(params)]
    if params.get("l2_mem"):
        variant.append(f"L2 {params['l2_mem']}")
    if params.get("ram_backend") not in (None, "auto"):
        variant.append(f"RAM on {params['ram_backend']}")
    if params.get("shared_ram") is False:
        variant.append("RAM copied")
    if params.get("inject"):
        variant.append(f"inject {params['inject']}")
    if params.get("cycles") not in (None, 1):
        variant.append(f"{params['cycles']} cycles")
    return (f"{kernel} → {to_kernel} · QEMU {params.get('l1_qemu') or '?'}", " · ".join(variant))


def _versions(results: list[dict]) -> str:
    seen = []
    for result in results:
        l1 = result.get("l1") or {}
        if not any(l1.get(key) for key in ("kernel_from", "kernel_to", "qemu")):
            continue  # the run broke before it learned the versions
        text = f"{l1.get('kernel_from') or '–'} → {l1.get('kernel_to') or '–'} · QEMU {l1.get('qemu') or '–'}"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)


class _Notes:
    """Numbered footnotes for the Markdown table, in the order the table is read."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, text: str) -> int:
        self.items.append({"n": len(self.items) + 1, "text": text})
        return len(self.items)


def _verdict_view(verdict: str) -> dict:
    return {"verdict": verdict, "label": LABELS.get(verdict, verdict), "badge": BADGES[verdict],
            "css": "v-" + verdict.lower().replace("_", "-")}


def _cell_view(result: dict, out_dir: Path) -> dict:
    run_dir = Path(result["run_dir"]) if result.get("run_dir") else out_dir / result["cell"]
    base = _relative(run_dir, out_dir)
    logs = result.get("logs") or {}
    log_links = [{"name": name, "href": _href(f"{base}/{path}")} for name, path in logs.items()]
    logs_dir = os.path.commonpath([os.path.dirname(p) or "." for p in logs.values()]) if logs else None
    effective, reason = res.effective_verdict(result)
    expect, raw = res.expectation(result), result["verdict"]
    label = LABELS.get(effective, effective)
    if expect and res.met_expectation(result) and effective != raw:
        label = f"{raw} as expected" + (f" ({expect.partition(':')[2]})" if ":" in expect else "")
    elif expect and effective != raw:
        label = f"{raw}, expected {expect}"
    downtime = result.get("downtime_s") or {}
    attempts = [
        {"attempt": a["attempt"], "verdict": a["verdict"], "reason": a["reason"], "counted": a["counted"],
         "href": _href(_relative(Path(a["run_dir"]), out_dir) + "/" + res.RESULT_FILE) if a.get("run_dir")
         else None}
        for a in result.get("attempts") or []
    ]
    title = [f"{result['cell']}: {effective}" + (f" (verdict {result['verdict']})"
                                                  if effective != result["verdict"] else "")]
    if reason:
        title.append(reason)
    if result.get("retried"):
        title.extend(f"attempt {a['attempt']}: {a['verdict']} {a['reason']}".rstrip() for a in attempts)
    checks = []
    for name in res.CHECKS:
        check = (result["checks"].get(name) or {"verdict": res.NOT_RUN})
        verdict = check["verdict"]
        why = check.get("reason") or ""
        checks.append({"name": name, **_verdict_view(verdict), "reason": why,
                       "title": f"{result['cell']} · {name}: {LABELS.get(verdict, verdict)}"
                       + (f" — {why}" if why else "")})
    error = result.get("error") or None
    params = result["params"]
    l2 = result.get("l2") or {}
    return {
        "name": result["cell"],
        **_verdict_view(effective),
        "label": label,
        "raw_verdict": raw,
        "effective": effective,
        "reason": reason,
        "expect": expect,
        "title": "\n".join(title),
        "mode": result["mode"],
        "accel": result["accel"] or "–",
        "json_href": _href(f"{base}/{res.RESULT_FILE}"),
        "logs_href": _href(f"{base}/{logs_dir}/") if logs_dir not in (None, ".") else None,
        "log_links": log_links,
        "downtime_qmp": _seconds(downtime.get("qmp")),
        "downtime_guest": _seconds(downtime.get("guest")),
        "wall": _seconds(result.get("wall_s")),
        "started": result.get("started") or "–",
        "checks": checks,
        "extra_checks": [{"name": n, **_verdict_view(c["verdict"]), "reason": c.get("reason") or ""}
                         for n, c in result["checks"].items() if n not in res.CHECKS],
        "attempts": attempts,
        "retried": bool(result.get("retried")),
        "error": {"step": error.get("step") or "?", "message": error.get("message") or ""} if error else None,
        "inject": params.get("inject"),
        "l2_kernel": l2.get("kernel") or "–",
        "l2_devices": ", ".join(f"{d.get('name')} {d.get('vendor_device', '')}".strip()
                                for d in l2.get("devices") or []) or "–",
    }


def _ordered_modes(results: list[dict]) -> list[str]:
    present = {r["mode"] for r in results}
    return [m for m in MODES if m in present] + sorted(present - set(MODES))


def _nice_step(span: float) -> float:
    """A round axis step (1, 2 or 5 × 10^k) giving about five ticks over `span`."""
    raw = max(span, 1e-9) / 5
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


FONT_W, PAD = 6.6, 12
"""Average glyph width of the charts' 11px monospace font, and their padding."""


def legend_layout(phases: list[str], colours: dict[str, str], width: float) -> tuple[list[dict], int]:
    """Legend entries laid out left to right, wrapping at `width`; and the y where the plot starts."""
    legend, x, y = [], PAD, 28
    for phase in phases:
        item_w = 22 + len(phase) * FONT_W + 14
        if x + item_w > width - PAD:
            x, y = PAD, y + 18
        legend.append({"phase": phase, "colour": colours[phase], "x": round(x, 1), "y": y})
        x += item_w
    return legend, y + 26


def _chart(results: list[dict], title: str) -> dict:
    """Geometry of the stacked-bar chart of the downtime phases, one bar per cell."""
    phases = [p for p in res.PHASES if p not in OUTSIDE_DOWNTIME]
    for result in results:
        phases += [p for p in result["phases"] if p not in phases and p not in OUTSIDE_DOWNTIME]
    used = [p for p in phases if any(isinstance(r["phases"].get(p), int | float) and r["phases"][p] > 0
                                     for r in results)]
    colours = {p: PHASE_COLOURS.get(p) or SPARE_COLOURS[i % len(SPARE_COLOURS)] for i, p in enumerate(used)}

    font_w, bar_h, gap, plot_w, pad = FONT_W, 16, 8, 560, PAD
    label_w = round(max([len(r["cell"]) for r in results] + [12]) * font_w + 2 * pad)
    width = label_w + plot_w + 90
    legend, top = legend_layout(used, colours, width)

    def total(result: dict) -> float:
        return sum(v for p, v in result["phases"].items() if p in used and isinstance(v, int | float))

    highest = max([total(r) for r in results]
                  + [(r.get("downtime_s") or {}).get("qmp") or 0 for r in results] + [0.0])
    step = _nice_step(highest or 1.0)
    axis_max = step * max(1, math.ceil(highest / step - 1e-9))
    scale = plot_w / axis_max
    bars = []
    for i, result in enumerate(sorted(results, key=lambda r: r["cell"])):
        y0 = top + i * (bar_h + gap)
        segments, x0 = [], float(label_w)
        for phase in used:
            value = result["phases"].get(phase)
            if not isinstance(value, int | float) or value <= 0:
                continue
            w = value * scale
            segments.append({"x": f"{x0:.1f}", "w": f"{w:.1f}", "colour": colours[phase],
                             "title": f"{result['cell']} · {phase}: {value:.2f} s"})
            x0 += w
        qmp = (result.get("downtime_s") or {}).get("qmp")
        bars.append({
            "label": result["cell"], "y": y0, "text_y": y0 + bar_h - 4, "segments": segments,
            "total": f"{total(result):.2f} s" if segments else "no timings", "total_x": f"{x0 + 6:.1f}",
            "downtime_x": f"{label_w + qmp * scale:.1f}" if isinstance(qmp, int | float) else None,
            "downtime_title": f"{result['cell']} · downtime (QMP): {qmp:.2f} s"
            if isinstance(qmp, int | float) else "",
        })
    axis_y = top + len(bars) * (bar_h + gap) + 4
    decimals = 0 if step >= 1 else len(f"{step:.10f}".rstrip("0").split(".")[1])
    ticks = [{"x": f"{label_w + k * step * scale:.1f}", "label": f"{k * step:.{decimals}f}"}
             for k in range(round(axis_max / step) + 1)]
    return {"title": title, "width": width, "height": axis_y + 34, "label_w": label_w, "top": top - 6,
            "bar_h": bar_h, "legend": legend, "bars": bars, "ticks": ticks, "axis_y": axis_y,
            "plot_end": label_w + plot_w, "empty": not bars,
            "note": f"Stacked: {', '.join(used) or 'no phases'}. Black tick: downtime reported by QMP. "
                    f"Not drawn: {', '.join(OUTSIDE_DOWNTIME)} (outside the downtime window)."}


def _span(values: list[str]) -> str:
    values = sorted(set(values))
    if not values:
        return "–"
    return values[0] if len(values) == 1 else f"{values[0]} – {values[-1]}"


def build_context(results: list[dict], out_dir: Path, title: str = DEFAULT_TITLE) -> dict:
    """Everything the report templates print, computed from `results` (each a loaded result,
    possibly carrying `run_dir` and `attempts` from `results.collect`). Links are relative to
    `out_dir`."""
    out_dir = Path(out_dir)
    ordered = sorted(results, key=lambda r: r["cell"])
    views = {id(r): _cell_view(r, out_dir) for r in ordered}
    modes = _ordered_modes(ordered)
    grouped: dict[tuple, list[dict]] = {}
    for result in ordered:
        grouped.setdefault(_row_key(result), []).append(result)

    notes = _Notes()
    rows = []
    for (label, variant), members in sorted(grouped.items()):
        slots = []
        for mode in modes:
            entries = [views[id(r)] for r in members if r["mode"] == mode]
            for view in entries:
                if view["reason"] and (view["effective"] != res.PASS or view["raw_verdict"] != res.PASS
                                       or view["retried"]):
                    text = f"{view['name']}: {view['label']} — {view['reason']}"
                    if view["retried"]:
                        text += "; " + "; ".join(f"attempt {a['attempt']}: {a['verdict']}"
                                                 for a in view["attempts"])
                    view["note"] = notes.add(text)
                else:
                    view["note"] = None
                for check in view["checks"]:
                    check["note"] = (notes.add(f"{view['name']} · {check['name']}: {check['label']} — "
                                               f"{check['reason']}")
                                     if check["reason"] and check["verdict"] != res.PASS else None)
            slots.append(entries)
        rows.append({"label": label, "variant": variant, "versions": _versions(members), "slots": slots})

    tally = res.counts(ordered)
    expecting = [r for r in ordered if res.expectation(r)]
    met = sum(1 for r in expecting if res.met_expectation(r))
    hosts = [r.get("host") or {} for r in ordered]
    summary = {
        "total": len(ordered),
        "counts": [{"n": n, **_verdict_view(v)} for v, n in tally.items()],
        "accels": ", ".join(sorted({r["accel"] for r in ordered if r["accel"]})) or "–",
        "hosts": ", ".join(sorted({f"{h['hostname']} ({h.get('cpus', '?')} CPUs)"
                                   for h in hosts if h.get("hostname")})) or "–",
        "l0_qemu": ", ".join(sorted({str(h["l0_qemu"]) for h in hosts if h.get("l0_qemu")})) or "–",
        "dates": _span([r["started"][:10] for r in ordered if r.get("started")]),
        "expectations": {"total": len(expecting), "met": met, "missed": len(expecting) - met},
        "retried": sum(1 for r in ordered if r.get("retried")),
    }
    return {
        "title": title,
        "summary": summary,
        "modes": modes,
        "checks": list(res.CHECKS),
        "rows": rows,
        "cells": [views[id(r)] for r in ordered],
        "notes": notes.items,
        "chart": _chart(ordered, f"{title}: restart phases per cell"),
        "verdict_legend": [_verdict_view(v) for v in (*res.VERDICTS, res.NOT_RUN)],
    }


def portable(result: dict, out_dir: Path) -> dict:
    """A copy of `result` whose directories are relative to `out_dir`, for a movable results.json."""
    copy = dict(result)
    if copy.get("run_dir"):
        copy["run_dir"] = _relative(Path(copy["run_dir"]), Path(out_dir))
    if copy.get("attempts"):
        copy["attempts"] = [
            {**a, "run_dir": _relative(Path(a["run_dir"]), Path(out_dir)) if a.get("run_dir") else None}
            for a in copy["attempts"]
        ]
    return copy




def render_report(results: list[dict], out_dir: Path, title: str = DEFAULT_TITLE) -> dict[str, Path]:
    """Write report.md, report.html (self-contained: inline CSS and SVG), phases.svg, results.json
    and junit.xml into `out_dir`. Returns the paths by kind: md, html, svg, json, junit."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = build_context(results, out_dir, title)
    env = environment()
    svg = env.get_template("phases.svg.j2").render(**context)
    paths = {
        "md": atomic_write(out_dir / "report.md", env.get_template("report.md.j2").render(**context)),
        "html": atomic_write(out_dir / "report.html",
                       env.get_template("report.html.j2").render(**context, svg=Markup(svg))),
        "svg": atomic_write(out_dir / "phases.svg", svg),
        "json": atomic_write(out_dir / "results.json", json.dumps(
            [portable(r, out_dir) for r in sorted(results, key=lambda r: r["cell"])],
            indent=2, default=str) + "\n"),
    }
    res.write_junit(results, out_dir / "junit.xml", suite="fastrestart")
    paths["junit"] = out_dir / "junit.xml"
    return paths


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
"""Headless and quiet: without the networking flags Chromium keeps dialling out of a closed network."""


def chromium() -> str | None:
    """The Chromium binary on this machine, if any."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html: Path, png: Path, width: int = 1600, height: int = 1200, timeout: float = 120) -> Path:
    """Render `html` in headless Chromium and save what a reader sees as `png`.

    Raises UsageError when Chromium is missing or fails, naming the package and its output."""
    binary = chromium()
    if binary is None:
        raise UsageError("headless Chromium is not installed: `apt-get install chromium` (./setup does it).")
    png = Path(png)
    with tempfile.TemporaryDirectory(prefix="fr-chromium-") as profile:
        proc = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
                               Path(html).resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.exists():
        raise UsageError(f"Chromium could not render {html} (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[-800:]}")
    return png
