"""The small static C programs that run inside the guests, and parsers of what they print.

Sources live in ``guests/workloads/<name>.c``; each builds into one standalone static binary
because the guests have only busybox. The helpers they share live in the single header
``guests/workloads/workload.h``, which every source includes (and which is part of every
build's inputs). They are compiled here, on L0, with our own recipe::

    gcc -O2 -static -Wall -Wextra -o OUT SRC

- ``memcheck`` (L2): fills locked memory with a per-page pattern, keeps rewriting pages while
  the save happens, and verifies every byte afterwards. Prints JSON.
- ``blkcheck`` (L2): the same for an NVMe namespace, with crc32c-tagged blocks and exact I/O
  accounting. Prints JSON.
- ``fio`` (L2, Debian's, see ``images.fio_tree``): a crc32c-verified data set written before the
  restart and read back after it, and a verifying random-write job that runs across the restart.
  Its regions of the NVMe namespace never overlap blkcheck's.
- ``l1tool`` (L1): digest and flip bytes of a device-DAX node or file through mmap; read or
  clear a PCI function's MSI enable bit. Prints ``key=value`` lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from fastrestart import DATA
from fastrestart.artifacts import progress
from fastrestart.errors import StepError, UsageError

SOURCE_DIR = DATA / "guests" / "workloads"
CFLAGS = ("-O2", "-static", "-Wall", "-Wextra")
# Headers every workload includes: a change to one rebuilds them all.
HEADERS = ("workload.h",)

# The keys a caller may rely on, per output. Extra keys are allowed (and present).
MEMCHECK_READY_KEYS = frozenset({"pages", "mib", "seed", "fill_seconds", "fill_mib_per_s", "mlocked",
                                 "samples", "base", "pid"})
MEMCHECK_RESULT_KEYS = frozenset({"pages_checked", "bad_pages", "writer_writes", "writer_mismatches",
                                  "verify_seconds", "verify_mib_per_s", "fill_mib_per_s", "first_bad"})
BLKCHECK_READY_KEYS = frozenset({"blocks", "mib", "bs", "direct", "write_mib_per_s", "pid"})
BLKCHECK_RESULT_KEYS = frozenset({"blocks_checked", "bad_blocks", "ios_submitted", "ios_completed",
                                  "io_errors", "loop_reads", "loop_writes", "first_bad", "verify_seconds", "direct"})
BLKCHECK_STATS_KEYS = frozenset({"ios_submitted", "ios_completed", "io_errors", "loop_reads", "loop_writes"})
# edutest prints JSON from `start` (edutest.c: write_ready) and `verify` (json_counters + write_result).
# Its result's "pass" is not required here: a result without it is the DMA check's FAIL (see
# edutest_problems), as edutest itself exits 1 when it finds no "pass":true.
EDUTEST_READY_KEYS = frozenset({"bdf", "backend", "irq", "slots", "size", "pid"})
EDUTEST_RESULT_KEYS = frozenset({"bdf", "backend", "irq", "transfers", "dma_mismatches", "dma_timeouts", "bme_lost",
                                 "irq_expected", "irq_received", "irq_lost", "irq_spurious", "irq_pm_replays",
                                 "dma_done_irqs", "raised_irqs", "suspends_seen", "first_mismatch", "stopped_by"})
# Keys whose value must be a count (an integer >= 0): the verdicts compare them, so a null or a
# string there must never reach them (None == None would pass).
COUNT_KEYS = {
    ("memcheck", "result"): frozenset({"pages_checked", "bad_pages", "writer_writes", "writer_mismatches"}),
    ("blkcheck", "result"): frozenset({"blocks_checked", "bad_blocks", "ios_submitted", "ios_completed", "io_errors",
                                       "loop_reads", "loop_writes"}),
    ("blkcheck", "stats"): BLKCHECK_STATS_KEYS,
    ("edutest", "result"): EDUTEST_RESULT_KEYS - {"bdf", "backend", "irq", "first_mismatch", "stopped_by"},
}


def source(name: str) -> Path:
    """The C source of workload ``name``; a UsageError if there is none."""
    src = SOURCE_DIR / f"{name}.c"
    if not src.is_file():
        known = ", ".join(sorted(p.stem for p in SOURCE_DIR.glob("*.c"))) or "none"
        raise UsageError(f"There is no guest workload '{name}' (no {src}). Known workloads: {known}.")
    return src


def inputs(name: str) -> tuple[Path, ...]:
    """Every file the build of workload ``name`` reads: its source, then the shared headers."""
    headers = (SOURCE_DIR / h for h in HEADERS)
    return (source(name), *(h for h in headers if h.is_file()))


def _compiler(cc: str) -> str:
    path = shutil.which(cc)
    if not path:
        raise UsageError(f"The C compiler '{cc}' is missing on this machine; it builds the guest workloads. "
                         "Install it with `apt-get install gcc libc6-dev`.")
    return path


def build(name: str, out_dir: Path, *, cc: str = "gcc") -> Path:
    """Compile workload ``name`` into ``out_dir/name`` as a static binary; return its path.

    Cached: nothing is done when the binary is newer than all its ``inputs`` (its source and
    the shared headers). The binary is written under a temporary name and renamed, so
    concurrent builds (xdist) never see half a file.
    Raises UsageError when the compiler or the static C library is missing, StepError when
    the source does not compile.
    """
    deps = inputs(name)
    src = deps[0]
    out_dir = Path(out_dir)
    out = out_dir / name
    if out.exists() and out.stat().st_mtime > max(p.stat().st_mtime for p in deps):
        return out
    compiler = _compiler(cc)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.{os.getpid()}.tmp"
    # nice: compiles share two cores with TCG guests that must keep their timing.
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    cmd = [*nice, compiler, *CFLAGS, "-o", str(tmp), str(src)]
    with progress.build(f"the guest workload {name} ({src.name}, static)"):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            err = proc.stderr
            if "cannot find -lc" in err or "cannot find -lgcc_eh" in err or "libc.a" in err:
                raise UsageError(f"'{cc}' cannot link {name} statically: the static C library (libc.a) is "
                                 "missing. Install it with `apt-get install libc6-dev` (Debian) or "
                                 "glibc-static (Fedora).")
            raise StepError("build-workload", f"{cc} failed to compile {src.name}",
                            {"command": " ".join(cmd), "exit code": proc.returncode, "stderr": err[-4000:]})
    tmp.chmod(0o755)
    tmp.replace(out)
    return out


def build_all(out_dir: Path, *, cc: str = "gcc") -> dict[str, Path]:
    """Compile every workload in ``guests/workloads`` into ``out_dir``; return name -> binary."""
    return {src.stem: build(src.stem, out_dir, cc=cc) for src in sorted(SOURCE_DIR.glob("*.c"))}


# -- output parsers -------------------------------------------------------------------------

def _parse_json(program: str, text: str, kinds: dict[str, frozenset[str]], kind: str | None = None) -> dict:
    """Parse one JSON object printed by ``program`` and check it is one of ``kinds`` (only
    ``kind``, when given), with a count wherever ``COUNT_KEYS`` wants one.

    The kind that matched is stored under ``"kind"``. Malformed output is a StepError: no
    verdict is ever computed from it.
    """
    if kind is not None:
        kinds = {kind: kinds[kind]}
    try:
        data = json.loads(text.strip())
    except json.JSONDecodeError as exc:
        raise StepError(f"parse-{program}", f"{program} printed no valid JSON: {exc}",
                        {"output": text[-2000:]}) from exc
    if not isinstance(data, dict):
        raise StepError(f"parse-{program}", f"{program} printed JSON that is not an object",
                        {"output": text[-2000:]})
    for name, keys in kinds.items():
        if keys <= data.keys():
            data["kind"] = name
            break
    else:
        missing = {name: sorted(keys - data.keys()) for name, keys in kinds.items()}
        raise StepError(f"parse-{program}", f"{program} output lacks expected keys: {missing}",
                        {"output": text[-2000:]})
    bad = {key: data[key] for key in sorted(COUNT_KEYS.get((program, data["kind"]), ()))
           if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0}
    if bad:
        raise StepError(f"parse-{program}", f"{program} printed values that are not counts: {bad}",
                        {"output": text[-2000:]})
    return data


def parse_memcheck(text: str, kind: str | None = None) -> dict:
    """Parse ``memcheck start`` (kind "ready") or ``memcheck verify`` (kind "result") output;
    ``kind`` accepts only that one."""
    return _parse_json("memcheck", text, {"result": MEMCHECK_RESULT_KEYS, "ready": MEMCHECK_READY_KEYS}, kind)


def parse_blkcheck(text: str, kind: str | None = None) -> dict:
    """Parse ``blkcheck start`` ("ready"), ``blkcheck verify`` ("result") or ``status`` ("stats");
    ``kind`` accepts only that one."""
    return _parse_json("blkcheck", text, {"result": BLKCHECK_RESULT_KEYS, "ready": BLKCHECK_READY_KEYS,
                                          "stats": BLKCHECK_STATS_KEYS}, kind)


def parse_edutest(text: str, kind: str | None = None) -> dict:
    """Parse ``edutest start`` ("ready") or ``edutest verify`` ("result") output; ``kind`` accepts
    only that one. A result's "pass", when present, must be true or false."""
    data = _parse_json("edutest", text, {"result": EDUTEST_RESULT_KEYS, "ready": EDUTEST_READY_KEYS}, kind)
    if data["kind"] == "result" and "pass" in data and not isinstance(data["pass"], bool):
        raise StepError("parse-edutest", f"edutest printed \"pass\": {data['pass']!r}, not true or false",
                        {"output": text[-2000:]})
    return data


