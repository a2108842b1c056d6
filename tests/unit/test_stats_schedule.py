from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats  # type: ignore[import-untyped]

from testbed.engine import schedule as sched
from testbed.engine.stats import fisher_exact, loss_window, percentile, summarize, wilson


def test_wilson_known_values() -> None:
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


@given(st.integers(1, 500), st.data())
def test_wilson_contains_the_estimate(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n))
    lo, hi = wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_fisher_exact_known_values() -> None:
    # 9 of 16 lost vs 0 of 16 lost: clearly different.
    assert fisher_exact(9, 7, 0, 16) == pytest.approx(0.0008157, rel=1e-3)  # scipy.stats.fisher_exact
    assert fisher_exact(3, 5, 3, 5) == pytest.approx(1.0)
    assert fisher_exact(1, 9, 11, 3) == pytest.approx(0.002759, rel=1e-3)  # R's fisher.test


def test_percentile_nearest_rank() -> None:
    v = [float(x) for x in range(1, 101)]
    assert percentile(v, 50) == 50.0 and percentile(v, 99) == 99.0 and percentile([], 50) is None


def rec(i: int, off: float, verdict: str, skew: float = 0.05) -> dict[str, object]:
    return {
        "iteration": i,
        "offset_ms": off,
        "guest_offset_ms": off - 5,
        "planned_offset_ms": off,
        "verdict": verdict,
        "skew_ms": skew,
        "started": 1000.0 + i,
        "duration_s": 1.0,
    }


def test_summary_window_and_rule_of_three() -> None:
    recs = [rec(i, o, "lost" if 50 <= o <= 250 else "preserved") for i, o in enumerate(range(0, 400, 25))]
    recs.append(rec(99, 100, "infra-error"))
    s = summarize(recs)
    assert s["product_iterations"] == 16 and s["counts"]["lost"] == 9
    assert s["window"]["anchor"] == "guest_offset_ms"
    assert (s["window"]["first_loss_ms"], s["window"]["last_loss_ms"]) == (45, 245)
    assert s["window"]["bracket_ms"] == [20, 270]
    assert s["windows_by_anchor"]["offset_ms"]["first_loss_ms"] == 50
    ok = summarize([rec(i, 10, "preserved") for i in range(30)])
    assert ok["zero_loss_bound"].startswith("0 losses in 30 iterations: loss rate < 0.1")


def test_linear_random_and_parse() -> None:
    assert sched.linear(-50, 650, 8) == [-50, 50, 150, 250, 350, 450, 550, 650]
    assert sched.seeded_random(0, 10, 5, 7) == sched.seeded_random(0, 10, 5, 7)
    assert sched.seeded_random(0, 10, 5, 7) != sched.seeded_random(0, 10, 5, 8)
    assert sched.cycle_to([1.0, 2.0], 5) == [1.0, 2.0, 1.0, 2.0, 1.0]
    assert sched.parse_offsets("linear:-10:100:12") == {
        "kind": "linear",
        "start_ms": -10,
        "stop_ms": 100,
        "count": 12,
    }
    assert sched.parse_offsets("1,2.5") == {"kind": "fixed", "offsets_ms": [1.0, 2.5]}
    with pytest.raises(ValueError, match="linear:START:STOP:COUNT"):
        sched.parse_offsets("linear:x")


@pytest.mark.parametrize("window", [(40.0, 300.0), (-20.0, 5.0), (600.0, 640.0)])
def test_adaptive_search_brackets_a_synthetic_window(window: tuple[float, float]) -> None:
    lo_w, hi_w = window
    seen: dict[float, str] = {}

    def outcome(x: float) -> str | None:
        return seen.get(x)

    gen = sched.adaptive(-100, 700, 40, outcome, coarse=9, resolution_ms=2.0, seed=1)
    for x in gen:
        seen[x] = "lost" if lo_w <= x <= hi_w else "preserved"
    w = loss_window([{"planned_offset_ms": x, "verdict": v} for x, v in seen.items()], "planned_offset_ms")
    assert w is not None
    (left_ok, right_ok), left_lost, right_lost = w["bracket_ms"], w["first_loss_ms"], w["last_loss_ms"]
    assert left_ok < lo_w <= left_lost and left_lost - left_ok <= 2.0 + 1e-9
    assert right_lost <= hi_w < right_ok and right_ok - right_lost <= 2.0 + 1e-9
    assert len(seen) <= 40 and not math.isnan(left_ok)


