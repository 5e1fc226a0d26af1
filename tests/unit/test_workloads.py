"""The guest workloads, built with our recipe and run natively on L0.

Each test works in its own tmp_path; the binaries are built once per xdist worker. Daemons
started by a test are killed by pid file when it ends, whatever happened.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
from fastrestart.artifacts import workloads
from fastrestart.errors import StepError, UsageError

GCC_MISSING = "gcc is missing: the workloads cannot be built (apt-get install gcc libc6-dev)"
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason=GCC_MISSING)

PROGRAMS = ("memcheck", "l1tool", "blkcheck")
PAGE = 4096


@pytest.fixture(scope="module")
def bins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("gcc") is None:
        pytest.skip(GCC_MISSING)
    out = tmp_path_factory.mktemp("bin")
    return {name: workloads.build(name, out) for name in PROGRAMS}


@pytest.fixture
def daemons():
    """Directories whose daemons must not outlive the test."""
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        for name in ("memcheck", "blkcheck"):
            pidfile = d / f"{name}.pid"
            if not pidfile.exists():
                continue
            pid = int(pidfile.read_text())
            try:
                # Only kill what is really ours: a recycled pid belongs to someone else.
                if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


def exited(pid: int) -> bool:
    """Gone, or a zombie: the init that adopted the daemon may be slow to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def run(binary: Path, *args: object, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          check=False)


# -- build ------------------------------------------------------------------------------------

def _has_interp(path: Path) -> bool:
    """True if the ELF file asks for a dynamic loader (a PT_INTERP program header)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def test_build_gives_static_executables(bins):
    for name, path in bins.items():
        assert path.name == name and os.access(path, os.X_OK)
        assert not _has_interp(path), f"{name} is dynamically linked"


@pytest.fixture
def tiny_sources(tmp_path, monkeypatch) -> Path:
    """A source directory of two trivial programs: build logic without slow real compiles."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("one", "two"):
        (src / f"{name}.c").write_text("int main(void) { return 0; }\n")
    monkeypatch.setattr(workloads, "SOURCE_DIR", src)
    return src


@needs_gcc
def test_build_is_cached_and_follows_the_source(tmp_path, tiny_sources):
    out = workloads.build("one", tmp_path / "bin")
    first = out.stat().st_mtime_ns
    assert workloads.build("one", tmp_path / "bin").stat().st_mtime_ns == first
    # An output older than its source is rebuilt.
    old = (tiny_sources / "one.c").stat().st_mtime - 10
    os.utime(out, (old, old))
    assert workloads.build("one", tmp_path / "bin").stat().st_mtime > old + 5
    assert subprocess.run([str(out)], check=False).returncode == 0
    assert not list((tmp_path / "bin").glob(".*.tmp"))


@needs_gcc
def test_build_all_builds_every_source(tmp_path, tiny_sources):
    built = workloads.build_all(tmp_path / "bin")
    assert built == {"one": tmp_path / "bin" / "one", "two": tmp_path / "bin" / "two"}
    assert all(os.access(p, os.X_OK) and not _has_interp(p) for p in built.values())


@needs_gcc
@pytest.mark.parametrize("name", PROGRAMS)
def test_sources_compile_without_warnings(name, tmp_path):
    proc = subprocess.run(["gcc", *workloads.CFLAGS, "-Werror", "-c", "-o", str(tmp_path / "o.o"),
                           str(workloads.source(name))], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_missing_compiler_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="apt-get install gcc"):
        workloads.build("memcheck", tmp_path, cc="/nonexistent/gcc")


