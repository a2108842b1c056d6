"""``decide(facts)``, the one verdict tree every backend's evidence ends in: every
combination of the facts that matter, checked against the rules written out here on
their own (``RULES``: in words, first match wins), plus named cases with the verdict
spelled out by hand. The backends' own tests check their fact extraction."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from testbed.core.verdicts import VERDICTS, Facts, Finding, Request, Servicing, Verdict, decide

# Every fact with its own, recognisable lines, so a verdict's evidence shows which facts
# it was decided on.
CRASH = Finding("the guest crashed", ("crash line",))
INFRA = Finding("the VMM died", ("infra line",))
REQUEST = Finding("the host's word on the request", ("request line",))
SERVICING = Finding("servicing's own word", ("servicing line",))
DELIVERY = Finding("", ("vtl0 line",))
FATE = Finding("the VM's fate", ("fate line",))
SOURCES = {"crash": CRASH, "infra": INFRA, "request": REQUEST, "servicing": SERVICING, "acted": DELIVERY,
           "fate": FATE}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One combination of the facts that matter, by name."""

    crashed: bool
    broken: bool  # the race could not be read
    request: Request
    servicing: Servicing
    proof: str | None
    acted: int | None
    before: bool
    ended: bool

    def facts(self) -> Facts:
        return Facts(
            crash=CRASH if self.crashed else None,
            infra_error=INFRA if self.broken else None,
            request=self.request,
            request_seen=REQUEST,
            servicing=self.servicing,
            servicing_proof=self.proof,
            servicing_seen=SERVICING,
            acted=self.acted,
            before_servicing=self.before,
            acted_seen=DELIVERY,
            ended=self.ended,
            fate=FATE,
        )


# The values each fact can take (acted: unknown, none, once, twice or more).
REQUESTS: list[Request] = ["none", "unfired", "refused", "accepted", "unanswered"]
SERVICINGS: list[Servicing] = ["none", "done", "failed"]
PROOFS: list[str | None] = [None, "restarted", "skipped", "unproven"]
ACTED: list[int | None] = [None, 0, 1, 2, 3]
BOOL = [False, True]
CASES = [Case(*c) for c in itertools.product(BOOL, BOOL, REQUESTS, SERVICINGS, PROOFS, ACTED, BOOL, BOOL)]

# The rules, in order; the first that holds gives the verdict, and the verdict names the
# lines of exactly these facts.
RULES: list[tuple[str, Callable[[Case], bool], str, tuple[str, ...]]] = [
    ("the guest crashed", lambda c: c.crashed, "guest-crash", ("crash",)),
    ("the race could not be read", lambda c: c.broken, "infra-error", ("infra",)),
    ("the guest acted on it twice or more", lambda c: (c.acted or 0) >= 2, "duplicated", ("acted", "request")),
    ("it acted once, with no servicing to survive", lambda c: c.acted == 1 and c.servicing == "none",
     "delivered-before", ("acted", "request", "servicing")),
    ("it acted once, handed over before servicing took hold", lambda c: c.acted == 1 and c.before,
     "delivered-before", ("acted", "request", "servicing")),
    ("servicing failed, whatever the message did", lambda c: c.servicing == "failed", "servicing-failed",
     ("servicing", "fate")),
    ("servicing said done and provably did not restart", lambda c: c.proof == "skipped", "servicing-skipped",
     ("servicing", "acted")),
    ("it acted once, after servicing", lambda c: c.acted == 1, "preserved", ("acted", "request", "servicing")),
    ("the host refused the request", lambda c: c.request == "refused", "rejected", ("request",)),
    ("no request was planned", lambda c: c.request == "none", "preserved", ("servicing",)),
    ("a request was planned and never fired", lambda c: c.request == "unfired", "infra-error",
     ("request", "servicing")),
    ("the VM went off, yet the guest never acted", lambda c: c.ended, "infra-error", ("fate", "request")),
    ("the host neither posted nor refused it", lambda c: c.request == "unanswered", "infra-error", ("request",)),
    ("the guest's lines could not be read", lambda c: c.acted is None, "infra-error", ("request", "servicing")),
    ("accepted, never acted on, the VM still running", lambda c: True, "lost",
     ("request", "servicing", "fate")),
]  # fmt: skip


def expected(case: Case) -> tuple[str, str, list[str]]:
    """(rule, verdict, evidence lines) by the rules above."""
    rule, kind, sources = next((r, k, s) for r, holds, k, s in RULES if holds(case))
    lines = [ln for src in sources for ln in SOURCES[src].lines]
    return rule, kind, lines


def mismatches(decide_: Callable[[Facts], Verdict]) -> list[str]:
    out = []
    for case in CASES:
        rule, kind, lines = expected(case)
        got = decide_(case.facts())
        if (got.kind, got.evidence) != (kind, lines):
            out.append(f"{case}: want {kind} {lines} ({rule}), got {got.kind} {got.evidence}")
    return out


def test_every_combination_follows_the_rules() -> None:
    bad = mismatches(decide)
    assert bad == [], f"{len(bad)} of {len(CASES)} combinations differ, e.g.\n" + "\n".join(bad[:5])


