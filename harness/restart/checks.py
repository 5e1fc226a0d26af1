"""Guest checks: liveness, memory integrity, DMA integrity and interrupt accounting.

Workloads run inside L2 (guests/workloads/*.c). They start in ``prepare``, run across the
restart, and are verified in ``verify``. Each check gives PASS, FAIL (with evidence),
UNSUPPORTED (with the reason) or NOT_RUN; a check that did not run is never a PASS.
"""

from __future__ import annotations

import errno
import re
import time
from typing import TYPE_CHECKING

from fastrestart.artifacts import workloads
from fastrestart.errors import RigFault, StepError
from fastrestart.waits import wait_until

if TYPE_CHECKING:
    from fastrestart.vm.guest import L2
    from fastrestart.vm.qmp import Qmp
    from fastrestart.vm.rig import Rig

WORK = "/run/fr"
CHECKS = ["liveness", "memory", "dma", "interrupts"]
L2_LOG_PROBLEMS = re.compile(
    r"I/O timeout|I/O \d+ QID \d+ timeout|aborting|controller is down|nobody cared|"
    r"Disabling IRQ #\d+|resetting controller|Buffer I/O error|blk_update_request: I/O error", re.I)
DMAR_FAULT = re.compile(r"DMAR: \[(?:DMA (?:Read|Write)|INTR-REMAP)[^\]]*\][^\n]*|DMAR: DRHD: handling fault[^\n]*")


def verdict(state: str, evidence: dict | None = None, reason: str = "") -> dict:
    result = {"verdict": state, "evidence": evidence or {}}
    if reason:
        result["reason"] = reason
    return result


def not_run(reason: str) -> dict:
    return verdict("NOT_RUN", reason=reason)


def dmar_faults(log: str) -> list[str]:
    """DMAR fault lines in an L1 kernel log."""
    return [m.group(0).strip() for m in DMAR_FAULT.finditer(log)]


def l2_log_problems(log: str) -> list[str]:
    """Lines in L2's kernel log that mean lost interrupts or stuck I/O."""
    return [line.strip() for line in log.splitlines() if L2_LOG_PROBLEMS.search(line)]


def first_event_time(qmp: Qmp, since: int, names: list[str], wait: float = 0) -> float:
    """L0 time at which the first of ``names`` arrived (events are timestamped on receipt)."""
    for event in qmp.events[since:]:
        if event.name in names:
            return event.received
    if wait:
        return qmp.wait_event(names, timeout=wait, since=since).received
    raise StepError("downtime", f"no {names} event was seen", {"events": [e.name for e in qmp.events[since:]]})


# -- liveness ------------------------------------------------------------------------------

def _l2_monotonic(l2: L2) -> tuple[float, float]:
    """(L0 time, L2 CLOCK_MONOTONIC) sampled together; L0 time is the round trip's midpoint."""
    sent = time.time()
    out = l2.console.check("head -3 /proc/timer_list | sed -n 's/^now at \\([0-9]*\\) nsecs/\\1/p'", step="liveness")
    back = time.time()
    return (sent + back) / 2, _number(out.strip(), int, "L2's CLOCK_MONOTONIC", out) / 1e9


def _number(text: str, kind: type, what: str, output: str) -> int | float:
    """A number read from a guest: output the restart may have garbled is a StepError (after the
    save, the restart's FAIL), never a ValueError that would look like a bug of the harness."""
    try:
        return kind(text)
    except ValueError:
        raise StepError("liveness", f"{what} came back unreadable: {text!r}", {"output": output[-500:]}) from None


def liveness_reading(l2: L2, rig: Rig) -> dict:
    l0_time, monotonic = _l2_monotonic(l2)
    output = l2.console.check("cat /proc/sys/kernel/random/boot_id /run/fr/counter; cut -d' ' -f1 /proc/uptime",
                              step="liveness")
    out = output.split()
    if len(out) != 3:
        raise StepError("liveness", "L2's boot_id, counter and uptime came back unreadable", {"output": output})
    return {"l0_time": l0_time, "l2_monotonic": monotonic, "boot_id": out[0],
            "counter": _number(out[1], int, "L2's counter", output), "uptime": _number(out[2], float, "uptime", output),
            "qemu_pid": l2.pid, "l1_boot_id": rig.l1_facts()["boot_id"]}


