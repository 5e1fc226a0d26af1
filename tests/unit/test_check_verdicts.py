"""The checks consume everything their L2 workloads detect: edutest's Bus Master Enable losses,
DMA timeouts, spurious interrupts, its own "pass" and exit status; blkcheck's I/O errors and exit
status; memcheck's exit status. A result that lacks a key a verdict reads is a StepError, never a
PASS.

The results are real lines, from the L2 console of a cpr-reboot run with edu (MSI) and NVMe:
edutest's is the format of edutest.c's json_counters + write_result, memcheck's and blkcheck's
that of their write_result.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from fastrestart.artifacts import workloads
from fastrestart.errors import StepError
from fastrestart.restart import checks

EDU_LINE = (
    '{"bdf":"0000:01:00.0","backend":"uio","irq":"msi","size":2048,"slots":1024,"transfers":116,'
    '"transfers_started":116,"transfers_failed":0,"dma_mismatches":0,"landing_mismatches":0,"retire_mismatches":0,'
    '"final_mismatches":0,"retire_checks":0,"final_checked":116,"dma_timeouts":0,"irq_expected":347,'
    '"irq_received":347,"irq_lost":0,"irq_spurious":0,"irq_status_anomalies":0,"dma_done_expected":232,'
    '"dma_done_irqs":232,"raised_expected":115,"raised_irqs":115,"gpa_moved":0,"corruptions_injected":0,'
    '"pm_resume_reinits":0,"bme_lost":0,"suspends_seen":1,"intx_masked_seen":0,"pm_retried_transfers":0,'
    '"irq_resume_kicks":0,"irq_pm_replays":0,"irq_timeout_ms":2000,"elapsed_s":31.456,"transfers_per_s":3.688,'
    '"irqs_per_s":11.031,"first_mismatch":[],"pci_events":[],"stopped_by":"SIGUSR1","pass":true}')
MEM_LINE = ('{"pages_checked": 19200, "bad_pages": 0, "writer_writes": 61755, "writer_mismatches": 0, '
            '"verify_seconds": 0.785245, "verify_mib_per_s": 95.5, "fill_mib_per_s": 1126.8, "mib": 75, "seed": 7, '
            '"mlocked": true, "first_bad": []}')
BLK_LINE = ('{"blocks_checked": 8192, "bad_blocks": 0, "ios_submitted": 5638, "ios_completed": 5638, "io_errors": 0, '
            '"loop_reads": 2787, "loop_writes": 2787, "loop_bad": 0, "direct": true, "io_error_list": [], '
            '"verify_seconds": 0.696427, "verify_mib_per_s": 45.9, "write_mib_per_s": 36.3, "first_bad": []}')
FIO_ACROSS = {"job": "across", "error": 0, "verify_errors": 0, "reads": 473, "read_kib": 1892, "writes": 480,
              "write_kib": 1920, "seconds": 7}
FIO_DATASET = {"job": "dataset", "error": 0, "verify_errors": 0, "reads": 4096, "read_kib": 16384, "writes": 0,
               "write_kib": 0, "seconds": 8}
DELETE = object()


def line(base: str, **changes: object) -> str:
    """``base`` with keys changed (or removed, with DELETE), in the programs' own key order."""
    data = json.loads(base)
    for key, value in changes.items():
        if value is DELETE:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


def edu_result(rc: int, **changes: object) -> dict:
    """What Workloads._verify_devices hands the verdicts: the parsed result and its exit status."""
    return {**workloads.parse_edutest(line(EDU_LINE, **changes), "result"), "exit_status": rc}


def blk_result(rc: int, **changes: object) -> dict:
    fio = {"across_exited": True, "across": FIO_ACROSS, "dataset": FIO_DATASET, "stderr": []}
    return {**workloads.parse_blkcheck(line(BLK_LINE, **changes), "result"), "exit_status": rc, "fio": fio}


def mem_result(rc: int, **changes: object) -> dict:
    return {**workloads.parse_memcheck(line(MEM_LINE, **changes), "result"), "exit_status": rc}


def test_the_edutest_line_is_edutests_own_format():
    """Every key the parser requires (and "pass") is one that edutest.c prints in its result."""
    source = workloads.source("edutest").read_text()
    printed = set(re.findall(r'\\"(\w+)\\":', source))
    assert workloads.EDUTEST_RESULT_KEYS | {"pass"} <= printed
    assert set(json.loads(EDU_LINE)) <= printed


# -- edutest ---------------------------------------------------------------------------------------

