"""Verdicts from Hyper-V evidence: the host-timed race result of ``Invoke-TestbedRace``,
the worker's event log, and the VTL0 (COM1) and OpenHCL (COM3) serial lines.

Classified on numbers (event IDs, return values, job error codes), never on
message text, which is localized and varies between builds.
``facts`` reads them into ``Facts``; ``testbed.core.verdicts.decide`` gives the verdict.
"""

from __future__ import annotations

import re
from typing import Any

from testbed.core.evidence import RaceEvidence
from testbed.core.verdicts import NOTHING, Facts, Finding, Request, Verdict, decide

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
# InitiateShutdown, RequestStateChange, ...), so a reason says what a code means;
# 32779-32782 are InitiateShutdown's own (Msvm_ShutdownComponent).
RETURN_CODES = {
    0: "Completed with No Error", 4096: "Method Parameters Checked - Job Started", 32768: "Failed",
    32769: "Access Denied", 32770: "Not Supported", 32771: "Status is unknown", 32772: "Timeout",
    32773: "Invalid parameter", 32774: "System is in use", 32775: "Invalid state for this operation",
    32776: "Incorrect data type", 32777: "System is not available", 32778: "Out of memory",
    32779: "File not found", 32780: "The system is not ready",
    32781: "The machine is locked and cannot be shut down without the force option",
    32782: "A system shutdown is in progress",
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
    if race.get("ServiceError"):  # the call threw, or had not returned by TimeoutHintSecs + 30 s
        return f"ReloadManagementVtl failed on the host: {race['ServiceError']}"
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
    """Hyper-V's verdict: its facts, decided as for every backend."""
    return decide(facts(evidence))


def facts(evidence: RaceEvidence) -> Facts:
    """The facts of what HyperVBackend.race returned (its ``raw`` part: the host's answer
    as on the wire, the worker's events, the COM1 pattern)."""
    if evidence.infra_error:
        return Facts(infra_error=Finding(evidence.infra_error, (evidence.infra_error,)))
    ev = evidence.raw
    race: dict[str, Any] = ev["race"]
    events: list[dict[str, Any]] = ev.get("events", [])
    ids = {int(e["Id"]) for e in events}
    ev_lines = tuple(f"event {e['Id']} at {e['TimeUtc']}: {e.get('Message', '')}".strip() for e in events)
    servicing = race.get("ServiceMs") is not None
    svc_lines = (
        f"host ReloadManagementVtl at {race['ServiceMs']:.1f} ms returned {race.get('ServiceReturn')}"
        + (f", job state {race.get('JobState')} error {race.get('JobErrorCode')}" if race.get("JobState") else ""),
    ) if servicing else ()  # fmt: skip
    failure = servicing_failure(race, {int(i): float(ms) for i, ms in ev.get("event_ms", [])})
    request, request_seen = _request(race)
    acted, before, acted_seen = _acted(ev, ids, ev_lines, accepted=request == "accepted")
    crash = sorted(ids & set(CRASH_EVENTS))
    worker_gone = EV_WORKER_TERMINATED in ids
    fate = Finding("VM off", ev_lines)
    if race.get("Running"):
        fate = Finding(f"VM still running at the end of the {ev.get('grace_ms', 0):.0f} ms grace",
                       (f"host shutdown IC after the race: {race.get('IcAfter')!r}",))  # fmt: skip
    return Facts(
        crash=Finding(f"event {crash[0]}: {CRASH_EVENTS[crash[0]]}", ev_lines) if crash else None,
        infra_error=Finding("the VM worker process terminated (event 14070)", ev_lines)
        if worker_gone
        else None,
        request=request,
        request_seen=request_seen,
        servicing="failed" if failure else "done" if servicing else "none",
        servicing_proof=evidence.servicing_proof,
        # A failure read from the worker's events names them.
        servicing_seen=Finding(failure or "servicing done", svc_lines + (ev_lines if failure else ())),
        acted=acted,
        before_servicing=before,
        acted_seen=acted_seen,
        ended=not race.get("Running"),
        fate=fate,
    )


def _request(race: dict[str, Any]) -> tuple[Request, Finding]:
    """What the host did with InitiateShutdown: its return value, the IC's state when it
    was called, and the job it started (a job that failed after 4096 took nothing to
    the guest)."""
    if race.get("FireMs") is None:
        if race.get("AnchorMissing"):  # fired after a phase or the IC's return, which never came
            return "unfired", Finding(f"the shot was never fired: {race['AnchorMissing']}")
        return "none", NOTHING
    fire_line = (f"host InitiateShutdown at {race['FireMs']:.1f} ms returned {race.get('FireReturn')}; "
                 f"shutdown IC was {race.get('IcAtFire')!r}",)  # fmt: skip
    if race.get("FireReturn") == JOB_STARTED and race.get("FireJobState") not in (None, JOB_COMPLETED):
        job = job_error(
            race.get("FireJobState"), race.get("FireJobErrorCode"), race.get("FireJobErrorDescription") or ""
        )
        return "refused", Finding(f"InitiateShutdown started a job that {job}", fire_line)
    if race.get("IcAtFire") != "OK" or race.get("FireReturn") not in ACCEPTED:
        return "refused", Finding(f"the shutdown IC was {race.get('IcAtFire')!r} and InitiateShutdown returned "
                                  f"{returned(race.get('FireReturn'))}", fire_line)  # fmt: skip
    return "accepted", Finding("the host's shutdown request was accepted with the IC OK", fire_line)


def _acted(
    ev: dict[str, Any], ids: set[int], ev_lines: tuple[str, ...], *, accepted: bool
) -> tuple[int | None, bool, Finding]:
    """How many times VTL0 acted on the shutdown, whether before servicing took hold,
    and the lines: VTL0's own COM1 lines, else the host's guest-shutdown event after an
    accepted IC call (later than the delivery, so it can prove "before servicing" but
    never rule it out). Unknown (None) when COM1 could not be read and nothing else
    shows a delivery."""
    race: dict[str, Any] = ev["race"]
    pattern = re.compile(ev["vtl0_pattern"])
    delivered = [e for e in race.get("Com1") or [] if pattern.search(e["Line"])]
    shown = tuple(_lines(delivered, "COM1")) + tuple(
        ln for ln in ev_lines if int(ln.split()[1]) in GUEST_SHUTDOWN_EVENTS
    )
    anchor = ev.get("guest_anchor_ms")
    anchor = anchor if anchor is not None else race.get("ServiceMs")
    t_del = delivered[0]["Ms"] if delivered else ev.get("ic_event_ms")
    before = t_del is not None and anchor is not None and t_del < anchor
    if delivered:
        return len(delivered), before, Finding(lines=shown)
    if ids & GUEST_SHUTDOWN_EVENTS and accepted:
        off = sorted(ids & GUEST_SHUTDOWN_EVENTS)[0]
        caveat = f"event {off}; no VTL0 line on COM1, so delivered-before cannot be ruled out"
        return 1, before, Finding(caveat, shown)
    if race.get("Com1Error"):
        # No VTL0 evidence: a VM still running may have been told and be slow, or not told.
        return None, False, Finding(f"COM1 could not be read ({race['Com1Error']})", shown)
    return 0, False, Finding(lines=shown)