def _fisher_by_exact_products(a: int, b: int, c: int, d: int) -> float:
    """The former implementation (exact math.comb products), as the reference."""
    n1, n2, m = a + b, c + d, a + c
    lo, hi = max(0, m - n2), min(m, n1)

    def p_of(x: int) -> float:
        return math.comb(n1, x) * math.comb(n2, m - x) / math.comb(n1 + n2, m)

    p_obs = p_of(a)
    return min(1.0, sum(p for x in range(lo, hi + 1) if (p := p_of(x)) <= p_obs * (1 + 1e-7)))


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 60), st.integers(0, 60), st.integers(0, 60), st.integers(0, 60))
def test_fisher_exact_in_log_space_matches_exact_products_and_scipy(a: int, b: int, c: int, d: int) -> None:
    got = fisher_exact(a, b, c, d)
    assert got == pytest.approx(_fisher_by_exact_products(a, b, c, d), rel=1e-9, abs=1e-15)
    assert got == pytest.approx(float(scipy_stats.fisher_exact([[a, b], [c, d]])[1]), rel=1e-6, abs=1e-12)


def test_fisher_exact_at_a_million_iterations() -> None:
    """10^6 iterations per side: finite, in (0, 1], and equal to the exact products."""
    p = fisher_exact(5000, 495000, 5400, 494600)
    assert 0 < p < 1e-3
    assert fisher_exact(50, 4950, 54, 4946) == pytest.approx(
        _fisher_by_exact_products(50, 4950, 54, 4946), rel=1e-9
    )


def _delay_records(points: dict[float, list[str]]) -> list[dict[str, object]]:
    return [{"shutdown_mode": "ic-ready", "planned_offset_ms": d, "verdict": v}
            for d, vs in points.items() for v in vs]  # fmt: skip


def test_ic_ready_delay_curve_and_safe_delay() -> None:
    from testbed.engine.stats import ic_ready_delay

    got = ic_ready_delay(_delay_records({0: ["lost"] * 3, 100: ["lost", "preserved", "lost"],
                                         300: ["preserved"] * 3, 600: ["preserved"] * 3}))  # fmt: skip
    assert got is not None
    assert [p["lost"] for p in got["curve"]] == [3, 2, 0, 0]
    assert got["safe_delay_ms"] == 300 and got["tries_at_safe"] == 3 and got["bound"] == 1.0
    assert got["answer"].startswith("wait at least 300 ms after ready: 0 losses in 3 tries")
    assert "in 6 tries at every delay from there" in got["answer"]
    flat = ic_ready_delay(_delay_records({0: ["preserved"] * 10, 50: ["preserved"] * 10}))
    assert flat is not None and flat["answer"].startswith("no wait needed") and flat["bound"] == 0.3
    late = ic_ready_delay(_delay_records({0: ["preserved"], 100: ["lost"]}))  # a loss at the longest delay
    assert late is not None and late["safe_delay_ms"] is None and "wait longer than that" in late["answer"]
    assert ic_ready_delay([{"shutdown_mode": "offset", "planned_offset_ms": 1.0, "verdict": "lost"}]) is None


def test_phase_means_overall_and_per_verdict() -> None:
    from testbed.engine.stats import phase_means

    recs = [
        {"verdict": "lost", "phases_s": {"start": 0.2, "race": 2.0, "teardown": 0.1}},
        {"verdict": "preserved", "phases_s": {"start": 0.4, "race": 1.0, "teardown": 0.1}},
        {"verdict": "infra-error"},  # an iteration without phases counts nowhere
    ]
    got = phase_means(recs)
    assert got["all"] == pytest.approx({"race": 1.5, "start": 0.3, "teardown": 0.1})
    assert got["lost"]["race"] == 2.0 and got["preserved"]["race"] == 1.0 and "infra-error" not in got


def test_in_run_grace_replaces_only_the_default_once_it_has_seen_deliveries() -> None:
    from testbed.engine.grace import IN_RUN_DELIVERIES, in_run_grace

    default = (1600.0, "default (run playbooks/baselines.yaml to calibrate)")
    delivered = [{"verdict": "preserved", "delivery_ms": 150.0 + i} for i in range(IN_RUN_DELIVERIES)]
    lost = [{"verdict": "lost", "delivery_ms": None}] * 3
    assert in_run_grace(delivered[:-1] + lost, default, 100.0) == default  # not enough seen yet
    grace, source = in_run_grace(delivered + lost, default, 100.0)
    assert grace == 3 * 154.0 + 100.0 and source.startswith(
        "in-run: 3 x the slowest of 5 deliveries (154 ms)"
    )
    slow = [{"verdict": "preserved", "delivery_ms": 900.0}] * IN_RUN_DELIVERIES
    assert in_run_grace(slow, default, 100.0)[0] == 1600.0  # never above the default
    fast = [{"verdict": "delivered-before", "delivery_ms": 10.0}] * IN_RUN_DELIVERIES
    assert in_run_grace(fast, default, 0.0)[0] == 500.0  # never below the floor
    assert in_run_grace(delivered, (1200.0, "set in the playbook"), 100.0) == (1200.0, "set in the playbook")
