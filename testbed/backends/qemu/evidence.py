"""Verdicts from the reference lab's evidence, and that evidence in the engine's terms.

Evidence is what the iteration left behind: the host relay's message log,
the guest's serial lines (``TB t=<guest us> ...``), QMP events and the
servicing report, all from the QEMU host agent's ``race``.  The classifier
never looks at the planned offset and never guesses: each verdict carries the
lines it was read from.
"""

from __future__ import annotations

import re
from typing import Any

from testbed.core.evidence import RaceEvidence, TimelineEntry
from testbed.core.verdicts import NOTHING, Facts, Finding, Request, Servicing, Verdict, decide

_T = re.compile(r"^TB t=(\d+) ")


def guest_time_us(line: str) -> int | None:
    m = _T.match(line)
    return int(m.group(1)) if m else None


def evidence(res: dict[str, Any]) -> RaceEvidence:
    """The agent's race result (kept whole as ``raw``) with its host-clock anchors."""
    svc: dict[str, Any] = res.get("svc", {})
    shutdown = res.get("shutdown") or {}
    timeline = [TimelineEntry(e["t_ns"], "host", f"{e['kind']} {e['port']}: {e['line']}")
                for e in res.get("host_log", []) if not _stream_line(e["line"])]  # fmt: skip
    if "guest_start_us" in svc and "start_ns" in svc:
        # Guest lines onto the host clock, anchored where both saw the servicing start.
        for ln in res.get("serial", []):
            g = guest_time_us(ln)
            if g is not None and g >= svc["guest_start_us"] - 2_000_000:
                t = svc["start_ns"] + (g - svc["guest_start_us"]) * 1000
                timeline.append(TimelineEntry(t, "guest", ln.split(" ", 2)[2]))
    timeline += [TimelineEntry(e["t_ns"], "qmp", f"{e['event']} {e.get('data')}")
                 for e in res.get("qmp_events", [])]  # fmt: skip
    return RaceEvidence(
        backend="qemu",
        zero_ns=res.get("t0_ns"),
        service_requested_ns=svc.get("request_ns"),
        service_started_ns=svc.get("start_ns"),
        service_done_ns=svc.get("done_ns"),
        ic_reoffered_ns=svc.get("reoffer_ns"),  # the first offer after the request with a new boot id
        fire_planned_ns=res.get("fire_planned_ns"),
        fire_ns=res.get("fire_ns"),
        ended_ns=shutdown.get("t_ns"),
        ended=bool(res.get("ended")),
        end_reason=(shutdown.get("data") or {}).get("reason")
        if shutdown.get("event") == "SHUTDOWN"
        else shutdown.get("event"),
        ic_at_fire=res.get("ic_at_fire"),
        decision=res.get("decision"),
        message_id=res.get("shutdown_id"),
        features=res.get("features"),
        guest_anchor="paravisor" if "start_ns" in svc else None,
        servicing_proof=servicing_proof(svc),
        phases=res.get("phases") or {},
        phase=(res.get("shutdown_plan") or {}).get("phase"),
        phase_ns=res.get("phase_ns"),
        timeline=sorted(timeline, key=lambda e: e.t_ns),
        stream=stream_accounting(res) if res.get("stream_sent") is not None else None,
        raw=res,
    )


_STREAM = re.compile(r"^(TX |ACK seq=\S+ id=hb|MSG seq=\S+ t=\S+ type=(hb|stream) |(hb|stream) id=)")


def _stream_line(line: str) -> bool:
    """A stream's own line (kept out of the timeline: hundreds per iteration)."""
    return bool(_STREAM.match(line))


def stream_accounting(res: dict[str, Any]) -> dict[str, Any]:
    """Every stream message accounted for, from the host's log alone.

    Host -> guest: each ``hb`` is refused (the IC was not ready: never posted), or
    posted/held and then acknowledged once (delivered), more than once (duplicated) or
    never (lost); acknowledgements that arrive behind a later one count as reordered.
    Guest -> host: ``TX`` lines by sequence number: missing below the highest seen
    (lost), seen twice (duplicated), arriving behind a higher one (reordered). The lost
    messages' offsets (ms from the servicing request, and from the paravisor's start)
    are one iteration's estimate of the loss window."""
    log_ = res.get("host_log", [])
    svc = res.get("svc", {})
    return {
        "host_to_guest": _host_to_guest(log_, res.get("t0_ns"), svc.get("start_ns")),
        "guest_to_host": _guest_to_host(log_),
    }


def _inversions(seq: list[int]) -> int:
    """How many arrived behind a higher sequence number already seen (reordered)."""
    top, n = -1, 0
    for x in seq:
        n += x < top
        top = max(top, x)
    return n


