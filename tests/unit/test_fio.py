"""fio as L2 runs it (Debian's binary and its libraries, from ``images.fio_tree``), run on L0
against a file: the data set, the writer across a pause, the fault that corrupts the data set,
and the verdicts built from what fio reports."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fastrestart.artifacts import images, workloads
from fastrestart.errors import StepError, UsageError
from fastrestart.restart import checks, faults

DISK_MIB = 256  # the size of L2's NVMe namespace


@pytest.fixture(scope="module")
def fio() -> list[str]:
    """argv prefix that runs the bundled fio here, through its own loader and libraries."""
    try:
        tree = images.fio_tree()
    except UsageError as exc:  # no mirror and no warm cache: say so, never pass silently
        pytest.fail(f"fio could not be fetched: {exc}")
    prefix = tree / images.FIO_PREFIX
    return [str(prefix / "lib" / "ld.so"), "--library-path", str(prefix / "lib"), str(prefix / "fio")]


def run_fio(fio: list[str], command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``command`` as L2's shell gets it, with "fio" standing for the bundle. Its output goes to
    files (a daemonised fio would otherwise hold the pipes open)."""
    argv = shlex.split(command)
    assert argv[0] == "fio"
    with (cwd / "fio.stderr").open("w+") as stderr:
        proc = subprocess.run([*fio, *argv[1:]], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=stderr, text=True, timeout=120)
        stderr.seek(0)
        proc.stderr = stderr.read()
    return proc


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "nvme.img"
    with path.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    return path


def dataset(fio: list[str], disk: Path, *, verify: bool) -> dict:
    out = disk.parent / ("verify.json" if verify else "write.json")
    proc = run_fio(fio, workloads.fio_dataset_command(str(disk), str(out), verify=verify), disk.parent)
    assert proc.returncode == 0, proc.stderr
    return workloads.parse_fio(out.read_text()) | {"stderr": proc.stderr}


def test_the_bundle_carries_every_library_fio_loads(fio):
    proc = subprocess.run([*fio, "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("fio-3.")


def test_a_clean_data_set_reads_back_whole(fio, disk):
    written = dataset(fio, disk, verify=False)
    assert written["error"] == 0 and written["writes"] == workloads.FIO_DATASET_MIB[1] * 256
    verified = dataset(fio, disk, verify=True)
    assert verified["error"] == 0 and verified["verify_errors"] == 0
    assert verified["reads"] == written["writes"]
    assert checks.fio_dma_problems({"dataset": verified, "across": None}) == []


def test_the_dma_corrupt_fault_is_found_in_every_block_it_hits(fio, disk):
    dataset(fio, disk, verify=False)
    flips = faults.corrupt_fio_dataset(disk)
    assert [f["block"] for f in flips] == [0, 2048, 4095]
    verified = dataset(fio, disk, verify=True)
    assert verified["verify_errors"] == len(flips)
    assert verified["reads"] == workloads.FIO_DATASET_MIB[1] * 256  # it went on to the end
    assert "crc32c: verify failed" in verified["stderr"]
    problems = checks.fio_dma_problems({"dataset": verified, "across": None})
    assert problems == ["nvme: fio found 3 bad block(s) in its data set (crc32c)"]


def test_a_data_set_that_was_never_written_fails(fio, disk):
    verified = dataset(fio, disk, verify=True)
    assert verified["verify_errors"] > 0
    assert checks.fio_dma_problems({"dataset": verified, "across": None})


def test_the_writer_runs_through_a_pause_and_stops_on_sigterm(fio, disk):
    out = disk.parent / "across.json"
    argv = shlex.split(workloads.fio_across_command(str(disk), str(out)))
    writer = subprocess.Popen([*fio, *argv[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    pid = writer.pid
    try:
        time.sleep(1)
        os.killpg(pid, signal.SIGSTOP)  # fio and its job process, as if the guest were paused
        time.sleep(1)
        os.killpg(pid, signal.SIGCONT)
        time.sleep(1.5)
    finally:
        os.kill(pid, signal.SIGTERM)  # fio finishes its I/O and writes its report
    try:
        writer.wait(timeout=30)
    except subprocess.TimeoutExpired:
        writer.kill()
        pytest.fail("fio did not exit on SIGTERM")
    across = workloads.parse_fio(out.read_text())  # after "fio: terminating on signal 15"
    assert across["error"] == 0 and across["writes"] > 50 and across["reads"] > 0
    fio_result = {"across_exited": True, "across": across,
                  "dataset": {"reads": workloads.FIO_DATASET_MIB[1] * 256, "verify_errors": 0, "error": 0}}
    assert checks.fio_dma_problems(fio_result) == []
    verdict = checks.interrupts_verdict(None, {"ios_submitted": 1, "ios_completed": 1, "io_errors": 0,
                                               "fio": fio_result}, [], {})
    assert verdict["verdict"] == "PASS", verdict


def test_a_writer_that_never_exits_is_an_interrupts_fail():
    blk = {"ios_submitted": 10, "ios_completed": 10, "io_errors": 0,
           "fio": {"across_exited": False, "dataset": {"reads": 4096}}}
    verdict = checks.interrupts_verdict(None, blk, [], {})
    assert verdict["verdict"] == "FAIL" and "did not exit" in verdict["reason"]


def test_parse_fio_names_what_it_could_not_read():
    with pytest.raises(StepError, match="fio printed no"):
        workloads.parse_fio("fio: terminating on signal 15\n")
    with pytest.raises(StepError, match="fio printed no valid JSON"):  # a job without its figures
        workloads.parse_fio('{"jobs": [{"jobname": "across", "error": 0}]}')
    with pytest.raises(StepError, match="fio printed no valid JSON"):
        workloads.parse_fio('{"jobs": [{"jobname": "across", "error": 0, "elapsed": 1, "read": null}]}')