PARSERS = {"memcheck": parse_memcheck, "blkcheck": parse_blkcheck, "edutest": parse_edutest}


def parse_output(program: str, text: str, kind: str | None = None) -> dict:
    """The JSON line that ``program`` printed, through its validating parser."""
    if program not in PARSERS:
        raise StepError(f"parse-{program}", f"the harness has no parser for {program}'s output",
                        {"output": text[-2000:]})
    return PARSERS[program](text, kind)


def parse_l1tool(text: str) -> dict[str, int | float | str]:
    """Parse the ``key=value`` line that ``l1tool`` prints into a dict.

    Decimal values become int, values with a dot become float; hexadecimal values (digests,
    ``0x..`` register words) stay strings so that a digest keeps its leading zeros.
    """
    line = next((ln for ln in text.splitlines() if "=" in ln), "")
    result: dict[str, int | float | str] = {}
    for field in line.split():
        key, sep, value = field.partition("=")
        if not sep:
            raise StepError("parse-l1tool", f"l1tool printed a field without '=': {field!r}",
                            {"output": text})
        if value.isdigit() and key != "digest":
            result[key] = int(value)
        else:
            try:
                result[key] = float(value) if "." in value else value
            except ValueError:
                result[key] = value
    if not result:
        raise StepError("parse-l1tool", "l1tool printed no key=value line", {"output": text})
    return result


