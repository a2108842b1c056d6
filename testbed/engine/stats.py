"""Statistics over iteration records: loss rate with a Wilson interval, window, skew, rate.

Infrastructure errors are excluded from every denominator: a run that lost
its host has not measured the product.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from testbed.core.verdicts import PRODUCT_FAILURES, VERDICTS
from testbed.engine.bisect import summarize_bisect
from testbed.engine.estimators import Z95, fisher_exact, percentile, wilson

__all__ = [
    "Z95",
    "fisher_exact",
    "percentile",
    "wilson",
]  # the estimators, where callers have always found them


def spread(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Servicing lag and fire skew, p50 and p99 (ms): what contention between guests widens."""
    out: dict[str, Any] = {"n": len(records)}
    for key in ("servicing_lag_ms", "skew_ms"):
        xs = [r[key] for r in records if r.get(key) is not None]
        out[key] = {"p50": percentile(xs, 50), "p99": percentile(xs, 99)} if xs else None
    return out


def loss_window(records: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """First/last offset with a loss, and the nearest non-loss offsets around them."""
    pts = sorted(
        (r[key], r["verdict"]) for r in records if r.get(key) is not None and r["verdict"] != "infra-error"
    )
    lost = [o for o, v in pts if v == "lost"]
    if not lost:
        return None
    first, last = min(lost), max(lost)
    before = [o for o, v in pts if v != "lost" and o < first]
    after = [o for o, v in pts if v != "lost" and o > last]
    bracket = [max(before) if before else None, min(after) if after else None]
    return {
        "words": window_words(key, first, last, bracket[0], bracket[1]),
        "anchor": key,
        "first_loss_ms": first,
        "last_loss_ms": last,
        "bracket_ms": bracket,
    }


ANCHOR_WORDS = {"guest_offset_ms": "after the paravisor's servicing start",
                "offset_ms": "after the servicing request", "ic_ready_offset_ms": "after the IC's re-offer"}  # fmt: skip


def per_bucket(records: list[dict[str, Any]], key: str, bucket_ms: float) -> list[dict[str, Any]]:
    """Tries, losses, loss rate and Wilson interval per ``bucket_ms`` of ``key``."""
    buckets: dict[float, list[int]] = {}
    for r in records:
        off = r.get(key)
        if off is None or r["verdict"] == "infra-error":
            continue
        b = math.floor(off / bucket_ms) * bucket_ms
        buckets.setdefault(b, [0, 0])
        buckets[b][1] += 1
        buckets[b][0] += r["verdict"] == "lost"
    return [{"from_ms": b, "to_ms": b + bucket_ms, "lost": k, "n": m, "rate": k / m, "ci95": list(wilson(k, m))}
            for b, (k, m) in sorted(buckets.items())]  # fmt: skip


def window_words(key: str, first: float, last: float, lo: float | None, hi: float | None) -> str:
    """The window in words with its uncertainty: each edge lies between the last try
    that did not lose and the first that did, so it is said as the middle ± half."""

    def edge(a: float | None, b: float, side: str) -> str:
        if a is None:
            return f"{side} {b:.0f} ms (no try {'before' if side == 'at most' else 'after'} it)"
        mid, half = (a + b) / 2, abs(b - a) / 2
        return f"{mid:.0f} ± {half:.0f} ms"

    start = edge(lo, first, "at most")
    end = edge(hi, last, "at least")
    return f"loses from {start} to {end} {ANCHOR_WORDS.get(key, 'from the anchor')}"


def summarize(records: list[dict[str, Any]], bucket_ms: float = 50.0) -> dict[str, Any]:
    counts = Counter(r["verdict"] for r in records)
    product = [r for r in records if r["verdict"] != "infra-error"]
    n = len(product)
    lost = counts.get("lost", 0)
    lo, hi = wilson(lost, n)
    skews = [r["skew_ms"] for r in records if r.get("skew_ms") is not None]
    durations = [r["duration_s"] for r in records if r.get("duration_s")]
    t0 = min((r["started"] for r in records if r.get("started")), default=None)
    t1 = max((r["started"] + r.get("duration_s", 0) for r in records if r.get("started")), default=None)
    elapsed_min = (t1 - t0) / 60 if t0 is not None and t1 is not None and t1 > t0 else None
    windows = {k: loss_window(records, k) for k in ("guest_offset_ms", "offset_ms")}
    # The sharper anchor is the paravisor's own servicing start, when it was recorded.
    best = windows["guest_offset_ms"] or windows["offset_ms"]
    out: dict[str, Any] = {
        "iterations": len(records),
        "counts": {v: counts.get(v, 0) for v in VERDICTS},
        "product_iterations": n,
        "loss_rate": lost / n if n else None,
        "loss_ci95": [lo, hi],
        "failures": sum(counts.get(v, 0) for v in PRODUCT_FAILURES),
        "per_bucket": per_bucket(product, "offset_ms", bucket_ms),
        # Loss rate vs offset with Wilson bands, for each anchor the records have.
        "per_bucket_by_anchor": {k: b for k in ANCHOR_WORDS if (b := per_bucket(product, k, bucket_ms))},
        "window": best,
        "windows_by_anchor": windows,
        "skew_ms": {
            "p50": percentile(skews, 50),
            "p99": percentile(skews, 99),
            "max": max(skews) if skews else None,
        },
        "iterations_per_min": (len(records) / elapsed_min) if elapsed_min else None,
        "mean_iteration_s": sum(durations) / len(durations) if durations else None,
    }
    if n and lost == 0:
        out["zero_loss_bound"] = f"0 losses in {n} iterations: loss rate < {3 / n:.3g} at 95% (rule of three)"
    out["phases_s"] = phase_means(records)
    out["spread"] = spread(records)
    table = phase_table(records)
    if table is not None:
        out["phase_sweep"] = table

    bis = summarize_bisect(records)
    if bis is not None:
        out["bisect"] = bis
    traffic = stream_summary(records, out["iterations_per_min"])
    if traffic is not None:
        out["stream"] = traffic
    found = flaky_search(records)
    if found is not None:
        out["flaky_search"] = found
    curve = ic_ready_delay(records)
    if curve is not None:
        out["ic_ready_delay"] = curve
    return out


def phase_table(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The phase sweep: (phase, delay) -> verdict counts, loss rate and Wilson interval,
    in the order the phases happen; and the phase timeline (mean and spread of each
    phase's arrival from the servicing request) over every iteration that has one."""
    rs = [r for r in records if r.get("shutdown_mode") == "phase" and r["verdict"] != "infra-error"
          and not r.get("arm")]  # a search's phase tries are its own table  # fmt: skip
    if not rs:
        return None
    times: dict[str, list[float]] = {}
    for r in records:
        for k, v in (r.get("phase_times_ms") or {}).items():
            times.setdefault(k, []).append(v)
    order = sorted(times, key=lambda k: sum(times[k]) / len(times[k]))
    timeline = []
    for k in order:
        v = times[k]
        mean = sum(v) / len(v)
        sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        timeline.append({"phase": k, "mean_ms": mean, "sd_ms": sd, "n": len(v)})
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rs:
        cells.setdefault((r["phase"], float(r["planned_offset_ms"])), []).append(r)
    rank = {k: i for i, k in enumerate(order)}
    rows = []
    for (ph, d), group in sorted(cells.items(), key=lambda c: (rank.get(c[0][0], 1e9), c[0][1])):
        counts = Counter(r["verdict"] for r in group)
        k = counts.get("lost", 0)
        lo, hi = wilson(k, len(group))
        latency = [r["skew_ms"] for r in group if r.get("skew_ms") is not None]
        rows.append({"phase": ph, "delay_ms": d, "n": len(group), "counts": dict(counts), "lost": k,
                     "rate": k / len(group), "ci95": [lo, hi],
                     "trigger_latency_ms_max": max(latency) if latency else None})  # fmt: skip
    return {"cells": rows, "timeline": timeline}


def phase_means(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean seconds per phase, over all iterations and per verdict: a slow run says why
    (a long grace after servicing, a slow restore, teardown waits)."""
    groups: dict[str, list[dict[str, float]]] = {"all": []}
    for r in records:
        ph = r.get("phases_s")
        if ph:
            groups["all"].append(ph)
            groups.setdefault(r["verdict"], []).append(ph)
    out = {}
    for g, rows in groups.items():
        if rows:
            names = sorted({k for row in rows for k in row})
            out[g] = {k: sum(row.get(k, 0.0) for row in rows) / len(rows) for k in names}
    return out


def stream_summary(records: list[dict[str, Any]], per_min: float | None) -> dict[str, Any] | None:
    """Messages under traffic over the run: every stream message's fate per direction,
    the loss window the streams show (the union of each iteration's lost offsets), and
    offsets tested per minute: one per iteration for the shutdown, one per posted
    message with the stream."""
    rs = [r["stream"] for r in records if r.get("stream")]
    if not rs:
        return None
    h = {k: sum(int(x["host_to_guest"].get(k) or 0) for x in rs)
         for k in ("sent", "delivered", "lost", "duplicated", "refused", "reordered")}  # fmt: skip
    g = {
        k: sum(int(x["guest_to_host"].get(k) or 0) for x in rs)
        for k in ("received", "lost", "duplicated", "reordered")
    }

    def union(key: str) -> list[float] | None:
        ws = [x["host_to_guest"][key] for x in rs if x["host_to_guest"].get(key)]
        return [min(w[0] for w in ws), max(w[1] for w in ws)] if ws else None

    posted = h["sent"] - h["refused"]
    per_it = posted / len(rs)
    return {"iterations": len(rs), "host_to_guest": h, "guest_to_host": g,
            "lost_window_ms": union("lost_window_ms"), "lost_window_guest_ms": union("lost_window_guest_ms"),
            "offsets_per_iteration": per_it,
            "offsets_per_min": per_it * per_min if per_min else None,
            "shutdown_offsets_per_min": per_min}  # fmt: skip


def flaky_search(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The flaky-window search's answer: per arm (phase or offset bucket) its tries,
    losses and Wilson interval, and in words either the window found with its rate, or
    "no window with loss rate >= x anywhere in [lo, hi]" with the bound the tries reached."""
    rs = [r for r in records if r.get("arm") and (r.get("search") or {}).get("kind") == "flaky"
          and r["verdict"] != "infra-error"]  # fmt: skip
    if not rs:
        return None
    search = rs[0]["search"]
    arms: dict[str, dict[str, Any]] = {}
    for r in rs:
        a = arms.setdefault(r["arm"], {"arm": r["arm"], "index": r["search"]["arm_index"], "n": 0, "lost": 0,
                                       "phase": r.get("phase"), "at_ms": []})  # fmt: skip
        a["n"] += 1
        a["lost"] += r["verdict"] == "lost"
        t = (r.get("phase_times_ms") or {}).get(r.get("phase") or "")
        if t is not None:
            a["at_ms"].append(t)
    rows = []
    for a in sorted(arms.values(), key=lambda a: a["index"]):
        lo, hi = wilson(a["lost"], a["n"])
        at = a.pop("at_ms")
        a.update(rate=a["lost"] / a["n"], ci95=[lo, hi], at_ms=sum(at) / len(at) if at else None)
        rows.append(a)
    tried = len(rows)
    untried = int(search.get("arms", tried)) - tried
    where = f"[{search['lo_ms']:g}, {search['hi_ms']:g}] ms from the servicing request"
    lossy = sorted((a for a in rows if a["lost"]), key=lambda a: -a["rate"])
    if lossy:
        answer = "window found: " + "; ".join(
            f"loses at {a['arm']}"
            + (f" (the phase comes {a['at_ms']:.1f} ms after the servicing request)" if a["at_ms"] is not None else "")
            + f": {a['lost']} of {a['n']} tries ({100 * a['rate']:.1f}%, 95% [{100 * a['ci95'][0]:.1f}%, "
            f"{100 * a['ci95'][1]:.1f}%])"
            for a in lossy
        )  # fmt: skip
        bound = None
    else:
        bound = max(a["ci95"][1] for a in rows) if not untried else 1.0
        answer = (f"no window with loss rate >= {100 * bound:.1f}% anywhere in {where}"
                  + (f" nor at any of {sum(1 for a in rows if a['phase'])} servicing phases" if any(a["phase"] for a in rows)
                     else "") + f", at 95% ({len(rs)} tries, {min(a['n'] for a in rows)} or more per arm)")  # fmt: skip
        if untried:
            answer = (
                f"no loss in {len(rs)} tries, but {untried} of the search's arms were never tried: no bound"
            )
        elif bound >= search["target_rate"]:
            answer += (f"; the target {100 * search['target_rate']:.0f}% was not reached within the budget of "
                       f"{search['budget']}")  # fmt: skip
    return {"arms": rows, "answer": answer, "bound": bound, "tries": len(rs), **{k: search[k] for k in
            ("lo_ms", "hi_ms", "target_rate", "budget")}}  # fmt: skip


def ic_ready_delay(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """ "How long after the IC is ready must the host wait?": loss vs the planned delay
    after the IC's re-offer (``shutdown: ic-ready``), and the smallest delay from which
    every delay tried had no loss, with the rule-of-three bound of its tries (at least
    3/N: a loss rate below it cannot be told from zero with N tries)."""
    rs = [r for r in records if r.get("shutdown_mode") == "ic-ready" and r["verdict"] != "infra-error"]
    if not rs:
        return None
    by: dict[float, list[str]] = {}
    for r in rs:
        by.setdefault(float(r["planned_offset_ms"]), []).append(r["verdict"])
    curve: list[dict[str, Any]] = []
    for d in sorted(by):
        vs = by[d]
        k = sum(v == "lost" for v in vs)
        lo, hi = wilson(k, len(vs))
        curve.append({"delay_ms": d, "n": len(vs), "lost": k, "rate": k / len(vs), "ci95": [lo, hi]})
    safe: dict[str, Any] | None = None
    for point in reversed(curve):  # the longest run of loss-free delays ending at the largest
        if point["lost"]:
            break
        safe = point
    if safe is None:
        answer = f"losses up to the longest delay tried ({curve[-1]['delay_ms']:g} ms): wait longer than that"
    else:
        bound = 3 / safe["n"]
        tail = [p for p in curve if p["delay_ms"] >= safe["delay_ms"]]
        tries = sum(p["n"] for p in tail)
        answer = (
            (
                "no wait needed: "
                if safe is curve[0]
                else f"wait at least {safe['delay_ms']:g} ms after ready: "
            )
            + f"0 losses in {safe['n']} tries at {safe['delay_ms']:g} ms (loss rate < {bound:.3g} at 95%, rule of "
            f"three), and in {tries} tries at every delay from there"
        )
    return {
        "curve": curve,
        "safe_delay_ms": safe["delay_ms"] if safe else None,
        "tries_at_safe": safe["n"] if safe else None,
        "bound": 3 / safe["n"] if safe else None,
        "answer": answer,
    }