def test_missing_static_libc_is_a_usage_error(tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho '/usr/bin/ld: cannot find -lc: No such file or directory' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(UsageError, match="libc6-dev"):
        workloads.build("memcheck", tmp_path / "out", cc=str(fake))


def test_compile_error_is_a_step_error_with_evidence(tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'memcheck.c:1: error: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(StepError) as info:
        workloads.build("memcheck", tmp_path / "out", cc=str(fake))
    assert "boom" in str(info.value)


def test_unknown_workload_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="Known workloads"):
        workloads.build("nosuch", tmp_path)


# -- memcheck ---------------------------------------------------------------------------------

def mc_start(bins, d: Path, daemons: list, mib: int = 16, seed: int = 1234, hz: int | None = None) -> dict:
    daemons.append(d)
    args = ["start", "--mib", mib, "--seed", seed, "--dir", d]
    if hz is not None:
        args += ["--writer-hz", hz]
    proc = run(bins["memcheck"], *args)
    assert proc.returncode == 0, proc.stderr
    ready = workloads.parse_memcheck(proc.stdout)
    assert ready["kind"] == "ready"
    assert ready == {**json.loads((d / "memcheck.ready").read_text()), "kind": "ready"}
    return ready


def mc_verify(bins, d: Path) -> tuple[int, dict]:
    proc = run(bins["memcheck"], "verify", "--dir", d, "--timeout", 20)
    assert proc.returncode in (0, 1), proc.stderr
    result = workloads.parse_memcheck(proc.stdout, "result")
    assert result["kind"] == "result"
    # The harness's reading of memcheck's exit status (checks.memory_verdict) matches the binary.
    assert workloads.memcheck_problems({**result, "exit_status": proc.returncode}) == []
    return proc.returncode, result


def mc_flip(bins, d: Path, page: int, byte: int, bit: int) -> None:
    proc = run(bins["memcheck"], "selftest-flip", "--dir", d, "--page", page, "--byte", byte, "--bit", bit)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"ok page={page} byte={byte} bit={bit}")


