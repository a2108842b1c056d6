"""Verdicts from OpenVMM evidence: the console's answers and log lines, VTL0's COM1
and OpenHCL's COM3, each stamped on arrival with the host's monotonic clock.

``facts`` reads them into ``Facts``; ``testbed.core.verdicts.decide`` gives the verdict.
The mapping (README, "Running against a real OpenVMM host"):

* VTL0's shutdown line on COM1, or ``shutdown initiated`` (printed only once the
  guest acknowledged the request), after the servicing anchor: ``preserved``;
  before it: ``delivered-before``; two VTL0 lines: ``duplicated``.
* ``shutdown ic not ready`` (at once or after waiting across servicing) or
  ``shutdown failed with error code 0x...``: ``rejected``, with the wait.
* ``vtl2 servicing failed``, ``guest reported vtl0 failed to start``, or no
  ``vtl2 servicing complete`` by testbed's deadline: ``servicing-failed``.
* ``guest halted`` with a reason other than ``PowerOff``: ``guest-crash``.
* taken without refusal, servicing (if any) complete, and by the deadline no
  ``shutdown initiated``, no VTL0 line, no halt: ``lost``.
* openvmm exiting or panicking, no shutdown IC: ``infra-error``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from testbed.backends.openvmm.console import COMPLETE, ENDS, SINCE, ConsoleLine, hex_or_int, parse
from testbed.core.evidence import RaceEvidence, TimelineEntry
from testbed.core.verdicts import Facts, Finding, Request, Servicing, Verdict, decide

POWER_OFF = "PowerOff"


@dataclass
class Seen:
    t_ns: int
    stream: str
    line: ConsoleLine

    def show(self, zero: int | None) -> str:
        at = f"{(self.t_ns - zero) / 1e6:.1f} ms" if zero is not None else "?"
        return f"{self.stream} {at}: {self.line.text}"


def _seen(raw: dict[str, Any], stream: str) -> list[Seen]:
    return [Seen(int(t), stream, parse(ln)) for t, ln in raw.get(stream, [])]


def evidence(raw: dict[str, Any]) -> RaceEvidence:
    """The host driver's race result (plus what the backend added: the commands, the
    patterns, the grace) in the engine's terms; kept whole in ``raw``."""
    com3 = _seen(raw, "COM3")
    start_rx = re.compile(raw["com3_servicing_start_pattern"])
    anchor = next((s.t_ns for s in com3 if start_rx.search(s.line.text)), None) if "t0_ns" in raw else None
    console = _seen(raw, "console") + _seen(raw, "log")
    done = next((s.t_ns for s in console if s.line.event in ENDS), None)
    halted = next((s for s in console if s.line.event == "guest-halted"), None)
    completed = any(s.line.event in COMPLETE for s in console)
    restored = any(
        s.line.event == "phase:restore-done" and s.line.fields.get("success") == "true" for s in console
    )
    # OpenVMM's guest emulation device logs "restore vtl2 complete success=true" when the
    # new OpenHCL reports its restore over GET: the restart, seen. Without that line,
    # "vtl2 servicing complete" alone proves nothing.
    proof = ("restarted" if restored else "unproven") if raw.get("service_cmd") and completed else None
    timeline = [TimelineEntry(s.t_ns, s.stream, s.line.text) for s in console + _seen(raw, "COM1") + com3]
    phases = {k: int(v) for k, v in (raw.get("phases") or {}).items() if k != "ic-ready"}
    ic_ready = (raw.get("phases") or {}).get("ic-ready")
    return RaceEvidence(
        backend="openvmm",
        zero_ns=raw.get("t0_ns", raw.get("begin_ns")),
        service_requested_ns=raw.get("t0_ns") if raw.get("service_cmd") else None,
        service_started_ns=anchor,
        service_done_ns=done if raw.get("service_cmd") else None,
        fire_planned_ns=raw.get("fire_planned_ns"),
        fire_ns=raw.get("fire_ns"),
        ended_ns=halted.t_ns if halted else None,
        ended=halted is not None,
        end_reason=halted.line.fields.get("reason") if halted else None,
        message_id="shutdown-ic" if raw.get("shutdown_cmd") else None,
        guest_anchor="COM3" if anchor is not None else None,
        servicing_proof=proof,
        phases=phases,
        phase=raw.get("phase") if raw.get("mode") == "phase" else None,
        phase_ns=phases.get(raw.get("phase") or "") if raw.get("mode") == "phase" else None,
        ic_reoffered_ns=int(ic_ready) if ic_ready is not None else None,
        timeline=sorted(timeline, key=lambda e: e.t_ns),
        raw=raw,
    )


