"""Schedules of shutdown offsets (ms from the servicing request; negative = before it).

Every schedule is an object with one interface (``Schedule.tries(tally)``): it plans
the next try from the tally of the case's finished and in-flight tries. Static ones
(fixed, linear, random) ignore the tally; the adaptive window search (a coarse grid,
bisection of every interval where a loss and a non-loss meet down to
``resolution_ms``, then repeats at the edges), the phase sweep's midpoints, the flaky
search and the bisection read it. ``build`` picks the object for a case; the runner
never looks at a schedule's kind. ``seed`` makes every schedule repeat exactly.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from testbed.engine.estimators import wilson
from testbed.engine.playbook import BisectSpec, ScheduleSpec

log = logging.getLogger(__name__)

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
    landmarks: Callable[[], list[float]] | None = None,
) -> Iterator[float]:
    """Yield offsets; ``outcome(offset)`` tells the verdict once the caller ran it.

    ``landmarks()`` gives the servicing phases' measured times (same anchor as the
    offsets) where the backend observes phases: a loss window's edges sit at phases (the
    save starting, the port closing), so an edge whose bracket holds a phase is probed
    just either side of it first, which closes the bracket to ``resolution_ms`` in two
    tries instead of a bisection's five or six."""
    rng = random.Random(seed)
    tried: list[float] = []
    used = 0
    seeded: set[tuple[float, float]] = set()

    def emit(x: float) -> Iterator[float]:
        nonlocal used
        if used < budget:
            used += 1
            tried.append(x)
            yield x

    for x in linear(lo_ms, hi_ms, max(2, min(coarse, budget))):
        yield from emit(x)
    # Bisection on every loss / non-loss boundary (a phase inside a bracket first).
    while used < budget:
        edges = _edges(tried, outcome, resolution_ms)
        if not edges:
            break
        marks = landmarks() if landmarks else []
        for a, b in edges:
            inside = [t for t in marks if a + resolution_ms / 2 < t < b - resolution_ms / 2]
            if inside and (a, b) not in seeded:
                seeded.add((a, b))
                t = min(inside, key=lambda m: abs(m - (a + b) / 2))
                yield from emit(round(t - resolution_ms / 2, 3))
                yield from emit(round(t + resolution_ms / 2, 3))
            else:
                yield from emit(round((a + b) / 2, 3))
    # Refinement: spend what is left around the edges, with a little jitter.
    while used < budget:
        edges = _edges(tried, outcome, 0.0)
        if not edges:
            return
        a, b = edges[rng.randrange(len(edges))]
        yield from emit(round(rng.uniform(a - resolution_ms, b + resolution_ms), 3))


def _edges(tried: list[float], outcome: Outcome, wider_than: float) -> list[tuple[float, float]]:
    """Neighbouring tried offsets, one lost and one not, further apart than ``wider_than``."""
    pts = sorted({x for x in tried if outcome(x) is not None})
    return [(a, b) for a, b in zip(pts, pts[1:], strict=False)
            if (outcome(a) == "lost") != (outcome(b) == "lost") and b - a > wider_than]  # fmt: skip


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


ArmCounts = Callable[
    [bool], dict[str, tuple[int, int, int]]
]  # settle? -> label: (tries done, lost, in flight)