def test_memcheck_clean_run_finds_nothing_while_the_writer_writes(bins, tmp_path, daemons):
    ready = mc_start(bins, tmp_path, daemons, mib=16)
    assert ready["pages"] == 16 * 256 and ready["mib"] == 16 and ready["seed"] == 1234
    assert ready["fill_mib_per_s"] > 0 and ready["fill_seconds"] >= 0
    pages = [s["page"] for s in ready["samples"]]
    assert {0, ready["pages"] // 2, ready["pages"] - 1} <= set(pages) and len(pages) >= 8
    for s in ready["samples"]:
        assert int(s["vaddr"], 16) == int(ready["base"], 16) + s["page"] * PAGE
        if os.geteuid() == 0:
            assert int(s["paddr"], 16) % PAGE == 0 and int(s["paddr"], 16) > 0
    if os.geteuid() == 0:
        assert ready["mlocked"] is True
    pid = int((tmp_path / "memcheck.pid").read_text())
    assert pid == ready["pid"]
    time.sleep(0.3)
    rc, result = mc_verify(bins, tmp_path)
    assert rc == 0
    assert result["pages_checked"] == ready["pages"]
    assert result["bad_pages"] == 0 and result["first_bad"] == []
    assert result["writer_writes"] > 100  # 2000 pages/s for 0.3 s
    assert result["writer_mismatches"] == 0
    assert result["verify_mib_per_s"] > 0
    # The daemon exits after the verify and removes its pid file.
    deadline = time.monotonic() + 5
    while not exited(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exited(pid)
    assert not (tmp_path / "memcheck.pid").exists()


def _flip_cases() -> list:
    rng = random.Random(20240607)
    pages = 8 * 256
    return [
        pytest.param(0, 0, 0, id="first-byte"),
        pytest.param(pages - 1, PAGE - 1, 7, id="last-byte"),
        pytest.param(rng.randrange(pages), rng.randrange(PAGE), rng.randrange(8), id="random-byte"),
        pytest.param(rng.randrange(pages), rng.randrange(16), rng.randrange(8), id="header-byte"),
    ]


@pytest.mark.parametrize(("page", "byte", "bit"), _flip_cases())
def test_memcheck_finds_a_single_flipped_bit(bins, tmp_path, daemons, page, byte, bit):
    ready = mc_start(bins, tmp_path, daemons, mib=8)
    mc_flip(bins, tmp_path, page, byte, bit)
    rc, result = mc_verify(bins, tmp_path)
    assert rc == 1
    assert result["bad_pages"] == 1
    bad = result["first_bad"]
    assert len(bad) == 1
    assert bad[0]["page"] == page and bad[0]["offset"] == byte
    assert int(bad[0]["vaddr"], 16) == int(ready["base"], 16) + page * PAGE
    # Exactly the one bit differs, in the right byte of the 8-byte word.
    xor = int(bad[0]["expected"], 16) ^ int(bad[0]["actual"], 16)
    assert xor == 1 << (8 * (byte % 8) + bit)


def test_memcheck_writer_catches_corruption_and_never_repairs_it(bins, tmp_path, daemons):
    # A 1 MiB region rewritten at 20000 pages/s: the writer reaches every page within a second.
    mc_start(bins, tmp_path, daemons, mib=1, hz=20000)
    mc_flip(bins, tmp_path, 100, 2048, 3)
    deadline = time.monotonic() + 5
    while "writer: page 100 bad" not in (tmp_path / "memcheck.log").read_text():
        assert time.monotonic() < deadline, "the writer never visited the flipped page"
        time.sleep(0.05)
    time.sleep(0.2)  # more writer passes over the page: none may rewrite it
    rc, result = mc_verify(bins, tmp_path)
    assert rc == 1
    assert result["writer_mismatches"] == 1 and result["bad_pages"] == 1
    assert result["first_bad"][0]["page"] == 100 and result["first_bad"][0]["offset"] == 2048
    assert result["first_bad"][0]["found_by"] == "writer"
    assert result["writer_writes"] > 1000


def test_memcheck_finds_a_bit_flipped_from_outside_the_process(bins, tmp_path, daemons):
    """Like the host flipping guest RAM: write another process's memory, with the writer running."""
    ready = mc_start(bins, tmp_path, daemons, mib=8)
    page, byte = 777, 1234
    addr = int(ready["base"], 16) + page * PAGE + byte
    try:
        with open(f"/proc/{ready['pid']}/mem", "r+b", buffering=0) as mem:
            mem.seek(addr)
            old = mem.read(1)[0]
            mem.seek(addr)
            mem.write(bytes([old ^ 0x10]))
    except PermissionError as exc:
        pytest.skip(f"cannot write another process's memory here: {exc}")
    rc, result = mc_verify(bins, tmp_path)
    assert rc == 1 and result["bad_pages"] == 1
    assert result["first_bad"][0]["page"] == page and result["first_bad"][0]["offset"] == byte


def test_memcheck_phys_matches_the_samples(bins, tmp_path, daemons):
    if os.geteuid() != 0:
        pytest.skip("physical addresses need root (pagemap hides PFNs otherwise)")
    ready = mc_start(bins, tmp_path, daemons, mib=4, hz=0)
    sample = ready["samples"][-1]
    proc = run(bins["memcheck"], "phys", "--dir", tmp_path, "--page", sample["page"])
    assert proc.returncode == 0, proc.stderr
    info = workloads.parse_l1tool(proc.stdout)
    assert info["vaddr"] == sample["vaddr"] and info["paddr"] == sample["paddr"]
    assert run(bins["memcheck"], "stop", "--dir", tmp_path).returncode == 0


def test_memcheck_usage_errors(bins, tmp_path, daemons):
    assert run(bins["memcheck"], "verify", "--dir", tmp_path, "--timeout", 1).returncode == 2
    assert run(bins["memcheck"], "start", "--dir", tmp_path, "--mib", 1).returncode == 2  # no --seed
    assert run(bins["memcheck"], "start", "--dir", tmp_path, "--mib", "x", "--seed", 1).returncode == 2
    assert run(bins["memcheck"], "bogus", "--dir", tmp_path).returncode == 2
    mc_start(bins, tmp_path, daemons, mib=1)
    again = run(bins["memcheck"], "start", "--dir", tmp_path, "--mib", 1, "--seed", 1)
    assert again.returncode == 2 and "already runs" in again.stderr
    bad_flip = run(bins["memcheck"], "selftest-flip", "--dir", tmp_path,
                   "--page", 999, "--byte", 0, "--bit", 0)
    assert bad_flip.returncode == 1 and bad_flip.stdout.startswith("error")
    rc, result = mc_verify(bins, tmp_path)
    assert rc == 0 and result["bad_pages"] == 0
    # A verify after the daemon is gone prints the result it left behind.
    rc2, again_result = mc_verify(bins, tmp_path)
    assert rc2 == 0 and again_result["pages_checked"] == result["pages_checked"]


# -- l1tool -----------------------------------------------------------------------------------

M64 = (1 << 64) - 1
P1, P2, P3, P4, P5 = (11400714785074694791, 14029467366897019727, 1609587929392839161,
                      9650029242287828579, 2870177450012600261)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * P2) & M64, 31) * P1) & M64


