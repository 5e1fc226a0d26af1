"""Unit tests of the pure parts: layouts, specs, command lines, probes, modes, verdicts, consoles."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from fastrestart.artifacts.kernels import resolve
from fastrestart.cli import main
from fastrestart.errors import GuestPanic, RigFault, StepError, Unsupported, UsageError
from fastrestart.restart import checks, faults, modes
from fastrestart.restart.probes import QemuCaps, caps_from_replies
from fastrestart.vm import accel
from fastrestart.vm.console import Console
from fastrestart.vm.devices import Edu, IntelIommu, Nvme, UserNet
from fastrestart.vm.guest import L2Spec, RamBackend, VfioPci
from fastrestart.vm.rig import Layout, parse_size_mib

# -- memory layout -----------------------------------------------------------------------------

def test_layout_small_guest_sits_below_the_pci_hole_with_a_spare_section():
    layout = Layout.for_l2(256)
    assert layout.ram_offset_mib == 1024 and layout.ram_size_mib >= 256 * 66 // 64
    assert layout.state_offset_mib == layout.ram_offset_mib + layout.ram_size_mib
    assert layout.l1_mem_mib >= layout.state_offset_mib + layout.state_size_mib + 128
    assert all(v % 128 == 0 for v in (layout.ram_offset_mib, layout.ram_size_mib, layout.state_offset_mib))
    assert layout.memmap() == f"memmap={layout.ram_size_mib}M!1024M memmap=128M!{layout.state_offset_mib}M"


def test_layout_big_guest_goes_above_4g():
    layout = Layout.for_l2(2048)
    assert layout.ram_offset_mib == 4096
    assert layout.l1_mem_mib == 2048 + layout.ram_size_mib + layout.state_size_mib + 128


@pytest.mark.parametrize("bad", [63, 255, 20000])
def test_layout_rejects_impossible_sizes(bad):
    with pytest.raises(UsageError):
        Layout.for_l2(bad)


@pytest.mark.parametrize(("text", "mib"), [("256M", 256), ("2G", 2048), ("512", 512), ("1GiB", 1024)])
def test_parse_size(text, mib):
    assert parse_size_mib(text) == mib


def test_parse_size_rejects_garbage():
    with pytest.raises(UsageError):
        parse_size_mib("lots")


# -- accelerator -------------------------------------------------------------------------------

def _sysfs(tmp_path, module=None, nested=None, kvm=True):
    sys_dir, dev = tmp_path / "sys", tmp_path / "dev"
    (sys_dir / "module").mkdir(parents=True)
    dev.mkdir()
    if kvm:
        (dev / "kvm").touch()
    if module:
        params = sys_dir / "module" / module / "parameters"
        params.mkdir(parents=True)
        if nested is not None:
            (params / "nested").write_text(nested + "\n")
    return sys_dir, dev


@pytest.mark.parametrize("module", ["kvm_intel", "kvm_amd"])
@pytest.mark.parametrize("flag", ["Y", "1"])
def test_kvm_only_with_nesting(tmp_path, module, flag):
    choice = accel.detect(*_sysfs(tmp_path, module, flag))
    assert choice.name == "kvm" and module in choice.reason


def test_paravirtual_kvm_is_not_trusted(tmp_path):
    choice = accel.detect(*_sysfs(tmp_path, "kvm_pvm"))
    assert choice.name == "tcg" and "kvm_pvm" in choice.reason
    assert "+svm" in " ".join(choice.args)


def test_kvm_without_nesting_falls_back_to_tcg(tmp_path):
    assert accel.detect(*_sysfs(tmp_path, "kvm_intel", "N")).name == "tcg"


def test_no_kvm_at_all(tmp_path):
    assert accel.detect(*_sysfs(tmp_path, kvm=False)).name == "tcg"


def test_accel_override(tmp_path):
    assert accel.choose("tcg", *_sysfs(tmp_path / "a")).reason == "forced with --accel tcg"
    with pytest.raises(UsageError):
        accel.choose("kvm", *_sysfs(tmp_path / "b", kvm=False))


# -- command lines ------------------------------------------------------------------------------

def test_devices_render_their_own_arguments(tmp_path):
    assert IntelIommu().args() == ["-device", "intel-iommu,intremap=on,caching-mode=on,aw-bits=39"]
    assert Edu().args() == ["-device", "edu,addr=0x4"] and Edu().l1_bdf == "0000:00:04.0"
    nvme = Nvme(backing=tmp_path / "n.img")
    assert f"file={tmp_path / 'n.img'}" in nvme.args()[1] and "nvme,serial=fr-nvme-5" in nvme.args()[3]
    assert UserNet({1234: 4444}).args()[1].endswith("hostfwd=tcp:127.0.0.1:1234-:4444")


def test_l2_command_line_is_identical_across_generations_but_for_ports_and_incoming():
    spec = L2Spec(RamBackend("devdax", 256, "/dev/dax0.0"), vfio=[VfioPci("edu", "0000:00:04.0", 0)],
                  allow_s3=True)
    first, second = spec.args(ports=0), spec.args(ports=0, incoming=["defer"])
    # Identical but for the console not waiting for a client, and -incoming.
    assert [a.replace("wait=off", "wait=on", 1) if a.startswith("socket,id=con0") else a
            for a in second[:len(first)]] == first
    assert second[len(first):] == ["-incoming", "defer"] and "wait=off" in " ".join(second)
    line = " ".join(first)
    assert "memory-backend-file,id=mem,size=256M,mem-path=/dev/dax0.0,align=2M,share=on" in line
    assert "ICH9-LPC.disable_s3=0" in line and "vfio-pci,host=0000:00:04.0,bus=rp-edu,id=edu" in line
    assert "port=5556" in " ".join(spec.args(ports=1))
    unplugged = " ".join(spec.args(plug_vfio=False))
    assert "pcie-root-port" in unplugged and "vfio-pci" not in unplugged


# -- probes and modes ---------------------------------------------------------------------------

def _caps(version, modes_=("normal", "cpr-reboot", "cpr-transfer"), caps=("x-ignore-shared",)):
    return QemuCaps(version, list(modes_), list(caps), True)


def test_caps_are_read_from_introspection_by_enum_members():
    schema = {"return": [{"name": "123", "meta-type": "enum", "values": ["normal", "cpr-reboot"]},
                         {"name": "7", "meta-type": "enum", "values": ["socket", "exec", "rdma", "file"]},
                         {"name": "query-migrate", "meta-type": "command"}]}
    caps = caps_from_replies("9.2.0", schema, {"return": [{"capability": "x-ignore-shared", "state": False}]},
                             {"return": [{"name": "q35"}]})
    assert caps.modes == ["normal", "cpr-reboot"] and caps.has_file_uri and caps.capabilities == ["x-ignore-shared"]


def test_auto_picks_cpr_reboot_for_devices_on_qemu_10():
    assert modes.choose("auto", _caps("10.0.13"), ["edu"], "devdax", True).name == "cpr-reboot"


def test_auto_falls_back_to_hotplug_on_qemu_7_2():
    assert modes.choose("auto", _caps("7.2.22", ["normal"]), ["edu"], "devdax", True).name == "hotplug"


def test_auto_without_devices_on_qemu_7_2_is_ignore_shared():
    assert modes.choose("auto", _caps("7.2.22", ["normal"]), [], "fsdax", True).name == "ignore-shared"


def test_cpr_reboot_on_qemu_7_2_names_the_version():
    with pytest.raises(Unsupported, match=r"QEMU >= 8\.2; L1 QEMU is 7\.2"):
        modes.choose("cpr-reboot", _caps("7.2.22", ["normal"]), ["edu"], "devdax", True)


def test_cpr_transfer_with_vfio_needs_10_1():
    with pytest.raises(Unsupported, match=r"10\.1"):
        modes.choose("cpr-transfer", _caps("10.0.13"), ["edu"], "devdax", True)
    assert modes.choose("cpr-transfer", _caps("11.1.3"), ["edu"], "devdax", True).name == "cpr-transfer"


def test_fsdax_with_vfio_is_unsupported_with_the_reason():
    with pytest.raises(Unsupported, match="fsdax"):
        modes.choose("cpr-reboot", _caps("10.0.13"), ["edu"], "fsdax", True)


def test_ignore_shared_refuses_vfio():
    with pytest.raises(Unsupported, match="vfio-pci blocks migration"):
        modes.choose("ignore-shared", _caps("10.0.13"), ["nvme"], "devdax", True)


# -- specs and faults ---------------------------------------------------------------------------

class _FakeL2:
    """An L2 generation as a mode drives it: QMP commands recorded, quit, launch, close."""

    def __init__(self, pid: int, fail_on: str = ""):
        self.pid, self.fail_on, self.sent, self.quit_in, self.closed = pid, fail_on, [], None, False
        self.launch_args: dict = {}
        self.qmp = self

    def cmd(self, name, step="qmp", timeout=180, **args):
        if name == self.fail_on:
            raise StepError(step, f"{name} failed")
        self.sent.append(name)
        return {"status": "running"} if name == "query-status" else {}

    def wait_migration(self, timeout, step):
        return {"status": "completed", "total-time": 9, "downtime": 3, "ram": {"transferred": 0}}

    def launch(self):
        return self

    def quit(self, step):
        self.quit_in = step

    def close(self):
        self.closed = True


def _transfer_context(old, new):
    from types import SimpleNamespace

    def new_l2(**options):
        new.launch_args = options
        return new

    rig = SimpleNamespace(sh=SimpleNamespace(check=lambda cmd, **_: ""), devices=[])
    return modes.RestartContext(rig=rig, caps=_caps("11.1.3"), l2=old, ram_path="/dev/dax0.0", ignore_shared=True,
                                workloads=None, new_l2=new_l2)


def test_cpr_transfer_returns_the_new_qemu_for_the_flow_to_adopt():
    from types import SimpleNamespace

    from fastrestart.restart.flow import Flow

    old, new = _FakeL2(100), _FakeL2(200)
    mode = modes.choose("cpr-transfer", _caps("11.1.3"), [], "devdax", True)
    outcome = mode.save(_transfer_context(old, new))
    assert outcome.l2 is new and outcome.ram_path is None
    assert outcome.facts["old_pid"] == 100 and outcome.facts["new_pid"] == 200
    assert new.launch_args["connect"] is False and len(new.launch_args["incoming"]) == 2
    assert old.quit_in == "save" and old.sent[-1] == "migrate" and not new.closed
    # The flow adopts it: its own L2 and the rig's.
    flow = Flow.__new__(Flow)
    flow.rig, flow.l2, flow.ram_path = SimpleNamespace(l2=old), old, "/dev/dax0.0"
    assert flow.adopt(outcome) is outcome.facts
    assert flow.l2 is new and flow.rig.l2 is new and flow.ram_path == "/dev/dax0.0"
    flow.adopt(modes.Outcome({}, ram_path="/proc/9/fd/3"))
    assert flow.l2 is new and flow.ram_path == "/proc/9/fd/3"


def test_a_failed_hand_over_keeps_the_old_qemu_and_closes_the_new_one():
    old, new = _FakeL2(100, fail_on="migrate"), _FakeL2(200)
    with pytest.raises(StepError, match="migrate failed"):
        modes.choose("cpr-transfer", _caps("11.1.3"), [], "devdax", True).save(_transfer_context(old, new))
    assert new.closed and old.quit_in is None


@pytest.mark.parametrize("spec", ["debian", "debian:potato", "nfs:/x", "path:/does/not/exist"])
def test_bad_kernel_specs_are_usage_errors(spec):
    with pytest.raises(UsageError):
        resolve(spec, fetch=False)


def test_local_kernel_tree(tmp_path):
    (tmp_path / "bzImage").write_bytes(b"kernel")
    (tmp_path / "lib/modules/6.99.0-test").mkdir(parents=True)
    (tmp_path / ".config").write_text("CONFIG_KEXEC=y\n# CONFIG_LIVEUPDATE is not set\n")
    kernel = resolve(f"path:{tmp_path}")
    assert kernel.release == "6.99.0-test" and kernel.config_options() == {"CONFIG_KEXEC": "y"}


def test_gpa_to_offset_follows_the_q35_split():
    assert faults.gpa_to_offset(0x1234000, 256 << 20) == 0x1234000
    assert faults.gpa_to_offset(0x100000000 + 0x5000, 4 << 30) == 0x80000000 + 0x5000


def test_unknown_fault_is_bad_usage_and_unreachable_faults_are_unsupported():
    with pytest.raises(UsageError, match="Faults: mem-flip"):
        faults.fault("cosmic-ray")
    with pytest.raises(Unsupported, match="needs edu"):
        faults.FAULTS["irq-drop"].check_reach("cpr-reboot", True, ["nvme"])
    with pytest.raises(Unsupported, match="edu or nvme"):
        faults.FAULTS["dma-corrupt"].check_reach("cpr-reboot", True, [])
    with pytest.raises(Unsupported, match="fresh ones write over it"):
        faults.FAULTS["dma-corrupt"].check_reach("hotplug", True, ["edu", "nvme"])
    with pytest.raises(Unsupported, match="keeps the host running"):
        faults.FAULTS["mem-lost"].check_reach("cpr-transfer", False, ["edu"])
    with pytest.raises(Unsupported, match="LUO memfd"):
        faults.FAULTS["mem-lost"].check_reach("luo", True, [])
    faults.FAULTS["dma-corrupt"].check_reach("cpr-reboot", True, ["nvme"])  # fio's data set is the target
    assert {f.check for f in faults.FAULTS.values()} <= set(checks.CHECKS)
    assert set(faults.HOOKS) | {"mem-lost"} == set(faults.FAULTS)


def test_memory_verdict():
    clean = {"pages_checked": 100, "bad_pages": 0, "writer_mismatches": 0}
    assert checks.memory_verdict(clean, {})["verdict"] == "PASS"
    assert checks.memory_verdict({**clean, "bad_pages": 1}, {})["verdict"] == "FAIL"
    assert checks.memory_verdict(clean, {"digest": "changed"})["verdict"] == "FAIL"
    assert checks.memory_verdict({"pages_checked": 0}, {})["verdict"] == "FAIL"


def test_dma_and_interrupt_verdicts():
    edu = {"transfers": 10, "dma_mismatches": 0, "irq_expected": 30, "irq_received": 30}
    blk = {"bad_blocks": 0, "ios_submitted": 5, "ios_completed": 5, "io_errors": 0}
    assert checks.dma_verdict(edu, blk)["verdict"] == "PASS"
    assert checks.dma_verdict({**edu, "dma_mismatches": 2}, blk)["verdict"] == "FAIL"
    assert checks.dma_verdict(None, None)["verdict"] == "UNSUPPORTED"
    assert checks.interrupts_verdict(edu, blk, [], {})["verdict"] == "PASS"
    assert checks.interrupts_verdict({**edu, "irq_received": 29}, blk, [], {})["verdict"] == "FAIL"
    # blkcheck's I/O is synchronous: submitted vs completed cannot fail; an I/O error can.
    assert checks.interrupts_verdict(edu, {**blk, "ios_completed": 4}, [], {})["verdict"] == "PASS"
    assert checks.interrupts_verdict(edu, {**blk, "io_errors": 1}, [], {})["verdict"] == "FAIL"
    assert checks.interrupts_verdict(edu, blk, ["nvme nvme0: I/O 12 QID 1 timeout, aborting"], {})["verdict"] == "FAIL"


L1_DMESG = """\
[    2.921837] DMAR: dmar0: Using Queued invalidation
[   41.204467] DMAR: DRHD: handling fault status reg 2
[   41.204994] DMAR: [DMA Read NO_PASID] Request device [00:04.0] fault addr 0xb653000 [fault reason 0x06] \
PTE Read access is not set
[   41.300000] DMAR-IR: IRQ remapping was enabled on dmar0 but we are not in kdump mode
"""
L2_DMESG = """\
[   12.000000] nvme nvme0: 1/0/0 default/read/poll queues
[   70.123456] nvme nvme0: I/O tag 3 (0003) QID 1 timeout, aborting req_op:READ(0) size:4096
[   71.000000] irq 11: nobody cared (try booting with the "irqpoll" option)
"""


def test_log_scanners_on_real_excerpts():
    assert len(checks.dmar_faults(L1_DMESG)) == 2
    problems = checks.l2_log_problems(L2_DMESG)
    assert len(problems) == 2 and "nobody cared" in problems[1]
    assert checks.dmar_faults("DMAR: No RMRR found") == []


# -- console (against a fake shell) -----------------------------------------------------------------

class FakeShell(threading.Thread):
    """Answers the console's marker protocol the way busybox sh would, with echo on."""

    def __init__(self, sock, panic=False):
        super().__init__(daemon=True)
        self.sock, self.panic = sock, panic

    def run(self):
        buffer = b""
        while True:
            data = self.sock.recv(4096)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                text = line.decode()
                self.sock.sendall(line + b"\r\n")  # echo
                if self.panic:
                    self.sock.sendall(b"[ 9.9] Kernel panic - not syncing: Attempted to kill init!\r\n")
                    continue
                start, rest = text.split("; ", 1)
                command, end = rest.rsplit("; ", 1)
                marker = start.split()[1].replace("''", "")
                rc = 3 if command == "false" else 0
                output = "" if command in ("true", "false") else f"out of {command}\r\n"
                end_marker = end.split()[1].replace("''", "")
                self.sock.sendall(f"{marker}\r\n{output}{end_marker} {rc}\r\n# ".encode())