def require_counting(earlier: dict | None, now: dict) -> None:
    """Before a save, L2's counter must have moved since an earlier reading. If it has not, the
    guest's timers are not running (seen under a loaded TCG L1) and a liveness FAIL after the
    restart would blame the restart for it: that is the rig's ERROR (RigFault, although the save
    step has begun), before anything is tested."""
    if earlier is None or now["l0_time"] - earlier["l0_time"] < 1 or now["boot_id"] != earlier["boot_id"]:
        return
    if now["counter"] <= earlier["counter"]:
        raise RigFault(f"L2's counter has not moved for {now['l0_time'] - earlier['l0_time']:.1f} s before the "
                       f"save (still {now['counter']}): the guest's timers are not running, before anything under "
                       "test happened", {"earlier": earlier, "now": now}, step="save")


def liveness(before: dict, after: dict, l2: L2, rig: Rig) -> dict:
    """Same guest (boot_id), still alive (counter carries on and keeps counting), no reboot."""
    time.sleep(0.5)
    text = l2.console.check("cat /run/fr/counter", step="liveness").strip()
    later = _number(text, int, "L2's counter", text)
    lag = (after["l0_time"] - before["l0_time"]) - (after["l2_monotonic"] - before["l2_monotonic"])
    evidence = {"boot_id_before": before["boot_id"], "boot_id_after": after["boot_id"],
                "counter_before": before["counter"], "counter_after": after["counter"], "counter_later": later,
                "uptime_before": before["uptime"], "uptime_after": after["uptime"],
                "l1_boot_id_before": before["l1_boot_id"], "l1_boot_id_after": after["l1_boot_id"],
                "qemu_pid_before": before["qemu_pid"], "qemu_pid_after": after["qemu_pid"],
                "guest_clock_lag_s": round(lag, 3)}
    problems = []
    if after["boot_id"] != before["boot_id"]:
        problems.append("L2's boot_id changed: the guest rebooted")
    if after["counter"] < before["counter"]:
        problems.append("L2's counter went back: its RAM did not survive")
    if later <= after["counter"]:
        problems.append("L2's counter stopped counting after the resume")
    if after["uptime"] < before["uptime"]:
        problems.append("L2's uptime went back")
    if problems:
        return verdict("FAIL", evidence, "; ".join(problems))
    return verdict("PASS", evidence)


# -- the workloads -------------------------------------------------------------------------