# -- exit statuses ----------------------------------------------------------------------------
# What each workload's `verify` exit status means, from its C source, so that the checks can tell
# an exit status the printed counts explain from one they do not (a result plus exit status is
# recorded under "exit_status"; a result without one is not cross-checked).

def _require(program: str, result: dict, keys: tuple[str, ...]) -> None:
    """The parsers guarantee these counts; a result that bypassed them is a StepError, never a
    KeyError and never a comparison of None with None."""
    bad = [k for k in keys if not isinstance(result.get(k), int) or isinstance(result.get(k), bool)]
    if bad:
        raise StepError("verify", f"{program}'s result lacks the counts {bad}",
                        {"result": {k: v for k, v in result.items() if k != "fio"}})


def edutest_pass(result: dict) -> bool:
    """edutest's own verdict, as result_pass() in edutest.c computes it: no DMA mismatch, Bus
    Master Enable never lost, every interrupt it waited for arrived."""
    _require("edutest", result, ("dma_mismatches", "bme_lost", "irq_expected", "irq_received"))
    return (result["dma_mismatches"] == 0 and result["bme_lost"] == 0
            and result["irq_expected"] == result["irq_received"])


def edutest_problems(result: dict) -> list[str]:
    """edutest verify prints its result and exits 0 if it holds "pass":true, else 1 (2: usage
    error or no result, with nothing on stdout). Its "pass", its exit status and its counts must
    agree: a disagreement, or a "pass": false that its counts do not explain, is named here."""
    if "exit_status" not in result and "pass" not in result:
        return []
    rc, passed = result.get("exit_status"), result.get("pass")
    if not isinstance(passed, bool):
        return [f"edu: edutest verify printed no \"pass\" verdict (exit {rc})"]
    problems = []
    said = "true" if passed else "false"
    if rc is not None and rc != (0 if passed else 1):
        problems.append(f"edu: edutest verify says \"pass\": {said} but exited {rc}")
    if passed != edutest_pass(result):
        if passed:
            problems.append(f"edu: edutest verify says \"pass\": true although it counts {result['dma_mismatches']} "
                            f"DMA mismatch(es), {result['bme_lost']} Bus Master Enable loss(es) and "
                            f"{result['irq_received']} of {result['irq_expected']} interrupts")
        else:
            problems.append(f"edu: edutest verify says \"pass\": false (exit {rc}) with no DMA mismatch, no Bus "
                            f"Master Enable loss and {result['irq_received']} of {result['irq_expected']} interrupts: "
                            f"nothing the harness checks explains it")
    return problems