@pytest.fixture
def console(tmp_path):
    ours, theirs = socket.socketpair()
    FakeShell(theirs).start()
    log = (tmp_path / "console.log").open("wb")
    yield Console("fake", ours, log)
    ours.close()
    log.close()


def test_console_run_returns_rc_and_output(console):
    assert console.run("uname -r") == (0, "out of uname -r")
    assert console.run("false") == (3, "")
    with pytest.raises(StepError, match="exited 3"):
        console.check("false", step="demo")


def test_console_panic_fails_at_once(tmp_path):
    ours, theirs = socket.socketpair()
    FakeShell(theirs, panic=True).start()
    with (tmp_path / "log").open("wb") as log, pytest.raises(GuestPanic, match="Attempted to kill init"):
        Console("fake", ours, log).run("true", timeout=20)


def test_a_long_wait_ends_when_the_watchdog_says_the_guest_is_gone(tmp_path, monkeypatch):
    import time

    from fastrestart.errors import ConsoleTimeout
    from fastrestart.vm import console as console_mod

    monkeypatch.setattr(console_mod, "WATCHDOG_S", 0.2)
    ours, theirs = socket.socketpair()  # nothing ever answers
    answers = iter(["", "", "its QEMU reports runstate internal-error"])
    with (tmp_path / "log").open("wb") as log:
        silent = Console("fake", ours, log)
        silent.watchdog = lambda: next(answers)
        started = time.monotonic()
        with pytest.raises(ConsoleTimeout, match="runstate internal-error"):
            silent.run("memcheck verify", timeout=300)
    assert time.monotonic() - started < 5  # three watchdog slices, not the 300 s deadline
    theirs.close()


