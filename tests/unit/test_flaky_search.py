"""The flaky-window search on a simulated host (arms that lose with a known rate):
it finds a rare window without being told where, proves "no window" with the bound
its tries reached, stops as soon as it can, and spreads parallel probes over arms."""

from __future__ import annotations

import random

from testbed.engine import schedule as sched
from testbed.engine.stats import flaky_search, wilson

PHASES = ["request-seen", "quiesce", "drained", "save-start", "save-end", "port-close", "exec",
          "restore-start", "restore-end", "port-reopen", "ic-reoffered"]  # fmt: skip


def simulate(rates: dict[str, float], budget: int, seed: int, target: float = 0.1, confirm: int = 20):  # type: ignore[no-untyped-def]
    """Run the search to its end, each try decided at once by the arm's rate."""
    arms = sched.flaky_arms(-50, 500, 8, PHASES)
    rng = random.Random(seed)
    done: dict[str, list[bool]] = {a.label: [] for a in arms}

    def tally(_settle: bool) -> dict[str, tuple[int, int, int]]:
        return {k: (len(v), sum(v), 0) for k, v in done.items()}

    order = []
    for arm, _x in sched.flaky(arms, budget, tally, target_rate=target, confirm=confirm, seed=seed):
        done[arm.label].append(rng.random() < rates.get(arm.label, 0.0))
        order.append(arm.label)
    return arms, done, order


def test_finds_a_rare_phase_window_on_every_seed_within_the_budget() -> None:
    quiesce = "phase quiesce + 0 ms"
    tries = []
    for seed in range(50):
        _arms, done, order = simulate({quiesce: 0.267}, budget=600, seed=seed)
        assert sum(done[quiesce]) > 0, seed  # found
        assert len(done[quiesce]) == 20  # then confirmed with its tries, and stopped
        assert all(sum(v) == 0 for k, v in done.items() if k != quiesce)
        tries.append(len(order))
    tries.sort()
    assert tries[-1] <= 600 and tries[len(tries) // 2] < 150, tries


def test_no_window_stops_when_every_bound_is_under_the_target() -> None:
    arms, done, order = simulate({}, budget=10_000, seed=1, target=0.2)
    per_arm = {len(v) for v in done.values()}
    assert per_arm == {16}  # 0 of 16: Wilson upper 19.4% < 20%; 0 of 15: 20.4%
    assert wilson(0, 16)[1] < 0.2 <= wilson(0, 15)[1]
    assert len(order) == 16 * len(arms)


def test_the_budget_ends_a_search_that_could_not_reach_its_target() -> None:
    _arms, done, order = simulate({}, budget=40, seed=1, target=0.01)
    assert len(order) == 40 and max(len(v) for v in done.values()) - min(len(v) for v in done.values()) <= 1


def test_probes_in_flight_spread_over_the_arms() -> None:
    arms = sched.flaky_arms(0, 100, 2, ["a", "b"])
    pending = {a.label: 0 for a in arms}

    def tally(_settle: bool) -> dict[str, tuple[int, int, int]]:
        return {k: (0, 0, p) for k, p in pending.items()}

    gen = sched.flaky(arms, 100, tally, target_rate=0.1, confirm=5)
    first = []
    for _ in range(4):  # four lanes each take one before any finishes
        arm, _x = next(gen)
        pending[arm.label] += 1
        first.append(arm.label)
    assert sorted(first) == sorted(a.label for a in arms)


def _rec(arm: str, verdict: str, index: int, phase: str | None = None) -> dict:  # type: ignore[type-arg]
    return {"arm": arm, "verdict": verdict, "phase": phase, "phase_times_ms": {phase: 2.5} if phase else None,
            "search": {"kind": "flaky", "lo_ms": -50, "hi_ms": 500, "target_rate": 0.2, "budget": 100, "arms": 2,
                       "arm_index": index}}  # fmt: skip


def test_the_answer_in_words() -> None:
    recs = [_rec("phase quiesce + 0 ms", "lost" if i < 8 else "preserved", 0, "quiesce") for i in range(30)]
    recs += [_rec("offsets [-50, 500) ms", "preserved", 1) for _ in range(3)]
    s = flaky_search(recs)
    assert s is not None and s["answer"].startswith(
        "window found: loses at phase quiesce + 0 ms (the phase comes 2.5 ms"
    )
    assert "8 of 30 tries (26.7%, 95% [14.2%, 44.4%])" in s["answer"]
    clean = [_rec("phase quiesce + 0 ms", "preserved", 0, "quiesce") for _ in range(16)]
    clean += [_rec("offsets [-50, 500) ms", "preserved", 1) for _ in range(16)]
    s = flaky_search(clean)
    assert s is not None and s["bound"] < 0.2
    assert s["answer"].startswith(
        "no window with loss rate >= 19.4% anywhere in [-50, 500] ms from the servicing request"
    )
    assert "nor at any of 1 servicing phases" in s["answer"]
    short = flaky_search(clean[:3] + clean[16:19])
    assert short is not None and "the target 20% was not reached within the budget of 100" in short["answer"]
    untried = flaky_search(clean[:3])
    assert untried is not None and "never tried: no bound" in untried["answer"]