def classify(race: RaceEvidence) -> Verdict:
    """OpenVMM's verdict: its facts, decided as for every backend."""
    return decide(facts(race))


def facts(race: RaceEvidence) -> Facts:
    """The facts of OpenVMM's race: the console's answers and log lines, VTL0's COM1."""
    if race.infra_error:
        return Facts(infra_error=Finding(race.infra_error, (race.infra_error,)))
    raw, zero = race.raw, race.zero_ns
    console = sorted(_seen(raw, "console") + _seen(raw, "log"), key=lambda s: s.t_ns)

    def first(*names: str) -> Seen | None:
        return next((s for s in console if s.line.event in names), None)

    vtl0_rx = re.compile(raw["vtl0_shutdown_pattern"])
    vtl0 = [s for s in _seen(raw, "COM1") if vtl0_rx.search(s.line.text)]
    ack, halted = first("shutdown-initiated"), first("guest-halted")
    fire_line: tuple[str, ...] = ()
    if race.fire_ns is not None and zero is not None:
        fire_line = (f"host typed `{raw['shutdown_cmd']}` at {(race.fire_ns - zero) / 1e6:.1f} ms",)
    servicing, servicing_seen = _servicing(raw, first, zero)
    request, request_seen = _request(race, first("ic-not-ready", "shutdown-failed", "shutdown-comm-failure"),
                                     fire_line)  # fmt: skip
    delivered = vtl0[0] if vtl0 else ack
    anchor = race.service_started_ns if race.service_started_ns is not None else race.service_requested_ns
    shown = tuple(s.show(zero) for s in [*vtl0, ack, halted] if s is not None)
    # "shutdown initiated" is printed only once the guest acknowledged the request.
    caveat = "" if vtl0 or ack is None else "the console's 'shutdown initiated'; no VTL0 line on COM1"
    crash: Finding | None = None
    fate: Finding | None = None
    if halted is not None:
        reason = halted.line.fields.get("reason", POWER_OFF)
        fate = Finding(f"VM halted ({reason})", (halted.show(zero),))
        if reason != POWER_OFF:
            crash = Finding(f"the guest halted: reason={reason}", fate.lines + servicing_seen.lines)
    # openvmm exiting with nothing seen of the guest leaves nothing to classify by.
    died = raw.get("exited") is not None and halted is None and not vtl0 and ack is None
    return Facts(
        crash=crash,
        infra_error=_foreground(race, first("servicing-foreground"), fire_line)
        or _broken(first, console, zero, fire_line, raw.get("exited") if died else None),
        request=request,
        request_seen=request_seen,
        servicing=servicing,
        servicing_proof=race.servicing_proof,
        servicing_seen=servicing_seen,
        acted=len(vtl0) or (1 if ack is not None else 0),
        before_servicing=delivered is not None and anchor is not None and delivered.t_ns < anchor,
        acted_seen=Finding(caveat, shown),
        ended=halted is not None,
        fate=fate or Finding(f"VM still running at the end of the {raw.get('grace_ms', 0):.0f} ms grace"),
    )