def _hb_log(log_: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, int], list[int]]:
    """The host -> guest lines: each hb's first send decision (sent, held or rejected),
    the acknowledgements per hb id, and the acknowledged seqs in arrival order."""
    first: dict[str, dict[str, Any]] = {}
    acks: dict[str, int] = {}
    ack_order: list[int] = []
    for e in log_:
        line = e["line"]
        m = re.match(r"^(?:MSG seq=(\d+) t=\S+ type=hb id=(hb\d+)|hb id=(hb\d+))", line)
        if m and e["kind"] in ("sent", "held", "rejected"):
            mid = m.group(2) or m.group(3)
            first.setdefault(mid, {"t_ns": e["t_ns"], "decision": e["kind"]})
            continue
        if e["kind"] != "recv":
            continue
        m = re.match(r"^ACK seq=(\d+) id=(hb\d+)", line)
        if m:
            acks[m.group(2)] = acks.get(m.group(2), 0) + 1
            ack_order.append(int(m.group(1)))
    return first, acks, ack_order


def _loss_window(lost_t: list[int], anchor: int | None) -> list[float] | None:
    """The first and last lost message's offset in ms from ``anchor`` (None if nothing was lost)."""
    return [round((min(lost_t) - anchor) / 1e6, 3), round((max(lost_t) - anchor) / 1e6, 3)] if (
        lost_t and anchor is not None) else None  # fmt: skip


def _host_to_guest(log_: list[dict[str, Any]], t0: int | None, start: int | None) -> dict[str, Any]:
    """Each hb's fate (refused, delivered, duplicated or lost), the reordered acks and
    the lost ones' window from the servicing request (t0) and the paravisor's start."""
    first, acks, ack_order = _hb_log(log_)
    verdict = {}
    for mid, d in first.items():
        k = acks.get(mid, 0)
        verdict[mid] = "refused" if d["decision"] == "rejected" else "delivered" if k == 1 else (
            "duplicated" if k > 1 else "lost")  # fmt: skip
    lost_t = [first[m]["t_ns"] for m, v in verdict.items() if v == "lost"]
    host = {
        v: sum(1 for x in verdict.values() if x == v) for v in ("delivered", "lost", "duplicated", "refused")
    }
    return {
        "sent": len(first),
        **host,
        "reordered": _inversions(ack_order),
        "lost_window_ms": _loss_window(lost_t, t0),
        "lost_window_guest_ms": _loss_window(lost_t, start),
    }


def _guest_to_host(log_: list[dict[str, Any]]) -> dict[str, Any]:
    """The guest's ``TX`` seqs as received: gaps below the highest (lost), repeats, reorders."""
    tx = [
        int(m.group(1)) for e in log_ if e["kind"] == "recv" and (m := re.match(r"^TX seq=(\d+)", e["line"]))
    ]
    seen = set(tx)
    return {
        "received": len(tx),
        "lost": (max(tx) + 1 - len(seen)) if tx else 0,
        "duplicated": len(tx) - len(seen),
        "reordered": _inversions(tx),
    }


def servicing_proof(svc: dict[str, Any]) -> str | None:
    """The lab proves a restart by the boot id: every start of a paravisor image draws a
    new one and announces it in HELLO, so a servicing that reported success is
    "restarted" only if the next offer came with an id other than the one before."""
    if "request_ns" not in svc or svc.get("ok") is not True:
        return None
    before, after = svc.get("boot_before"), svc.get("boot_after")
    if not before:
        return "unproven"  # a paravisor build that announces no boot id
    return "restarted" if after and after != before else "skipped"


def _skipped(svc: dict[str, Any]) -> str | None:
    if servicing_proof(svc) != "skipped":
        return None
    return (f"the paravisor reported servicing into {svc.get('image') or 'its image'} done, but never re-offered "
            f"the IC from a new start (boot id {svc['boot_before']} throughout)")  # fmt: skip


def _host_lines(log: list[dict[str, Any]], pred: Any) -> list[str]:
    return [f"host {e['kind']} {e['port']}: {e['line']}" for e in log if pred(e)]


def classify(race: RaceEvidence) -> Verdict:
    """The reference lab's verdict: its facts, decided as for every backend."""
    return decide(facts(race))