def xxh64(data: bytes) -> int:
    """Reference XXH64 (seed 0), slow but simple: checks the C implementation."""
    n, i = len(data), 0
    if n >= 32:
        v = [(P1 + P2) & M64, P2, 0, (-P1) & M64]
        while i + 32 <= n:
            v = [_round(v[k], int.from_bytes(data[i + 8 * k:i + 8 * k + 8], "little")) for k in range(4)]
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M64
        for lane in v:
            h = ((h ^ _round(0, lane)) * P1 + P4) & M64
    else:
        h = P5
    h = (h + n) & M64
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, int.from_bytes(data[i:i + 8], "little")), 27) * P1 + P4) & M64
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (int.from_bytes(data[i:i + 4], "little") * P1 & M64), 23) * P2 + P3) & M64
        i += 4
    while i < n:
        h = (_rotl(h ^ (data[i] * P5 & M64), 11) * P1) & M64
        i += 1
    h ^= h >> 33
    h = h * P2 & M64
    h ^= h >> 29
    h = h * P3 & M64
    return h ^ (h >> 32)


def digest(bins, path: Path, *args: object) -> dict:
    proc = run(bins["l1tool"], "digest", path, *args)
    assert proc.returncode == 0, proc.stderr
    out = workloads.parse_l1tool(proc.stdout)
    assert out["algo"] == "xxh64" and isinstance(out["seconds"], float)
    return out


def test_l1tool_digest_is_xxh64(bins, tmp_path):
    assert xxh64(b"") == 0xEF46DB3751D8E999 and xxh64(b"abc") == 0x44BC2CF5AD770999  # published values
    data = random.Random(5).randbytes(100_003)
    f = tmp_path / "ram"
    f.write_bytes(data)
    whole = digest(bins, f)
    assert whole["size"] == len(data) and whole["digest"] == f"{xxh64(data):016x}"
    part = digest(bins, f, "--offset", 4097, "--size", 50_001)
    assert part["size"] == 50_001 and part["offset"] == 4097
    assert part["digest"] == f"{xxh64(data[4097:4097 + 50_001]):016x}"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert digest(bins, empty)["digest"] == "ef46db3751d8e999"


def test_l1tool_digest_across_mapping_windows(bins, tmp_path):
    # 70 MiB spans two 64 MiB windows; an unaligned range must hash as the same bytes alone.
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.write(os.urandom(70 << 20))
    off, size = 2 * 1024 * 1024 - 3, (66 << 20) + 5
    with big.open("rb") as f:
        f.seek(off)
        (tmp_path / "cut").write_bytes(f.read(size))
    ranged = digest(bins, big, "--offset", off, "--size", size)
    assert ranged["digest"] == digest(bins, tmp_path / "cut")["digest"]