class Workloads:
    """Starts and verifies the L2 workloads that back the memory, DMA and interrupt checks."""

    def __init__(self, rig: Rig, mem_check_mib: int | None):
        self.rig = rig
        self.mem_check_mib = mem_check_mib
        self.devices: dict[str, str] = {}  # name -> L2 BDF
        self.ready: dict[str, dict] = {}
        self.edu_slots: list[str] = []
        self.segment = 0  # device workloads restart after a hot-unplug; each run is a segment
        self.finished: list[tuple[str, dict | None, dict | None]] = []  # (segment label, edu, nvme)

    def _json(self, l2: L2, cmd: str, step: str, timeout: float = 300, kind: str | None = None) -> tuple[int, dict]:
        """Run a workload command; its exit status and the last JSON line it printed, through the
        program's validating parser (``kind``: the only kind of output accepted). Output that is
        not valid JSON, lacks a key or holds a non-count where a count belongs is a StepError of
        ``step``: never a KeyError later, never a verdict computed from None."""
        rc, out = l2.console.run(cmd, timeout=timeout, step=step)
        line = next((x for x in reversed(out.splitlines()) if x.startswith("{")), None)
        if line is None:
            raise StepError(step, f"`{cmd}` printed no JSON (exit {rc})", {"output": out[-2000:]})
        try:
            return rc, workloads.parse_output(cmd.split()[0], line, kind)
        except StepError as exc:
            raise StepError(step, f"`{cmd}` (exit {rc}): {exc.message}",
                            {**exc.evidence, "exit status": rc}) from exc

    def discover(self, l2: L2) -> dict[str, str]:
        out = l2.console.check("for d in /sys/bus/pci/devices/*; do echo ${d##*/} $(cat $d/vendor $d/device); done",
                               step="prepare")
        by_id = {}
        for line in out.splitlines():
            bdf, vendor, device = line.split()
            by_id[f"{vendor[2:]}:{device[2:]}"] = bdf
        found = {}
        for device in self.rig.devices:
            if device.vendor_device not in by_id:
                raise StepError("prepare", f"L2 does not see the assigned {device.name} ({device.vendor_device})",
                                {"l2 pci": out})
            found[device.name] = by_id[device.vendor_device]
        return found

    def start(self, l2: L2) -> None:
        self.devices = self.discover(l2)
        l2.console.check(f"mkdir -p {WORK}/mem", step="prepare")
        mib = self.mem_check_mib
        if mib is None:
            available = int(l2.console.check("sed -n 's/^MemAvailable: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
                                             step="prepare").strip()) // 1024
            mib = max(16, int(available * 0.6))
        _, self.ready["memory"] = self._json(l2, f"memcheck start --mib {mib} --seed 7 --dir {WORK}/mem", "prepare")
        self.start_devices(l2, "prepare")

    def _dirs(self) -> tuple[str, str]:
        return f"{WORK}/edu{self.segment}", f"{WORK}/blk{self.segment}"

    def start_devices(self, l2: L2, step: str) -> None:
        """Start the DMA and interrupt workloads on the assigned devices."""
        edu_dir, blk_dir = self._dirs()
        l2.console.check(f"mkdir -p {edu_dir} {blk_dir}", step=step)
        if "edu" in self.devices:
            irq = self.rig.artifacts.edu_irq
            rc, ready = self._json(l2, f"edutest start --bdf {self.devices['edu']} --dir {edu_dir} --irq {irq}",
                                   step, timeout=120)
            if rc != 0:
                raise StepError(step, "edutest could not start", {"output": ready})
            self.ready["edu"] = ready
        if "nvme" in self.devices:
            dev = l2.console.check("ls /dev/nvme*n1 | head -1", step=step).strip()
            _, self.ready["nvme"] = self._json(l2, f"blkcheck start --dev {dev} --dir {blk_dir} --mib 32", step)
            self.ready["fio"] = self._start_fio(l2, dev, blk_dir, step)

    def _fio_json(self, l2: L2, path: str, step: str) -> dict:
        # fio's JSON is multi-line and L2's serial line is slow: squeeze it onto one line.
        out = l2.console.check(f"sed -n '/^{{/,$p' {path} | tr -d ' \\n'; echo", step=step)
        return workloads.parse_fio(out)

    def _start_fio(self, l2: L2, dev: str, directory: str, step: str) -> dict:
        """fio writes its data set, then a verifying writer is left running across the restart."""
        l2.console.run(workloads.fio_dataset_command(dev, f"{directory}/dataset-write.json", verify=False)
                       + f" 2>{directory}/dataset-write.err", timeout=300, step=step)
        written = self._fio_json(l2, f"{directory}/dataset-write.json", step)
        if written["error"] or not written["writes"]:
            raise StepError(step, "fio could not write its data set to the NVMe namespace",
                            {"fio": written, "stderr": l2.console.run(f"cat {directory}/dataset-write.err")[1]})
        # The wrapper execs fio, so $! is fio's pid.
        l2.console.check(f"{workloads.fio_across_command(dev, f'{directory}/across.json')} </dev/null >/dev/null "
                         f"2>{directory}/across.err & echo $! >{directory}/across.pid", step=step)
        return {"dataset_written": written, "dev": dev}

    def _verify_fio(self, l2: L2, directory: str, step: str) -> dict:
        """Stop the writer (every submitted I/O must complete for it to exit), then read the
        data set back; fio checks each block's crc32c."""
        _, stopped = l2.console.run(
            f"p=$(cat {directory}/across.pid); kill -TERM $p; i=0; "
            f"while kill -0 $p 2>/dev/null && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; "
            f"kill -0 $p 2>/dev/null && echo STILL-RUNNING || echo EXITED", timeout=120, step=step)
        result: dict = {"across_exited": "EXITED" in stopped}
        if result["across_exited"]:
            result["across"] = self._fio_json(l2, f"{directory}/across.json", step)
        dev = self.ready["fio"]["dev"]
        l2.console.run(workloads.fio_dataset_command(dev, f"{directory}/dataset-verify.json", verify=True)
                       + f" 2>{directory}/dataset-verify.err", timeout=300, step=step)
        result["dataset"] = self._fio_json(l2, f"{directory}/dataset-verify.json", step)
        _, errors = l2.console.run(f"cat {directory}/across.err {directory}/dataset-verify.err 2>/dev/null | "
                                   "grep -v 'terminating on signal' | head -6", step=step)
        result["stderr"] = errors.strip().splitlines()
        return result

    def stop_devices(self, l2: L2, label: str, step: str) -> None:
        """Verify and stop the device workloads now (before a hot-unplug takes the devices away)."""
        self.finished.append((label, *self._verify_devices(l2, step)))
        self.segment += 1

    def restart_devices(self, l2: L2, step: str, timeout: float = 120) -> None:
        """After a hot-plug: wait until L2 sees its devices again, then start fresh workloads."""
        def attempt() -> dict | None:
            try:
                found = self.discover(l2)
            except StepError:
                return None
            if "nvme" in found and l2.console.run("ls /dev/nvme*n1", step=step)[0] != 0:
                return None
            return found

        self.devices = wait_until(attempt, timeout=timeout, every=1, failure=lambda: StepError(
            step, "L2 did not see its devices again after the hot-plug"))
        self.start_devices(l2, step)

    def _verify_devices(self, l2: L2, step: str) -> tuple[dict | None, dict | None]:
        edu_dir, blk_dir = self._dirs()
        edu = blk = None
        if "edu" in self.ready:
            rc, edu = self._json(l2, f"edutest verify --dir {edu_dir} --timeout 60", step, kind="result")
            edu["exit_status"] = rc  # cross-checked with its "pass" and its counts (dma_verdict)
            if self.rig.artifacts.edu_irq_why:
                edu["msi_unavailable"] = self.rig.artifacts.edu_irq_why
            if edu["backend"] == "uio" and edu["irq"] == "msi":  # edu_uio logs what its suspend met
                count = l2.console.check("dmesg | grep -c 'edu_uio: DMA in flight at suspend' || true",
                                         step=step).strip().splitlines()
                if not count or not count[-1].isdigit():
                    raise StepError(step, "could not count edu_uio's suspends with a DMA in flight",
                                    {"output": "\n".join(count)[-500:]})
                edu["suspends_with_dma_in_flight"] = int(count[-1])
        if "nvme" in self.ready:
            rc, blk = self._json(l2, f"blkcheck verify --dir {blk_dir} --timeout 120", step, kind="result")
            blk["exit_status"] = rc  # cross-checked with its counts (dma_verdict)
            blk["fio"] = self._verify_fio(l2, blk_dir, step)
        return edu, blk

    def before_suspend(self) -> str:
        """What the guest runs right before its sleep request (``fr-suspend COMMAND``): it returns
        once edu starts a DMA, so that a transfer is in flight when the suspend begins (and
        edu_uio's suspend must wait for it)."""
        return f"edutest busy --dir {self._dirs()[0]}" if "edu" in self.ready else ""

    def slot_gpas(self, l2: L2, count: int) -> list[str]:
        """Guest-physical addresses of edu's first DMA slots (read only when a fault needs them)."""
        out = l2.console.check(f"tr ',[' '\\n\\n' < {self._dirs()[0]}/edutest.ready | grep -A{count} slot_gpas | "
                               "grep -o '0x[0-9a-f]*'", step="prepare")
        return out.split()[:count]

    def verify(self, l2: L2, findings: dict[str, dict], inject: str | None) -> dict:
        results: dict[str, dict] = {}
        rc, mem = self._json(l2, f"memcheck verify --dir {WORK}/mem", "verify", kind="result")
        mem["exit_status"] = rc  # cross-checked with its counts (memory_verdict)
        label = "after re-plug" if self.finished else "across the restart"
        segments = [*self.finished, (label, *self._verify_devices(l2, "verify"))]
        # Only matching lines cross the console: L2's emulated serial line is slow.
        _, dmesg = l2.console.run(f"dmesg | grep -iE '{L2_LOG_PROBLEMS.pattern}' | tail -20", step="verify")
        _, l1_log = self.rig.sh.run("dmesg | grep -E 'DMAR: \\[|DMAR: DRHD: handling fault' | tail -20")
        l1_faults = dmar_faults(l1_log)
        if l1_faults:
            findings.setdefault("interrupts", {})["L1 DMAR faults at verify"] = l1_faults
        results["memory"] = memory_verdict(mem, findings.get("memory", {}))
        problems = l2_log_problems(dmesg)
        results["dma"] = with_l1_findings(_combine([(label, dma_verdict(edu, blk)) for label, edu, blk in segments]),
                                          findings.get("dma", {}))
        l1_findings = findings.get("interrupts", {})
        results["interrupts"] = _combine([(label, interrupts_verdict(edu, blk, problems, l1_findings))
                                          for label, edu, blk in segments])
        return results


