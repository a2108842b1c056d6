"""Schedules of shutdown offsets (ms from the servicing request; negative = before it).

Static schedules are lists.  The adaptive window search is a generator that
looks at the verdicts so far: a coarse grid, then bisection of every interval
where a loss and a non-loss meet, down to ``resolution_ms``, then repeats at
the edges.  ``seed`` makes every schedule repeat exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from testbed.engine.playbook import ScheduleSpec

Outcome = Callable[[float], str | None]  # offset -> verdict of its latest iteration


def linear(start_ms: float, stop_ms: float, count: int) -> list[float]:
    if count < 1:
        raise ValueError("count must be >= 1")
    if count == 1:
        return [float(start_ms)]
    step = (stop_ms - start_ms) / (count - 1)
    return [round(start_ms + i * step, 3) for i in range(count)]


def seeded_random(lo_ms: float, hi_ms: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(lo_ms, hi_ms), 3) for _ in range(count)]


def cycle_to(points: list[float], iterations: int) -> list[float]:
    """Repeat (or cut) a list of points to ``iterations`` offsets, in order."""
    if not points:
        return []
    return [points[i % len(points)] for i in range(iterations)]


def parse_offsets(spec: str) -> dict[str, Any]:
    """CLI ``--offsets``: ``10,50,90`` | ``linear:-50:400:16`` | ``random:0:400:20``
    | ``adaptive:-50:500`` -> a schedule mapping like the playbook's."""
    s = spec.strip()
    try:
        if s.startswith(("linear:", "random:", "adaptive:")):
            kind, *nums = s.split(":")
            vals = [float(x) for x in nums]
            if kind == "linear":
                return {
                    "kind": "linear",
                    "start_ms": vals[0],
                    "stop_ms": vals[1],
                    "count": int(vals[2]),
                }
            if kind == "random":
                return {"kind": "random", "lo_ms": vals[0], "hi_ms": vals[1], "count": int(vals[2])}
            return {"kind": "adaptive", "lo_ms": vals[0], "hi_ms": vals[1]}
        return {"kind": "fixed", "offsets_ms": [float(x) for x in s.split(",") if x.strip()]}
    except (ValueError, IndexError):
        raise ValueError(
            f"bad --offsets {spec!r}: use 10,50,90 | linear:START:STOP:COUNT | random:LO:HI:COUNT | adaptive:LO:HI"
        ) from None


def parse_schedule(spec: str) -> ScheduleSpec:
    """``--offsets`` validated as a playbook's schedule would be, before anything is
    provisioned: NaN, infinities, counts of 0 or beyond 100000 are refused here."""
    raw = parse_offsets(spec)
    try:
        return ScheduleSpec(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"bad --offsets {spec!r}: {where + ': ' if where else ''}{err['msg']}") from None


def adaptive(
    lo_ms: float,
    hi_ms: float,
    budget: int,
    outcome: Outcome,
    *,
    coarse: int = 8,
    resolution_ms: float = 2.0,
    seed: int = 0,
) -> Iterator[float]:
    """Yield offsets; ``outcome(offset)`` tells the verdict once the caller ran it."""
    rng = random.Random(seed)
    tried: list[float] = []
    used = 0

    def emit(x: float) -> Iterator[float]:
        nonlocal used
        if used < budget:
            used += 1
            tried.append(x)
            yield x

    for x in linear(lo_ms, hi_ms, max(2, min(coarse, budget))):
        yield from emit(x)
    # Bisection on every loss / non-loss boundary.
    while used < budget:
        pts = sorted({x for x in tried if outcome(x) is not None})
        edges = [
            (a, b)
            for a, b in zip(pts, pts[1:], strict=False)
            if (outcome(a) == "lost") != (outcome(b) == "lost") and b - a > resolution_ms
        ]
        if not edges:
            break
        for a, b in edges:
            yield from emit(round((a + b) / 2, 3))
    # Refinement: spend what is left around the edges, with a little jitter.
    while used < budget:
        pts = sorted({x for x in tried if outcome(x) is not None})
        edges = [
            (a, b)
            for a, b in zip(pts, pts[1:], strict=False)
            if (outcome(a) == "lost") != (outcome(b) == "lost")
        ]
        if not edges:
            return
        a, b = edges[rng.randrange(len(edges))]
        yield from emit(round(rng.uniform(a - resolution_ms, b + resolution_ms), 3))


