"""The Hyper-V race's answer in the engine's terms: ``Invoke-TestbedRace``'s outcome
and the worker's event log, as ``RaceEvidence`` on the race's clock.

Kept apart from the backend (which only calls the host) and from
``testbed.backends.hyperv.evidence`` (which reads the verdict from this).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from testbed.backends.hyperv.config import HyperVSpec
from testbed.backends.hyperv.evidence import ACCEPTED, GUEST_SHUTDOWN_EVENTS, JOB_COMPLETED, POWER_OFF_EVENTS
from testbed.backends.hyperv.module import RaceOutcome, WorkerEvent
from testbed.backends.hyperv.phases import JOB_DONE
from testbed.backends.hyperv.phases import patterns as phase_patterns
from testbed.core.evidence import RaceEvidence, TimelineEntry


def evidence(
    outcome: RaceOutcome,
    events: list[WorkerEvent],
    spec: HyperVSpec,
    grace_ms: float,
    fired: bool,
    phase: str | None = None,
) -> RaceEvidence:
    """The race in the engine's terms, on the host's clock (the race's Stopwatch, in
    ns). The host's own answer (PascalCase, as on the wire) is kept whole in ``raw``;
    ``phase`` is the one the shot followed, if it followed one."""
    anchor = _guest_anchor_ms(outcome, spec)
    zero = outcome.service_ms if outcome.service_ms is not None else outcome.start_ms
    times = _event_times(outcome, events)
    timeline = _timeline(outcome)
    phases = _phases(outcome, spec)
    raw = {
        "race": outcome.model_dump(by_alias=True),
        "events": [e.model_dump(by_alias=True) for e in events],
        "vtl0_pattern": spec.vtl0_shutdown_pattern,
        "grace_ms": grace_ms,
        "guest_anchor_ms": anchor,
        "ic_event_ms": times.ic_ms,
        "event_ms": sorted(times.first.items()),
        "in_flight": _in_flight(outcome),
        "anchor_missing": outcome.anchor_missing,
    }
    return RaceEvidence(
        backend="hyperv",
        zero_ns=_ns(zero),
        service_requested_ns=_ns(outcome.service_ms),
        service_started_ns=_ns(anchor) if outcome.service_ms is not None else None,
        service_done_ns=_ns(outcome.service_done_ms) if outcome.service_ms is not None else None,
        fire_ns=_ns(outcome.fire_ms),
        # The plan, from the actual times the host stamped when each call was made (each on
        # its own thread): the servicing call's start + offset, or the anchor's stamp +
        # offset for a shot after a phase or the IC. For a negative offset the shot leads
        # and servicing follows it, so the skew is then how late servicing followed.
        fire_planned_ns=_planned_ns(outcome),
        ended_ns=_ns(outcome.off_ms if outcome.off_ms is not None else times.off_ms),
        ended=not outcome.running,
        ic_at_fire=outcome.ic_at_fire,
        decision=_decision(outcome),
        message_id="shutdown-ic" if fired else None,
        guest_anchor="COM3" if anchor is not None else None,
        # Hyper-V reports a completed job, not a restart: where COM3 is read and the
        # vm_config names OpenHCL's start line, that line after the request proves it.
        servicing_proof=_servicing_proof(outcome, spec),
        phases=phases,
        phase=phase,
        # The host's own stamp of the line the shot followed (its .NET match), else ours.
        phase_ns=(_ns(outcome.anchor_ms) if outcome.anchor_ms is not None else phases.get(phase))
        if phase is not None
        else None,
        ic_reoffered_ns=_ns(outcome.anchor_ms) if outcome.fire_after == "ic-ready" else None,
        timeline=timeline,
        raw=raw,
    )


def _planned_ns(outcome: RaceOutcome) -> int | None:
    if outcome.fire_ms is None:
        return None
    if outcome.fire_planned_ms is not None:
        return _ns(outcome.fire_planned_ms)
    return _ns(outcome.service_ms + outcome.offset_ms) if outcome.service_ms is not None else None


def _phases(outcome: RaceOutcome, spec: HyperVSpec) -> dict[str, int]:
    """Each phase's first mark after the servicing request, on the race's clock (ns): a
    COM3 line's arrival, or the job seen over (the anchor's stamp when the shot followed
    it, else the coarser time the race's own poll saw it)."""
    if outcome.service_ms is None:
        return {}
    out: dict[str, int] = {}
    for name, pattern in phase_patterns(spec.com3_phase_patterns).items():
        rx = re.compile(pattern)
        at = next((x.ms for x in outcome.com3 if x.ms >= outcome.service_ms and rx.search(x.line)), None)
        if at is not None:
            out[name] = _ns_of(at)
    done = outcome.anchor_ms if outcome.fire_after == JOB_DONE else outcome.service_done_ms
    if done is not None:
        out[JOB_DONE] = _ns_of(done)
    return out


