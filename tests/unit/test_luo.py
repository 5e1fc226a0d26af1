"""Mode luo without a VM: its UNSUPPORTED reasons from a kernel's .config, what it asks of L1's
kernel command line and kexec, and the L1 helper (l1tool luo-*) run natively on L0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from fastrestart.artifacts import workloads
from fastrestart.artifacts.kernels import Kernel
from fastrestart.errors import CheckFailed, Unsupported
from fastrestart.restart import modes
from fastrestart.restart.probes import QemuCaps
from fastrestart.vm.guest import RamBackend

LUO_CONFIG = """CONFIG_KEXEC=y
CONFIG_KEXEC_FILE=y
CONFIG_KEXEC_HANDOVER=y
CONFIG_LIVEUPDATE=y
CONFIG_LIVEUPDATE_MEMFD=y
"""
DEBIAN_LIKE = """CONFIG_KEXEC=y
CONFIG_KEXEC_FILE=y
# CONFIG_KEXEC_HANDOVER is not set
CONFIG_ARCH_SUPPORTS_KEXEC_HANDOVER=y
"""


def _kernel(tmp_path: Path, config: str | None) -> Kernel:
    path = None
    if config is not None:
        path = tmp_path / ".config"
        path.write_text(config)
    return Kernel("path:x", "7.2.0-test", tmp_path / "bzImage", tmp_path, path)


def _caps(caps=("x-ignore-shared",)) -> QemuCaps:
    return QemuCaps("10.0.7", ["normal", "cpr-reboot"], list(caps), True)


# -- the mode's decisions ----------------------------------------------------------------------

def test_debian_kernel_is_unsupported_naming_every_missing_luo_option(tmp_path):
    with pytest.raises(Unsupported) as exc:
        modes.MODES["luo"].check_kernel(_kernel(tmp_path, DEBIAN_LIKE), [])
    reason = exc.value.reason
    assert reason.startswith("mode luo: kernel 7.2.0-test lacks ")
    for option in ("CONFIG_LIVEUPDATE ", "CONFIG_LIVEUPDATE_MEMFD", "CONFIG_KEXEC_HANDOVER"):
        assert option in reason
    assert "CONFIG_KEXEC_FILE" not in reason and "passthrough" not in reason


def test_kernel_without_kexec_file_is_unsupported(tmp_path):
    with pytest.raises(Unsupported, match="CONFIG_KEXEC_FILE"):
        modes.MODES["luo"].check_kernel(_kernel(tmp_path, LUO_CONFIG.replace("CONFIG_KEXEC_FILE=y", "")), [])


def test_luo_kernel_without_devices_is_supported(tmp_path):
    modes.MODES["luo"].check_kernel(_kernel(tmp_path, LUO_CONFIG), [])


def test_devices_need_the_pci_vfio_live_update_series(tmp_path):
    with pytest.raises(Unsupported) as exc:
        modes.MODES["luo"].check_kernel(_kernel(tmp_path, LUO_CONFIG), ["edu"])
    reason = exc.value.reason
    assert "passthrough kept live across kexec needs the PCI/VFIO live-update series" in reason
    assert "CONFIG_PCI_LIVEUPDATE" in reason and "CONFIG_VFIO_PCI_LIVEUPDATE" in reason
    assert "--devices none" in reason and "lacks CONFIG_LIVEUPDATE" not in reason


def test_devices_on_a_kernel_with_the_series_are_still_unsupported_by_the_helper(tmp_path):
    config = LUO_CONFIG + "CONFIG_PCI_LIVEUPDATE=y\nCONFIG_VFIO_PCI_LIVEUPDATE=y\nCONFIG_IOMMU_LIVEUPDATE=y\n"
    with pytest.raises(Unsupported, match="preserves only memfds"):
        modes.MODES["luo"].check_kernel(_kernel(tmp_path, config), ["nvme"])


def test_both_reasons_when_the_kernel_lacks_luo_and_devices_are_asked_for(tmp_path):
    with pytest.raises(Unsupported) as exc:
        modes.MODES["luo"].check_kernel(_kernel(tmp_path, DEBIAN_LIKE), ["edu", "nvme"])
    assert "CONFIG_LIVEUPDATE" in exc.value.reason and "CONFIG_PCI_LIVEUPDATE" in exc.value.reason


def test_without_a_config_the_boot_tells_but_devices_are_refused(tmp_path):
    modes.MODES["luo"].check_kernel(_kernel(tmp_path, None), [])
    with pytest.raises(Unsupported, match="PCI/VFIO live-update series"):
        modes.MODES["luo"].check_kernel(_kernel(tmp_path, None), ["edu"])


def test_other_modes_do_not_look_at_luo_options(tmp_path):
    for name in ("ignore-shared", "cpr-reboot", "hotplug", "cpr-transfer"):
        modes.MODES[name].check_kernel(_kernel(tmp_path, DEBIAN_LIKE), ["edu"])
        assert modes.MODES[name].kernel_cmdline == () and modes.MODES[name].kexec_flags == ()
        assert modes.MODES[name].ram_backend is None


def test_luo_asks_for_kho_and_liveupdate_on_every_boot_and_the_file_based_kexec():
    luo = modes.MODES["luo"]
    assert luo.kernel_cmdline == ("kho=on", "liveupdate=on")
    assert luo.kexec_flags == ("-s",) and luo.restarts_host and luo.ram_backend == "luo"


def test_luo_needs_x_ignore_shared_and_shared_ram():
    assert modes.choose("luo", _caps(), [], "fsdax", True).name == "luo"
    with pytest.raises(Unsupported, match="x-ignore-shared"):
        modes.choose("luo", _caps(caps=()), [], "fsdax", True)
    with pytest.raises(Unsupported, match="shared memfd"):
        modes.choose("luo", _caps(), [], "fsdax", False)


def test_auto_never_picks_luo():
    assert "luo" not in modes.AUTO_ORDER
    assert modes.choose("auto", _caps(), [], "fsdax", True).name != "luo"


class _Shell:
    """L1's shell answering l1tool the way the helper does."""

    def __init__(self, retrieve: str):
        self.retrieve = retrieve
        self.commands: list[str] = []

    def check(self, cmd: str, timeout: float = 60, step: str = "console") -> str:
        self.commands.append(cmd)
        if "luo-hold" in cmd:
            return "session=fastrestart-l2 pid=77 ram_path=/proc/77/fd/3 state_path=/proc/77/fd/4 ram_size=268435456"
        return "preserved=2"

    def run(self, cmd: str, timeout: float = 60, step: str = "console") -> tuple[int, str]:
        self.commands.append(cmd)
        if "luo-retrieve" in cmd:
            return 0, self.retrieve
        return 0, ""