@dataclass(frozen=True)
class Arm:
    """One place the flaky-window search can probe: a servicing phase (fired on its
    arrival) or a bucket [lo_ms, hi_ms) of offsets from the servicing request."""

    label: str
    phase: str | None = None
    lo_ms: float = 0.0
    hi_ms: float = 0.0


def flaky_arms(lo_ms: float, hi_ms: float, buckets: int, phases: list[str]) -> list[Arm]:
    """The phases first (in the order they happen), then the buckets of the range."""
    edges = linear(lo_ms, hi_ms, buckets + 1)
    arms = [Arm(f"phase {p} + 0 ms", phase=p) for p in phases]
    arms += [
        Arm(f"offsets [{a:g}, {b:g}) ms", lo_ms=a, hi_ms=b) for a, b in zip(edges, edges[1:], strict=False)
    ]
    return arms


Tally = Callable[[bool], dict[str, tuple[int, int, int]]]  # settle? -> label: (tries done, lost, in flight)


def flaky(
    arms: list[Arm],
    budget: int,
    tally: Tally,
    *,
    target_rate: float,
    confirm: int,
    seed: int = 0,
) -> Iterator[tuple[Arm, float]]:
    """The budgeted search for a window that loses a fraction of its tries.

    Every try goes to the arm whose loss rate could be highest: the largest Wilson
    upper bound, counting tries still in flight as done without a loss, so parallel
    lanes spread over arms instead of piling on one (ties: fewest tries, then order).
    An arm that lost is a window found: it gets tries until ``confirm`` are done, for
    its rate. With no loss anywhere the search stops once every arm's upper bound is
    below ``target_rate`` (only finished tries count then: ``tally(True)`` waits for
    those in flight). Yields (arm, offset): a phase arm's offset is the delay, 0."""
    from testbed.engine.stats import wilson

    rng = random.Random(seed)
    used = 0
    while used < budget:
        t = tally(False)
        lost = [a for a in arms if t[a.label][1] > 0]
        if lost:
            pick = max(lost, key=lambda a: (t[a.label][1] / max(1, t[a.label][0]), -arms.index(a)))
            if t[pick.label][0] + t[pick.label][2] >= confirm:
                if any(v[2] for v in t.values()):
                    tally(True)  # the confirmation's last tries are in flight: their verdicts decide
                    continue
                return
        else:
            if all(wilson(0, t[a.label][0])[1] < target_rate for a in arms):
                if any(v[2] for v in t.values()):
                    tally(True)
                    continue
                return
            if all(wilson(0, t[a.label][0] + t[a.label][2])[1] < target_rate for a in arms):
                tally(True)  # the tries in flight would finish it: wait for them before adding any
                continue

            def score(a: Arm, t: dict[str, tuple[int, int, int]] = t) -> tuple[float, int, int]:
                n, _k, pending = t[a.label]
                return (wilson(0, n + pending)[1], -(n + pending), -arms.index(a))

            pick = max(arms, key=score)
        used += 1
        yield pick, (0.0 if pick.phase else round(rng.uniform(pick.lo_ms, pick.hi_ms), 3))


def phase_cells(phases: list[str], delays_ms: list[float], repeat: int, seed: int) -> list[tuple[str, float]]:
    """Every (phase, delay) cell ``repeat`` times, in a seeded order."""
    cells = [(p, d) for p in phases for d in delays_ms] * repeat
    random.Random(seed).shuffle(cells)
    return cells


def phase_midpoints(phases: list[str], times_ms: list[dict[str, float]]) -> dict[str, float]:
    """Per phase (but the last), half the mean time to the next phase, from the phase
    times the run has seen so far: the middle of the gap a phase trigger can aim at."""
    out: dict[str, float] = {}
    for a, b in zip(phases, phases[1:], strict=False):
        gaps = [t[b] - t[a] for t in times_ms if a in t and b in t]
        if gaps:
            out[a] = round(max(0.0, sum(gaps) / len(gaps) / 2), 3)
    return out


def phase_sweep_size(n_phases: int, n_delays: int, midpoint: bool, repeat: int) -> int:
    return (n_phases * n_delays + (max(0, n_phases - 1) if midpoint else 0)) * repeat
