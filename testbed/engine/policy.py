"""What a run's results mean for the user: the playbook's expectations and the exit code.

Kept in the engine (not in report/, which only renders) because the CLI, the
runner and ``testbed report`` must all decide the same way. ``conclude`` is what the
engine does at a run's end on its own (the summary and the exit code, in
summary.json); the application passes ``testbed.report.finish_run``, which also
renders every report, as ``RunOptions.finish``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.core.config import check_expectation
from testbed.core.runfolder import read_results
from testbed.engine.fleet import per_host
from testbed.engine.stats import loss_window, summarize


def evaluate(run: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics plus the playbook's expectations, per case and overall.

    A run whose every iteration was ``infra-error`` measured nothing: it can
    neither meet nor violate an expectation (``measured_nothing``). Every case
    expects ``servicing-skipped: 0`` unless it says otherwise."""
    summary = summarize(records)
    infra = summary["counts"]["infra-error"]
    measured_nothing = bool(records) and infra == len(records)
    violations: list[str] = []
    if not measured_nothing:
        for case, expect in (run.get("expect_by_case") or {"": run.get("expect", {})}).items():
            recs = [r for r in records if not case or r.get("case") == case]
            counts = summarize(recs)["counts"] if recs else {}
            # Servicing that did not happen measured nothing about the message: unless a
            # playbook asks for it (a negative control), any is an expectation violated.
            for verdict, spec in {"servicing-skipped": 0, **expect}.items():
                n = counts.get(verdict, 0)
                if recs and not check_expectation(spec, n):
                    violations.append(f"{case or 'run'}: expected {verdict} {spec}, got {n}")
    summary["expectations"] = {"violations": violations, "ok": not violations and not measured_nothing}
    summary["measured_nothing"] = measured_nothing
    # A fleet's host that left the run is said in the per-host table; its errors (the streak
    # that drained it) do not count against max_infra_errors of the hosts that went on.
    left = {h["name"] for h in run.get("fleet") or [] if h.get("drained")}
    counted = infra - sum(1 for r in records if r["verdict"] == "infra-error" and r.get("host") in left)
    every_host_left = bool(left) and left == {h["name"] for h in run["fleet"]}
    summary["infra_errors_exceeded"] = (measured_nothing or every_host_left
                                        or counted > int(run.get("max_infra_errors", 0)))  # fmt: skip
    summary["interrupted"] = bool(run.get("interrupted"))
    summary["parallel"] = int(run.get("parallel") or 1)
    summary["warnings"] = contention_warnings(run, summary)
    edges = window_edges(records, run.get("schedule_by_case") or {})
    if edges:
        summary["window_edges"] = edges
    hosts = per_host(records, run.get("fleet"))
    if hosts is not None:
        summary["per_host"] = hosts
    return summary


SKEW_P99_LIMIT_MS = 1.0


def contention_warnings(run: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Contention must show, not hide: a late fire (skew p99 over 1 ms) at any
    parallelism, and in a parallel run a servicing lag that spreads wider than the
    one-guest reference baselines.yaml recorded (twice its p99 - p50, plus 1 ms)."""
    out = []
    lanes = int(run.get("parallel") or 1)
    p99 = (summary.get("skew_ms") or {}).get("p99")
    if p99 is not None and p99 > SKEW_P99_LIMIT_MS:
        out.append(f"fire skew p99 {p99:.3f} ms is over {SKEW_P99_LIMIT_MS:g} ms"
                   + (f" with {lanes} guests at once: the host is too busy to fire on time" if lanes > 1 else
                      ": the host is too busy to fire on time"))  # fmt: skip
    ref = (run.get("one_guest_reference") or {}).get("servicing_lag_ms")
    mine = (summary.get("spread") or {}).get("servicing_lag_ms")
    if lanes > 1 and ref and mine and None not in (ref["p50"], ref["p99"], mine["p50"], mine["p99"]):
        width, ref_width = mine["p99"] - mine["p50"], ref["p99"] - ref["p50"]
        if width > 2 * ref_width + 1.0:
            out.append(f"servicing lag spreads {width:.2f} ms (p99 - p50) with {lanes} guests, "
                       f"{ref_width:.2f} ms with one (baselines.yaml): the guests slow each other")  # fmt: skip
    return out


def exit_code(summary: dict[str, Any]) -> int:
    """0 ok; 1 an expectation violated (wins over 3); 3 infrastructure failures over
    the limit, or nothing measured at all."""
    if summary["expectations"]["violations"]:
        return 1
    if summary["infra_errors_exceeded"]:
        return 3
    return 0


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run folder's manifest (run.json, {} when missing) and its records."""
    run_path = run_dir / "run.json"
    run: dict[str, Any] = json.loads(run_path.read_text()) if run_path.exists() else {}
    return run, read_results(run_dir / "results.jsonl")


def conclude(run_dir: Path) -> tuple[dict[str, Any], int]:
    """The summary and the exit code of a run folder, written to summary.json."""
    run, records = load_run(run_dir)
    summary = evaluate(run, records)
    (run_dir / "summary.json").write_text(json.dumps({"manifest": run, **summary}, indent=2, default=str))
    return summary, exit_code(summary)


def window_edges(records: list[dict[str, Any]], schedules: dict[str, Any]) -> list[str]:
    """An adaptive search's edges that did not reach its resolution, in the search's own
    terms (the planned offsets it bisects), each said with how far it is known and why:
    no try beyond it, losses and non-losses interleaving there (the edge is not sharp in
    planned offsets: the servicing start moves from try to try), or the budget ran out."""
    spec = next((s for s in schedules.values() if s.get("kind") == "adaptive"), None)
    window = loss_window(records, "planned_offset_ms")
    if not window or spec is None:
        return []
    res = float(spec.get("resolution_ms") or 0)
    lo, hi = window["bracket_ms"]
    first, last = window["first_loss_ms"], window["last_loss_ms"]
    out = []
    for name, near, far in (("lower", lo, first), ("upper", hi, last)):
        if near is None:
            out.append(f"the {name} edge is open: no try {'below' if name == 'lower' else 'above'} the losses "
                       f"did not lose; widen lo_ms/hi_ms")  # fmt: skip
            continue
        width = abs(far - near)
        if width <= res:
            continue
        zone = (far, far + 4 * width) if name == "lower" else (far - 4 * width, far)
        mixed = [r for r in records if r.get("planned_offset_ms") is not None and r["verdict"] not in
                 ("lost", "infra-error") and zone[0] < r["planned_offset_ms"] < zone[1]]  # fmt: skip
        why = (f"tries that did not lose sit among the losses within {4 * width:.0f} ms of it (the edge is not sharp "
               "in planned offsets: the servicing start moves from try to try)" if mixed else
               f"the budget of {len(records)} tries ran out; raise iterations")  # fmt: skip
        out.append(
            f"the {name} edge is bracketed to {width:.1f} ms of planned offset, not the {res:g} ms asked: {why}"
        )
    return out
