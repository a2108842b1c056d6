"""The OpenVMM race's trigger, on the host: the shutdown typed at an offset from the
servicing request, a delay after a servicing phase's line, or after the shutdown IC's
re-negotiation on COM1; and every phase's first arrival stamped on the host clock.

``vm`` is the host driver's VM (its console's screen and log, COM1, COM3: each a list of
lines stamped on arrival by a reader thread). Stdlib only, valid on Python 3.9: it
ships in the driver's zipapp.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from testbed.backends.openvmm.console import ENDS, IC_READY, PHASES, event, parse
from testbed.hostprog.timing import sleep_until_ns

# Each phase's line (its text, verbatim), then the IC-ready anchor's (a regex): (name, where, rx).
MATCHERS = [(name, at, re.compile(re.escape(text))) for name, at, text in PHASES] + [
    ("ic-ready", IC_READY[0], re.compile(IC_READY[1]))
]


class Race:
    """One race's trigger: where the shutdown is fired from, and the first arrival of each
    servicing phase (and of the IC's re-negotiation) as the reader threads stamped it.
    Lines are scanned once each, as they come (the trigger polls every half millisecond
    beside a guest that needs the CPU)."""

    def __init__(self, vm: Any, start: dict[str, int], shutdown_cmd: str | None, offset_ms: float | None,
                 mode: str, phase: str | None) -> None:  # fmt: skip
        self.vm, self.start, self.shutdown_cmd, self.mode, self.phase = vm, start, shutdown_cmd, mode, phase
        self.offset_ns = int(offset_ms * 1e6) if offset_ms is not None else None
        # A negative offset from the request: the shutdown is typed first.
        before = (
            mode == "offset"
            and shutdown_cmd is not None
            and self.offset_ns is not None
            and self.offset_ns < 0
        )
        self.before_ns = -self.offset_ns if before and self.offset_ns is not None else None
        self.out: dict[str, Any] = {
            "begin_ns": time.monotonic_ns(),
            "phases": {},
            "mode": mode,
            "phase": phase,
        }
        self.pos = dict(start)
        self.ended = self.halted = False

    def stamp(self) -> None:
        """Scan the lines that came since the last call: phases, the IC, the end."""
        c, seen = self.vm.console, self.out["phases"]
        for s, where in ((c.screen, "log"), (c.log, "log"), (self.vm.com3, "COM3"), (self.vm.com1, "COM1")):
            new = s.since(self.pos[s.name])
            self.pos[s.name] += len(new)
            for t, ln in new:
                for name, at, rx in MATCHERS:
                    if at == where and rx.search(ln) and (name not in seen or t < seen[name]):
                        if name != "ic-ready" or "t0_ns" in self.out:
                            seen[name] = t
                if where == "log":
                    ev = event(parse(ln).message)
                    self.ended = self.ended or ev in ENDS
                    self.halted = self.halted or ev == "guest-halted"

    def trigger_ns(self) -> int | None:
        """When the shutdown is due, once its anchor has been seen (None: not yet)."""
        if self.shutdown_cmd is None or self.offset_ns is None or self.before_ns is not None:
            return None
        if self.mode == "offset":
            return int(self.out["t0_ns"]) + self.offset_ns
        anchor = self.out["phases"].get("ic-ready" if self.mode == "ic-ready" else self.phase or "")
        return anchor + self.offset_ns if anchor is not None else None

    async def fire_during(self, servicing_timeout_s: float, grace_ms: float) -> None:
        """Fire when due while servicing runs (or, for an anchor that comes after it, up to
        the grace after its end); then wait for servicing's end or the deadline."""
        c, out = self.vm.console, self.out
        deadline = int(out["t0_ns"]) + int(servicing_timeout_s * 1e9)
        pending = self.shutdown_cmd is not None and self.before_ns is None
        anchor_wait_ns: int | None = None
        while pending or not self.ended:
            self.stamp()
            due = self.trigger_ns() if pending else None
            if due is not None and due - time.monotonic_ns() < 3_000_000:
                await sleep_until_ns(due)
                out["fire_planned_ns"], out["fire_ns"], pending = due, c.type(self.shutdown_cmd or ""), False
                continue
            now = time.monotonic_ns()
            if now > deadline:
                out["servicing_timeout"] = not self.ended
                break
            if c.exited() is not None or self.halted:
                break
            if self.ended and pending and self.offset_ns is None:  # after-ready: once servicing completed
                out["fire_ns"], pending = c.type(self.shutdown_cmd or ""), False
            elif self.ended and pending:  # the anchor comes after servicing (ic-ready) or never came
                anchor_wait_ns = anchor_wait_ns or now + int(grace_ms * 1e6)
                if now > anchor_wait_ns:
                    out["anchor_missing"] = self.phase if self.mode == "phase" else self.mode
                    break
            await asyncio.sleep(0.0005)
