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

from . import REPO
from .errors import StepError, UsageError

SOURCE_DIR = REPO / "guests" / "workloads"
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
                                  "io_errors", "first_bad", "verify_seconds", "direct"})
BLKCHECK_STATS_KEYS = frozenset({"ios_submitted", "ios_completed", "io_errors", "loop_reads", "loop_writes"})


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

def _parse_json(program: str, text: str, kinds: dict[str, frozenset[str]]) -> dict:
    """Parse one JSON object printed by ``program`` and check it is one of ``kinds``.

    The kind that matched is stored under ``"kind"``. Malformed output is a StepError: the
    workload, not the product, misbehaved, so the run is an ERROR.
    """
    try:
        data = json.loads(text.strip())
    except json.JSONDecodeError as exc:
        raise StepError(f"parse-{program}", f"{program} printed no valid JSON: {exc}",
                        {"output": text[-2000:]}) from exc
    if not isinstance(data, dict):
        raise StepError(f"parse-{program}", f"{program} printed JSON that is not an object",
                        {"output": text[-2000:]})
    for kind, keys in kinds.items():
        if keys <= data.keys():
            data["kind"] = kind
            return data
    missing = {kind: sorted(keys - data.keys()) for kind, keys in kinds.items()}
    raise StepError(f"parse-{program}", f"{program} output lacks expected keys: {missing}",
                    {"output": text[-2000:]})


def parse_memcheck(text: str) -> dict:
    """Parse ``memcheck start`` (kind "ready") or ``memcheck verify`` (kind "result") output."""
    return _parse_json("memcheck", text, {"result": MEMCHECK_RESULT_KEYS, "ready": MEMCHECK_READY_KEYS})


def parse_blkcheck(text: str) -> dict:
    """Parse ``blkcheck start`` ("ready"), ``blkcheck verify`` ("result") or ``status`` ("stats")."""
    return _parse_json("blkcheck", text, {"result": BLKCHECK_RESULT_KEYS, "ready": BLKCHECK_READY_KEYS,
                                          "stats": BLKCHECK_STATS_KEYS})


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
    try:
        job = json.loads(text[start:])["jobs"][0] if start >= 0 else None
    except (json.JSONDecodeError, KeyError, IndexError) as exc:
        raise StepError("parse-fio", f"fio printed no valid JSON: {exc}", {"output": text[-2000:]}) from exc
    if job is None:
        raise StepError("parse-fio", "fio printed no JSON", {"output": text[-2000:]})
    return {"job": job["jobname"], "error": job["error"], "verify_errors": job.get("total_err", 0),
            "reads": job["read"]["total_ios"], "read_kib": job["read"]["io_kbytes"],
            "writes": job["write"]["total_ios"], "write_kib": job["write"]["io_kbytes"],
            "seconds": job["elapsed"]}
