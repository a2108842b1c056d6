"""Host side of the reference lab: the "vmbus server" that offers the shutdown IC.

It speaks the line protocol of ``guest/paravisor.c`` on two virtio-serial
ports (``vmbus`` and ``get``) and implements the host half of each
preservation strategy:

* ``none``         post whenever asked (OpenVMM before #962).
* ``mask``         a MASK on ``get`` makes the host hold messages and answer
                   MASK_ACK; held messages are re-posted on UNMASK.  The
                   paravisor drains only after MASK_ACK, so the host has stopped
                   posting before the drain starts (Hyper-V's guarantee, as
                   closely as two independent ports allow).
* ``mask-async``   same host behaviour, but the paravisor does not wait for the
                   ack: a message already in flight can land after the drain.
* ``pause-resume`` the #962 in-band protocol, offered as feature
                   ``pause_resume`` at channel open: PAUSE -> PAUSE_RESPONSE
                   then queue; RESUME -> flush.

IC semantics (documented in the README): the shutdown IC is ``ready`` from the
paravisor's offer (HELLO) until the host sees the channel go away (the
``vmbus`` port closing, a QMP VSERPORT_CHANGE event), then ``not-ready`` until
the next offer.  A request while not ready is refused and never posted.

Stdlib only: this module runs inside the host agent, possibly on a remote host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Send = Callable[[str], None]


def fields(line: str) -> dict[str, str]:
    """``'MSG seq=3 id=x'`` -> ``{'seq': '3', 'id': 'x'}``."""
    out: dict[str, str] = {}
    for tok in line.split()[1:]:
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


def verb(line: str) -> str:
    return line.split(" ", 1)[0] if line else ""


@dataclass
class Relay:
    send_vmbus: Send
    send_get: Send
    strategy: str = "none"
    clock: Callable[[], int] = time.monotonic_ns
    ic: str = "no-contact"
    guest_image: str = ""
    boot: str = ""  # the running paravisor's boot id (from its last HELLO)
    hellos: int = 0  # offers seen (a SYNC is answered by one)
    phases: dict[str, int] = field(default_factory=dict)  # this servicing's phases, first arrival (ns)
    on_phase: Callable[[str, int], None] | None = None
    features: set[str] = field(default_factory=set)
    next_seq: int = 0
    paused: bool = False
    masked: bool = False
    held: list[str] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    svc: dict[str, Any] = field(default_factory=dict)
    acks: list[dict[str, str]] = field(default_factory=list)

    # ---- logging ---------------------------------------------------------
    def note(self, kind: str, port: str, line: str, **extra: Any) -> dict[str, Any]:
        entry = {"t_ns": self.clock(), "kind": kind, "port": port, "line": line, **extra}
        self.log.append(entry)
        return entry

    def _post(self, port: str, line: str) -> None:
        (self.send_vmbus if port == "vmbus" else self.send_get)(line)
        self.note("sent", port, line)

    # ---- session ---------------------------------------------------------
    def sync(self) -> None:
        """(Re)start the session: ask the paravisor to announce itself.

        Used on every connect, including after a snapshot restore, so host and
        guest agree on features and sequence numbers (renegotiation).
        """
        self._post("vmbus", "SYNC")

    def offered_features(self) -> str:
        return "pause_resume" if self.strategy == "pause-resume" else "-"

    # ---- inbound ---------------------------------------------------------
    def on_vmbus(self, line: str) -> None:
        self.note("recv", "vmbus", line)
        v, f = verb(line), fields(line)
        if v == "HELLO":
            self.guest_image = f.get("version", "")
            self.boot = f.get("boot", "")
            self.hellos += 1
            restarted = self.boot != self.svc.get("boot_before") or not self.boot
            reoffer = "request_ns" in self.svc and "reoffer_ns" not in self.svc and restarted
            if reoffer:
                # The re-offer: the first offer after the servicing request from a paravisor
                # that started again (a new boot id). An offer with the old id is the same
                # paravisor answering a SYNC late, not a restart.
                self.svc["reoffer_ns"] = self.log[-1]["t_ns"]
                self.svc["boot_after"] = self.boot
                self.svc["image_after"] = self.guest_image
            self.next_seq = int(f.get("rx", self.next_seq))
            guest = set(f.get("features", "-").split(",")) - {"-"}
            offered = set(self.offered_features().split(",")) - {"-"}
            self.features = guest & offered
            self._post("vmbus", f"WELCOME features={','.join(sorted(self.features)) or '-'}")
            self.ic = "ready"
            if reoffer:  # a request fired on this phase finds the IC ready, as it now is
                self._phase("ic-reoffered", self.svc["reoffer_ns"])
            if self.paused and "pause_resume" not in self.features:
                # A reconnect without the feature cannot send Resume: treat the
                # new offer as the resume, or the queue would be stuck forever.
                self.paused = False
                self._flush("reoffer-without-pause_resume")
        elif v == "PAUSE":
            self.paused = True
            self._post("vmbus", "PAUSE_RESPONSE")
        elif v == "RESUME":
            self.paused = False
            self._flush("resume")
        elif v == "CLOSING":
            self.on_port_change("vmbus", False)
        elif v == "ACK":
            self.acks.append(f)

    def on_get(self, line: str) -> None:
        self.note("recv", "get", line)
        v, f = verb(line), fields(line)
        if v == "MASK":
            self.masked = True
            self._post("get", "MASK_ACK")
        elif v == "UNMASK":
            self.masked = False
            self._flush("unmask")
        elif v == "SVC_START":
            self.svc["start_ns"] = self.log[-1]["t_ns"]
            self.svc["guest_start_us"] = int(f.get("t", "0"))
            self._phase("request-seen")
        elif v == "PHASE":
            self._phase(f.get("name", "?"))
        elif v == "SVC_DONE":
            self.svc["done_ns"] = self.log[-1]["t_ns"]
            self.svc["ok"] = f.get("ok") == "1"
            self.svc["reason"] = f.get("reason", "")
            self.svc["image"] = f.get("image", "")

    def on_port_change(self, port: str, is_open: bool) -> None:
        """The vmbus channel closed (CLOSING from the paravisor, or QMP
        VSERPORT_CHANGE, which QEMU throttles to one per second per port and
        so cannot be the only signal)."""
        self.note("port", port, f"open={int(is_open)}")
        if port == "vmbus" and not is_open and self.ic == "ready":
            self.ic = "not-ready"  # the channel went away: rescinded until re-offered

    def _phase(self, name: str, t_ns: int | None = None) -> None:
        """A servicing phase, on arrival (the host's clock): the first time it is seen in
        this servicing counts, and ``on_phase`` (the phase trigger) hears of it at once,
        before the next line is read."""
        if "request_ns" not in self.svc or name in self.phases:
            return
        t = self.log[-1]["t_ns"] if t_ns is None else t_ns
        self.phases[name] = t
        if self.on_phase is not None:
            self.on_phase(name, t)

    # ---- outbound --------------------------------------------------------
    def start_servicing(self, svc_id: int, image: str, knobs: dict[str, int]) -> int:
        """Send the servicing request; returns the host time it left (t = 0)."""
        params = " ".join(f"{k}={v}" for k, v in knobs.items())
        line = f"SERVICE id={svc_id} image={image} strategy={self.strategy} {params}".strip()
        self.svc = {"id": svc_id, "image": image, "boot_before": self.boot}
        self.phases = {}
        self.send_get(line)
        t0 = self.clock()
        self.note("sent", "get", line)
        self.svc["request_ns"] = t0
        return t0

    def request_shutdown(self, msg_id: str, reason: str) -> tuple[str, int]:
        """Fire the shutdown IC request. Returns (decision, host time of the decision).

        decision: ``posted`` (bytes written to the vmbus port), ``held``
        (queued while masked or paused, posted later) or ``rejected`` (IC not
        ready: refused, as Hyper-V refuses a shutdown when the IC is not OK).
        """
        return self.request_message("shutdown", msg_id, f"reason={reason}")

    def request_message(self, kind: str, msg_id: str, extra: str = "") -> tuple[str, int]:
        """Any host -> guest message on the IC's channel, under the same rules as the
        shutdown (refused while not ready, held while masked or paused): the shutdown,
        a stream's ``hb`` messages, the ``stream`` request for guest -> host traffic."""
        if self.ic != "ready":
            t = self.clock()
            self.note("rejected", "vmbus", f"{kind} id={msg_id}", ic=self.ic)
            return "rejected", t
        line = f"MSG seq={self.next_seq} t={self.clock() // 1000} type={kind} id={msg_id} {extra}".rstrip()
        self.next_seq += 1
        if self.paused or self.masked:
            self.held.append(line)
            t = self.clock()
            self.note("held", "vmbus", line, paused=self.paused, masked=self.masked)
            return "held", t
        self.send_vmbus(line)
        t = self.clock()
        self.note("sent", "vmbus", line)
        return "posted", t

    def _flush(self, why: str) -> None:
        held, self.held = self.held, []
        for line in held:
            self._post("vmbus", line)
        if held:
            self.note("flushed", "vmbus", f"count={len(held)} why={why}")
