"""Which build broke it: a bisection over an ordered list of paravisor builds, each
build judged by a sequential test, because a flaky race makes a one-shot bisection lie.

Each build gets Wald's sequential probability ratio test (SPRT) of H0 "loss rate
<= p0" (good) against H1 "loss rate >= p1" (bad), with error rates alpha (calling a
good build bad) and beta (calling a bad build good): tries continue until the log
likelihood ratio leaves (ln(beta/(1-alpha)), ln((1-beta)/alpha)), or ``max_per_build``
tries leave it undecided, which ends the bisection honestly with no answer. The
first build must test good and the last bad, then the middle of the bracket is
tested until the first bad build is next to the last good one.

The SPRT runs over a build's tries in iteration order, so the decision is the same
when it is recomputed from results.jsonl (``decide``), also when parallel lanes
finished them out of order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from testbed.engine.estimators import wilson


@dataclass(frozen=True)
class Sprt:
    p0: float
    p1: float
    alpha: float
    beta: float

    def decide(self, lost: list[bool]) -> tuple[str | None, int, float]:
        """(``"good"`` | ``"bad"`` | None, tries to the decision, log likelihood ratio there)."""
        low, high = math.log(self.beta / (1 - self.alpha)), math.log((1 - self.beta) / self.alpha)
        up, down = math.log(self.p1 / self.p0), math.log((1 - self.p1) / (1 - self.p0))
        llr = 0.0
        for i, was_lost in enumerate(lost, 1):
            llr += up if was_lost else down
            if llr <= low:
                return "good", i, llr
            if llr >= high:
                return "bad", i, llr
        return None, len(lost), llr


# build, settle -> the build's finished tries in iteration order (True: lost), tries in
# flight; ``settle`` waits until none of the build's tries is in flight.
Tally = Callable[[str, bool], tuple[list[bool], int]]


def bisect(builds: list[str], tally: Tally, test: Sprt, max_per_build: int) -> Iterator[str]:
    """Yield the build each next try runs on, until the bisection is decided or cannot be."""

    def judge(build: str) -> Generator[str, None, str]:
        while True:
            lost, pending = tally(build, False)
            decision = test.decide(lost)[0]
            if decision is None and len(lost) + pending < max_per_build:
                yield build
                continue
            if pending:
                tally(build, True)  # the tries in flight count: the decision is made on all of them
                continue
            return decision or "undecided"

    lo, hi = 0, len(builds) - 1
    if (yield from judge(builds[lo])) != "good":
        return
    if (yield from judge(builds[hi])) != "bad":
        return
    while hi - lo > 1:
        mid = (lo + hi) // 2
        decision = yield from judge(builds[mid])
        if decision == "good":
            lo = mid
        elif decision == "bad":
            hi = mid
        else:
            return


def summarize_bisect(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The bisection table (per build tested: tries, losses, Wilson interval, the SPRT's
    decision and the tries it took) and its answer in words, from the records alone."""
    rs = [
        r
        for r in records
        if (r.get("search") or {}).get("kind") == "bisect" and r["verdict"] != "infra-error"
    ]
    if not rs:
        return None
    spec = rs[0]["search"]
    test = Sprt(spec["p0"], spec["p1"], spec["alpha"], spec["beta"])
    builds: list[str] = spec["builds"]
    rows = []
    by: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rs, key=lambda r: r["iteration"]):
        by.setdefault(r["image"], []).append(r)
    for b in builds:
        if b not in by:
            continue
        lost = [r["verdict"] == "lost" for r in by[b]]
        decision, at, llr = test.decide(lost)
        if decision is None and len(lost) < spec["max_per_build"]:
            decision = "unfinished"  # the run ended (budget, Ctrl-C) before the test did
        k = sum(lost)
        lo, hi = wilson(k, len(lost))
        rows.append({"build": b, "index": builds.index(b), "n": len(lost), "lost": k, "rate": k / len(lost),
                     "ci95": [lo, hi], "decision": decision or "undecided", "decided_after": at if decision
                     in ("good", "bad") else None, "llr": llr})  # fmt: skip
    good = [x for x in rows if x["decision"] == "good"]
    bad = [x for x in rows if x["decision"] == "bad"]
    stuck = [x for x in rows if x["decision"] in ("undecided", "unfinished")]
    errors = f"SPRT p0 {spec['p0']:g} vs p1 {spec['p1']:g}, alpha {spec['alpha']:g}, beta {spec['beta']:g} per build"
    first_bad = min(bad, key=lambda x: x["index"]) if bad else None
    last_good = max(good, key=lambda x: x["index"]) if good else None
    answer: str
    if stuck:
        s = stuck[0]
        answer = (f"no answer: build {s['build']} was {s['decision']} after {s['n']} tries ({s['lost']} lost); "
                  "raise max_per_build or the budget, or widen p1 - p0")  # fmt: skip
    elif rows and rows[0]["build"] == builds[0] and rows[0]["decision"] == "bad":
        answer = f"the first build {builds[0]} is already bad ({rows[0]['lost']} of {rows[0]['n']} lost): nothing to bisect"
    elif last_good and last_good["build"] == builds[-1]:
        answer = f"the last build {builds[-1]} tests good: no regression in this series"
    elif first_bad and last_good and first_bad["index"] == last_good["index"] + 1:
        answer = (f"first bad build: {first_bad['build']} ({first_bad['lost']} of {first_bad['n']} lost, "
                  f"{100 * first_bad['rate']:.0f}%, 95% [{100 * first_bad['ci95'][0]:.0f}%, "
                  f"{100 * first_bad['ci95'][1]:.0f}%]); the build before it, {last_good['build']}, is good "
                  f"({last_good['lost']} of {last_good['n']} lost); {len(rs)} tries in all, {errors}")  # fmt: skip
    else:
        answer = f"unfinished: {len(rows)} builds tested, the bracket is still open"
    return {"builds": rows, "answer": answer, "tries": len(rs), **{k: spec[k] for k in
            ("p0", "p1", "alpha", "beta", "max_per_build")}}  # fmt: skip