def _context(shell: _Shell, ram_path: str = "") -> modes.RestartContext:
    from types import SimpleNamespace

    rig = SimpleNamespace(sh=shell, config=SimpleNamespace(l2_mem_mib=256))
    return modes.RestartContext(rig=rig, caps=_caps(), l2=None, ram_path=ram_path, ignore_shared=True,
                                workloads=None, new_l2=lambda **_: None)


def test_luo_returns_where_l2s_ram_lives_and_keeps_its_memfds_itself():
    """The mode changes nothing in the flow: the RAM path comes back in its Outcome, and what it
    keeps between its steps lives in its own instance (a fresh one per run)."""
    luo = modes.choose("luo", _caps(), [], "fsdax", True)
    assert luo is not modes.MODES["luo"] and luo is not modes.choose("luo", _caps(), [], "fsdax", True)
    shell = _Shell("pid=88 ram_path=/proc/88/fd/5 state_path=/proc/88/fd/6 state_size=4096")
    held = luo.prepare_ram(_context(shell))
    assert held.ram_path == "/proc/77/fd/3" and held.l2 is None and held.facts["luo_hold"]["pid"] == 77
    assert luo.state_path() == "/proc/77/fd/4" and modes.MODES["luo"].held == {}
    luo.saved_state_bytes = 4096  # what the save wrote
    back = luo.reserve(_context(shell, ram_path="/proc/77/fd/3"))
    assert back.ram_path == "/proc/88/fd/5" and luo.state_path() == "/proc/88/fd/6"
    luo.saved_state_bytes = 8192
    with pytest.raises(CheckFailed, match="came back from LUO with 4096 bytes, not 8192"):
        luo.reserve(_context(shell))


def test_other_modes_keep_their_state_in_the_state_region():
    assert modes.choose("cpr-reboot", _caps(), [], "fsdax", True).state_path() == modes.STATE_FILE
    assert modes.choose("cpr-reboot", _caps(), [], "fsdax", True).prepare_ram(_context(_Shell(""))).ram_path is None


def test_luo_ram_backend_maps_the_helpers_memfd_shared():
    args = RamBackend("luo", 256, "/proc/123/fd/3").args()
    assert args == ["-object", "memory-backend-file,id=mem,size=256M,mem-path=/proc/123/fd/3,share=on"]