def _foreground(race: RaceEvidence, done: Seen | None, fire_line: tuple[str, ...]) -> Finding | None:
    """A shutdown typed while a build before openvmm #1364 (2025-05; release/2411) ran
    service-vtl2 in its console's foreground: the console read it only once servicing had
    returned, so nothing raced; no verdict of the product can be read from it."""
    typed_during = (
        done is not None and race.fire_ns is not None and race.service_requested_ns is not None
        and race.service_requested_ns <= race.fire_ns < done.t_ns
    )  # fmt: skip
    if not typed_during or done is None:
        return None
    return Finding("this openvmm build runs service-vtl2 in the console's foreground (before openvmm #1364, "
                   "2025-05; it prints 'servicing time: Nms'), so the shutdown typed during servicing was read "
                   "only after it: the race cannot be run through this build's console; use a newer build",
                   (done.show(race.zero_ns),) + fire_line)  # fmt: skip


def _broken(first: Callable[..., Seen | None], console: list[Seen], zero: int | None,
            fire_line: tuple[str, ...], exited: Any) -> Finding | None:  # fmt: skip
    """openvmm itself failing: its console panicking, no shutdown IC, or exiting."""
    panic = first("console-panic")
    if panic is not None:
        return Finding("openvmm's console panicked (no terminal?)", (panic.show(zero),))
    refused = first("console-refused")
    if refused is not None:  # a flag of openvmm.service (or a matrix's lab.<flag>) this build lacks
        return Finding(f"openvmm's console refused a typed command, so it never ran: {refused.line.text} "
                       "(this openvmm build lacks the flag: drop it from openvmm.service or the matrix)",
                       (refused.show(zero),) + fire_line)  # fmt: skip
    no_ic = first("no-shutdown-ic")
    if no_ic is not None:
        return Finding("openvmm has no shutdown IC (is --hv set?)", (no_ic.show(zero),))
    if exited is not None:
        return Finding(f"openvmm exited ({exited}) during the race",
                       tuple(s.show(zero) for s in console[-3:]) + fire_line)  # fmt: skip
    return None


def _servicing(
    raw: dict[str, Any], first: Callable[..., Seen | None], zero: int | None
) -> tuple[Servicing, Finding]:
    """Servicing's outcome: openvmm's completion or failure lines, or their absence."""
    done, failed, vtl0_failed = first(*COMPLETE), first("servicing-failed"), first("vtl0-failed")
    lines = tuple(s.show(zero) for s in (done, failed, vtl0_failed) if s is not None)
    if not raw.get("service_cmd"):
        return "none", Finding(lines=lines)
    if failed is not None:
        return "failed", Finding(f"openvmm: {failed.line.text}", lines)
    if vtl0_failed is not None:
        return "failed", Finding("VTL0 failed to start after servicing", lines)
    if done is None:
        return "failed", Finding(f"no 'vtl2 servicing complete' within {raw.get('servicing_timeout_s')} s"
                                 if raw.get("servicing_timeout") else "servicing did not finish", lines)  # fmt: skip
    return "done", Finding("servicing done", lines)


def _request(race: RaceEvidence, refused: Seen | None, fire_line: tuple[str, ...]) -> tuple[Request, Finding]:
    """What openvmm did with the shutdown: refused it (and after how long), or took it
    (it prints nothing when it does)."""
    if race.fire_ns is None:
        missing = race.raw.get("anchor_missing")
        if missing and race.raw.get("shutdown_cmd"):  # fired on a phase or the IC that never came
            who = f" (printed by {SINCE[missing]})" if missing in SINCE else ""
            return "unfired", Finding(
                f"the shutdown's anchor ({missing}) never came, so it was never typed{who}"
            )
        return "none", Finding(lines=fire_line)
    if refused is None:
        return "accepted", Finding("openvmm took the shutdown without refusal", fire_line)
    wait = (refused.t_ns - race.fire_ns) / 1e6
    code = (
        hex_or_int(refused.line.message.rsplit(" ", 1)[-1])
        if refused.line.event == "shutdown-failed"
        else None
    )
    what = f"error code {code:#x}" if code is not None else refused.line.message
    return "refused", Finding(f"openvmm refused the shutdown ({what}) after {wait:.0f} ms",
                              fire_line + (refused.show(race.zero_ns),))  # fmt: skip