EDU_CASES = [
    # (id, changes, exit status, dma verdict, in its reason, interrupts verdict, in its reason)
    ("clean", {}, 0, "PASS", None, "PASS", None),
    ("bme-lost", {"bme_lost": 2, "pass": False}, 1, "FAIL", "Bus Master Enable cleared 2 time(s)", "PASS", None),
    ("dma-timeouts", {"dma_timeouts": 1, "transfers_failed": 1}, 0, "FAIL", "1 DMA timeout(s)", "PASS",
     None),
    ("pass-false-unexplained", {"pass": False}, 1, "FAIL", "nothing the harness checks explains it", "PASS", None),
    ("pass-true-exit-1", {}, 1, "FAIL", 'says "pass": true but exited 1', "PASS", None),
    ("pass-false-exit-0", {"pass": False, "dma_mismatches": 1}, 0, "FAIL", 'says "pass": false but exited 0',
     "PASS", None),
    ("pass-true-despite-a-mismatch", {"dma_mismatches": 1}, 0, "FAIL", '"pass": true although', "PASS", None),
    ("no-pass", {"pass": DELETE}, 1, "FAIL", 'printed no "pass" verdict (exit 1)', "PASS", None),
    ("exit-2-with-a-result", {}, 2, "FAIL", "exited 2", "PASS", None),
    ("payload-corrupted", {"dma_mismatches": 1, "landing_mismatches": 1, "pass": False}, 1, "FAIL",
     "1 DMA payload(s) corrupted", "PASS", None),
    ("spurious", {"irq_spurious": 3}, 0, "PASS", None, "FAIL", "3 spurious interrupt(s)"),
    # A lost interrupt makes edutest say pass: false; the interrupts check explains it, so the DMA
    # check stays PASS (irq-drop must trip interrupts and no other check).
    ("interrupt-lost", {"irq_received": 346, "irq_lost": 1, "pass": False}, 1, "PASS", None, "FAIL",
     "346 of 347 interrupts arrived"),
]


@pytest.mark.parametrize(("changes", "rc", "dma", "dma_reason", "irq", "irq_reason"),
                         [case[1:] for case in EDU_CASES], ids=[case[0] for case in EDU_CASES])
def test_edutest_results(changes, rc, dma, dma_reason, irq, irq_reason):
    edu = edu_result(rc, **changes)
    judge(edu, None, (dma, dma_reason), (irq, irq_reason))


def judge(edu: dict | None, blk: dict | None, dma: tuple, irq: tuple) -> tuple[dict, dict]:
    """The DMA and interrupts verdicts on these results, each checked against (verdict, reason part)."""
    results = checks.dma_verdict(edu, blk), checks.interrupts_verdict(edu, blk, [], {})
    for result, (verdict, reason) in zip(results, (dma, irq), strict=True):
        assert result["verdict"] == verdict, result
        assert reason is None or reason in result["reason"], result
    return results


def test_edutest_evidence_carries_what_it_detected():
    edu = edu_result(1, bme_lost=2, dma_timeouts=1, irq_spurious=4, **{"pass": False})
    dma = checks.dma_verdict(edu, None)["evidence"]["edu"]
    assert {k: dma[k] for k in ("bme_lost", "dma_timeouts", "pass", "exit_status")} == {
        "bme_lost": 2, "dma_timeouts": 1, "pass": False, "exit_status": 1}
    assert checks.interrupts_verdict(edu, None, [], {})["evidence"]["edu"]["irq_spurious"] == 4


@pytest.mark.parametrize("key", sorted(workloads.EDUTEST_RESULT_KEYS))
def test_an_edutest_result_missing_a_key_is_a_step_error(key):
    with pytest.raises(StepError, match=key):
        workloads.parse_edutest(line(EDU_LINE, **{key: DELETE}), "result")


@pytest.mark.parametrize("changes", [{"bme_lost": None}, {"irq_spurious": "0"}, {"dma_timeouts": -1},
                                     {"irq_received": True}, {"transfers": 1.5}, {"pass": "true"}, {"pass": None}],
                         ids=lambda c: "-".join(f"{k}={v!r}" for k, v in c.items()))
def test_a_garbled_edutest_count_is_a_step_error(changes):
    with pytest.raises(StepError):
        workloads.parse_edutest(line(EDU_LINE, **changes), "result")


def test_edutests_ready_line_is_not_a_result():
    ready = ('{"bdf":"0000:01:00.0","backend":"uio","irq":"msi","slots":1024,"size":2048,"slot_stride":4096,'
             '"dma_bits":28,"id":"0x010000ed","pid":194,"seed":"0xb5060212940606e0","irq_timeout_ms":2000}')
    assert workloads.parse_edutest(ready)["kind"] == "ready"
    with pytest.raises(StepError, match="lacks expected keys"):
        workloads.parse_edutest(ready, "result")


