"""Verdicts from OpenVMM evidence: every kind, from the stamped lines the host driver
returns, through the backend's own evidence path (evidence() then classify())."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.backends.openvmm.evidence import classify, evidence
from testbed.core.verdicts import VERDICTS

MS = 1_000_000
T0 = 10_000 * MS


def log(ms: float, level: str, msg: str) -> tuple[int, str]:
    return (T0 + int(ms * MS), f"   5.000000000s {level:>5} openvmm_entry::repl:  {msg}")


def raw(**streams: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "begin_ns": T0 - MS, "t0_ns": T0, "fire_ns": T0 + 150 * MS, "fire_planned_ns": T0 + 150 * MS,
        "end_ns": T0 + 3000 * MS, "exited": None, "service_cmd": "service-vtl2", "shutdown_cmd": "shutdown",
        "grace_ms": 1500.0, "servicing_timeout_s": 6, "vtl0_shutdown_pattern": "Shutdown request received",
        "com3_servicing_start_pattern": "received servicing request from host",
        "console": [(T0, "openvmm> service-vtl2"), (T0 + 150 * MS, "openvmm> shutdown")],
        "log": [log(650, "INFO", "vtl2 servicing complete duration=650")],
        "COM1": [], "COM3": [(T0 + 30 * MS, "[ 4.1] underhill_core::dispatch: received servicing request from host")],
    }  # fmt: skip
    base.update(streams)
    return base


VTL0 = "[ 5.2] hv_utils: Shutdown request received - graceful shutdown initiated"
DONE = log(650, "INFO", "vtl2 servicing complete duration=650")
CASES = {
    "preserved": raw(COM1=[(T0 + 700 * MS, VTL0)],
                     log=[DONE, log(699, "INFO", "shutdown initiated"), log(800, "INFO", 'guest halted reason="PowerOff"')]),
    "delivered-before": raw(COM1=[(T0 + 10 * MS, VTL0)], fire_ns=T0 + 5 * MS),
    "duplicated": raw(COM1=[(T0 + 700 * MS, VTL0), (T0 + 900 * MS, VTL0)]),
    "lost": raw(),
    "rejected": raw(log=[DONE, log(660, "ERROR", "shutdown ic not ready")]),
    "servicing-failed": raw(log=[log(400, "ERROR", "vtl2 servicing failed error=save failed")]),
    "guest-crash": raw(log=[log(500, "INFO", 'guest halted reason="TripleFault"')]),
    "infra-error": raw(exited=-6, log=[]),
}  # fmt: skip


def test_cases_cover_every_verdict() -> None:
    # servicing-skipped needs proof that servicing did not happen; OpenVMM only shows
    # when it did (the restore line), so it says "unproven" instead (below).
    assert set(CASES) == set(VERDICTS) - {"servicing-skipped"}


def test_servicing_proof_is_the_restore_line_or_unproven() -> None:
    restored = "   5.100000000s  INFO guest_emulation_device:  restore vtl2 complete success=true"
    assert evidence(raw(log=[(T0 + 600 * MS, restored), DONE])).servicing_proof == "restarted"
    assert evidence(raw()).servicing_proof == "unproven"  # "vtl2 servicing complete" alone
    failed = "   5.100000000s  INFO guest_emulation_device:  restore vtl2 complete success=false"
    assert evidence(raw(log=[(T0 + 600 * MS, failed), DONE])).servicing_proof == "unproven"
    assert evidence(raw(service_cmd=None, log=[])).servicing_proof is None


@pytest.mark.parametrize("expected", sorted(CASES))
def test_classify(expected: str) -> None:
    v = classify(evidence(CASES[expected]))
    assert v.kind == expected, v
    assert v.evidence or v.kind == "infra-error"


def test_numbers_come_from_the_host_clock() -> None:
    ev = evidence(CASES["preserved"])
    assert ev.offset_ms == 150.0 and ev.guest_offset_ms == 120.0 and ev.servicing_ms == 650.0
    assert ev.end_reason == "PowerOff" and ev.delivery_ms == 150.0  # halted at 800, servicing done at 650


def test_rejected_states_the_wait_and_the_code() -> None:
    v = classify(evidence(raw(log=[DONE, log(900, "ERROR", "shutdown failed with error code 0x80004005")])))
    assert v.kind == "rejected" and "0x80004005" in v.reason and "750 ms" in v.reason


def test_a_deadline_without_completion_is_servicing_failed() -> None:
    v = classify(evidence(raw(log=[], servicing_timeout=True)))
    assert v.kind == "servicing-failed" and "within 6 s" in v.reason


def test_shutdown_initiated_alone_proves_delivery_with_the_caveat() -> None:
    v = classify(evidence(raw(log=[DONE, log(700, "INFO", "shutdown initiated")])))
    assert v.kind == "preserved" and "no VTL0 line on COM1" in v.reason


def test_no_answer_without_servicing_is_lost_as_on_every_backend() -> None:
    """Fired with no servicing, no refusal, no VTL0 line, no halt: lost, as QEMU and
    Hyper-V say (one verdict tree); this tree once said infra-error here."""
    v = classify(evidence(raw(service_cmd=None, log=[], COM3=[])))
    assert v.kind == "lost" and "without refusal" in v.reason and "1500 ms" in v.reason


def test_a_foreground_service_vtl2_build_is_read_as_it_prints() -> None:
    """release/2411 prints 'servicing time: Nms' when its foreground service-vtl2 returns:
    servicing done; a shutdown typed during it was read only afterwards (infra-error that
    says so), one typed after it is read as usual."""
    fg = (T0 + 650 * MS, "servicing time: 650ms")
    during = classify(evidence(raw(console=[(T0, "openvmm> service-vtl2"), fg], log=[])))
    assert during.kind == "infra-error" and "foreground" in during.reason, during
    after = raw(console=[(T0, "openvmm> service-vtl2"), fg], log=[log(800, "INFO", "shutdown initiated")],
                COM1=[(T0 + 800 * MS, VTL0)], fire_ns=T0 + 700 * MS, fire_planned_ns=T0 + 700 * MS)  # fmt: skip
    assert classify(evidence(after)).kind == "preserved"


def test_a_build_without_version_is_not_recorded_as_clap_error() -> None:
    from testbed.backends.openvmm.hostside import _version

    assert _version("openvmm 0.1.0+g1488a37b7\nversion: 0.1.0\n") == "openvmm 0.1.0+g1488a37b7"
    clap = "error: unexpected argument '--version' found\n\nUsage: openvmm [OPTIONS]\n"
    assert _version(clap).startswith("unknown (this build has no --version")
