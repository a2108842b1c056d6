"""Verdicts from OpenVMM evidence: the console's answers and log lines, VTL0's COM1
and OpenHCL's COM3, each stamped on arrival with the host's monotonic clock.

The mapping (README, "Running against a real OpenVMM host"):

* VTL0's shutdown line on COM1, or ``shutdown initiated`` (printed only once the
  guest acknowledged the request), after the servicing anchor: ``preserved``;
  before it: ``delivered-before``; two VTL0 lines: ``duplicated``.
* ``shutdown ic not ready`` (at once or after waiting across servicing) or
  ``shutdown failed with error code 0x...``: ``rejected``, with the wait.
* ``vtl2 servicing failed``, ``guest reported vtl0 failed to start``, or no
  ``vtl2 servicing complete`` by testbed's deadline: ``servicing-failed``.
* ``guest halted`` with a reason other than ``PowerOff``: ``guest-crash``.
* taken without refusal, ``vtl2 servicing complete``, and by the deadline no
  ``shutdown initiated``, no VTL0 line, no halt: ``lost``.
* openvmm exiting or panicking, no shutdown IC: ``infra-error``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from testbed.backends.openvmm.console import ConsoleLine, hex_or_int, parse
from testbed.core.evidence import RaceEvidence, TimelineEntry
from testbed.core.verdicts import Verdict

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
    done = next((s.t_ns for s in console if s.line.event in ("servicing-complete", "servicing-failed")), None)
    halted = next((s for s in console if s.line.event == "guest-halted"), None)
    completed = any(s.line.event == "servicing-complete" for s in console)
    restored = any(
        s.line.event == "phase:restore-done" and s.line.fields.get("success") == "true" for s in console
    )
    # OpenVMM's guest emulation device logs "restore vtl2 complete success=true" when the
    # new OpenHCL reports its restore over GET: the restart, seen. Without that line,
    # "vtl2 servicing complete" alone proves nothing.
    proof = ("restarted" if restored else "unproven") if raw.get("service_cmd") and completed else None
    timeline = [TimelineEntry(s.t_ns, s.stream, s.line.text) for s in console + _seen(raw, "COM1") + com3]
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
        timeline=sorted(timeline, key=lambda e: e.t_ns),
        raw=raw,
    )


def classify(race: RaceEvidence) -> Verdict:
    if race.infra_error:
        return Verdict.infra(race.infra_error)
    raw = race.raw
    zero = race.zero_ns
    console = sorted(_seen(raw, "console") + _seen(raw, "log"), key=lambda s: s.t_ns)

    def first(*names: str) -> Seen | None:
        return next((s for s in console if s.line.event in names), None)

    vtl0_rx = re.compile(raw["vtl0_shutdown_pattern"])
    vtl0 = [s for s in _seen(raw, "COM1") if vtl0_rx.search(s.line.text)]
    servicing = bool(raw.get("service_cmd"))
    fired = race.fire_ns is not None
    ack, halted = first("shutdown-initiated"), first("guest-halted")
    done, failed, vtl0_failed = first("servicing-complete"), first("servicing-failed"), first("vtl0-failed")
    refused = first("ic-not-ready", "shutdown-failed", "shutdown-comm-failure")
    svc_lines = [s.show(zero) for s in (done, failed, vtl0_failed) if s is not None]
    fire_line: list[str] = []
    if race.fire_ns is not None and zero is not None:
        fire_line = [f"host typed `{raw['shutdown_cmd']}` at {(race.fire_ns - zero) / 1e6:.1f} ms"]

    panic = first("console-panic")
    if panic is not None:
        return Verdict("infra-error", "openvmm's console panicked (no terminal?)", [panic.show(zero)])
    no_ic = first("no-shutdown-ic")
    if no_ic is not None:
        return Verdict("infra-error", "openvmm has no shutdown IC (is --hv set?)", [no_ic.show(zero)])
    if (
        raw.get("exited") is not None and halted is None and not vtl0 and ack is None
    ):  # openvmm died: nothing to classify by
        return Verdict("infra-error", f"openvmm exited ({raw['exited']}) during the race",
                       [s.show(zero) for s in console[-3:]] + fire_line)  # fmt: skip
    if halted is not None and halted.line.fields.get("reason", POWER_OFF) != POWER_OFF:
        return Verdict("guest-crash", f"the guest halted: reason={halted.line.fields.get('reason')}",
                       [halted.show(zero)] + svc_lines)  # fmt: skip
    if len(vtl0) >= 2:
        return Verdict(
            "duplicated",
            f"VTL0 handled the shutdown {len(vtl0)} times",
            [s.show(zero) for s in vtl0] + fire_line,
        )

    servicing_failed = None
    if servicing:
        if failed is not None:
            servicing_failed = f"openvmm: {failed.line.text}"
        elif vtl0_failed is not None:
            servicing_failed = "VTL0 failed to start after servicing"
        elif done is None:
            servicing_failed = (f"no 'vtl2 servicing complete' within {raw.get('servicing_timeout_s')} s"
                                if raw.get("servicing_timeout") else "servicing did not finish")  # fmt: skip
    delivered = vtl0[0] if vtl0 else ack
    if fired and delivered is not None:
        anchor = race.service_started_ns if race.service_started_ns is not None else race.service_requested_ns
        shown = (
            [s.show(zero) for s in vtl0]
            + ([ack.show(zero)] if ack else [])
            + ([halted.show(zero)] if halted else [])
        )
        if not servicing or (anchor is not None and delivered.t_ns < anchor):
            return Verdict(
                "delivered-before",
                "VTL0 got the shutdown before servicing took hold",
                shown + fire_line + svc_lines,
            )
        if servicing_failed is None:
            why = "delivered exactly once, after servicing"
            if not vtl0:
                why += " (the console's 'shutdown initiated'; no VTL0 line on COM1)"
            return Verdict("preserved", why, shown + fire_line + svc_lines)
    if servicing_failed is not None:
        return Verdict(
            "servicing-failed", servicing_failed, svc_lines + ([halted.show(zero)] if halted else [])
        )
    if refused is not None:
        wait = (refused.t_ns - race.fire_ns) / 1e6 if race.fire_ns is not None else None
        code = (
            hex_or_int(refused.line.message.rsplit(" ", 1)[-1])
            if refused.line.event == "shutdown-failed"
            else None
        )
        what = f"error code {code:#x}" if code is not None else refused.line.message
        return Verdict("rejected", f"openvmm refused the shutdown ({what}) after {wait:.0f} ms" if wait is not None
                       else f"openvmm refused the shutdown ({what})", fire_line + [refused.show(zero)])  # fmt: skip
    if not fired:
        return Verdict("preserved", "servicing completed; no message was at stake", svc_lines)
    if halted is not None:
        return Verdict("infra-error", "the VM powered off, but neither VTL0 nor the console showed the shutdown",
                       [halted.show(zero)] + fire_line)  # fmt: skip
    if servicing and done is not None:
        return Verdict("lost", "openvmm took the shutdown without refusal and servicing completed, but VTL0 "
                       f"never saw it: no 'shutdown initiated', no COM1 line, no halt in {raw.get('grace_ms', 0):.0f} ms",
                       fire_line + svc_lines)  # fmt: skip
    return Verdict("infra-error", "no answer to the shutdown and nothing to classify it by", fire_line)
