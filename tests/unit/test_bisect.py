"""The bisection on a simulated series (builds with known loss rates): an SPRT per build
names the first bad build of a 15%-loss regression on nearly every seed (a one-shot
try would call a bad build good 85% of the time), says "no answer" when a build stays
undecided, and states a bad first or a good last build."""

from __future__ import annotations

import math
import random

from testbed.engine.bisect import Sprt, bisect, summarize_bisect

SERIES = [f"v2-r{i}" for i in range(1, 9)]
TEST = Sprt(0.01, 0.15, 0.05, 0.01)


def simulate(rates: dict[str, float], seed: int, max_per_build: int = 150) -> list[dict]:  # type: ignore[type-arg]
    rng = random.Random(seed)
    recs: list[dict] = []  # type: ignore[type-arg]

    def tally(build: str, _settle: bool) -> tuple[list[bool], int]:
        return [r["verdict"] == "lost" for r in recs if r["image"] == build], 0

    for build in bisect(SERIES, tally, TEST, max_per_build):
        lost = rng.random() < rates.get(build, 0.0)
        recs.append({"iteration": len(recs), "image": build, "verdict": "lost" if lost else "preserved",
                     "search": {"kind": "bisect", "builds": SERIES, "p0": 0.01, "p1": 0.15, "alpha": 0.05,
                                "beta": 0.01, "max_per_build": max_per_build}})  # fmt: skip
    return recs


def test_sprt_boundaries_are_walds() -> None:
    assert TEST.decide([False] * 29)[0] is None and TEST.decide([False] * 30)[:2] == ("good", 30)
    assert TEST.decide([True, True])[:2] == ("bad", 2)
    d, at, llr = TEST.decide([True] + [False] * 3 + [True])
    assert d == "bad" and at == 5 and llr >= math.log(0.95 / 0.05)


def test_the_first_bad_build_is_named_on_almost_every_seed() -> None:
    bad = {b: 0.15 for b in SERIES[5:]}
    right, tries = 0, []
    for seed in range(200):
        s = summarize_bisect(simulate(bad, seed))
        assert s is not None
        right += s["answer"].startswith("first bad build: v2-r6 ")
        tries.append(s["tries"])
    assert right >= 190, right  # beta = 1% per bad build tested: 98.1% right over 1000 seeds
    tries.sort()
    assert tries[100] < 160, tries[100]  # median 116 over 1000 seeds


def test_an_undecided_build_ends_with_no_answer() -> None:
    recs = simulate({}, seed=1, max_per_build=5)  # 5 clean tries cannot reach the "good" boundary (30)
    s = summarize_bisect(recs)
    assert len(recs) == 5 and s is not None
    assert s["answer"].startswith("no answer: build v2-r1 was undecided after 5 tries (0 lost)")
    assert "raise max_per_build" in s["answer"]


def test_a_good_last_build_and_a_bad_first_one_are_said() -> None:
    s = summarize_bisect(simulate({}, seed=1))
    assert s is not None and s["answer"] == "the last build v2-r8 tests good: no regression in this series"
    s = summarize_bisect(simulate({b: 0.5 for b in SERIES}, seed=1))
    assert s is not None and s["answer"].startswith("the first build v2-r1 is already bad")
