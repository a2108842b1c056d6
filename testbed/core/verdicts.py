"""The verdict vocabulary, and the one decision from race evidence to a verdict: the
bottom layer that the engine, the reports, the config loader and every backend import
(and that imports nothing of theirs).

Each backend reads its own evidence (QMP events, console lines, Hyper-V event IDs) into
``Facts``, in terms every backend shares; ``decide`` turns facts into a ``Verdict``, the
same way for every backend, so one race cannot get two verdicts for two backends. The
engine counts verdicts and never looks inside a backend's evidence.

``decide``: the first row that holds gives the verdict (``acted``: how many times the
guest acted on the shutdown request).

    ====  ========================================  ===================================
    row   when                                      verdict
    ====  ========================================  ===================================
    1     the guest crashed                         guest-crash
    2     the race could not be read                infra-error
    3     acted 2+ times                            duplicated
    4     acted once, before servicing took hold    delivered-before
          (or with no servicing at all)
    5     servicing failed                          servicing-failed
    6     servicing reported success, provably      servicing-skipped
          without a restart
    7     acted once                                preserved
    8     the host refused the request              rejected
    9     no request was planned                    preserved (nothing at stake)
    10    a request was planned, never fired        infra-error
    11    the VM went off without acting on it      infra-error
    12    fired, neither posted nor refused         infra-error
    13    whether the guest acted is unknown        infra-error (inconclusive)
    14    otherwise: accepted, never acted on,      lost
          the VM still running at the deadline
    ====  ========================================  ===================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

VERDICTS = (
    "preserved",
    "delivered-before",
    "lost",
    "duplicated",
    "rejected",
    "servicing-failed",
    "servicing-skipped",
    "guest-crash",
    "infra-error",
)
# servicing-skipped: the host was told servicing succeeded and it did not happen (openvmm
# #2698), so whatever the message did proves nothing; a product failure, never a pass.
PRODUCT_FAILURES = ("lost", "duplicated", "servicing-skipped")


@dataclass
class Verdict:
    """One iteration's outcome, with the evidence lines it was read from."""

    kind: str
    reason: str
    evidence: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.kind, "reason": self.reason, "evidence": self.evidence}

    @classmethod
    def infra(cls, message: str) -> Verdict:
        return cls("infra-error", message, [message])


@dataclass(frozen=True)
class Finding:
    """One fact as a backend read it: what it says, in words a verdict can give as its
    reason, and the evidence lines it was read from, which the verdict names so that
    every verdict can be checked against the run folder."""

    says: str = ""
    lines: tuple[str, ...] = ()


NOTHING = Finding()

# What became of the shutdown request, as the host saw it.
#   none:       none was planned (a servicing-only race)
#   unfired:    one was planned and never fired (its trigger never came)
#   refused:    the host would not take it (the IC was not ready, the call failed)
#   accepted:   the host took it and posted it to the guest
#   unanswered: fired, and the host's evidence shows it neither posted nor refused
Request = Literal["none", "unfired", "refused", "accepted", "unanswered"]
# Servicing: none requested, done (the host saw it finish), or failed (it failed, or
# did not finish by its deadline).
Servicing = Literal["none", "done", "failed"]


@dataclass(frozen=True)
class Facts:
    """What one race showed, in the terms every backend can state: each backend's
    evidence code reads its own lines into these, and ``decide`` alone turns them into
    a verdict. Each ``*_seen`` / ``Finding`` holds the lines a fact was read from."""

    crash: Finding | None = None
    """The guest crashed (a panic, a triple fault, a halt that was no power-off)."""
    infra_error: Finding | None = None
    """The race cannot be read (the testbed failed, the VMM died or lacks the IC), so
    no product verdict is honest."""
    request: Request = "none"
    """What became of the shutdown request (see ``Request``)."""
    request_seen: Finding = NOTHING
    """The host's lines about the request; ``says`` is what the host did with it: the
    refusal (the reason of ``rejected``), or the acceptance (the start of ``lost``'s)."""
    servicing: Servicing = "none"
    """Whether servicing was requested and how it ended (see ``Servicing``)."""
    servicing_proof: str | None = None
    """As ``RaceEvidence.servicing_proof``: "restarted", "skipped" (reported done and
    provably not restarted), "unproven", or None (not requested, or failed)."""
    servicing_seen: Finding = NOTHING
    """Servicing's lines; ``says`` why it failed, or how it was skipped."""
    acted: int | None = 0
    """How many times the guest acted on the request (0, 1, 2+); None when the guest's
    evidence could not be read, so a missing delivery proves nothing."""
    before_servicing: bool = False
    """The guest was handed the request before servicing took hold (False: after, or
    not known), so its delivery says nothing about servicing."""
    acted_seen: Finding = NOTHING
    """The lines showing the guest acted; ``says`` a caveat when the proof is indirect
    (no VTL0 line), or, with ``acted`` None, why the guest could not be read."""
    ended: bool = False
    """The VM went off within the race's grace."""
    fate: Finding = NOTHING
    """The VM's end in words ("VM still running", "VM ended (guest-shutdown)") and the
    lines showing it."""


def decide(facts: Facts) -> Verdict:
    """The verdict from the facts: the first row of the module's table that holds,
    with the lines of the facts it was decided on."""
    f, acted, req, svc = facts, facts.acted_seen, facts.request_seen, facts.servicing_seen

    def verdict(kind: str, reason: str, *found: Finding) -> Verdict:
        return Verdict(kind, reason, list(dict.fromkeys(ln for x in found for ln in x.lines)))

    if f.crash is not None:
        return verdict("guest-crash", f.crash.says, f.crash)
    if f.infra_error is not None:
        return verdict("infra-error", f.infra_error.says, f.infra_error)
    if f.acted is not None and f.acted >= 2:
        return verdict("duplicated", f"VTL0 handled the shutdown {f.acted} times", acted, req)
    if f.acted == 1 and (f.servicing == "none" or f.before_servicing):
        reason = "VTL0 got the shutdown before servicing took hold"
        return verdict("delivered-before", reason, acted, req, svc)
    if f.servicing == "failed":
        return verdict("servicing-failed", f"{svc.says}; {f.fate.says}", svc, f.fate)
    if f.servicing_proof == "skipped":  # whatever the message did, it was never at stake
        return verdict("servicing-skipped", svc.says, svc, acted)
    if f.acted == 1:
        reason = "delivered exactly once, after servicing" + (f" ({acted.says})" if acted.says else "")
        return verdict("preserved", reason, acted, req, svc)
    if f.request == "refused":
        return verdict("rejected", req.says, req)
    if f.request == "none":
        return verdict("preserved", "servicing completed; no message was at stake", svc)
    if f.request == "unfired":
        return verdict("infra-error", req.says, req, svc)
    if f.ended:
        reason = f"{f.fate.says}, but nothing shows the guest acted on the shutdown"
        return verdict("infra-error", reason, f.fate, req)
    if f.request == "unanswered":
        return verdict("infra-error", req.says, req)
    if f.acted is None:
        reason = f"inconclusive: {acted.says}, so a lost shutdown cannot be told from a slow one"
        return verdict("infra-error", reason, req, svc)
    return verdict("lost", f"{req.says}, never seen by VTL0; {f.fate.says}", req, svc, f.fate)
