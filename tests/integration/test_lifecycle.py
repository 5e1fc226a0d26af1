"""Teardown always happens: no QEMU outlives the harness, whatever ends it, and logs are kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm


def qemu_pids_for(marker: Path) -> list[int]:
    """PIDs of qemu-system processes whose command line mentions ``marker`` (our run directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and str(marker) in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def start(tmp_path: Path):
    """Start the harness CLI; whatever the test does, the process does not outlive it."""
    procs: list[subprocess.Popen] = []

    def launch(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "fastrestart.cli", *args, "--results", str(tmp_path / "run")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=Path(__file__).resolve().parents[2])
        procs.append(proc)
        return proc

    yield launch
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def wait_for_qemu(tmp_path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not qemu_pids_for(tmp_path) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    assert qemu_pids_for(tmp_path), "L1's QEMU never started"


# SIGHUP takes the same path as SIGTERM (machine.Terminated); tests/unit/test_verdicts.py covers it.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_run_leaves_no_qemu_no_pass_and_keeps_logs(tmp_path, start, sig):
    proc = start("run", "--devices", "none")
    wait_for_qemu(tmp_path, proc)
    console = tmp_path / "run" / "logs" / "l1-console.log"
    deadline = time.monotonic() + 300
    while b"Linux version" not in console.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)  # mid-boot: L1's kernel is booting
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, output  # 130, 143, 129: what a shell and a CI runner expect
    assert "Traceback" not in output and f"interrupted by {signal.Signals(sig).name}" in output
    deadline = time.monotonic() + 10
    while qemu_pids_for(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_pids_for(tmp_path) == []
    assert b"Linux version" in console.read_bytes()  # the log of the layer that was booting is kept
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["verdict"] == "ERROR" and result["error"]["kind"] == "interrupted", result["reason"]
    assert result["reason"].endswith(f"interrupted by {signal.Signals(sig).name} during step prepare")
    assert "<error " in (tmp_path / "run" / "junit.xml").read_text()


def test_killed_harness_takes_its_vms_with_it(tmp_path, start):
    proc = start("rig", "check")
    wait_for_qemu(tmp_path, proc)
    os.kill(proc.pid, signal.SIGKILL)  # no handler, no finally: only PR_SET_PDEATHSIG is left
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while qemu_pids_for(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_pids_for(tmp_path) == []


@pytest.mark.parametrize("kernel", ["debian:trixie", "debian:bookworm", "debian:sid"])
def test_rig_check_reports_every_part(tmp_path, start, kernel):
    out = tmp_path / "rig.json"
    proc = start("rig", "check", "--kernel", kernel, "--json", str(out))
    output, _ = proc.communicate(timeout=900)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, output
    assert report["ok"] and report["iommu"] == {"dmar": True, "irq_remapping": True}
    assert report["accel"]["name"] in ("kvm", "tcg") and report["accel"]["reason"]
    assert {d["name"]: (d["l1_driver"], d["vendor_device"]) for d in report["devices"]} == {
        "edu": ("vfio-pci", "1234:11e8"), "nvme": ("vfio-pci", "1b36:0010")}
    assert {d["name"]: d["l2_driver"] for d in report["devices"]}["nvme"] == "nvme"
    assert report["pmem"]["ram_path"].startswith("/dev/dax")
    assert qemu_pids_for(tmp_path) == []


def test_a_stalled_l2_console_is_reconnected(tmp_path, monkeypatch):
    """Seen here: L0 got one byte of L2's READY line, then nothing, while the guest ran on. With the
    stall window shorter than any boot, the first wait always 'stalls': the run must reconnect the
    console, go on, and say so in its evidence."""
    from fastrestart.campaign.runner import Cell, run_cell
    from fastrestart.vm import rig

    monkeypatch.setattr(rig, "CONSOLE_STALL_S", 2)
    result = run_cell(Cell(devices=(), mode="ignore-shared", mem_check_mib=16), tmp_path / "run")
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    assert len(result["per_cycle"]) == 1
    flow_log = (tmp_path / "run" / "logs" / "flow.log").read_text()
    assert '"l2_console_reconnects": 1' in flow_log
    assert b"reconnected" in (tmp_path / "run" / "logs" / "l2-console.log").read_bytes()


def test_a_first_l1_boot_that_hangs_is_retried_once(tmp_path, monkeypatch):
    """L1's first boot, before anything under test happened, may hang under loaded TCG (seen: CPU0's
    tick stopped). The rig stops that L1, boots another, and the evidence names the failed try."""
    from fastrestart.campaign.runner import Cell, run_cell
    from fastrestart.errors import ConsoleTimeout
    from fastrestart.vm import console, rig

    real_expect, hung = console.Console.expect, []

    def first_boot_hangs(self, ok, *args, **kwargs):
        if ok == rig.READY_L1 and not hung:
            hung.append(self.name)
            raise ConsoleTimeout(f"{self.name}: no READY (simulated hang)")
        return real_expect(self, ok, *args, **kwargs)

    monkeypatch.setattr(console.Console, "expect", first_boot_hangs)
    result = run_cell(Cell(devices=(), mode="ignore-shared", mem_check_mib=16), tmp_path / "run")
    assert result["verdict"] == "PASS", result["reason"] or result["error"]
    flow_log = (tmp_path / "run" / "logs" / "flow.log").read_text()
    assert '"l1_failed_first_boots": ["l1: no READY (simulated hang)"]' in flow_log
    assert len(set(result["l1"]["boot_ids"])) == 2  # the kexec happened once, on the second L1