def facts(race: RaceEvidence) -> Facts:
    """The facts of the QEMU host agent's race result (``race.raw``): the guest's serial
    lines, the relay's log, QMP events."""
    if race.infra_error:
        return Facts(infra_error=Finding(race.infra_error, (race.infra_error,)))
    ev = race.raw
    serial: list[str] = ev.get("serial", [])
    shutdown = ev.get("shutdown") or {}
    msg_id = ev.get("shutdown_id")
    delivered = [ln for ln in serial if msg_id and f"VTL0 SHUTDOWN id={msg_id} " in ln]
    # When the paravisor handed the message to VTL0 decides before/after: VTL0 may log a
    # message it was given just before servicing a little later.
    relay = next((ln for ln in serial if msg_id and " PV relay " in ln and f" id={msg_id}" in ln), None)
    svc_start = next((ln for ln in serial if " PV svc-start " in ln), None)
    t_del = guest_time_us(relay or delivered[0]) if delivered else None
    t_svc = guest_time_us(svc_start) if svc_start else None
    request, request_seen = _request(ev, msg_id)
    servicing, servicing_seen = _servicing(ev)
    ended = bool(ev.get("ended"))
    fate = Finding("VM still running at the end of the grace")
    if ended:
        end_reason = (shutdown.get("data") or {}).get("reason")
        fate = Finding(f"VM ended ({end_reason})", (f"qmp SHUTDOWN {shutdown.get('data')}",))
    return Facts(
        crash=_panic(ev),
        infra_error=_qemu_exit(shutdown),
        request=request,
        request_seen=request_seen,
        servicing=servicing,
        servicing_proof=race.servicing_proof,
        servicing_seen=servicing_seen,
        acted=len(delivered),
        before_servicing=t_del is not None and t_svc is not None and t_del < t_svc,
        acted_seen=Finding(lines=tuple(([relay] if relay and delivered else []) + delivered)),
        ended=ended,
        fate=fate,
    )


def _panic(ev: dict[str, Any]) -> Finding | None:
    shutdown = ev.get("shutdown") or {}
    panicked = [e for e in ev.get("qmp_events", []) if e["event"] == "GUEST_PANICKED"]
    if not panicked and (shutdown.get("data") or {}).get("reason") != "guest-panic":
        return None
    lines = [f"qmp {e['event']} {e.get('data')}" for e in panicked] or [
        f"qmp SHUTDOWN {shutdown.get('data')}"
    ]
    lines += [ln for ln in ev.get("serial", []) if "panick" in ln or "Kernel panic" in ln][:3]
    return Finding("the guest kernel panicked", tuple(lines))


def _qemu_exit(shutdown: dict[str, Any]) -> Finding | None:
    if shutdown.get("event") != "QEMU_EXIT":
        return None
    rc = (shutdown.get("data") or {}).get("rc")
    return Finding(f"QEMU exited without a guest shutdown (rc {rc}): killed under the engine?",
                   (f"qmp QEMU_EXIT {shutdown.get('data')}",))  # fmt: skip


def _request(ev: dict[str, Any], msg_id: str | None) -> tuple[Request, Finding]:
    """What the relay did with the shutdown request, from its log."""
    if msg_id is None:  # servicing only, no shutdown planned
        return "none", NOTHING
    log_: list[dict[str, Any]] = ev.get("host_log", [])
    ours = [e for e in log_ if f"id={msg_id}" in e["line"]]
    lines = tuple(_host_lines(ours, lambda _: True))
    if ev.get("decision") == "rejected":
        return "refused", Finding(
            f"the host refused the request: shutdown IC was {ev.get('ic_at_fire')}", lines
        )
    if ev.get("phase_missing"):
        return "unfired", Finding(f"{ev['phase_missing']}: nothing was fired", lines)
    if any(e["kind"] in ("sent", "held") for e in ours):
        return "accepted", Finding("posted by the host", lines)
    return "unanswered", Finding("the request was neither posted nor refused", lines)


def _servicing(ev: dict[str, Any]) -> tuple[Servicing, Finding]:
    """Servicing's outcome, from the paravisor's lines and the relay's GET traffic."""
    svc: dict[str, Any] = ev.get("svc", {})
    serial: list[str] = ev.get("serial", [])
    lines = tuple([ln for ln in serial if " PV svc-" in ln or " PV restore" in ln or " PV vmbus-" in ln]
                  + _host_lines(ev.get("host_log", []), lambda e: e["port"] == "get"))  # fmt: skip
    if "request_ns" not in svc:
        return "none", Finding(lines=lines)
    if ev.get("servicing_timeout"):
        return "failed", Finding("servicing did not finish before its timeout", lines)
    if svc.get("ok") is False:
        return "failed", Finding(f"servicing reported failure: {svc.get('reason') or 'unknown'}", lines)
    return "done", Finding(_skipped(svc) or "servicing done", lines)
