"""The ``fastrestart`` command line.

Exit codes: 0 PASS, 1 FAIL, 2 bad usage or input, 3 ERROR (rig or harness broke), 4 UNSUPPORTED.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import termios
import time
import tty
from pathlib import Path

from fastrestart.campaign import results
from fastrestart.campaign.runner import doctor_facts, run_cell
from fastrestart.errors import FastRestartError, UsageError
from fastrestart.options import FAULT, FLOW, RIG, add_arguments, at_least_one, cell_from_args
from fastrestart.vm.machine import Terminated, install_signal_handlers, interruption, kill_all_children

EXIT = {"PASS": 0, "FAIL": 1, "ERROR": 3, "UNSUPPORTED": 4}


class Progress:
    """The step now running and the elapsed time, on one line (or one line per step off a tty)."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, message: str) -> None:
        text = f"[{time.monotonic() - self.start:6.1f}s] {self.label}: {message}"
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def cmd_run(args: argparse.Namespace) -> int:
    cell = cell_from_args(args)
    run_dir = Path(args.results or Path("results") / time.strftime("%Y%m%d-%H%M%S"))
    progress = Progress(cell.label())
    result = run_cell(cell, run_dir, progress)
    progress.done()
    print_summary(result, run_dir)
    return EXIT[result["verdict"]]


def print_summary(result: dict, run_dir: Path) -> None:
    print(f"\n{result['cell']}: {result['verdict']}" + (f" — {result['reason']}" if result.get("reason") else ""))
    print(f"  mode {result['mode']}, accel {result['accel'] or '-'}, L1 {result['l1']['kernel_from']} -> "
          f"{result['l1']['kernel_to']}, L1 QEMU {result['l1']['qemu']}")
    print(f"  L1 boot_ids: {', '.join(b[:8] for b in result['l1']['boot_ids'])}; "
          f"L2 boot_ids: {', '.join(b[:8] for b in result['l2']['boot_ids'])}")
    phases = "  ".join(f"{k} {v:.2f}" for k, v in result["phases"].items() if v)
    print(f"  phases (s): {phases}")
    downtime = result["downtime_s"]
    print(f"  downtime (s): qmp {downtime['qmp']}  guest {downtime['guest']}   wall {result['wall_s']} s")
    for name, check in result["checks"].items():
        reason = f" — {check['reason']}" if check.get("reason") else ""
        print(f"  {name:<11} {check['verdict']}{reason}")
    if result.get("error"):
        print(f"  error in step {result['error']['step']}:\n    " +
              str(result["error"]["message"]).replace("\n", "\n    ")[:3000])
    size = result.get("results_size_bytes")
    print(f"  results: {run_dir}/result.json  logs: {run_dir}/logs/"
          + (f"  ({size / 1e6:.1f} MB in all)" if size is not None else ""))


def cmd_soak(args: argparse.Namespace) -> int:
    """Clean runs of many restart cycles: every FAIL is a false positive (or a real flake)."""
    out = Path(args.results or Path("results") / f"soak-{time.strftime('%Y%m%d-%H%M%S')}")
    tally: dict[str, dict[str, int]] = {}
    verdicts: list[str] = []
    for run in range(1, args.runs + 1):
        cell = cell_from_args(args, name=f"soak-{run}")
        progress = Progress(f"soak run {run}/{args.runs} ({args.cycles} cycles)")
        result = run_cell(cell, out / f"run-{run}", progress)
        progress.done()
        for name, check in result["checks"].items():
            tally.setdefault(name, {}).setdefault(check["verdict"], 0)
            tally[name][check["verdict"]] += 1
        print(f"run {run}: {result['verdict']} {result['reason']}  (downtime {result['downtime_s']})", flush=True)
        verdicts.append(result["verdict"])
    false_positives = sum(counts.get("FAIL", 0) for counts in tally.values())
    summary = {"runs": args.runs, "cycles_per_run": args.cycles, "restarts": args.runs * args.cycles,
               "verdicts": verdicts, "checks": tally, "false_positives": false_positives}
    (out / "soak.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if set(verdicts) == {"PASS"} else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    facts = doctor_facts()
    accel = facts["accel"]
    print(f"accelerator: {accel['name']} ({accel['reason']})")
    print(f"L0 QEMU: {facts['l0_qemu'] or 'missing'}")
    print(f"cache: {facts['cache']}")
    print(f"cached kernels: {', '.join(facts['kernels']) or 'none (fetched on first run)'}")
    print(f"cached L1 userspaces: {', '.join(facts['userspaces']) or 'none (built on first run)'}")
    for missing in facts.get("missing", []):
        print(f"missing: {missing}")
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=1))
    return 0 if not facts.get("missing") else 2


