"""Verdicts from Hyper-V evidence, on numbers: event IDs, return values, job error codes."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from testbed.backends.hyperv.config import HyperVSpec
from testbed.backends.hyperv.evidence import classify
from testbed.backends.hyperv.module import RaceOutcome, WorkerEvent
from testbed.backends.hyperv.race_evidence import evidence
from testbed.core.config import Artifact
from testbed.core.evidence import RaceEvidence

SHUTDOWN_LINE = {"Ms": 900.0, "Line": "hv_utils: Shutdown request received - graceful shutdown initiated"}
STARTED = datetime.fromisoformat("2026-11-26T04:00:00+00:00")
SPEC = HyperVSpec(igvm=Artifact(path="openhcl.bin"), vtl0_vhd=Artifact(path="vtl0.vhdx"),
                  com3_servicing_start_pattern="servicing: saving state")  # fmt: skip


def ev(race: dict[str, Any] | None = None, events: list[int] | None = None, *, guest_anchor_ms: float | None = None,
       ic_event_ms: float | None = None, infra_error: str | None = None,
       event_at: dict[int, float] | None = None) -> RaceEvidence:  # fmt: skip
    """Evidence built the backend's own way: the host's answer as on the wire (PascalCase),
    the worker's events with their times, through ``evidence()``; an event sits 1 s into
    the race unless a test places the shutdown-IC event itself."""
    if infra_error:
        return RaceEvidence.failed("hyperv", infra_error)
    base = {
        "VmId": "vm-1", "IcBefore": "OK", "OffsetMs": 100.0, "StartedUtc": STARTED.isoformat(), "StartMs": 0.0,
        "ServiceMs": 5.0, "ServiceReturn": 4096, "JobDone": True, "JobState": 7, "JobErrorCode": 0,
        "ServiceDoneMs": 450.0, "FireMs": 105.0, "FireReturn": 0, "IcAtFire": "OK", "Running": True,
        "IcAfter": "OK", "Com1": [], "Com3": [],
    }  # fmt: skip
    race = {**base, **(race or {})}
    if guest_anchor_ms is not None:
        race["Com3"] = [{"Ms": guest_anchor_ms, "Line": "servicing: saving state"}]
    worker = []
    for i in events or []:
        at = ic_event_ms if i == 18504 and ic_event_ms is not None else (event_at or {}).get(i, 1000.0)
        worker.append(WorkerEvent(id=i, time_utc=(STARTED + timedelta(milliseconds=at)).isoformat()))
    return evidence(RaceOutcome.model_validate(race), worker, SPEC, 3000.0, race["FireMs"] is not None)


def test_running_at_the_deadline_with_the_ic_ok_is_lost() -> None:
    v = classify(ev())
    assert v.kind == "lost" and "IC OK" in v.reason


def test_shutdown_ic_event_after_servicing_is_preserved() -> None:
    v = classify(ev({"Running": False, "Com1": [SHUTDOWN_LINE]}, [18504]))
    assert v.kind == "preserved" and any("hv_utils" in e for e in v.evidence)
    v = classify(ev({"Running": False}, [18504]))  # no COM1: preserved, with the caveat said
    assert v.kind == "preserved" and "cannot be ruled out" in v.reason


def test_vtl0_line_before_the_guest_anchor_is_delivered_before() -> None:
    early = {"Ms": 40.0, "Line": SHUTDOWN_LINE["Line"]}
    assert classify(ev({"Com1": [early]}, guest_anchor_ms=60.0)).kind == "delivered-before"
    assert classify(ev({"Com1": [early]}, guest_anchor_ms=30.0)).kind == "preserved"
    assert classify(ev({"Com1": [early]})).kind == "preserved"  # host anchor (ServiceMs 5.0) only


def test_two_vtl0_lines_are_duplicated() -> None:
    assert classify(ev({"Com1": [SHUTDOWN_LINE, {**SHUTDOWN_LINE, "Ms": 1200.0}]})).kind == "duplicated"


@pytest.mark.parametrize(
    ("race", "events", "reason"),
    [
        ({"ServiceReturn": 32773}, [], "ReloadManagementVtl returned 32773"),
        ({}, [18620], "event 18620"),
        ({"JobDone": False, "JobState": 4}, [], "still in state 4"),
        (
            {"JobState": 10, "JobErrorCode": 0xC0370803},
            [],
            "0xC0370803 (the management VTL failed to restore",
        ),
        ({"JobState": 10, "JobErrorCode": -1070135294}, [], "0xC0370802"),  # a signed int32 from WMI
    ],
)
def test_servicing_failures_by_number(race: dict[str, Any], events: list[int], reason: str) -> None:
    v = classify(ev(race, events))
    assert v.kind == "servicing-failed" and reason in v.reason


@pytest.mark.parametrize("event", [18528, 18539, 18540, 18550, 18560, 18590, 18515])
def test_crash_and_reset_events_are_guest_crash(event: int) -> None:
    assert classify(ev({"Running": False}, [event])).kind == "guest-crash"


def test_ic_not_ok_when_fired_is_rejected() -> None:
    v = classify(ev({"IcAtFire": "No Contact", "FireReturn": 32775}))
    assert v.kind == "rejected" and "'No Contact'" in v.reason


def test_turned_off_without_the_ic_is_not_a_product_verdict() -> None:
    assert classify(ev({"Running": False}, [18502])).kind == "infra-error"
    assert classify(ev({}, [14070])).kind == "infra-error"
    assert classify(ev(infra_error="TransportError: connection reset")).kind == "infra-error"


def test_servicing_only_is_preserved_with_nothing_at_stake() -> None:
    v = classify(ev({"FireMs": None, "FireReturn": None, "IcAtFire": None}))
    assert v.kind == "preserved" and "no message" in v.reason


def test_the_ic_event_alone_can_prove_delivery_before_servicing() -> None:
    """No COM1: the 18504 event's time (host clock) before the servicing request decides,
    even when servicing then failed on a VM that was already going off."""
    early = ev({"Running": False, "ServiceReturn": 32775}, [18504], ic_event_ms=2.0)
    assert classify(early).kind == "delivered-before"
    late = ev({"Running": False}, [18504], ic_event_ms=600.0)
    assert classify(late).kind == "preserved" and "cannot be ruled out" in classify(late).reason


def test_a_shutdown_job_that_fails_after_4096_is_rejected_not_lost() -> None:
    v = ev({"FireReturn": 4096, "FireJobDone": True, "FireJobState": 10, "FireJobErrorCode": 32768,
            "FireJobErrorDescription": "The guest rejected the shutdown request. (0x80004005)"})  # fmt: skip
    got = classify(v)
    assert got.kind == "rejected" and "ended Exception with HRESULT 0x80004005" in got.reason
    ok = ev({"FireReturn": 4096, "FireJobDone": True, "FireJobState": 7, "FireJobErrorCode": 0})
    assert classify(ok).kind == "lost"  # the job completed: accepted, and VTL0 never saw it


def test_18620_at_boot_is_not_a_servicing_failure() -> None:
    assert classify(ev({}, [18620], event_at={18620: -500.0})).kind == "lost"
    assert classify(ev({}, [18620], event_at={18620: 200.0})).kind == "servicing-failed"


def test_a_guest_initiated_shutdown_event_proves_delivery_only_with_an_accepted_ic_call() -> None:
    assert classify(ev({"Running": False}, [18508])).kind == "preserved"
    assert (
        classify(ev({"Running": False, "IcAtFire": "No Contact", "FireReturn": 32775}, [18508])).kind
        == "rejected"
    )


def test_missing_com1_evidence_is_inconclusive_not_lost() -> None:
    v = classify(ev({"Com1Error": "The operation has timed out."}))
    assert v.kind == "infra-error" and "inconclusive" in v.reason


def test_job_state_by_name_and_the_hresult_from_the_description() -> None:
    v = classify(ev({"JobState": 10, "JobErrorCode": 32768,
                     "JobErrorDescription": "Failed to save: 0xC0370802"}))  # fmt: skip
    assert (
        v.kind == "servicing-failed"
        and "with HRESULT 0xC0370802 (the management VTL failed to save" in v.reason
    )