def test_l1tool_flip_changes_the_digest_and_flipping_back_restores_it(bins, tmp_path):
    f = tmp_path / "ram"
    data = os.urandom(3 << 20)
    f.write_bytes(data)
    before = digest(bins, f)["digest"]
    proc = run(bins["l1tool"], "flip", f, "--offset", 2_500_000)
    assert proc.returncode == 0, proc.stderr
    out = workloads.parse_l1tool(proc.stdout)
    assert out["flipped"] == 1 and out["first"] == 2_500_000
    changed = f.read_bytes()
    assert changed[2_500_000] == data[2_500_000] ^ 0xFF
    assert changed[:2_500_000] == data[:2_500_000] and changed[2_500_001:] == data[2_500_001:]
    assert digest(bins, f)["digest"] != before
    assert run(bins["l1tool"], "flip", f, "--offset", 2_500_000).returncode == 0
    assert digest(bins, f)["digest"] == before


def test_l1tool_flip_count_stride_and_mask(bins, tmp_path):
    f = tmp_path / "ram"
    data = bytes(5 << 20)
    f.write_bytes(data)
    # Crosses the 2 MiB window boundary at 4 MiB.
    proc = run(bins["l1tool"], "flip", f, "--offset", 4_000_000, "--count", 5, "--stride", 100_000,
               "--mask", 1)
    assert proc.returncode == 0, proc.stderr
    out = workloads.parse_l1tool(proc.stdout)
    assert out["flipped"] == 5 and out["first"] == 4_000_000 and out["last"] == 4_400_000
    expected = bytearray(data)
    for k in range(5):
        expected[4_000_000 + k * 100_000] = 1
    changed = f.read_bytes()
    assert changed == expected
    # Past the end is refused, and nothing is written.
    assert run(bins["l1tool"], "flip", f, "--offset", 5 << 20).returncode == 2
    assert f.read_bytes() == changed


def _config_space(caps: list[tuple[int, int, bytes]], status_caps: bool = True) -> bytes:
    """A 256-byte PCI config space with capabilities (offset, id, body after the 2-byte header)."""
    cfg = bytearray(256)
    cfg[0:4] = bytes.fromhex("f4 1a 00 11")  # vendor/device of edu, for realism
    if status_caps:
        cfg[0x06] = 0x10
    cfg[0x34] = caps[0][0] if caps else 0
    for i, (off, cap_id, body) in enumerate(caps):
        cfg[off] = cap_id
        cfg[off + 1] = caps[i + 1][0] if i + 1 < len(caps) else 0
        cfg[off + 2:off + 2 + len(body)] = body
    return bytes(cfg)


def test_l1tool_msi_status_and_disable(bins, tmp_path):
    cfg = tmp_path / "config"
    # Power management at 0x40, then MSI at 0x50 with Message Control 0x0081 (64-bit, enabled).
    original = _config_space([(0x40, 0x01, b"\x03\x00"), (0x50, 0x05, b"\x81\x00")])
    cfg.write_bytes(original)
    status = run(bins["l1tool"], "msi-status", cfg)
    assert status.returncode == 0, status.stderr
    assert workloads.parse_l1tool(status.stdout) == {"msi_cap": "0x50", "control": "0x0081", "enabled": 1}
    proc = run(bins["l1tool"], "msi-disable", cfg)
    assert proc.returncode == 0, proc.stderr
    assert workloads.parse_l1tool(proc.stdout) == {"msi_cap": "0x50", "control_before": "0x0081",
                                                   "control_after": "0x0080"}
    after = cfg.read_bytes()
    assert after[0x52] == 0x80 and after[:0x52] == original[:0x52] and after[0x53:] == original[0x53:]
    assert "enabled=0" in run(bins["l1tool"], "msi-status", cfg).stdout


@pytest.mark.parametrize("caps", [
    pytest.param(_config_space([(0x40, 0x01, b""), (0x60, 0x11, b"")]), id="msix-only"),
    pytest.param(_config_space([(0x50, 0x05, b"\x81\x00")], status_caps=False), id="no-cap-list"),
    pytest.param(_config_space([(0x40, 0x01, b"")])[:0x41] + b"\x40" + bytes(256 - 0x42), id="looping-list"),
])
def test_l1tool_msi_without_an_msi_capability_fails(bins, tmp_path, caps):
    cfg = tmp_path / "config"
    cfg.write_bytes(caps)
    assert run(bins["l1tool"], "msi-status", cfg, timeout=5).returncode == 1
    assert run(bins["l1tool"], "msi-disable", cfg, timeout=5).returncode == 1
    assert cfg.read_bytes() == caps