def with_l1_findings(result: dict, l1_findings: dict) -> dict:
    """What L1 saw happen to the devices (e.g. Bus Master cleared) fails the check, named."""
    if not l1_findings or result["verdict"] == "UNSUPPORTED":
        return result
    reasons = [result["reason"]] if result.get("reason") else []
    return {**result, "verdict": "FAIL", "reason": "; ".join([*reasons, *l1_findings.values()]),
            "evidence": {**result["evidence"], "l1": l1_findings}}


def _combine(segments: list[tuple[str, dict]]) -> dict:
    """One verdict over the device workload segments (one, or two around a hot-plug)."""
    if len(segments) == 1:
        return segments[0][1]
    worst = next((v for _, v in segments if v["verdict"] == "FAIL"), None) or next(
        (v for _, v in segments if v["verdict"] != "PASS"), segments[-1][1])
    combined = {"verdict": worst["verdict"], "evidence": {label: v for label, v in segments}}
    reasons = [f"{label}: {v['reason']}" for label, v in segments if v.get("reason")]
    if reasons:
        combined["reason"] = "; ".join(reasons)
    return combined


def memory_verdict(mem: dict, l1_findings: dict) -> dict:
    evidence = {k: mem.get(k) for k in ("pages_checked", "bad_pages", "writer_writes", "writer_mismatches",
                                         "fill_mib_per_s", "verify_mib_per_s", "first_bad")}
    if "exit_status" in mem:
        evidence["exit_status"] = mem["exit_status"]
    evidence["l1_digest"] = l1_findings or "unchanged"
    problems = []
    if not mem.get("pages_checked"):
        problems.append("no page was checked")
    if mem.get("bad_pages") or mem.get("writer_mismatches"):
        problems.append(f"{mem.get('bad_pages')} bad page(s) in L2")
    if l1_findings:
        problems.append("the PMEM digest in L1 changed across the kexec")
    problems += workloads.memcheck_problems(mem)  # an exit status its counts do not explain
    return verdict("FAIL", evidence, "; ".join(problems)) if problems else verdict("PASS", evidence)


