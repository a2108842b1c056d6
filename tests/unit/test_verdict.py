"""Verdicts from recorded evidence: every kind, from the shapes the agent really returns."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.backends.qemu import evidence
from testbed.core.evidence import RaceEvidence
from testbed.core.verdicts import VERDICTS, Verdict


def classify(res: dict[str, Any]) -> Verdict:
    """Through the backend's own evidence path: the agent's result -> RaceEvidence -> verdict."""
    if "infra_error" in res:
        return evidence.classify(RaceEvidence.failed("qemu", res["infra_error"]))
    return evidence.classify(evidence.evidence(res))


def ev(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "shutdown_id": "sd1",
        "serial": [
            "TB t=1000 PV ready image=v2",
            "TB t=2000 PV svc-start id=1 from=v2 to=v2 strategy=none",
            "TB t=2400 PV svc-done id=1 image=v2",
        ],
        "host_log": [
            {"t_ns": 1, "kind": "sent", "port": "vmbus", "line": "MSG seq=0 t=1 type=shutdown id=sd1"}
        ],
        "qmp_events": [],
        "svc": {"request_ns": 1, "start_ns": 2, "done_ns": 3, "ok": True},
        "decision": "posted",
        "ended": False,
        "shutdown": None,
    }
    base.update(kw)
    return base


GUEST_SHUTDOWN = {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}}


def delivered(t: int, times: int = 1) -> list[str]:
    return [
        "TB t=1000 PV ready image=v2",
        "TB t=2000 PV svc-start id=1 from=v2 to=v2 strategy=none",
    ] + [f"TB t={t + i} VTL0 SHUTDOWN id=sd1 seq=0 reason=testbed" for i in range(times)]


CASES = {
    "preserved": ev(serial=delivered(2500), ended=True, shutdown=GUEST_SHUTDOWN),
    "delivered-before": ev(serial=delivered(1500), ended=True, shutdown=GUEST_SHUTDOWN),
    "lost": ev(),
    "duplicated": ev(serial=delivered(2500, times=2), ended=True, shutdown=GUEST_SHUTDOWN),
    "rejected": ev(
        decision="rejected",
        ic_at_fire="not-ready",
        host_log=[{"t_ns": 1, "kind": "rejected", "port": "vmbus", "line": "shutdown id=sd1"}],
    ),
    "servicing-failed": ev(servicing_timeout=True, svc={"request_ns": 1, "start_ns": 2}),
    # ok=1, and the paravisor never offered the IC again: its boot id never changed.
    "servicing-skipped": ev(
        serial=delivered(2500),
        ended=True,
        shutdown=GUEST_SHUTDOWN,
        svc={"request_ns": 1, "start_ns": 2, "done_ns": 3, "ok": True, "boot_before": "ab12"},
    ),
    "guest-crash": ev(
        qmp_events=[{"t_ns": 5, "event": "GUEST_PANICKED", "data": {"action": "pause"}}],
        ended=True,
        shutdown={"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-panic"}},
    ),
    "infra-error": ev(ended=True, shutdown={"event": "QEMU_EXIT", "data": {"rc": -9}}),
}


def test_cases_cover_every_verdict() -> None:
    assert set(CASES) == set(VERDICTS)


@pytest.mark.parametrize("expected", list(CASES))
def test_classify(expected: str) -> None:
    v = classify(CASES[expected])
    assert v.kind == expected, v
    assert v.evidence, "a verdict must name the evidence it was read from"


def test_infra_error_from_the_testbed_is_never_a_product_verdict() -> None:
    v = classify({"infra_error": "AgentLost: agent exited during race"})
    assert v.kind == "infra-error" and "AgentLost" in v.evidence[0]


def test_lost_requires_that_the_host_really_sent() -> None:
    v = classify(ev(host_log=[]))
    assert v.kind == "infra-error"


def test_servicing_failure_reported_by_guest() -> None:
    v = classify(ev(svc={"request_ns": 1, "start_ns": 2, "done_ns": 3, "ok": False, "reason": "exec-failed"}))
    assert v.kind == "servicing-failed" and "exec-failed" in v.reason and "still running" in v.reason


def test_handover_before_servicing_counts_even_if_vtl0_logs_after() -> None:
    """The paravisor relayed the message, then read the servicing request; VTL0 logged
    it a moment later. It was accepted before servicing took hold."""
    serial = ["TB t=1990 PV relay seq=0 id=sd1", "TB t=2000 PV svc-start id=1 from=v2 to=v2 strategy=none",
              "TB t=2050 VTL0 SHUTDOWN id=sd1 seq=0 reason=testbed"]  # fmt: skip
    v = classify(ev(serial=serial, ended=True, shutdown=GUEST_SHUTDOWN))
    assert v.kind == "delivered-before" and v.evidence[0].endswith("PV relay seq=0 id=sd1")


def test_baseline_without_servicing_is_delivered_before() -> None:
    v = classify(
        ev(
            svc={},
            serial=["TB t=5 VTL0 SHUTDOWN id=sd1 seq=0 reason=x"],
            ended=True,
            shutdown=GUEST_SHUTDOWN,
        )
    )
    assert v.kind == "delivered-before"


@pytest.mark.parametrize(
    ("svc", "proof", "kind"),
    [
        ({"boot_before": "a1", "boot_after": "b2"}, "restarted", "preserved"),
        ({"boot_before": "a1", "boot_after": "a1"}, "skipped", "servicing-skipped"),
        ({"boot_before": "a1"}, "skipped", "servicing-skipped"),
        ({}, "unproven", "preserved"),  # a paravisor that announces no boot id: said, not guessed
    ],
)
def test_servicing_proof_from_the_boot_id(svc: dict[str, Any], proof: str, kind: str) -> None:
    res = ev(serial=delivered(2500), ended=True, shutdown=GUEST_SHUTDOWN,
             svc={"request_ns": 1, "start_ns": 2, "done_ns": 3, "ok": True, **svc})  # fmt: skip
    race = evidence.evidence(res)
    assert race.servicing_proof == proof
    assert evidence.classify(race).kind == kind


def test_a_phase_that_never_came_fired_nothing() -> None:
    v = classify(ev(decision=None, host_log=[], phase_missing="phase restore never came in this servicing"))
    assert v.kind == "infra-error" and v.reason.startswith("phase restore never came")
    # ...unless servicing failed: then that is the verdict
    v = classify(
        ev(decision=None, host_log=[], phase_missing="phase restore never came", servicing_timeout=True)
    )
    assert v.kind == "servicing-failed"