def test_l1tool_usage_errors(bins, tmp_path):
    assert run(bins["l1tool"]).returncode == 2
    assert run(bins["l1tool"], "digest", tmp_path / "missing").returncode == 2
    assert run(bins["l1tool"], "flip", tmp_path / "missing", "--offset", 0).returncode == 2
    assert run(bins["l1tool"], "msi-status", tmp_path / "missing").returncode == 2


# -- blkcheck ---------------------------------------------------------------------------------

BS = 4096


def bc_start(bins, d: Path, daemons: list, mib: int = 8, iops: int | None = None,
             extra: tuple = ()) -> tuple[Path, dict]:
    daemons.append(d)
    dev = d / "disk"
    args = ["start", "--dev", dev, "--dir", d, "--mib", mib, "--seed", 99, *extra]
    if iops is not None:
        args += ["--iops", iops]
    proc = run(bins["blkcheck"], *args)
    assert proc.returncode == 0, proc.stderr
    ready = workloads.parse_blkcheck(proc.stdout)
    assert ready["kind"] == "ready" and ready["blocks"] == mib * 256 and ready["bs"] == BS
    assert dev.stat().st_size == mib << 20
    return dev, ready


def bc_verify(bins, d: Path) -> tuple[int, dict]:
    proc = run(bins["blkcheck"], "verify", "--dir", d, "--timeout", 20)
    assert proc.returncode in (0, 1), proc.stderr
    result = workloads.parse_blkcheck(proc.stdout, "result")
    assert result["kind"] == "result"
    # The harness's reading of blkcheck's exit status (checks.dma_verdict) matches the binary.
    assert workloads.blkcheck_problems({**result, "exit_status": proc.returncode}) == []
    return proc.returncode, result


def test_blkcheck_crc32c_selftest(bins):
    proc = run(bins["blkcheck"], "selftest")
    assert proc.returncode == 0 and "0xe3069283 ok" in proc.stdout


def test_blkcheck_clean_run_counts_every_io(bins, tmp_path, daemons):
    _, ready = bc_start(bins, tmp_path, daemons, mib=8, iops=1000)
    assert ready["write_mib_per_s"] > 0 and isinstance(ready["direct"], bool)
    time.sleep(1.2)
    stats = workloads.parse_blkcheck(run(bins["blkcheck"], "status", "--dir", tmp_path).stdout)
    assert stats["kind"] == "stats" and stats["loop_reads"] > 0
    rc, result = bc_verify(bins, tmp_path)
    assert rc == 0
    assert result["blocks_checked"] == 8 * 256 and result["bad_blocks"] == 0 and result["first_bad"] == []
    assert result["io_errors"] == 0 and result["ios_submitted"] == result["ios_completed"]
    assert result["loop_reads"] > 100 and result["loop_writes"] == result["loop_reads"]
    assert result["loop_reads"] >= stats["loop_reads"]


@pytest.mark.parametrize("buffered", [False, True], ids=["direct", "buffered"])
def test_blkcheck_catches_a_corrupted_block(bins, tmp_path, daemons, buffered):
    dev, ready = bc_start(bins, tmp_path, daemons, mib=4, extra=("--buffered",) if buffered else ())
    if buffered:  # ext4 and tmpfs accept O_DIRECT now; --buffered takes the fallback's path
        assert ready["direct"] is False
    with dev.open("r+b") as f:  # one byte of block 300's payload, through the page cache
        f.seek(300 * BS + 1000)
        old = f.read(1)[0]
        f.seek(300 * BS + 1000)
        f.write(bytes([old ^ 0x40]))
    rc, result = bc_verify(bins, tmp_path)
    assert rc == 1
    assert result["bad_blocks"] == 1
    assert result["first_bad"][0]["block"] == 300 and result["first_bad"][0]["crc_ok"] is False
    assert result["io_errors"] == 0 and result["direct"] is ready["direct"]