def dma_verdict(edu: dict | None, blk: dict | None) -> dict:
    if edu is None and blk is None:
        return verdict("UNSUPPORTED", reason="no DMA-capable device is assigned (--devices)")
    evidence, problems = {}, []
    if edu is not None:
        evidence["edu"] = {k: edu.get(k) for k in ("transfers", "dma_mismatches", "first_mismatch", "backend",
                                                   "suspends_seen", "suspends_with_dma_in_flight", "bme_lost",
                                                   "dma_timeouts", "pass", "exit_status") if k in edu}
        if not edu.get("transfers"):
            problems.append("edu made no DMA transfer")
        if edu.get("dma_mismatches"):
            problems.append(f"edu: {edu['dma_mismatches']} DMA payload(s) corrupted")
        if edu.get("bme_lost"):  # edutest set it again and went on: no payload mismatch need follow
            problems.append(f"edu: Bus Master Enable cleared {edu['bme_lost']} time(s) with no system suspend "
                            f"(edutest set it again each time)")
        if edu.get("dma_timeouts"):
            problems.append(f"edu: {edu['dma_timeouts']} DMA timeout(s): its engine did not finish a transfer in time")
        # edutest's own "pass" and exit status against its counts: whatever no rule above or in
        # interrupts_verdict explains (or a missing "pass") is this check's FAIL.
        problems += workloads.edutest_problems(edu)
    if blk is not None:
        evidence["nvme"] = {k: blk.get(k) for k in ("blocks_checked", "bad_blocks", "loop_reads", "loop_writes",
                                                    "first_bad", "direct")}
        if "exit_status" in blk:
            evidence["nvme"]["exit_status"] = blk["exit_status"]
        if blk.get("bad_blocks"):
            problems.append(f"nvme: {blk['bad_blocks']} bad block(s)")
        # An exit status blkcheck's counts do not explain fails the check its data backs.
        problems += workloads.blkcheck_problems(blk)
        if "fio" in blk:
            evidence["nvme"]["fio"] = blk["fio"]
            problems += fio_dma_problems(blk["fio"])
    return verdict("FAIL", evidence, "; ".join(problems)) if problems else verdict("PASS", evidence)