def cmd_rig_check(args: argparse.Namespace) -> int:
    from fastrestart.campaign.rigcheck import rig_check

    cell = cell_from_args(args)
    run_dir = Path(args.results or Path("results") / f"rig-{time.strftime('%Y%m%d-%H%M%S')}")
    progress = Progress("rig check")
    report = rig_check(cell, run_dir, progress)
    progress.done()
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 3


def cmd_shell(args: argparse.Namespace) -> int:
    from fastrestart.campaign.rigcheck import standing_rig

    cell = cell_from_args(args)
    run_dir = Path(args.results or Path("results") / f"shell-{time.strftime('%Y%m%d-%H%M%S')}")
    with standing_rig(cell, run_dir, Progress("shell")) as rig:
        print(f"\nL1 shell (L2 is running; its console: nc 127.0.0.1 {rig.ports['console'][0]}, its QMP: "
              f"127.0.0.1:{rig.ports['qmp'][0]}). Logs: {run_dir}/logs. Leave with Ctrl-].", file=sys.stderr)
        interact(rig.sh.sock)
    return 0


def interact(sock) -> None:
    """Hand the terminal to a console socket until Ctrl-]."""
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved:
            tty.setraw(stdin)
        os.write(sock.fileno(), b"\n")
        while True:
            ready, _, _ = select.select([stdin, sock], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    return
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or b"\x1d" in data:
                    return
                sock.sendall(data)
    finally:
        if saved:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def cmd_fetch(args: argparse.Namespace) -> int:
    """Warm the cache with everything the cells will boot: kernels, L1's userspace and QEMU, L0's
    QEMU, L2's initramfs with its workloads and modules (what a matrix's cells ask for, or the
    command line's cell)."""
    from fastrestart.campaign.pipelines import load_matrix
    from fastrestart.campaign.runner import rig_config
    from fastrestart.options import Cell
    from fastrestart.restart import probes
    from fastrestart.vm.rig import l0_qemu, prepare_artifacts

    cells = [cell_from_args(args)]
    if args.matrix:
        cells = [Cell.from_matrix(cell) for cell in load_matrix(Path(args.matrix))]
    seen = set()
    for cell in cells:
        config = rig_config(cell)
        key = (config.kernel, config.to_kernel, config.l1_qemu, config.l2_kernel, tuple(config.devices),
               config.edu_irq, config.l2_iommu, config.l0_qemu)
        if key in seen:
            continue
        seen.add(key)
        print(f"fetching kernel {config.kernel}{' -> ' + config.to_kernel if config.to_kernel else ''}, "
              f"L1 QEMU {config.l1_qemu}, L2 kernel {config.l2_kernel}, devices {','.join(config.devices) or 'none'}",
              file=sys.stderr)
        artifacts = prepare_artifacts(config)
        probes.qemu_caps(artifacts.userspace)
        l0_qemu(config.l0_qemu)
    print("artifacts cached; runs can now start offline", file=sys.stderr)
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    from fastrestart.campaign.matrix import run_matrix

    out = Path(args.results or Path("results") / f"matrix-{time.strftime('%Y%m%d-%H%M%S')}")
    return run_matrix(Path(args.matrix), out,
                      parallel=args.parallel, only=args.only)


def cmd_report(args: argparse.Namespace) -> int:
    from fastrestart.campaign.report import render_report

    found = results.collect(Path(args.dir))
    if not found:
        raise UsageError(f"No result.json under {args.dir}.")
    written = render_report(found, Path(args.dir))
    results.write_junit(found, Path(args.dir) / "junit.xml", suite="fastrestart")
    if args.screenshot:
        from fastrestart.campaign.report import screenshot

        written["png"] = screenshot(written["html"], Path(args.dir) / "report.png")
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Fast restart against the alternatives, interleaved on shared rigs; ratios from one run."""
    from fastrestart.campaign.bench import BenchOptions, load_bench, render_bench, run_bench
    from fastrestart.vm.rig import parse_size_mib

    out = Path(args.results or Path("results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    docs = Path(args.docs) if args.docs else None
    if args.render_only:
        bench = load_bench(out / "bench.json")
        written = render_bench(bench, out, docs)
    else:
        options = BenchOptions(
            routes=[r for r in args.routes.split(",") if r],
            sizes_mib=[parse_size_mib(s) for s in args.l2_mem.split(",")],
            repeat=args.repeat, devices=[d for d in args.devices.split(",") if d and d != "none"],
            mem_check_mib=args.mem_check, kernel=args.kernel, l1_qemu=args.l1_qemu, l0_qemu=args.l0_qemu,
            accel=args.accel)
        progress = Progress("bench")
        bench = run_bench(options, out, progress, command=" ".join(["fastrestart", *sys.argv[1:]]))
        progress.done()
        written = render_bench(bench, out, docs)
        print(f"bench wall time: {bench['wall_s']} s")
    for ratio in bench["ratios"] + bench["growth"]:
        print(f"  {ratio['name']}{' @ ' + ratio['size'] if ratio.get('size') else ''}: {ratio['value']}")
    for target in bench["targets"]:
        print(f"  target {target['state']}: {target['name']} ({target['detail']})")
    for name, path in written.items():
        print(f"{name}: {path}")
    # Every cycle, and every rig's own end-of-run checks, must hold: a broken rig or a FAIL of its
    # checks makes the figures untrustworthy, whatever the cycles said.
    rigs_ok = all(not r.get("error") and all(c["verdict"] in ("PASS", "UNSUPPORTED")
                                             for c in (r.get("checks") or {}).values()) for r in bench["rigs"])
    return 0 if rigs_ok and all(c["verdict"] in ("PASS", "UNSUPPORTED") for c in bench["cycles"]) else 1


def cmd_ci_render(args: argparse.Namespace) -> int:
    from fastrestart.campaign.pipelines import render_pipeline

    print(render_pipeline(args.engine, Path(args.matrix), Path(args.output)))
    return 0


def cmd_kernel_build(args: argparse.Namespace) -> int:
    """Build (or find cached) a kernel; the last stdout line is its spec, for scripts."""
    from fastrestart.artifacts.kernelbuild import build_kernel

    progress = Progress("kernel build")
    built = build_kernel(args.source, series=Path(args.series) if args.series else None,
                         fragments=[Path(f) for f in args.fragment or []], jobs=args.jobs,
                         keep_tree=args.keep_tree, progress=progress)
    progress.done()
    print(f"release {built.release}{' (cached)' if built.cached else ''}")
    print(built.spec)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from fastrestart.campaign.validate import DEFAULT_MATRIX, validate

    out = Path(args.results or Path("results") / f"validate-{time.strftime('%Y%m%d-%H%M%S')}")
    return validate(args.base, args.patched, Path(args.matrix or DEFAULT_MATRIX), out, parallel=args.parallel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrestart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one fast-restart cell and report every phase")
    add_arguments(run, RIG, FLOW, FAULT)
    run.add_argument("--results", help="result directory (default ./results/<timestamp>)")
    run.set_defaults(func=cmd_run)

    soak = sub.add_parser("soak", help="clean runs of many cycles; reports false positives (not run in CI)")
    add_arguments(soak, RIG, FLOW, defaults={"cycles": 20})
    soak.add_argument("--runs", type=at_least_one, default=1, help="runs, each on a fresh rig (default 1)")
    soak.add_argument("--results", help="result directory (default ./results/soak-<timestamp>)")
    soak.set_defaults(func=cmd_soak)

    doctor = sub.add_parser("doctor", help="what this machine has and lacks")
    doctor.add_argument("--json")
    doctor.set_defaults(func=cmd_doctor)

    rig = sub.add_parser("rig", help="the rig alone")
    rig_sub = rig.add_subparsers(dest="rig_command", required=True)
    check = rig_sub.add_parser("check", help="boot L1 and L2 and check every part of the rig")
    add_arguments(check, RIG)
    check.add_argument("--json", help="also write the report to this file")
    check.add_argument("--results", help="result directory (default ./results/rig-<timestamp>)")
    check.set_defaults(func=cmd_rig_check)

    shell = sub.add_parser("shell", help="an L1 prompt with L2 running, for debugging")
    add_arguments(shell, RIG)
    shell.add_argument("--results", help="result directory (default ./results/shell-<timestamp>)")
    shell.set_defaults(func=cmd_shell)

    fetch = sub.add_parser("fetch", help="warm the artifact cache (kernels, userspaces, guest images)")
    add_arguments(fetch, RIG)
    fetch.add_argument("--matrix", help="warm what every cell of this matrix needs instead")
    fetch.set_defaults(func=cmd_fetch)

    matrix = sub.add_parser("matrix", help="run the cells of a matrix and build the report")
    matrix.add_argument("matrix")
    matrix.add_argument("--parallel", type=int, default=1)
    matrix.add_argument("--results")
    matrix.add_argument("--only", help="run only cells whose name matches this glob")
    matrix.set_defaults(func=cmd_matrix)

    report = sub.add_parser("report", help="re-render report.md/html and junit.xml from results")
    report.add_argument("dir")
    report.add_argument("--screenshot", action="store_true", help="also save report.png (headless Chromium)")
    report.set_defaults(func=cmd_report)

    bench = sub.add_parser("bench", help="fast restart against ram-copy, firmware reboots, cpr-transfer and a "
                           "cold boot, side by side (not run in CI)")
    bench.add_argument("--l2-mem", default="128M,512M,1G,2G", help="L2 RAM sizes, comma separated")
    bench.add_argument("--repeat", type=int, default=3, help="cycles of each route per size")
    bench.add_argument("--routes", default="fast-restart,ram-copy,firmware-reboot-seabios,firmware-reboot-ovmf,"
                       "cpr-transfer,cold-boot", help="routes, comma separated")
    bench.add_argument("--devices", default="none",
                       help="assigned devices for every route (default none: cpr-transfer with vfio devices "
                            "loses interrupts or stops the guest, see README)")
    bench.add_argument("--mem-check", type=int, default=32, help="MiB of L2 RAM the memory check fills")
    bench.add_argument("--kernel", default="debian:trixie", help="L1 kernel spec")
    bench.add_argument("--l1-qemu", default="trixie", help="QEMU in L1 (every route shares it)")
    bench.add_argument("--l0-qemu")
    bench.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    bench.add_argument("--results", help="result directory (default ./results/bench-<timestamp>)")
    bench.add_argument("--docs", help="also write DIR/performance.md with copies of the SVGs")
    bench.add_argument("--render-only", action="store_true", help="re-render from --results DIR/bench.json")
    bench.set_defaults(func=cmd_bench)

    ci = sub.add_parser("ci", help="CI pipelines")
    ci_sub = ci.add_subparsers(dest="ci_command", required=True)
    render = ci_sub.add_parser("render", help="render a nightly pipeline from a matrix")
    render.add_argument("--engine", choices=["gitlab", "github"], required=True)
    render.add_argument("--matrix", required=True)
    render.add_argument("-o", "--output", required=True)
    render.set_defaults(func=cmd_ci_render)

    kernel = sub.add_parser("kernel", help="kernels built from source")
    kernel_sub = kernel.add_subparsers(dest="kernel_command", required=True)
    kbuild = kernel_sub.add_parser("build", help="build a kernel from source + series + fragments (cached)")
    kbuild.add_argument("--source", required=True, help="debian-source:7.2, path:DIR or git:DIR@REV")
    kbuild.add_argument("--series", help="a directory of *.patch files (applied sorted) or an mbox")
    kbuild.add_argument("--fragment", action="append", help="a config fragment (repeatable), e.g. "
                        "kernels/fragments/fast-restart.config")
    kbuild.add_argument("--jobs", type=int, help="make -j (default: the number of CPUs)")
    kbuild.add_argument("--keep-tree", action="store_true", help="keep the build tree after success")
    kbuild.set_defaults(func=cmd_kernel_build)

    validate = sub.add_parser("validate", help="run the same cells on a base and a patched kernel, diff verdicts")
    validate.add_argument("--base", required=True, help="kernel spec of the base, e.g. build:KEY or debian:sid")
    validate.add_argument("--patched", required=True, help="kernel spec of the patched kernel")
    validate.add_argument("--matrix", help="matrix file (default kernels/validate.yaml)")
    validate.add_argument("--results", help="result directory (default ./results/validate-<timestamp>)")
    validate.add_argument("--parallel", type=int, default=1)
    validate.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_signal_handlers()
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"fastrestart: {exc}", file=sys.stderr)
        return 2
    except FastRestartError as exc:
        print(f"fastrestart: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        what, code = interruption(exc)
        print(f"\nfastrestart: interrupted by {what}; every VM was stopped, the result says ERROR, logs are kept.",
              file=sys.stderr)
        return code
    finally:
        kill_all_children()


if __name__ == "__main__":
    sys.exit(main())