# -- the L1 helper, natively ---------------------------------------------------------------------

GCC_MISSING = "gcc is missing: l1tool cannot be built (apt-get install gcc libc6-dev)"


@pytest.fixture(scope="module")
def l1tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip(GCC_MISSING)
    return workloads.build("l1tool", tmp_path_factory.mktemp("bin"))


def run(binary: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def luo_dir(tmp_path):
    """The helper's directory; its daemon never outlives the test."""
    directory = tmp_path / "luo"
    yield directory
    pidfile = directory / "l1tool.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text())
        try:
            if b"l1tool" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def test_abi_matches_the_kernels_uapi_header(l1tool):
    """include/uapi/linux/liveupdate.h: _IO(0xBA, nr), structs that start with their size."""
    out = workloads.parse_l1tool(run(l1tool, "luo-abi").stdout)
    assert out["session_arg_size"] == 4 + 4 + 64  # size, fd, name[LIVEUPDATE_SESSION_NAME_LENGTH]
    assert out["fd_arg_size"] == 16 and out["token_offset"] == 8  # size, fd, __aligned_u64 token
    assert out["finish_arg_size"] == 8  # size, reserved

    def io(nr: int) -> str:  # _IO(type, nr) on x86: no size, no direction bits
        return hex((0xBA << 8) | nr)

    assert out["create_session"] == io(0x00) and out["retrieve_session"] == io(0x01)
    assert out["preserve_fd"] == io(0x40) and out["retrieve_fd"] == io(0x41) and out["finish"] == io(0x42)
    assert (out["ram_token"], out["state_token"]) == (1, 2)


def test_hold_gives_memfds_that_proc_paths_reach(l1tool, luo_dir):
    proc = run(l1tool, "luo-hold", "--dir", luo_dir, "--ram-size", 4 << 20)
    assert proc.returncode == 0, proc.stderr
    held = workloads.parse_l1tool(proc.stdout)
    assert held["ram_size"] == 4 << 20 and held["state_size"] == 0 and held["session"] == "fastrestart-l2"
    assert held["ram_path"] == f"/proc/{held['pid']}/fd/{held['ram_fd']}"
    assert os.stat(held["ram_path"]).st_size == 4 << 20
    # What QEMU's exec:cat does with the device state, and L1's digest of the RAM.
    Path(held["state_path"]).write_bytes(b"device state")
    assert Path(held["state_path"]).read_bytes() == b"device state"
    digest = workloads.parse_l1tool(run(l1tool, "digest", held["ram_path"]).stdout)
    assert digest["size"] == 4 << 20
    # A second daemon in the same directory is refused.
    assert run(l1tool, "luo-hold", "--dir", luo_dir, "--ram-size", 4096).returncode == 2


@pytest.mark.skipif(Path("/dev/liveupdate").exists(), reason="this host has LUO: preserving would succeed")
def test_preserve_without_liveupdate_fails_with_the_operation_and_the_daemon_stays(l1tool, luo_dir):
    held = workloads.parse_l1tool(run(l1tool, "luo-hold", "--dir", luo_dir, "--ram-size", 8192).stdout)
    proc = run(l1tool, "luo-preserve", "--dir", luo_dir)
    assert proc.returncode == 1
    out = workloads.parse_l1tool(proc.stdout)
    assert out["preserved"] == 0 and out["failed"] == "open_/dev/liveupdate" and out["errno"] == 2
    assert Path(held["ram_path"]).exists()  # still holding: the harness can report and tear down
    assert run(l1tool, "luo-stop", "--dir", luo_dir).returncode == 0


@pytest.mark.skipif(Path("/dev/liveupdate").exists(), reason="this host has LUO")
def test_retrieve_without_liveupdate_fails_and_says_why(l1tool, luo_dir):
    proc = run(l1tool, "luo-retrieve", "--dir", luo_dir, "--ram-size", 8192)
    assert proc.returncode == 1 and "/dev/liveupdate" in proc.stderr


@pytest.mark.parametrize("args", [["luo-hold", "--ram-size", "4096"], ["luo-hold", "--dir", "{dir}"],
                                  ["luo-hold", "--dir", "{dir}", "--ram-size", "0"],
                                  ["luo-retrieve", "--dir", "{dir}", "--session", "s" * 64],
                                  ["luo-preserve", "--dir"], ["luo-hold", "--dir", "{dir}", "--bogus", "1"]])
def test_usage_errors_exit_2(l1tool, luo_dir, args):
    assert run(l1tool, *(a.format(dir=luo_dir) for a in args)).returncode == 2
