"""Verdicts from Hyper-V evidence: the host-timed race result of ``Invoke-TestbedRace``,
the worker's event log, and the VTL0 (COM1) and OpenHCL (COM3) serial lines.

Classified on numbers (event IDs, return values, job error codes), never on
message text, which is localized and varies between builds.
"""

from __future__ import annotations

import re
from typing import Any

from testbed.core.evidence import RaceEvidence
from testbed.core.verdicts import Verdict

JOB_STARTED = 4096
JOB_COMPLETED = 7
# Microsoft-Windows-Hyper-V-Worker-Admin event IDs (CONTEXT.md).
EV_TURNED_OFF = 18502
EV_SHUTDOWN_IC = 18504
EV_SHUTDOWN_BY_GUEST = 18508
EV_OFF_ON_GUEST_RESET = 18515
EV_MANAGEMENT_VTL_FAILED = 18620
EV_WORKER_TERMINATED = 14070
POWER_OFF_EVENTS = frozenset({EV_TURNED_OFF, EV_SHUTDOWN_IC, EV_SHUTDOWN_BY_GUEST})  # petri's set
CRASH_EVENTS = {
    18528: "stopped after a critical error",
    18539: "triple fault",
    18540: "triple fault",
    18550: "triple fault",
    18560: "triple fault",
    18590: "guest crash report",
    EV_OFF_ON_GUEST_RESET: "turned off because the guest reset (TurnOffOnGuestRestart)",
}
# Servicing failure codes documented publicly (job ErrorCode / event data).
SERVICING_CODES = {
    0xC0370800: "servicing already in progress",
    0xC0370801: "invalid protocol response from the management VTL",
    0xC0370802: "the management VTL failed to save state (the VM resumes unharmed)",
    0xC0370803: "the management VTL failed to restore (often corrupt saved state)",
    0xC037080A: "no GET protocol with the management VTL (timeout)",
}
ACCEPTED = (0, JOB_STARTED)  # InitiateShutdown / ReloadManagementVtl: done, or job started
# The ValueMap the Msvm_* methods share for their return value (as documented for
# InitiateShutdown, RequestStateChange, ...), so a reason says what a code means.
RETURN_CODES = {
    0: "Completed with No Error", 4096: "Method Parameters Checked - Job Started", 32768: "Failed",
    32769: "Access Denied", 32770: "Not Supported", 32771: "Status is unknown", 32772: "Timeout",
    32773: "Invalid parameter", 32774: "System is in use", 32775: "Invalid state for this operation",
    32776: "Incorrect data type", 32777: "System is not available", 32778: "Out of memory",
}  # fmt: skip
# The VM went off because the guest shut down: through the IC (18504) or by itself (18508).
# 18502 (turned off) is the host pulling the plug, never a delivery. Whether the guest
# acted on *our* request is proven by the IC call's own result, not by the event.
GUEST_SHUTDOWN_EVENTS = frozenset({EV_SHUTDOWN_IC, EV_SHUTDOWN_BY_GUEST})
JOB_STATES = {7: "Completed", 8: "Terminated", 9: "Killed", 10: "Exception"}  # CIM_ConcreteJob
_HRESULT = re.compile(r"0x[0-9A-Fa-f]{8}")


def job_error(state: Any, code: Any, description: str) -> str:
    """A finished job's failure in words: its state by name, and the HRESULT, which is in
    ErrorDescription (ErrorCode is a uint16 and cannot hold one) or else ErrorCode."""
    name = JOB_STATES.get(int(state), f"state {state}") if state is not None else "an unknown state"
    m = _HRESULT.search(description or "")
    if m:
        return f"ended {name} with HRESULT {code_name(int(m.group(0), 16))} (from ErrorDescription)"
    return f"ended {name} with ErrorCode {code_name(int(code or 0))}" + (
        f": {description}" if description else ""
    )


def returned(rv: Any) -> str:
    """A method's return value with its ValueMap text: ``32775 (Invalid state for this operation)``."""
    text = RETURN_CODES.get(rv) if isinstance(rv, int) else None
    return f"{rv} ({text})" if text else str(rv)


def code_name(code: int) -> str:
    c = code & 0xFFFFFFFF
    return f"0x{c:08X}" + (f" ({SERVICING_CODES[c]})" if c in SERVICING_CODES else "")


def servicing_failure(race: dict[str, Any], event_ms: dict[int, float]) -> str | None:
    """Why servicing failed, from numbers only; None when it succeeded or did not run.
    18620 counts only when it came after the servicing request (petri: it is a failure
    before VTL0 started, so at boot it says nothing about servicing)."""
    if race.get("ServiceMs") is None:
        return None
    rv = race.get("ServiceReturn")
    if rv not in ACCEPTED:
        return f"ReloadManagementVtl returned {returned(rv)}"
    at = event_ms.get(EV_MANAGEMENT_VTL_FAILED)
    if at is not None and at >= race["ServiceMs"]:
        return f"event {EV_MANAGEMENT_VTL_FAILED}: failure in the management VTL"
    if rv == JOB_STARTED:
        if race.get("JobDone") is False:
            return f"the servicing job was still in state {race.get('JobState')} after TimeoutHintSecs + 30 s"
        code = race.get("JobErrorCode") or 0
        if race.get("JobState") != JOB_COMPLETED or code:
            return "the servicing job " + job_error(
                race.get("JobState"), code, race.get("JobErrorDescription") or ""
            )
    return None