def fio_dma_problems(fio: dict) -> list[str]:
    """What fio's two jobs say about the data: the data set read back, and the writer's own
    verify reads while it ran across the restart."""
    problems = []
    dataset, across = fio.get("dataset", {}), fio.get("across")
    if dataset.get("verify_errors") or dataset.get("error"):
        problems.append(f"nvme: fio found {dataset.get('verify_errors') or 'some'} bad block(s) in its "
                        f"data set (crc32c)")
    elif dataset.get("reads", 0) * workloads.FIO_BS < workloads.FIO_DATASET_MIB[1] << 20:
        problems.append(f"nvme: fio read back only {dataset.get('reads')} blocks of its data set")
    if across and (across.get("verify_errors") or across.get("error") == errno.EILSEQ):  # fio: verify failed
        problems.append("nvme: fio's writer read back a bad block while running across the restart")
    return problems


def interrupts_verdict(edu: dict | None, blk: dict | None, l2_problems: list[str], l1_findings: dict) -> dict:
    if edu is None and blk is None:
        return verdict("UNSUPPORTED", reason="no interrupt-raising device is assigned (--devices)")
    evidence: dict = {"l2_log": l2_problems[:10], "l1_dmar_faults": l1_findings}
    problems = []
    if edu is not None:
        evidence["edu"] = {k: edu.get(k) for k in ("irq", "irq_expected", "irq_received", "irq_lost",
                                                   "irq_spurious", "irq_pm_replays", "dma_done_irqs", "raised_irqs")}
        if "msi_unavailable" in edu:  # auto fell back to INTx: say why MSI was not counted
            evidence["edu"]["msi_unavailable"] = edu["msi_unavailable"]
        if not edu.get("irq_expected"):
            problems.append("edu raised no interrupt")
        elif edu.get("irq_expected") != edu.get("irq_received"):
            problems.append(f"edu: {edu.get('irq_received')} of {edu.get('irq_expected')} interrupts arrived")
        # edutest.c documents no case where a spurious interrupt is expected: one the PM core
        # re-sends on resume is counted in irq_pm_replays instead (evidence, not a failure).
        if edu.get("irq_spurious"):
            problems.append(f"edu: {edu['irq_spurious']} spurious interrupt(s) (none outstanding, or more "
                            f"notifications than raised)")
    if blk is not None:
        # blkcheck's pread/pwrite are synchronous and fio runs with psync: once they report, no
        # I/O of theirs is in flight, so "every I/O submitted completed" cannot fail here (and in
        # cpr-reboot L2 suspends before the save: nothing is in flight across the restart). The
        # counts are evidence; what is checked is no I/O error and fio's writer below. (A blkcheck
        # exit status its counts do not explain is dma_verdict's.)
        evidence["nvme"] = {k: blk.get(k) for k in ("ios_submitted", "ios_completed", "io_errors")}
        if blk.get("io_error_list"):
            evidence["nvme"]["io_error_list"] = blk["io_error_list"]
        if blk.get("io_errors"):
            problems.append(f"nvme: blkcheck met {blk['io_errors']} I/O error(s)")
        fio = blk.get("fio")
        if fio is not None:
            across = fio.get("across") or {}
            evidence["nvme"]["fio_across"] = {k: across.get(k) for k in ("writes", "reads", "error", "seconds")}
            if not fio.get("across_exited"):
                problems.append("nvme: fio's writer did not exit on SIGTERM within 60 s (an I/O never completed)")
            elif across.get("error") not in (0, errno.EILSEQ):  # a bad block is the DMA check's
                problems.append(f"nvme: fio's writer stopped with error {across.get('error')}")
            elif not across.get("writes"):
                problems.append("nvme: fio's writer, started before the save, reports no completed write")
    if l2_problems:
        problems.append(f"L2 kernel log: {l2_problems[0]}")
    if l1_findings:
        problems.append("DMAR faults in L1")
    if problems:
        return verdict("FAIL", evidence, "; ".join(problems))
    # A PASS that counted INTx where MSI was asked for (auto fell back) says so in its reason.
    fallback = (edu or {}).get("msi_unavailable")
    return verdict("PASS", evidence, f"edu counted on INTx, not MSI: {fallback}" if fallback else "")