def memcheck_problems(result: dict) -> list[str]:
    """memcheck verify exits 1 exactly when its result has bad pages (0 otherwise; 2 with no
    result). Any other exit status with this result is named here."""
    if "exit_status" not in result:
        return []
    _require("memcheck", result, ("bad_pages",))
    rc, expected = result["exit_status"], 1 if result["bad_pages"] else 0
    if rc == expected:
        return []
    return [f"memcheck verify exited {rc}, but with {result['bad_pages']} bad page(s) it exits {expected}"]


def blkcheck_problems(result: dict) -> list[str]:
    """blkcheck verify exits 1 exactly when its result has bad blocks, I/O errors or fewer I/Os
    completed than submitted (0 otherwise; 2 with no result). Named here: an exit status its
    result does not give, and an exit 1 that no bad block and no I/O error explain (its I/Os
    are synchronous, so submitted and completed differ only by the errors)."""
    if "exit_status" not in result:
        return []
    _require("blkcheck", result, ("bad_blocks", "io_errors", "ios_submitted", "ios_completed"))
    rc, bad, errors = result["exit_status"], result["bad_blocks"], result["io_errors"]
    counts = (f"{bad} bad block(s), {errors} I/O error(s), {result['ios_completed']} of "
              f"{result['ios_submitted']} I/Os completed")
    expected = 1 if bad or errors or result["ios_submitted"] != result["ios_completed"] else 0
    if rc != expected:
        return [f"nvme: blkcheck verify exited {rc}, but with {counts} it exits {expected}"]
    if rc and not bad and not errors:
        return [f"nvme: blkcheck verify exited {rc} with {counts}"]
    return []


# -- fio -----------------------------------------------------------------------------------

FIO_BS = 4096
FIO_DATASET_MIB = (64, 16)  # (offset, size): written before the save, verified after the resume
FIO_ACROSS_MIB = (128, 16)  # random writes with verify backlog, running while L2 is saved and restored
_FIO_COMMON = f"--bs={FIO_BS} --ioengine=psync --direct=1 --verify=crc32c --output-format=json"


def fio_dataset_command(dev: str, output: str, *, verify: bool) -> str:
    """Write the data set (``verify=False``) or read all of it back and check every block."""
    offset, size = FIO_DATASET_MIB
    mode = "--verify_only --continue_on_error=verify" if verify else "--do_verify=0"
    return (f"fio --name=dataset --filename={dev} --offset={offset}M --size={size}M --rw=write "
            f"{_FIO_COMMON} {mode} --output={output}")


def fio_across_command(dev: str, output: str) -> str:
    """A writer that re-reads and checks every 32 blocks it wrote, until SIGTERM (the caller
    runs it in the background)."""
    offset, size = FIO_ACROSS_MIB
    return (f"fio --name=across --filename={dev} --offset={offset}M --size={size}M --rw=randwrite "
            f"--verify_backlog=32 --verify_state_save=0 --rate_iops=100 --time_based --runtime=86400 {_FIO_COMMON} "
            f"--output={output}")


def parse_fio(text: str) -> dict:
    """The figures the checks use from fio's JSON output (which may follow a line such as
    "fio: terminating on signal 15"): the job's error, verify errors, I/Os and KiB each way."""
    start = text.find("{")
    if start < 0:
        raise StepError("parse-fio", "fio printed no JSON", {"output": text[-2000:]})
    try:
        job = json.loads(text[start:])["jobs"][0]
        return {"job": job["jobname"], "error": job["error"], "verify_errors": job.get("total_err", 0),
                "reads": job["read"]["total_ios"], "read_kib": job["read"]["io_kbytes"],
                "writes": job["write"]["total_ios"], "write_kib": job["write"]["io_kbytes"],
                "seconds": job["elapsed"]}
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise StepError("parse-fio", f"fio printed no valid JSON: {exc!r}", {"output": text[-2000:]}) from exc