# -- command line -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["run", "--kernel", "debian:potato", "--results", "RESULTS"],
    ["run", "--mode", "warp-speed", "--results", "RESULTS"],
    ["run", "--mode", "cpr-rebot", "--results", "RESULTS"],
    ["run", "--inject", "cosmic-ray", "--results", "RESULTS"],
    ["run", "--cycles", "0", "--results", "RESULTS"],
    ["run", "--kernel", "path:/nonexistent", "--results", "RESULTS"],
    ["run", "--l2-mem", "lots", "--results", "RESULTS"],
    ["run", "--l2-mem", "128M", "--results", "RESULTS"],  # too small for fio, which the nvme check needs
])
def test_bad_input_exits_2_with_a_message_no_traceback_and_no_pass(tmp_path, capsys, argv):
    argv = [a.replace("RESULTS", str(tmp_path / "r")) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a bad choice before anything runs
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "fastrestart" in err and "Traceback" not in err
    left = tmp_path / "r" / "result.json"
    assert not left.exists() or json.loads(left.read_text())["verdict"] != "PASS"


def test_hotplug_segments_combine_into_one_verdict():
    good = checks.verdict("PASS", {"edu": {"transfers": 3}})
    bad = checks.verdict("FAIL", {"edu": {"transfers": 1}}, "edu: 1 DMA payload(s) corrupted")
    assert checks._combine([("across the restart", good)]) is good
    combined = checks._combine([("before unplug", good), ("after re-plug", bad)])
    assert combined["verdict"] == "FAIL" and combined["reason"].startswith("after re-plug: edu")
    assert set(combined["evidence"]) == {"before unplug", "after re-plug"}
    assert checks._combine([("before unplug", good), ("after re-plug", good)])["verdict"] == "PASS"


# -- Debian closures -------------------------------------------------------------------------------

def test_a_closure_is_what_apt_would_install_not_the_whole_archive_cache(tmp_path, monkeypatch):
    """The cache also holds kernels, other closures and superseded versions: none of them may
    leak into an image (or into its cache key)."""
    from fastrestart.artifacts.debian import AptRoot

    apt = AptRoot("trixie", root=tmp_path)
    simulated = ("NOTE: This is only a simulation!\n"
                 "Inst gcc-14-base (14.2.0-19 Debian:13.8/stable [amd64])\n"
                 "Inst libc6 (2.41-12+deb13u5 Debian:13.8/stable [amd64]) []\n"
                 "Inst qemu-system-x86 (1:10.0.6+ds-0+deb13u2 Debian:13.8/stable [amd64])\n"
                 "Inst fio-examples (3.39-1 Debian:13.8/stable [all])\n"
                 "Conf libc6 (2.41-12+deb13u5 Debian:13.8/stable [amd64])\n")
    monkeypatch.setattr(apt, "_apt", lambda *args, **kw: simulated if "-s" in args else "")
    wanted = ["fio-examples_3.39-1_all.deb", "gcc-14-base_14.2.0-19_amd64.deb",
              "libc6_2.41-12+deb13u5_amd64.deb", "qemu-system-x86_1%3a10.0.6+ds-0+deb13u2_amd64.deb"]
    assert apt.closure(["qemu-system-x86"]) == wanted
    apt.archives.mkdir(parents=True)
    for name in [*wanted, "linux-image-6.12.118+deb13-amd64_6.12.118-1_amd64.deb", "libc6_2.41-12_amd64.deb"]:
        (apt.archives / name).touch()
    assert [deb.name for deb in apt.download_closure(["qemu-system-x86"])] == wanted
    (apt.archives / wanted[0]).unlink()
    with pytest.raises(UsageError, match="fio-examples"):
        apt.download_closure(["qemu-system-x86"])


def test_a_device_setup_lost_in_l1_fails_the_dma_check_and_says_where():
    passing = checks.verdict("PASS", {"edu": {"transfers": 9}})
    assert checks.with_l1_findings(passing, {}) is passing
    finding = {"cycle 1 edu": "edu's PCI Command register in L1 lost Memory Space and Bus Master during the "
                              "restore (0x0107 -> 0x0100)"}
    failed = checks.with_l1_findings(passing, finding)
    assert failed["verdict"] == "FAIL" and "lost Memory Space and Bus Master" in failed["reason"]
    assert failed["evidence"]["edu"] == {"transfers": 9} and failed["evidence"]["l1"] == finding
    unsupported = checks.verdict("UNSUPPORTED", reason="no DMA-capable device is assigned (--devices)")
    assert checks.with_l1_findings(unsupported, finding) is unsupported


def test_a_counter_stuck_before_the_save_is_the_rigs_error_not_the_restarts_fail():
    earlier = {"l0_time": 100.0, "counter": 1, "boot_id": "b"}
    checks.require_counting(None, earlier)
    checks.require_counting(earlier, {"l0_time": 100.5, "counter": 1, "boot_id": "b"})  # too soon to tell
    checks.require_counting(earlier, {"l0_time": 103.0, "counter": 9, "boot_id": "b"})
    with pytest.raises(RigFault, match=r"has not moved for 3\.0 s before the save"):
        checks.require_counting(earlier, {"l0_time": 103.0, "counter": 1, "boot_id": "b"})