def _guest_anchor_ms(outcome: RaceOutcome, spec: HyperVSpec) -> float | None:
    """When COM3 shows OpenHCL starting (the vm_config's pattern, if it names one): the
    guest's own mark of the servicing's start, on the race's clock."""
    if not spec.com3_servicing_start_pattern:
        return None
    pat = re.compile(spec.com3_servicing_start_pattern)
    return next((x.ms for x in outcome.com3 if pat.search(x.line)), None)


@dataclass(frozen=True)
class _EventTimes:
    """The worker's events on the race's clock (ms)."""

    first: dict[int, float]  # each event id's first time
    ic_ms: float | None  # the first shutdown-IC event
    off_ms: float | None  # the last power-off event


def _event_times(outcome: RaceOutcome, events: list[WorkerEvent]) -> _EventTimes:
    """The events on the race's clock (the host's wall clock, from StartedUtc at StartMs).
    The shutdown-IC event matters most: with no COM1 line, it still proves a delivery
    that came before servicing."""
    ic_event_ms = None
    off_event_ms = None
    event_ms: dict[int, float] = {}
    started = datetime.fromisoformat(outcome.started_utc)
    for e in events:
        at: float = outcome.start_ms + (datetime.fromisoformat(e.time_utc) - started).total_seconds() * 1000
        event_ms.setdefault(e.id, at)
        if e.id in GUEST_SHUTDOWN_EVENTS and ic_event_ms is None:
            ic_event_ms = at
        off_event_ms = at if e.id in POWER_OFF_EVENTS else off_event_ms
    return _EventTimes(event_ms, ic_event_ms, off_event_ms)


def _timeline(outcome: RaceOutcome) -> list[TimelineEntry]:
    """Both serial ports' lines and the host's own steps, in time order."""
    timeline = [TimelineEntry(_ns_of(x.ms), "COM1", x.line) for x in outcome.com1]
    timeline += [TimelineEntry(_ns_of(x.ms), "COM3", x.line) for x in outcome.com3]
    for when, label in ((outcome.service_ms, "ReloadManagementVtl"), (outcome.fire_ms, "InitiateShutdown"),
                        (outcome.service_returned_ms, f"ReloadManagementVtl returned {outcome.service_return}"),
                        (outcome.fire_returned_ms, f"InitiateShutdown returned {outcome.fire_return}"),
                        (outcome.service_done_ms, "servicing job done"), (outcome.off_ms, "VM off"),
                        (outcome.anchor_ms, f"anchor ({outcome.fire_after}) seen")):  # fmt: skip
        if when is not None:
            timeline.append(TimelineEntry(_ns_of(when), "host", label))
    timeline += [
        TimelineEntry(_ns_of(x.ms), "host", f"shutdown IC {x.state}") for x in outcome.ic_transitions
    ]
    return sorted(timeline, key=lambda e: e.t_ns)


def _in_flight(outcome: RaceOutcome) -> str | None:
    """Which call the other one was made during: "servicing" (the shot landed while
    ReloadManagementVtl had not returned), "shutdown" (servicing was requested while
    InitiateShutdown had not), None (neither, or one of them was not made)."""
    s0, s1 = outcome.service_ms, outcome.service_returned_ms
    f0, f1 = outcome.fire_ms, outcome.fire_returned_ms
    if s0 is None or f0 is None:
        return None
    if s0 <= f0 and (s1 is None or f0 < s1):
        return "servicing"
    if f0 <= s0 and (f1 is None or s0 < f1):
        return "shutdown"
    return None


def _decision(outcome: RaceOutcome) -> str | None:
    """What InitiateShutdown returned, in the engine's words (None: it was not called)."""
    if outcome.fire_return is None:
        return None
    return "accepted" if outcome.fire_return in ACCEPTED else "refused"


def _servicing_proof(outcome: RaceOutcome, spec: HyperVSpec) -> str | None:
    """ "restarted" when COM3 shows OpenHCL starting after the request, "unproven" for a
    servicing the host only reports done, None when it was not done."""
    done = outcome.service_ms is not None and (
        outcome.service_return == 0 or outcome.job_state == JOB_COMPLETED
    )
    if not done:
        return None
    if spec.com3_restart_pattern and outcome.com3:
        rx = re.compile(spec.com3_restart_pattern)
        assert outcome.service_ms is not None
        if any(rx.search(x.line) and x.ms >= outcome.service_ms for x in outcome.com3):
            return "restarted"
    return "unproven"


def _ns_of(ms: float) -> int:
    return int(round(ms * 1e6))


def _ns(ms: float | None) -> int | None:
    return _ns_of(ms) if ms is not None else None