def flaky(
    arms: list[Arm],
    budget: int,
    tally: ArmCounts,
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


# ---- schedules as objects: one interface, planned from the run's tally -------------

Key = float | str | None  # what a try in flight is counted under: its search arm, else its offset


class Tally(Protocol):
    """What a schedule may read of its case while it plans: the finished tries and those
    in flight, at one instant (lanes finish tries while the schedule plans)."""

    def snapshot(self, keys: Collection[Key]) -> tuple[list[dict[str, Any]], dict[Key, int]]:
        """This case's finished records (slim, in finishing order) and the tries in flight per key."""
        ...

    def settle(self, keys: Collection[Key]) -> None:
        """Wait until no try of ``keys`` is in flight (or the run halts)."""
        ...


@dataclass(frozen=True)
class Try:
    """One planned try: where to fire (``offset_ms`` in the mode's terms), on which phase
    and build, and, for a search, the arm it probes and what the record says of the search."""

    offset_ms: float | None
    mode: str
    phase: str | None = None
    image: str | None = None
    arm: str | None = None
    search: dict[str, Any] | None = None


class Schedule(Protocol):
    """Plans a case's tries one at a time from the tally of finished and in-flight tries:
    a static list ignores the tally, a search reads it before every try."""

    @property
    def size(self) -> int:
        """At most this many tries (the progress bar's total; a search may stop sooner)."""
        ...

    def tries(self, tally: Tally) -> Iterator[Try]: ...


@dataclass
class Repeated:
    """The same try ``size`` times: a mode with no offset (after-ready, none)."""

    size: int
    mode: str

    def tries(self, tally: Tally) -> Iterator[Try]:
        for _ in range(self.size):
            yield Try(None, self.mode)


@dataclass
class Static:
    """A fixed, linear or random list of offsets, cycled or cut to ``size``."""

    points: list[float]
    size: int
    mode: str

    def tries(self, tally: Tally) -> Iterator[Try]:
        for x in cycle_to(self.points, self.size):
            yield Try(x, self.mode)


@dataclass
class Adaptive:
    """The window search: a coarse grid, then bisection of every loss/non-loss boundary
    down to ``resolution_ms``, then refinement at the edges (``adaptive``). A probe still
    racing in another lane is waited for, so a round runs in parallel and the next round
    sees all of it."""

    lo_ms: float
    hi_ms: float
    size: int
    mode: str
    coarse: int
    resolution_ms: float
    seed: int

    def tries(self, tally: Tally) -> Iterator[Try]:
        def outcome(x: float) -> str | None:
            while True:
                done, flying = tally.snapshot([x])
                for r in reversed(done):
                    if r.get("planned_offset_ms") == x:
                        return str(r["verdict"])
                if not flying[x]:
                    return None
                tally.settle([x])
                if tally.snapshot([x])[1][x]:  # still in flight: the run halted
                    return None

        def landmarks() -> list[float]:
            """Each phase's mean time over the finished tries (ms from the servicing request)."""
            done, _ = tally.snapshot([])
            times: dict[str, list[float]] = {}
            for r in done:
                for name, t in (r.get("phase_times_ms") or {}).items():
                    times.setdefault(name, []).append(float(t))
            return sorted(sum(v) / len(v) for v in times.values())

        gen = adaptive(self.lo_ms, self.hi_ms, self.size, outcome, coarse=self.coarse,
                       resolution_ms=self.resolution_ms, seed=self.seed, landmarks=landmarks)  # fmt: skip
        for x in gen:
            yield Try(x, self.mode)


@dataclass
class PhaseSweep:
    """Every (phase, delay) cell ``repeat`` times in a seeded order, fired on the phase's
    arrival; then, with ``midpoint``, each gap's middle as measured by those tries."""

    phases: list[str]
    delays_ms: list[float]
    repeat: int
    midpoint: bool
    seed: int

    @property
    def size(self) -> int:
        return phase_sweep_size(len(self.phases), len(self.delays_ms), self.midpoint, self.repeat)

    def tries(self, tally: Tally) -> Iterator[Try]:
        for ph, d in phase_cells(self.phases, self.delays_ms, self.repeat, self.seed):
            yield Try(d, "phase", phase=ph)
        if not self.midpoint:
            return
        done, _ = tally.snapshot([])
        mids = phase_midpoints(self.phases, [r["phase_times_ms"] for r in done if r.get("phase_times_ms")])
        for ph, _d in phase_cells([p for p in self.phases if p in mids], [0.0], self.repeat, self.seed + 1):
            yield Try(mids[ph], "phase", phase=ph)


@dataclass
class FlakySearch:
    """The budgeted search for a window that loses a fraction of its tries (``flaky``):
    offset buckets of [lo_ms, hi_ms] and the servicing phases, each an arm."""

    lo_ms: float
    hi_ms: float
    buckets: int
    phases: list[str]
    size: int
    target_rate: float
    confirm: int
    seed: int

    def tries(self, tally: Tally) -> Iterator[Try]:
        arms = flaky_arms(self.lo_ms, self.hi_ms, self.buckets, self.phases)
        labels = [a.label for a in arms]

        def counts(settle: bool) -> dict[str, tuple[int, int, int]]:
            if settle:
                tally.settle(labels)
            done, flying = tally.snapshot(labels)
            out = {a: (0, 0, flying[a]) for a in labels}
            for r in done:
                if r.get("arm") in out and r["verdict"] != "infra-error":
                    n, k, p = out[r["arm"]]
                    out[r["arm"]] = (n + 1, k + (r["verdict"] == "lost"), p)
            return out

        info = {"kind": "flaky", "lo_ms": self.lo_ms, "hi_ms": self.hi_ms, "target_rate": self.target_rate,
                "budget": self.size, "arms": len(arms)}  # fmt: skip
        search = flaky(
            arms, self.size, counts, target_rate=self.target_rate, confirm=self.confirm, seed=self.seed
        )
        for arm, x in search:
            yield Try(x, "phase" if arm.phase else "offset", phase=arm.phase, arm=arm.label,
                      search={**info, "arm_index": labels.index(arm.label)})  # fmt: skip


@dataclass
class Bisection:
    """Which build broke it: each try on the build the bisection asks for (an SPRT per
    build, ``testbed.engine.bisect``), at the case's offsets in turn, within ``size``."""

    spec: BisectSpec
    points: list[float]
    size: int
    mode: str

    def tries(self, tally: Tally) -> Iterator[Try]:
        from testbed.engine import bisect as bisection

        def judged(build: str, settle: bool) -> tuple[list[bool], int]:
            key = f"build {build}"
            if settle:
                tally.settle([key])
            done, flying = tally.snapshot([key])
            mine = sorted((r for r in done if r.get("arm") == key and r["verdict"] != "infra-error"),
                          key=lambda r: r["iteration"])  # fmt: skip
            return [r["verdict"] == "lost" for r in mine], flying[key]

        info = {"kind": "bisect", **self.spec.model_dump()}
        test = bisection.Sprt(self.spec.p0, self.spec.p1, self.spec.alpha, self.spec.beta)
        pts = cycle_to(self.points, self.size)
        for i, build in enumerate(bisection.bisect(self.spec.builds, judged, test, self.spec.max_per_build)):
            if i >= self.size:
                log.warning("bisect: the budget of %d iterations is spent", self.size)
                return
            yield Try(pts[i % len(pts)], self.mode, image=build, arm=f"build {build}", search=info)


def points_of(s: ScheduleSpec, n: int, seed: int) -> list[float]:
    """A fixed, linear or random schedule's offsets (ValueError for a kind with none)."""
    if s.kind == "fixed":
        return list(s.offsets_ms or [])
    if s.kind == "linear" and s.start_ms is not None and s.stop_ms is not None:
        return linear(s.start_ms, s.stop_ms, s.count or n)
    if s.kind == "random" and s.lo_ms is not None and s.hi_ms is not None:
        return seeded_random(s.lo_ms, s.hi_ms, s.count or n, seed)
    raise ValueError(f"schedule kind {s.kind} names no offsets of its own: use fixed, linear or random here")


def build(s: ScheduleSpec, n: int, mode: str, *, seed: int, phases: list[str],
          bisect: BisectSpec | None = None) -> Schedule:  # fmt: skip
    """The schedule object for a case: its spec's kind (and the playbook's bisection, the
    shutdown mode) decide which; ``phases`` are what the backend observes, resolved by
    the caller. The one place that dispatches on a schedule's kind."""
    if bisect is not None:
        return Bisection(bisect, points_of(s, n, seed), n, mode)
    if mode not in ("offset", "ic-ready"):
        return Repeated(n, mode)
    if s.kind == "phases":
        return PhaseSweep(phases, list(s.delays_ms), s.repeat, s.midpoint, seed)
    if s.kind in ("flaky", "adaptive"):
        assert s.lo_ms is not None and s.hi_ms is not None
        if s.kind == "flaky":
            return FlakySearch(s.lo_ms, s.hi_ms, s.buckets, phases, n, s.target_rate, s.confirm, seed)
        return Adaptive(s.lo_ms, s.hi_ms, n, mode, s.coarse, s.resolution_ms, seed)
    return Static(points_of(s, n, seed), n, mode)
