"""What one iteration plans and what it leaves behind, in terms every backend states:
the plan (``RacePlan``), the typed evidence (``RaceEvidence``, on the host's clock),
and a host's preflight report.

The engine reads only what is typed here. What a backend alone understands (QMP
events, Hyper-V event IDs, OpenVMM console lines) goes into ``RaceEvidence.raw``, is
kept in the run folder, and is read back only by that backend's own fact extraction
(``Backend.classify`` turns it into ``Facts``; ``testbed.core.verdicts.decide`` gives
the verdict).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class HostReport:
    """Preflight: every missing thing with the command that fixes it."""

    host: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass
class RacePlan:
    """What one iteration fires. ``offset_ms`` is from the servicing request (t = 0)."""

    iteration: int
    offset_ms: float | None
    service: bool = True
    shutdown: bool = True
    shutdown_mode: str = "offset"  # or "after-ready": the seed test's order
    image: str | None = None  # paravisor image to service into (None = same)
    phase: str | None = None  # shutdown_mode "phase": fire offset_ms after this servicing phase
    arm: str | None = None  # a search's arm this iteration probes (the flaky-window search)
    stream: dict[str, Any] | None = None  # StreamSpec as a mapping: traffic during the race


@dataclass
class TimelineEntry:
    """One thing that happened, on the host's monotonic clock (ns)."""

    t_ns: int
    source: str  # "host", "guest", "qmp", "COM1", "console", ...
    line: str


@dataclass
class RaceEvidence:
    """What one race left behind, in terms every backend can state.

    All ``*_ns`` values are on one clock: the host's monotonic clock where the
    race was fired (any epoch; only differences mean something).  ``None``
    means "not known", never zero.
    """

    backend: str
    zero_ns: int | None = None  # t = 0: the servicing request, or the race's start without one
    service_requested_ns: int | None = None
    service_started_ns: int | None = None  # as the paravisor reports it, when it does
    service_done_ns: int | None = None
    ic_reoffered_ns: int | None = None
    fire_planned_ns: int | None = None
    fire_ns: int | None = None
    ended_ns: int | None = None  # the VM went off
    ended: bool = False
    end_reason: str | None = None
    ic_at_fire: str | None = None
    decision: str | None = None  # what the host did with the request (posted, held, rejected, ...)
    message_id: str | None = None  # the shutdown request's id; None when none was fired
    features: list[str] | None = None  # negotiated preservation features, where there are any
    guest_anchor: str | None = None  # what marks service_started_ns ("paravisor", "COM3", ...)
    # Did the paravisor really restart? "restarted" (the backend saw it), "skipped" (it
    # reported success and provably did not), "unproven" (this backend cannot tell);
    # None when no servicing was requested or it failed.
    servicing_proof: str | None = None
    # Servicing phases as the host saw them arrive (name -> ns, first arrival), and, when
    # the shutdown was fired on one, which one and when its line arrived.
    phases: dict[str, int] = field(default_factory=dict)
    phase: str | None = None
    phase_ns: int | None = None
    timeline: list[TimelineEntry] = field(default_factory=list)
    # With a stream: every message accounted for (per direction: sent, delivered once,
    # lost, duplicated, reordered, refused) and the offsets of the lost ones.
    stream: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the backend's own evidence, for its classify
    infra_error: str | None = None

    @classmethod
    def failed(cls, backend: str, message: str) -> RaceEvidence:
        return cls(backend=backend, infra_error=message)

    # ---- derived numbers: computed here and nowhere else --------------------------
    @staticmethod
    def _ms(a: int | None, b: int | None) -> float | None:
        return (a - b) / 1e6 if a is not None and b is not None else None

    @property
    def offset_ms(self) -> float | None:
        """When the shutdown was fired, from the servicing request (host anchor)."""
        return self._ms(self.fire_ns, self.service_requested_ns)

    @property
    def guest_offset_ms(self) -> float | None:
        """When the shutdown was fired, from the paravisor's own servicing start."""
        return self._ms(self.fire_ns, self.service_started_ns)

    @property
    def ic_ready_offset_ms(self) -> float | None:
        """When the shutdown was fired, from the IC's re-offer after servicing (negative:
        before it came back)."""
        return self._ms(self.fire_ns, self.ic_reoffered_ns)

    @property
    def phase_to_fire_ms(self) -> float | None:
        """From the trigger phase's line arriving to the fire (the delay plus the latency)."""
        return self._ms(self.fire_ns, self.phase_ns)

    def phase_times_ms(self) -> dict[str, float]:
        """Each phase's arrival, in ms from the servicing request."""
        z = self.service_requested_ns
        return {} if z is None else {k: (v - z) / 1e6 for k, v in self.phases.items()}

    def skew_ms(self, planned_ms: float | None) -> float | None:
        """Fire time minus plan: against the backend's own planned fire time where it set
        one (a delay after the re-offer is planned only once the re-offer is seen), else
        against the planned offset from the servicing request."""
        if self.fire_planned_ns is not None and self.fire_ns is not None:
            return (self.fire_ns - self.fire_planned_ns) / 1e6
        off = self.offset_ms
        return off - planned_ms if off is not None and planned_ms is not None else None

    @property
    def servicing_lag_ms(self) -> float | None:
        return self._ms(self.service_started_ns, self.service_requested_ns)

    @property
    def servicing_ms(self) -> float | None:
        return self._ms(self.service_done_ns, self.service_requested_ns)

    @property
    def delivery_ms(self) -> float | None:
        """From the later of the fire and the end of servicing to the VM going off."""
        if self.ended_ns is None or self.fire_ns is None:
            return None
        return (self.ended_ns - max(self.fire_ns, self.service_done_ns or 0)) / 1e6

    def timeline_ms(self) -> list[tuple[float, str]]:
        """The timeline in ms from t = 0, each line labelled with its source."""
        if self.zero_ns is None:
            return []
        z = self.zero_ns
        return sorted(((e.t_ns - z) / 1e6, f"{e.source} {e.line}") for e in self.timeline)

    def as_dict(self) -> dict[str, Any]:
        """The evidence as plain data (for timeline.json): fields as they are, the timeline
        as mappings. Shallow on purpose: ``dataclasses.asdict`` deep-copies every line and
        was a third of the controller's time per try at a fleet's rates."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["timeline"] = [{"t_ns": e.t_ns, "source": e.source, "line": e.line} for e in self.timeline]
        return d
