"""The fast-restart flow, step by step, as docs/design.md §5 tells it.

    prepare → [ save → record → kexec → boot → reserve → enumerate → reload → restore → resume ] × cycles → verify

Every step is a method decorated with ``@step``: it is timed, it leaves its evidence in the
result and in ``flow.log``, and a failure inside it names it. A mode without a host restart
(cpr-transfer) skips kexec to reload.

From the moment ``save`` starts, the system under test is in play: whatever fails from then on is
the restart's FAIL unless the rig is proven at fault (runner.attribute decides, from the step
recorded here and the evidence).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastrestart.errors import CheckFailed, ConsoleTimeout, GuestPanic, ReservationMissing, RigFault, StepError
from fastrestart.restart import checks, faults
from fastrestart.restart.modes import Mode, Outcome, RestartContext
from fastrestart.restart.probes import QemuCaps
from fastrestart.vm.guest import DEAD_RUNSTATES, L2Machine, L2Spec
from fastrestart.vm.qmp import Qmp
from fastrestart.vm.rig import BOOT_DEADLINE_S, READY_L1, Rig

PCI_COMMAND_BITS = {"I/O Space": 0x1, "Memory Space": 0x2, "Bus Master": 0x4}
PHASES = ["prepare", "save", "record", "kexec", "boot", "reserve", "enumerate", "reload", "restore",
          "resume", "verify"]
REMAPPED_IOMMU = ["Translation was enabled", "not in kdump mode", "Copied translation tables",
                  "IRQ remapping was enabled"]


@dataclass
class FlowOptions:
    cycles: int = 1
    inject: str | None = None
    mem_check_mib: int | None = None
    l1_digest: bool = True
    host_restart: str = "kexec"  # kexec | firmware: how L1 restarts (a firmware reboot is the slow baseline)


def step(name: str) -> Callable:
    """Time a flow step, record its evidence and name it in any failure."""

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(self: Flow, *args, **kwargs):
            self.current_step = name
            self.restart_begun = self.restart_begun or name == "save"
            self.progress(name)
            started = time.monotonic()
            try:
                evidence = method(self, *args, **kwargs) or {}
            except StepError as exc:
                if exc.step not in PHASES:
                    exc.evidence.setdefault("detail", exc.step)
                    exc.step = name
                raise
            except ConsoleTimeout as exc:
                raise StepError(name, str(exc)) from exc
            # Anything else propagates as it is: a GuestPanic or CheckFailed keeps its meaning, and
            # a Python error is the harness's own (an ERROR with its traceback, never a FAIL).
            finally:
                elapsed = time.monotonic() - started
                phases = self.cycle_record.setdefault("phases", {})
                phases[name] = round(phases.get(name, 0) + elapsed, 3)
                self.log(f"step {name} took {elapsed:.3f} s")
            self.cycle_record.setdefault("evidence", {})[name] = evidence
            self.log(f"step {name} evidence: {json.dumps(evidence, default=str)[:2000]}")
            return evidence

        return wrapper

    return decorate


class Flow:
    """One fast-restart run on a rig, in a chosen mode."""

    def __init__(self, rig: Rig, mode: Mode, caps: QemuCaps, options: FlowOptions,
                 progress: Callable[[str], None] = lambda _: None):
        self.rig = rig
        self.mode = mode
        self.caps = caps
        self.options = options
        self.report_progress = progress
        self.l2: L2Machine | None = None  # the generation that runs the guest now (also rig.l2)
        self.l2_spec: L2Spec | None = None  # the arguments of the latest generation
        self.ram_path = ""  # where L2's RAM lives now (a mode may move it: luo)
        self.cycle = 0
        self.cycles: list[dict] = []
        self.prepare_record: dict = {"cycle": 0}
        self.verify_record: dict = {"cycle": "verify"}
        self.cycle_record = self.prepare_record
        self.l1_boot_ids: list[str] = []
        self.l1_releases: list[str] = []
        self.workloads: checks.Workloads | None = None
        self.readings: dict = {}
        self.findings: dict[str, dict] = {}
        self.pci_commands_before: dict[str, int] = {}
        self.stop_qmp: Qmp | None = None  # the QMP link that sees the save's STOP or SUSPEND
        self.stop_marker = 0  # how many events that link had before the save
        self.kexec_started: float | None = None  # monotonic time of `kexec -e` (or the firmware reboot)
        self.restore_observed_at: float | None = None  # wall time the restore step saw the new QEMU
        self.fault = faults.fault(options.inject)
        self.current_step = "prepare"
        self.restart_begun = False  # set when `save` starts: from then on a failure is the restart's
        self.cycles_completed = 0
        # A mode may need L1 kernel parameters on every boot, and its own home for L2's RAM.
        rig.extra_cmdline = list(mode.kernel_cmdline)
        if mode.ram_backend:
            rig.config.ram_backend = mode.ram_backend
        self.ignore_shared = rig.config.shared_ram  # False: the save copies L2's RAM into the state file
        self.l2_overrides: dict = {}  # L2 options kept identical across modes (the bench mixes them)
        self._flow_log = (rig.log_dir / "flow.log").open("a")

    # -- plumbing ----------------------------------------------------------------------------
    def log(self, text: str) -> None:
        self._flow_log.write(f"{time.strftime('%H:%M:%S')} [cycle {self.cycle}] {text}\n")
        self._flow_log.flush()

    def progress(self, name: str) -> None:
        self.log(f"step {name} starts")
        self.report_progress(f"cycle {self.cycle}: {name}" if self.cycle else name)

    def l2_machine(self, incoming: list[str] | None = None, plug_vfio: bool = True,
                   connect: bool = True) -> L2Machine:
        """The next L2 generation with this run's arguments (the same for every generation), not
        launched. A first boot waits for READY; an incoming QEMU does not."""
        self.l2_spec = self.rig.l2_spec(self.ram_path, **{**self.mode.l2_options(self.rig.config.devices),
                                                          **self.l2_overrides})
        return self.rig.l2_machine(self.l2_spec, incoming=incoming, plug_vfio=plug_vfio, connect=connect)

    def use_l2(self, l2: L2Machine) -> None:
        """From now on ``l2`` runs the guest."""
        self.l2 = l2
        self.rig.l2 = l2

    def context(self) -> RestartContext:
        """What the mode may see of this run, as it is now."""
        return RestartContext(rig=self.rig, caps=self.caps, l2=self.l2, ram_path=self.ram_path,
                              ignore_shared=self.ignore_shared, workloads=self.workloads,
                              new_l2=self.l2_machine, log=self.log)

    def adopt(self, outcome: Outcome) -> dict:
        """Take what a mode made (a new L2 generation, a new home for L2's RAM); its facts are the
        step's evidence."""
        if outcome.l2 is not None:
            self.use_l2(outcome.l2)
        if outcome.ram_path is not None:
            self.ram_path = outcome.ram_path
        return outcome.facts

    def judge_l2_silence(self, exc: Exception) -> None:
        """L2 stopped answering after the restart. That is the restart's FAIL (liveness), named by
        what L1 sees, unless the rig's own transport is proven at fault: L1 answers, L2's QEMU runs
        and the guest answers on a new console connection while the old one stays silent."""
        step = self.current_step
        try:
            l1_answers = self.rig.sh.run("true", timeout=20, step=step)[0] == 0
        except (StepError, ConsoleTimeout, GuestPanic) as silent:  # L1 itself hung or panicked
            l1_answers, exc = False, silent
        if not l1_answers:
            raise CheckFailed("liveness", f"L1 stopped answering after the restart (step {step}): "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
                              {"step": step, "console": str(exc)[:500]}) from exc
        try:
            status = self.l2.qmp.cmd("query-status", step="liveness", timeout=10)["status"]
        except StepError:
            status = "unknown (QMP gone)"
        alive = self.l2.is_running()
        # The lines that say what happened, not the register dump QEMU prints after them.
        _, qemu_log = self.rig.sh.run(f"grep -iE 'error|fail|warning' {self.l2.log_path} | tail -5 | cut -c1-300")
        # What L1 saw happen to the devices meanwhile is often the cause: say it here, since the
        # checks that would report it can no longer run.
        seen_in_l1 = [finding for found in self.findings.values() for finding in found.values()
                      if isinstance(finding, str)]
        evidence = {"step": step, "console": str(exc)[:500], "runstate": status, "l2 qemu alive": alive,
                    "l2 qemu log": qemu_log, "l1 findings": self.findings}
        if status in DEAD_RUNSTATES or not alive:
            what = f"its QEMU reports runstate {status}" if alive else "its QEMU exited"
            reason = "; ".join([f"L2 stopped after the restart: {what}", *seen_in_l1])
            raise CheckFailed("liveness", reason, evidence) from exc
        if self.l2_console_is_stalled():
            raise RigFault(f"L2's console forward stalled in step {step}: L1 answers, L2's QEMU runs ({status}) "
                           "and the guest answers on a new connection", evidence, step=step) from exc
        reason = "; ".join([f"L2 stopped answering after the restart (step {step}) while its QEMU reports "
                            f"{status}", *seen_in_l1])
        raise CheckFailed("liveness", reason, evidence) from exc

    def l2_console_is_stalled(self) -> bool:
        """True when L2's old console connection stays silent while a new one gets an answer: the
        forward (L0 user-net → L1 → chardev) broke, not the guest."""
        try:
            self.l2.console.sync(timeout=10)
            return False  # the old connection answers after all: the guest was slow, not the rig
        except (StepError, ConsoleTimeout, GuestPanic):
            pass
        try:
            self.l2.reconnect_console()
            self.l2.console.sync(timeout=30)
        except (StepError, ConsoleTimeout, GuestPanic, OSError):
            return False
        return True

    # -- the flow ---------------------------------------------------------------------------
    def run(self) -> None:
        self.prepare()
        for cycle in range(1, self.options.cycles + 1):
            self.begin_cycle(cycle)
            self.restart_cycle()
        self.cycle_record = self.verify_record
        self.verify()

    def restart_cycle(self) -> None:
        """One restart, docs/design.md §5 steps 1-9 (a mode without a host restart skips kexec to reload)."""
        self.save()
        self.record()
        if self.mode.restarts_host:
            if self.options.host_restart == "firmware":
                self.reboot()
            else:
                self.kexec()
            self.boot()
            self.reserve()
            self.enumerate()
            self.reload()
        self.restore()
        self.resume()
        self.end_cycle()

    def begin_cycle(self, cycle: int) -> None:
        self.cycle = cycle
        self.cycle_record = {"cycle": cycle}
        self.cycles.append(self.cycle_record)

    @step("prepare")
    def prepare(self) -> dict:
        boot = self.rig.boot_l1()
        facts = {**self.rig.l1_facts(), "tsc_khz": boot["tsc_khz"]}
        self.l1_boot_ids.append(facts["boot_id"])
        self.l1_releases.append(facts["release"])
        iommu = self.rig.iommu_state()
        if not (iommu["dmar"] and iommu["irq_remapping"]):
            raise StepError("prepare", "L1 came up without DMAR or IRQ remapping", {"dmesg": iommu["log"]})
        marks = {"l1_boot": round(boot["seconds"], 2)}
        started = time.monotonic()

        def mark(name: str) -> None:
            marks[name] = round(time.monotonic() - started, 2)
            self.log(f"prepare: {name} done at +{marks[name]} s")

        pmem = self.rig.setup_pmem(fresh=True)
        self.ram_path = pmem["ram_path"]
        pmem.update(self.adopt(self.mode.prepare_ram(self.context())))
        mark("pmem")
        drivers = self.rig.bind_vfio()
        mark("vfio")
        self.use_l2(self.l2_machine().launch())
        mark("l2_boot")
        self.readings["last"] = checks.liveness_reading(self.l2, self.rig)
        self.workloads = checks.Workloads(self.rig, self.options.mem_check_mib)
        self.workloads.start(self.l2)
        if self.fault is not None and self.fault.name == "dma-corrupt" and "edu" in self.workloads.devices:
            self.workloads.edu_slots = self.workloads.slot_gpas(self.l2, 64)
        mark("workloads")
        # The rig's own retries first: flow.log keeps only the head of long evidence.
        return {"timeline_s": marks, "l1_failed_first_boots": boot["failed_attempts"],
                "l2_console_reconnects": self.l2.console_reconnects, "l1": facts, "pmem": pmem,
                "l1_drivers": drivers, "l2_devices": self.workloads.devices, "workloads": self.workloads.ready}

    @step("save")
    def save(self) -> dict:
        self.readings["before"] = checks.liveness_reading(self.l2, self.rig)
        checks.require_counting(self.readings.get("last"), self.readings["before"])
        if self.devices_stay_attached:
            self.pci_commands_before = self.rig.pci_commands()
        self.stop_marker = len(self.l2.qmp.events)
        self.stop_qmp = self.l2.qmp
        facts = self.adopt(self.mode.save(self.context()))
        facts["stopped_at"] = checks.first_event_time(self.stop_qmp, self.stop_marker, ["SUSPEND", "STOP"])
        return facts

    @step("record")
    def record(self) -> dict:
        record = {"devices": [d.l1_bdf for d in self.rig.devices], "memmap": self.rig.layout.memmap(),
                  "cmdline": self.rig.l1_cmdline(), "state_file": self.mode.state_path(),
                  "ram_path": self.ram_path, "l2_args": self.l2_spec.args()}
        self.rig.sh.check(f"echo '{json.dumps(record)}' > /mnt/state/record.json", step="record")
        facts = {"record": record}
        if self.options.l1_digest and self.mode.restarts_host and self.ram_path:
            facts["ram_digest_before"] = faults.digest(self.rig, self.ram_path, self.rig.config.l2_mem_mib)
        facts.update(faults.inject(self, "record"))
        return facts

    @step("kexec")
    def kexec(self) -> dict:
        sh = self.rig.sh
        sh.check("sync; umount /sysroot/mnt/state; umount /sysroot/mnt/ram 2>/dev/null; true", step="kexec")
        append = self.rig.l1_cmdline(with_memmap=not (self.fault and self.fault.kexec_without_memmap))
        started = time.monotonic()
        flags = "".join(f" {flag}" for flag in self.mode.kexec_flags)
        sh.check(f"chroot /sysroot kexec{flags} -l /boot/to/vmlinuz --initrd=/boot/to/initrd --append='{append}'",
                 timeout=300, step="kexec")
        loaded = time.monotonic() - started
        self.kexec_started = time.monotonic()
        sh.send("chroot /sysroot kexec -e")
        sh.expect(r"Linux version \S+", timeout=BOOT_DEADLINE_S, step="kexec")
        return {"load_s": round(loaded, 3), "to_first_line_s": round(time.monotonic() - self.kexec_started, 3),
                "append": append, "kexec_flags": list(self.mode.kexec_flags)}

    @step("reboot")
    def reboot(self) -> dict:
        """The baseline a fast restart competes with: L1 reboots through its firmware (SeaBIOS or
        OVMF), which loads the same -kernel/-append again. Same unmount as the kexec step; then the
        kernel's emergency restart resets the machine."""
        sh = self.rig.sh
        if self.rig.artifacts.kernel_to != self.rig.artifacts.kernel_from:
            raise StepError("reboot", "a firmware reboot boots L1's -kernel again; it cannot switch kernels")
        sh.check("sync; umount /sysroot/mnt/state; umount /sysroot/mnt/ram 2>/dev/null; true", step="reboot")
        self.kexec_started = time.monotonic()
        sh.send("echo b > /proc/sysrq-trigger")
        sh.expect(r"Linux version \S+", timeout=BOOT_DEADLINE_S, step="reboot")
        return {"firmware": self.rig.config.firmware,
                "to_first_line_s": round(time.monotonic() - self.kexec_started, 3)}

    @step("boot")
    def boot(self) -> dict:
        first_line = time.monotonic()
        self.rig.sh.expect(r"fastrestart-l1: init on", timeout=BOOT_DEADLINE_S, step="boot")
        at_init = time.monotonic()
        ready = self.rig.sh.expect(READY_L1, timeout=BOOT_DEADLINE_S, step="boot")
        at_ready = time.monotonic()
        self.rig.sh.sync()
        facts = self.rig.l1_facts()
        self.l1_boot_ids.append(facts["boot_id"])
        self.l1_releases.append(facts["release"])
        expected = self.rig.artifacts.kernel_to.release
        if facts["release"] != expected:
            raise StepError("boot", f"L1 booted {facts['release']}, not the target {expected}")
        if facts["boot_id"] == self.l1_boot_ids[-2]:
            raise StepError("boot", "L1's boot_id did not change: no new kernel booted")
        return {**facts, "tsc_khz": self.rig.tsc_khz(),
                "kexec_to_init_s": round(time.monotonic() - self.kexec_started, 3),
                "first_line_to_init_s": round(at_init - first_line, 3),
                "init_to_ready_s": round(at_ready - at_init, 3), "uptime_at_ready_s": float(ready.group(1)),
                **faults.inject(self, "boot")}

    @step("reserve")
    def reserve(self) -> dict:
        try:
            pmem = self.rig.setup_pmem(fresh=False)
        except ReservationMissing as exc:  # the evidence decides, whatever was injected
            raise CheckFailed("memory", "L2 RAM is gone: the new kernel has no PMEM region where it was",
                              {"reason": exc.message, **exc.evidence}) from exc
        facts = {"pmem": pmem, **self.adopt(self.mode.reserve(self.context()))}
        state = self.rig.sh.run(f"stat -L -c %s {self.mode.state_path()}")
        facts["state_file_bytes"] = state[1].strip() if state[0] == 0 else "missing"
        before = self.cycle_record.get("evidence", {}).get("record", {}).get("ram_digest_before")
        if before:
            after = faults.digest(self.rig, pmem["ram_path"] or self.ram_path, self.rig.config.l2_mem_mib)
            facts["ram_digest_after"] = after
            if after["digest"] != before["digest"]:
                self.findings.setdefault("memory", {})[f"cycle {self.cycle} L1 digest"] = {
                    "before": before["digest"], "after": after["digest"]}
        return facts

    @step("enumerate")
    def enumerate(self) -> dict:
        drivers = self.rig.bind_vfio()
        wrong = {name: drv for name, drv in drivers.items() if drv != "vfio-pci"}
        if wrong:
            raise StepError("enumerate", f"devices not bound to vfio-pci after the kexec: {wrong}")
        return {"l1_drivers": drivers}

    @step("reload")
    def reload(self) -> dict:
        _, log = self.rig.sh.run("dmesg | grep -iE 'DMAR|IOMMU|remapp' | head -60")
        seen = [pattern for pattern in REMAPPED_IOMMU if pattern in log]
        faults_seen = checks.dmar_faults(log)
        if faults_seen:
            self.findings.setdefault("interrupts", {})[f"cycle {self.cycle} DMAR faults"] = faults_seen
        return {"inherited_iommu_messages": seen, "dmar_faults": faults_seen}

    @step("restore")
    def restore(self) -> dict:
        injected = faults.inject(self, "restore")
        facts = self.adopt(self.mode.restore(self.context()))
        facts.update(injected)
        if self.devices_stay_attached:
            facts["pci_command"] = self.watch_pci_commands()
        self.restore_observed_at = time.time()
        return facts

    @property
    def devices_stay_attached(self) -> bool:
        """The host keeps running (cpr-transfer): nothing may touch the devices' setup meanwhile."""
        return bool(self.rig.devices) and not self.mode.restarts_host

    def watch_pci_commands(self) -> dict:
        """A new QEMU that takes over must not touch the physical function: Memory Space or Bus
        Master Enable cleared behind the guest's back stops its DMA and makes its BAR accesses
        fault ("kvm run failed Bad address"). Seen with QEMU 11.1's cpr-transfer."""
        after = self.rig.pci_commands()
        evidence = {}
        for name, before in self.pci_commands_before.items():
            lost = [bit for bit, mask in PCI_COMMAND_BITS.items() if before & mask and not after[name] & mask]
            evidence[name] = {"before_save": f"{before:#06x}", "after_restore": f"{after[name]:#06x}", "cleared": lost}
            if lost:
                bits = " and ".join([", ".join(lost[:-1]), lost[-1]] if len(lost) > 1 else lost)
                self.findings.setdefault("dma", {})[f"cycle {self.cycle} {name}"] = (
                    f"{name}'s PCI Command register in L1 lost {bits} during the restore "
                    f"({before:#06x} -> {after[name]:#06x})")
        return evidence

    @step("resume")
    def resume(self) -> dict:
        since = 0 if not self.mode.restarts_host else len(self.l2.qmp.events)
        try:
            facts = self.adopt(self.mode.resume(self.context()))
        except StepError as exc:  # e.g. `cont` refused: "Resetting the Virtual Machine is required"
            self.judge_l2_silence(exc)
            raise
        # A guest that was already running when L0 connected (cpr-transfer's autostart) sends no
        # RESUME that L0 could still see: waiting for one only costs 10 s of wall time.
        wait = 0 if facts.get("resumed_with") == "autostart" else 10
        try:
            facts["resumed_at"] = checks.first_event_time(self.l2.qmp, since, ["RESUME", "WAKEUP"], wait=wait)
        except StepError:
            # cpr-transfer's new QEMU starts the guest before L0 can listen to it: the moment
            # L0 saw it running is an upper bound.
            facts["resumed_at"] = self.restore_observed_at
            facts["resume_observed_by"] = "query-status (upper bound)"
        facts["downtime_qmp_s"] = round(facts["resumed_at"] - self.cycle_record["evidence"]["save"]["stopped_at"], 3)
        try:
            self.readings["after"] = checks.liveness_reading(self.l2, self.rig)
        except (StepError, ConsoleTimeout) as exc:
            self.judge_l2_silence(exc)
            raise
        facts.update(faults.inject(self, "resume"))
        return facts

    def end_cycle(self) -> None:
        try:
            liveness = checks.liveness(self.readings["before"], self.readings["after"], self.l2, self.rig)
        except (StepError, ConsoleTimeout) as exc:  # the guest can die right after the resume, too
            self.judge_l2_silence(exc)
            raise
        self.cycle_record["liveness"] = liveness
        self.readings["last"] = self.readings["after"]
        self.cycles_completed += 1
        self.cycle_record["downtime_s"] = {
            "qmp": self.cycle_record["evidence"]["resume"]["downtime_qmp_s"],
            "guest": liveness["evidence"].get("guest_clock_lag_s")}
        self.log(f"cycle {self.cycle} liveness {liveness['verdict']}")

    @step("verify")
    def verify(self) -> dict:
        try:
            return {"checks": self.workloads.verify(self.l2, self.findings, self.options.inject)}
        except (StepError, ConsoleTimeout) as exc:
            # The guest can die after it resumed (seen: "kvm run failed Bad address" minutes after a
            # cpr-transfer hand-over).
            self.judge_l2_silence(exc)
            raise

    def close(self) -> None:
        self._flow_log.close()

    # -- what the result needs -------------------------------------------------------------
    def cycles_verdicts(self) -> dict:
        """Liveness over every cycle, and the checks from verify."""
        verdicts = {}
        lives = [c["liveness"] for c in self.cycles if "liveness" in c]
        if lives:
            failed = next((lv for lv in lives if lv["verdict"] != "PASS"), None)
            passed = {"verdict": "PASS", "evidence": {"cycles": [lv["evidence"] for lv in lives]}}
            verdicts["liveness"] = failed or passed
        verify = self.verify_record.get("evidence", {}).get("verify", {})
        verdicts.update(verify.get("checks", {}))
        return verdicts

    def cycles_summary(self) -> list[dict]:
        return [{"cycle": c["cycle"], "phases": c.get("phases", {}), "downtime_s": c.get("downtime_s"),
                 "evidence": c.get("evidence", {})} for c in self.cycles]


def summarize_phases(cycles: list[dict]) -> dict[str, float]:
    """Per-phase time: the mean over cycles (prepare and verify happen once)."""
    totals: dict[str, list[float]] = {}
    for record in cycles:
        for name, seconds in record.get("phases", {}).items():
            totals.setdefault(name, []).append(seconds)
    return {name: round(sum(v) / len(v), 3) for name, v in totals.items()}


def run_dir_for(results: Path | None) -> Path:
    return results or Path("results") / time.strftime("%Y%m%d-%H%M%S")
