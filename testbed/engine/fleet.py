"""Many hosts, one run: the hosts a run's lanes are spread over, and what happens when a
host leaves.

Every run is a fleet; most have one host. Each host gets as many lanes as the run asks
(``parallel``) up to its own ``max_guests``; all lanes draw from the run's one plan
generator, so an adaptive, flaky, phase or bisection search spends one budget across
the fleet and stops for all of it. A host that fails to provision, or whose tries end
as infrastructure errors ``max_infra_errors_in_a_row`` times in a row, is *drained*:
its lanes stop after the try in flight (each recorded, as infra-error with the reason
when the host is gone), the others take the rest of the budget, and the summary says
which host left when and why. A drained host is never used again within the run.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from testbed.backends.base import Backend
from testbed.core.config import VmConfig
from testbed.engine.estimators import fisher_exact, wilson
from testbed.hostprog import slots


def guest_limit(max_guests: int | None) -> int:
    """Guests a host runs at once: its inventory's max_guests, else the machine-wide slot
    limit (TESTBED_MAX_GUESTS, 2). One rule for a run on one host and for a fleet's hosts."""
    return max_guests or slots.max_guests()


@dataclass
class FleetHost:
    """One host of a run: its name as the user gave it, its kind, how to open one more of
    its backends (a lane's own agent and connection), and its guest limit."""

    name: str
    kind: str
    open: Callable[[], Backend]
    max_guests: int | None = None
    drained: str | None = None  # why the host left the run (None: it is in)
    drained_at: float | None = None  # wall clock
    lanes: int = 0
    first: Backend | None = field(default=None, repr=False)  # an already-open backend for its first lane
    cfg: VmConfig | None = field(default=None, repr=False)  # its own vm_config (a fleet of mixed kinds)

    def lanes_for(self, asked: int) -> int:
        """Lanes on this host: what the run asks, capped by the host's guest limit."""
        return max(1, min(asked, guest_limit(self.max_guests)))

    def drain(self, reason: str) -> None:
        if self.drained is None:
            self.drained, self.drained_at = reason, time.time()

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "lanes": self.lanes, "max_guests": self.max_guests,
                "drained": self.drained, "drained_at": self.drained_at,
                "vm_config": self.cfg.name if self.cfg is not None else None}  # fmt: skip


def split_lanes(hosts: list[FleetHost], asked: int) -> tuple[int, str]:
    """Give each host its lanes; the total and, when a cap bit, a note saying so."""
    notes = []
    for h in hosts:
        h.lanes = h.lanes_for(asked)
        if h.lanes < asked:
            notes.append(f"{h.name} capped to {h.lanes} by its max_guests")
    total = sum(h.lanes for h in hosts)
    head = f"parallel {asked} on {len(hosts)} hosts" if len(hosts) > 1 else f"parallel {asked}"
    return total, (f"{head}: {'; '.join(notes)}" if notes else "")


def per_host(records: list[dict[str, Any]], fleet: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A fleet run's answers per host: tries, verdict counts, loss rate with its Wilson
    interval, iterations per minute, infrastructure errors, when and why a host left;
    and whether the loss rate depends on the host (Fisher's exact test: of the two hosts,
    or of each host against the others with a Bonferroni correction for three or more).
    None for a run on one host."""
    names = list(dict.fromkeys(r["host"] for r in records if r.get("host")))
    if len(names) < 2:
        return None
    left = {h["name"]: h for h in fleet or [] if h.get("drained")}
    rows = [_host_row(name, [r for r in records if r.get("host") == name], left.get(name)) for name in names]
    return {"hosts": rows, **_host_test(rows)}


def _host_row(name: str, recs: list[dict[str, Any]], left: dict[str, Any] | None) -> dict[str, Any]:
    counts = Counter(r["verdict"] for r in recs)
    product = [r for r in recs if r["verdict"] != "infra-error"]
    lost = counts.get("lost", 0)
    lo, hi = wilson(lost, len(product))
    starts = [r["started"] for r in recs if r.get("started")]
    ends = [r["started"] + (r.get("duration_s") or 0) for r in recs if r.get("started")]
    minutes = (max(ends) - min(starts)) / 60 if starts else 0
    return {"host": name, "kind": recs[0].get("host_kind"), "tries": len(recs), "n": len(product), "lost": lost,
            "rate": lost / len(product) if product else None, "ci95": [lo, hi], "counts": dict(counts),
            "infra_errors": counts.get("infra-error", 0), "per_min": len(recs) / minutes if minutes else None,
            "left": left and {"reason": left["drained"], "at": left.get("drained_at")}}  # fmt: skip


def _host_test(rows: list[dict[str, Any]]) -> dict[str, Any]:
    k = len(rows)
    if k == 2:
        a, b = rows
        p = fisher_exact(a["lost"], a["n"] - a["lost"], b["lost"], b["n"] - b["lost"])
        test = "Fisher's exact test (two-sided) of the two hosts' loss rates"
    else:
        tot_lost, tot_n = sum(r["lost"] for r in rows), sum(r["n"] for r in rows)
        ps = [fisher_exact(r["lost"], r["n"] - r["lost"], tot_lost - r["lost"], (tot_n - r["n"]) - (tot_lost - r["lost"]))
              for r in rows]  # fmt: skip
        p = min(1.0, k * min(ps))
        test = f"Fisher's exact test (two-sided) of each host against the others, Bonferroni-corrected for {k} tests"
    words = ("the loss rate differs between hosts" if p < 0.05 else
             "no evidence that the loss rate depends on the host")  # fmt: skip
    return {"test": test, "p": p, "answer": f"{words} (p = {p:.3g}, {test})"}