@pytest.mark.parametrize(
    "wrong",
    [
        lambda f: decide(replace(f, crash=None)),  # crash forgotten
        lambda f: decide(replace(f, before_servicing=False)),  # delivered-before never found
        lambda f: decide(replace(f, servicing_proof=None)),  # a skipped servicing passing
        lambda f: decide(replace(f, ended=False)),  # a VM gone off counted as lost
        lambda f: Verdict(decide(f).kind, decide(f).reason, decide(f).evidence[:1]),  # evidence cut short
    ],
)
def test_the_check_catches_a_wrong_tree(wrong: Callable[[Facts], Verdict]) -> None:
    """The exhaustive check itself: a decision tree that gets a rule wrong is caught."""
    assert mismatches(wrong) != []


def test_every_verdict_is_reachable() -> None:
    assert {decide(c.facts()).kind for c in CASES} == set(VERDICTS)


def test_reasons_carry_what_the_facts_say() -> None:
    """A backend's own words (a refusal, a servicing failure, the VM's fate) reach the reason."""
    for case in CASES:
        _, kind, _ = expected(case)
        reason = decide(case.facts()).reason
        if kind == "rejected":
            assert reason == REQUEST.says
        elif kind == "servicing-failed":
            assert reason == f"{SERVICING.says}; {FATE.says}"
        elif kind == "servicing-skipped":
            assert reason == SERVICING.says
        elif kind == "lost":
            assert REQUEST.says in reason and FATE.says in reason and "never seen by VTL0" in reason
        elif kind == "duplicated":
            assert reason == f"VTL0 handled the shutdown {case.acted} times"
        assert reason, case


# ---- named cases: the verdict spelled out by hand ---------------------------------------

ACCEPTED_AFTER = Facts(request="accepted", request_seen=REQUEST, servicing="done", servicing_proof="restarted",
                       servicing_seen=SERVICING, acted=1, acted_seen=DELIVERY, ended=True, fate=FATE)  # fmt: skip


def test_one_delivery_after_a_restart_is_preserved() -> None:
    v = decide(ACCEPTED_AFTER)
    assert (v.kind, v.reason) == ("preserved", "delivered exactly once, after servicing")
    assert v.evidence == ["vtl0 line", "request line", "servicing line"]


def test_an_indirect_delivery_says_its_caveat() -> None:
    v = decide(replace(ACCEPTED_AFTER, acted_seen=Finding("event 18504; no VTL0 line", ("event line",))))
    assert v.reason == "delivered exactly once, after servicing (event 18504; no VTL0 line)"


def test_delivered_before_wins_over_a_servicing_failure() -> None:
    """Hyper-V's pinned case: the IC event before the request, then servicing failed."""
    v = decide(replace(ACCEPTED_AFTER, servicing="failed", servicing_proof=None, before_servicing=True))
    assert v.kind == "delivered-before"


def test_a_delivery_after_a_failed_servicing_is_the_failure() -> None:
    assert (
        decide(replace(ACCEPTED_AFTER, servicing="failed", servicing_proof=None)).kind == "servicing-failed"
    )


def test_a_skipped_servicing_is_never_a_pass() -> None:
    assert decide(replace(ACCEPTED_AFTER, servicing_proof="skipped")).kind == "servicing-skipped"
    assert decide(replace(ACCEPTED_AFTER, servicing_proof="unproven")).kind == "preserved"
    refused = replace(ACCEPTED_AFTER, request="refused", acted=0, servicing_proof="skipped")
    assert decide(refused).kind == "servicing-skipped"


def test_a_delivery_outranks_the_host_refusing() -> None:
    assert decide(replace(ACCEPTED_AFTER, request="refused")).kind == "preserved"


def test_a_crash_outranks_everything() -> None:
    v = decide(replace(ACCEPTED_AFTER, crash=CRASH, infra_error=INFRA, acted=2))
    assert (v.kind, v.reason, v.evidence) == ("guest-crash", "the guest crashed", ["crash line"])


def test_no_servicing_and_no_delivery_is_lost() -> None:
    v = decide(Facts(request="accepted", request_seen=Finding("posted", ("p",)), fate=Finding("VM running")))
    assert (v.kind, v.reason, v.evidence) == ("lost", "posted, never seen by VTL0; VM running", ["p"])


def test_a_vm_gone_off_without_a_delivery_is_not_lost() -> None:
    v = decide(replace(ACCEPTED_AFTER, acted=0))
    assert v.kind == "infra-error" and v.evidence == ["fate line", "request line"]


def test_unreadable_guest_lines_are_inconclusive_not_lost() -> None:
    v = decide(replace(ACCEPTED_AFTER, acted=None, ended=False,
                       acted_seen=Finding("COM1 could not be read (timeout)")))  # fmt: skip
    assert v.kind == "infra-error" and v.reason.startswith("inconclusive: COM1 could not be read (timeout)")


def test_servicing_only_is_preserved_with_nothing_at_stake() -> None:
    v = decide(Facts(servicing="done", servicing_seen=SERVICING))
    assert (v.kind, v.reason, v.evidence) == (
        "preserved",
        "servicing completed; no message was at stake",
        ["servicing line"],
    )


def test_evidence_names_each_line_once() -> None:
    same = Finding("x", ("shared line",))
    v = decide(replace(ACCEPTED_AFTER, request_seen=same, servicing_seen=same, acted_seen=same))
    assert v.evidence == ["shared line"]