# -- blkcheck and memcheck -------------------------------------------------------------------------

BLK_CASES = [
    ("clean", {}, 0, "PASS", None, "PASS", None),
    ("io-errors", {"io_errors": 2, "ios_completed": 5636,
                   "io_error_list": [{"op": "read", "block": 7, "errno": 5, "error": "Input/output error"}]}, 1,
     "PASS", None, "FAIL", "blkcheck met 2 I/O error(s)"),
    ("bad-blocks", {"bad_blocks": 1}, 1, "FAIL", "1 bad block(s)", "PASS", None),
    ("exit-1-unexplained", {}, 1, "FAIL", "blkcheck verify exited 1, but with 0 bad block(s)", "PASS", None),
    ("exit-0-despite-errors", {"io_errors": 1, "ios_completed": 5637}, 0, "FAIL", "it exits 1", "FAIL",
     "1 I/O error(s)"),
    # Submitted vs completed is evidence, no longer a claim; blkcheck exits 1 for it, which no
    # rule explains: the DMA check (which blkcheck's data backs) names that exit status.
    ("submitted-not-completed", {"ios_completed": 5637}, 1, "FAIL", "blkcheck verify exited 1 with 0 bad block(s)",
     "PASS", None),
]


@pytest.mark.parametrize(("changes", "rc", "dma", "dma_reason", "irq", "irq_reason"),
                         [case[1:] for case in BLK_CASES], ids=[case[0] for case in BLK_CASES])
def test_blkcheck_results(changes, rc, dma, dma_reason, irq, irq_reason):
    blk = blk_result(rc, **changes)
    dma_result, irq_result = judge(None, blk, (dma, dma_reason), (irq, irq_reason))
    assert dma_result["evidence"]["nvme"]["exit_status"] == rc
    assert {k: irq_result["evidence"]["nvme"][k] for k in ("ios_submitted", "ios_completed", "io_errors")} == {
        k: blk[k] for k in ("ios_submitted", "ios_completed", "io_errors")}


MEM_CASES = [
    ("clean", {}, 0, "PASS", None),
    ("bad-pages", {"bad_pages": 2}, 1, "FAIL", "2 bad page(s) in L2"),
    ("exit-1-unexplained", {}, 1, "FAIL", "memcheck verify exited 1, but with 0 bad page(s) it exits 0"),
    ("exit-0-despite-bad-pages", {"bad_pages": 1}, 0, "FAIL", "it exits 1"),
    ("no-page-checked", {"pages_checked": 0}, 0, "FAIL", "no page was checked"),
]


@pytest.mark.parametrize(("changes", "rc", "expected", "reason"), [case[1:] for case in MEM_CASES],
                         ids=[case[0] for case in MEM_CASES])
def test_memcheck_results(changes, rc, expected, reason):
    result = checks.memory_verdict(mem_result(rc, **changes), {})
    assert result["verdict"] == expected, result
    if reason:
        assert reason in result["reason"]
    assert result["evidence"]["exit_status"] == rc


@pytest.mark.parametrize(("parse", "base", "key"), [
    *[(workloads.parse_memcheck, MEM_LINE, k) for k in sorted(workloads.MEMCHECK_RESULT_KEYS)],
    *[(workloads.parse_blkcheck, BLK_LINE, k) for k in sorted(workloads.BLKCHECK_RESULT_KEYS)],
])
def test_a_result_missing_a_key_is_a_step_error(parse, base, key):
    with pytest.raises(StepError, match=key):
        parse(line(base, **{key: DELETE}), "result")


@pytest.mark.parametrize(("parse", "base", "key"), [(workloads.parse_memcheck, MEM_LINE, "bad_pages"),
                                                     (workloads.parse_blkcheck, BLK_LINE, "io_errors"),
                                                     (workloads.parse_blkcheck, BLK_LINE, "ios_completed")])
def test_a_null_count_is_a_step_error(parse, base, key):
    with pytest.raises(StepError, match="not counts"):
        parse(line(base, **{key: None}), "result")


def test_exit_status_helpers_never_compare_missing_counts():
    """A result that bypassed the parsers still never gives a KeyError or a None == None."""
    with pytest.raises(StepError, match="bme_lost"):
        checks.dma_verdict({"transfers": 3, "dma_mismatches": 0, "irq_expected": 2, "irq_received": 2,
                            "pass": True, "exit_status": 0}, None)
    with pytest.raises(StepError, match="io_errors"):
        checks.dma_verdict(None, {"bad_blocks": 0, "exit_status": 0})
    with pytest.raises(StepError, match="bad_pages"):
        checks.memory_verdict({"pages_checked": 3, "exit_status": 0}, {})