def _lines(entries: list[dict[str, Any]], port: str) -> list[str]:
    return [f"{port} {e['Ms']:.1f} ms: {e['Line']}" for e in entries]


def classify(evidence: RaceEvidence) -> Verdict:
    """The verdict from what HyperVBackend.race returned (its ``raw`` part: the host's
    answer as on the wire, the worker's events, the COM1 pattern)."""
    if evidence.infra_error:
        return Verdict.infra(evidence.infra_error)
    ev = evidence.raw
    race: dict[str, Any] = ev["race"]
    events: list[dict[str, Any]] = ev.get("events", [])
    ids = {int(e["Id"]) for e in events}
    ev_lines = [f"event {e['Id']} at {e['TimeUtc']}: {e.get('Message', '')}".strip() for e in events]
    pattern = re.compile(ev["vtl0_pattern"])
    delivered = [e for e in race.get("Com1") or [] if pattern.search(e["Line"])]
    delivered_lines = _lines(delivered, "COM1")
    fired = race.get("FireMs") is not None
    servicing = race.get("ServiceMs") is not None
    svc_lines = [
        f"host ReloadManagementVtl at {race['ServiceMs']:.1f} ms returned {race.get('ServiceReturn')}"
        + (f", job state {race.get('JobState')} error {race.get('JobErrorCode')}" if race.get("JobState") else "")
    ] if servicing else []  # fmt: skip
    fire_line = (
        [f"host InitiateShutdown at {race['FireMs']:.1f} ms returned {race.get('FireReturn')}; "
         f"shutdown IC was {race.get('IcAtFire')!r}"] if fired else []
    )  # fmt: skip
    event_ms = {int(i): float(ms) for i, ms in ev.get("event_ms", [])}
    # The IC call's own result: returned 0, or 4096 and its job completed (a job that
    # failed after 4096 took nothing to the guest).
    fire_job_failed = race.get("FireReturn") == JOB_STARTED and race.get("FireJobState") not in (
        None,
        JOB_COMPLETED,
    )
    accepted = fired and race.get("FireReturn") in ACCEPTED and not fire_job_failed

    crash = sorted(ids & set(CRASH_EVENTS))
    if crash:
        return Verdict("guest-crash", f"event {crash[0]}: {CRASH_EVENTS[crash[0]]}", ev_lines)
    if EV_WORKER_TERMINATED in ids:
        return Verdict("infra-error", "the VM worker process terminated (event 14070)", ev_lines)
    if len(delivered) >= 2:
        return Verdict(
            "duplicated", f"VTL0 handled the shutdown {len(delivered)} times", delivered_lines + fire_line
        )

    failure = servicing_failure(race, event_ms)
    if delivered or (ids & GUEST_SHUTDOWN_EVENTS and accepted and race.get("IcAtFire") == "OK"):
        anchor = ev.get("guest_anchor_ms")
        anchor = anchor if anchor is not None else race.get("ServiceMs")
        # VTL0's own line; else the host's 18504 event (later than the delivery, so it can
        # prove "before servicing" but never rule it out).
        t_del = delivered[0]["Ms"] if delivered else ev.get("ic_event_ms")
        shown = delivered_lines + [ln for ln in ev_lines if int(ln.split()[1]) in GUEST_SHUTDOWN_EVENTS]
        if not servicing or (t_del is not None and anchor is not None and t_del < anchor):
            return Verdict("delivered-before", "VTL0 got the shutdown before servicing took hold",
                           shown + fire_line + svc_lines)  # fmt: skip
        if failure is None:
            why = "delivered exactly once, after servicing"
            if not delivered:
                off = sorted(ids & GUEST_SHUTDOWN_EVENTS)[0]
                why += f" (event {off}; no VTL0 line on COM1, so delivered-before cannot be ruled out)"
            return Verdict("preserved", why, shown + fire_line + svc_lines)
    if failure is not None:
        fate = "VM still running" if race.get("Running") else "VM off"
        return Verdict("servicing-failed", f"{failure}; {fate}", svc_lines + ev_lines)
    if fired and fire_job_failed:
        job = job_error(
            race.get("FireJobState"), race.get("FireJobErrorCode"), race.get("FireJobErrorDescription") or ""
        )
        return Verdict("rejected", f"InitiateShutdown started a job that {job}", fire_line)
    if fired and (race.get("IcAtFire") != "OK" or race.get("FireReturn") not in ACCEPTED):
        return Verdict(
            "rejected",
            f"the shutdown IC was {race.get('IcAtFire')!r} and InitiateShutdown returned "
            f"{returned(race.get('FireReturn'))}",
            fire_line,
        )
    if not fired:
        return Verdict("preserved", "servicing completed; no message was at stake", svc_lines)
    if not race.get("Running"):
        return Verdict(
            "infra-error", "the VM turned off, but not through the shutdown IC", ev_lines + fire_line
        )
    if race.get("Com1Error"):
        # No VTL0 evidence: a VM still running may have been told and be slow, or not told.
        return Verdict("infra-error", f"inconclusive: COM1 could not be read ({race['Com1Error']}), so a lost "
                       "shutdown cannot be told from a slow one", fire_line + svc_lines)  # fmt: skip
    return Verdict(
        "lost",
        "the host's shutdown request was accepted with the IC OK, VTL0 never saw it; "
        f"the VM was still running {ev.get('grace_ms', 0):.0f} ms after servicing",
        fire_line + svc_lines + [f"host shutdown IC after the race: {race.get('IcAfter')!r}"],
    )