def test_blkcheck_catches_a_misdirected_write(bins, tmp_path, daemons):
    """A whole, self-consistent block in the wrong place: the crc is fine, the header is not."""
    dev, _ = bc_start(bins, tmp_path, daemons, mib=4, iops=0)
    with dev.open("r+b") as f:
        f.seek(3 * BS)
        block3 = f.read(BS)
        f.seek(4 * BS)
        f.write(block3)
    rc, result = bc_verify(bins, tmp_path)
    assert rc == 1 and result["bad_blocks"] == 1
    bad = result["first_bad"][0]
    assert bad["block"] == 4 and bad["actual_block"] == 3
    assert bad["crc_ok"] is True and bad["header_ok"] is False


def test_blkcheck_catches_a_lost_write(bins, tmp_path, daemons):
    """A block rolled back to an older, self-consistent version (a write that never landed)."""
    dev, _ = bc_start(bins, tmp_path, daemons, mib=4, iops=2000)
    original = dev.read_bytes()
    time.sleep(1.0)  # ~1000 rewrites over 1024 blocks
    now = dev.read_bytes()
    moved = [b for b in range(1024) if now[b * BS + 16:b * BS + 24] != bytes(8)]
    assert len(moved) > 100, "the loop rewrote (almost) nothing"
    victim = moved[len(moved) // 2]
    with dev.open("r+b") as f:
        f.seek(victim * BS)
        f.write(original[victim * BS:(victim + 1) * BS])
    rc, result = bc_verify(bins, tmp_path)
    assert rc == 1 and result["bad_blocks"] == 1
    bad = result["first_bad"][0]
    assert bad["block"] == victim and bad["actual_gen"] == 0 and bad["expected_gen"] >= 1
    assert bad["crc_ok"] is True and bad["header_ok"] is False
    assert result["io_errors"] == 0 and result["ios_submitted"] == result["ios_completed"]


def test_blkcheck_usage_errors(bins, tmp_path, daemons):
    assert run(bins["blkcheck"], "verify", "--dir", tmp_path, "--timeout", 1).returncode == 2
    assert run(bins["blkcheck"], "start", "--dir", tmp_path, "--mib", 1).returncode == 2  # no --dev
    assert run(bins["blkcheck"], "start", "--dir", tmp_path, "--dev", tmp_path / "d", "--mib", 1,
               "--bs", 1000).returncode == 2
    assert run(bins["blkcheck"], "start", "--dir", tmp_path, "--dev", tmp_path / "nodir" / "d",
               "--mib", 1).returncode == 2
    assert run(bins["blkcheck"], "status", "--dir", tmp_path).returncode == 2


# -- parsers ----------------------------------------------------------------------------------

def test_parsers_reject_garbage():
    with pytest.raises(StepError, match="no valid JSON"):
        workloads.parse_memcheck("Segmentation fault")
    with pytest.raises(StepError, match="lacks expected keys"):
        workloads.parse_blkcheck('{"blocks": 1}')
    with pytest.raises(StepError, match="not counts"):
        workloads.parse_memcheck('{"pages_checked": 3, "bad_pages": null, "writer_writes": 0, "writer_mismatches": 0, '
                                 '"verify_seconds": 0.1, "verify_mib_per_s": 1, "fill_mib_per_s": 1, "first_bad": []}')
    with pytest.raises(StepError, match="lacks expected keys"):  # a ready line where a result belongs
        workloads.parse_blkcheck('{"pid": 1, "blocks": 8, "bs": 4096, "mib": 1, "direct": true, '
                                 '"write_mib_per_s": 9.0}', "result")
    with pytest.raises(StepError):
        workloads.parse_l1tool("nothing here")
    assert workloads.parse_l1tool("digest=0012ab size=10 algo=xxh64 seconds=0.5\n") == {
        "digest": "0012ab", "size": 10, "algo": "xxh64", "seconds": 0.5}