# -- through Workloads.verify ----------------------------------------------------------------------

class FakeConsole:
    """L2's console: each command gets the reply of the first key it contains."""

    def __init__(self, replies: dict[str, tuple[int, str]]):
        self.replies = replies
        self.commands: list[str] = []

    def run(self, cmd: str, timeout: float = 60, step: str = "console") -> tuple[int, str]:
        self.commands.append(cmd)
        return next((reply for key, reply in self.replies.items() if key in cmd), (0, ""))

    def check(self, cmd: str, timeout: float = 60, step: str = "console") -> str:
        rc, out = self.run(cmd, timeout, step)
        if rc:
            raise StepError(step, f"`{cmd}` exited {rc}", {"output": out})
        return out


def fio_json(job: dict) -> str:
    return json.dumps({"jobs": [{"jobname": job["job"], "error": job["error"], "total_err": job["verify_errors"],
                                 "elapsed": job["seconds"],
                                 "read": {"total_ios": job["reads"], "io_kbytes": job["read_kib"]},
                                 "write": {"total_ios": job["writes"], "io_kbytes": job["write_kib"]}}]})


def verify(mem=(0, MEM_LINE), edu=(0, EDU_LINE), blk=(0, BLK_LINE)) -> dict:
    console = FakeConsole({
        "memcheck verify": (mem[0], f"memcheck: some word on stderr\n{mem[1]}"),
        "edutest verify": edu,
        "blkcheck verify": blk,
        "grep -c 'edu_uio": (0, "0"),
        "kill -TERM": (0, "EXITED"),
        "across.json | tr": (0, fio_json(FIO_ACROSS)),
        "dataset-verify.json | tr": (0, fio_json(FIO_DATASET)),
    })
    rig = SimpleNamespace(sh=SimpleNamespace(run=lambda cmd: (0, "")), artifacts=SimpleNamespace(edu_irq_why=""))
    loads = checks.Workloads(rig, None)
    loads.ready = {"memory": {}, "edu": {}, "nvme": {}, "fio": {"dev": "/dev/nvme0n1"}}
    return loads.verify(SimpleNamespace(console=console), {}, None)


def test_a_clean_verify_passes_every_check():
    results = verify()
    assert {name: r["verdict"] for name, r in results.items()} == {
        "memory": "PASS", "dma": "PASS", "interrupts": "PASS"}, results
    assert results["dma"]["evidence"]["edu"]["exit_status"] == 0
    assert results["dma"]["evidence"]["edu"]["suspends_with_dma_in_flight"] == 0
    assert results["memory"]["evidence"]["exit_status"] == 0


def test_verify_folds_in_the_exit_statuses():
    results = verify(mem=(1, MEM_LINE), edu=(1, line(EDU_LINE, bme_lost=1, **{"pass": False})),
                     blk=(1, line(BLK_LINE, io_errors=1, ios_completed=5637)))
    assert results["memory"]["verdict"] == "FAIL" and "memcheck verify exited 1" in results["memory"]["reason"]
    assert results["dma"]["verdict"] == "FAIL" and "Bus Master Enable cleared 1 time(s)" in results["dma"]["reason"]
    assert results["interrupts"]["verdict"] == "FAIL" and "1 I/O error(s)" in results["interrupts"]["reason"]


@pytest.mark.parametrize(("which", "reply"), [
    ("edu", (0, line(EDU_LINE, bme_lost=DELETE))),
    ("edu", (1, line(EDU_LINE, irq_spurious=None))),
    ("edu", (0, EDU_LINE[:300])),  # a line cut short on the serial console
    ("blk", (0, line(BLK_LINE, io_errors=DELETE))),
    ("mem", (0, line(MEM_LINE, pages_checked=DELETE))),
    ("mem", (0, '{"pid": 182, "pages": 19200}')),
], ids=["edu-missing", "edu-null", "edu-garbled", "blk-missing", "mem-missing", "mem-not-a-result"])
def test_a_broken_result_after_the_restart_is_a_step_error_of_verify(which, reply):
    with pytest.raises(StepError) as info:
        verify(**{which: reply})
    assert info.value.step == "verify"
    assert info.value.evidence["exit status"] == reply[0]


def test_a_pass_on_intx_after_an_msi_fallback_says_so():
    edu = edu_result(0, irq="intx", msi_unavailable="no headers for 6.99 in the suite")
    result = checks.interrupts_verdict(edu, None, [], {})
    assert result["verdict"] == "PASS" and "INTx, not MSI: no headers" in result["reason"]
