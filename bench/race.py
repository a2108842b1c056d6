"""Iterations per minute of the servicing + shutdown race, against a floor that does the
same guest work, for one guest and for N at once.

    python bench/race.py [--iterations 24] [--lanes 1,2] [--accel auto|tcg|kvm] [--mix]

The floor is the ideal iteration: bare QEMU (no testbed in the path) restoring the same
READY snapshot, servicing the lab paravisor with the same save/restore times through
the raw sockets, sending the shutdown after servicing and waiting for the poweroff
(``_bare.ideal_iteration``), measured in the same run; with N lanes, N of them at once.
The race fires its shutdowns after servicing too, once the IC is ready again
(``shutdown: ic-ready``, delay 0: the same work, every iteration ``preserved``), so the ratio says what testbed itself costs. Targets: ratio >= 0.9 for
one guest; for N guests on a host with at least 2N cores, race rate >= 0.8 x N x the
one-guest floor. ``--mix`` adds a run across the window (lost and rejected iterations
wait for their verdicts) with its rate per verdict class.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _bare import ideal_iteration  # noqa: E402

from testbed.backends.qemu.backend import QemuBackend  # noqa: E402
from testbed.engine.options import RunOptions  # noqa: E402
from testbed.engine.playbook import Playbook, ScheduleSpec, load_vm_config  # noqa: E402
from testbed.engine.runner import Runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def floor_rate(spec: dict[str, Any], snap: Path, knobs: dict[str, int], lanes: int, rounds: int) -> float:
    """Ideal iterations per minute with ``lanes`` of them running at once."""
    walls = []
    for _ in range(rounds):
        t = time.monotonic()
        threads = [threading.Thread(target=ideal_iteration, args=(spec, snap, knobs)) for _ in range(lanes)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        walls.append(time.monotonic() - t)
    return 60 * lanes / statistics.median(walls)


def race(cfg: Any, args: argparse.Namespace, lanes: int, schedule: ScheduleSpec | None) -> dict[str, Any]:
    """A run through testbed; ``schedule`` None: the shutdown after servicing, at the IC's
    re-offer (``shutdown: ic-ready``, delay 0, so the fire has a planned time and a skew),
    the ideal iteration's order."""
    pb = Playbook(name=f"bench-race-{lanes}", vm_config="-", strategy=args.strategy, iterations=args.iterations,
                  schedule=schedule or ScheduleSpec(kind="fixed", offsets_ms=[0.0]),
                  shutdown="ic-ready" if schedule is None else "offset", reset="snapshot", parallel=lanes,
                  expect={})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        res = Runner(pb, cfg, RunOptions(out=Path(tmp) / "run", seed=7)).run()
    recs = res.records
    return {"recs": recs, "summary": res.summary, "rate": res.summary["iterations_per_min"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=24)
    ap.add_argument("--lanes", default="1,2", help="guests at once to measure, e.g. 1,2,4")
    ap.add_argument("--strategy", default="none")
    ap.add_argument("--accel", default="auto", choices=["auto", "tcg", "kvm"])
    ap.add_argument("--rounds", type=int, default=7, help="floor measurements per lane count")
    ap.add_argument("--mix", action="store_true", help="also race across the window (random -100..650 ms)")
    ap.add_argument("--save-ms", type=int, default=None, help="override the lab's save_ms (window width)")
    ap.add_argument("--restore-ms", type=int, default=None)
    args = ap.parse_args()
    cfg = load_vm_config(ROOT / "vm_configs/reference-linux.yaml")
    knobs_over = {
        k: v for k, v in (("save_ms", args.save_ms), ("restore_ms", args.restore_ms)) if v is not None
    }
    cfg = cfg.with_lab(knobs_over).model_copy(update={"accel": args.accel})
    with QemuBackend() as b:
        vm = b.provision(cfg)
        snap = Path(b.ensure_snapshot(vm))
        spec = vm.spec()
        accel, why = vm.accel, vm.boot.get("accel_reason", "")
    k = cfg.lab
    knobs = {"save_ms": k.save_ms, "restore_ms": k.restore_ms, "blackout_ms": k.blackout_ms,
             "attach_ms": k.vtl0_attach_ms}  # fmt: skip
    lanes_list = [int(x) for x in args.lanes.split(",")]
    import os

    print(f"accel {accel} ({why}); {os.cpu_count()} cores; save_ms {k.save_ms}, restore_ms {k.restore_ms}; "
          f"{args.iterations} iterations per race, the shutdown at the IC's re-offer after servicing")  # fmt: skip
    one_floor = None
    for n in lanes_list:
        fl = floor_rate(spec, snap, knobs, n, args.rounds)
        one_floor = one_floor or (fl / n if n == 1 else None)
        r = race(cfg, args, n, None)
        lag = r["summary"]["spread"]["servicing_lag_ms"]
        verdicts = dict(sorted((v, c) for v, c in r["summary"]["counts"].items() if c))
        print(f"N={n}: floor (ideal iterations, {n} at once) {fl:.1f}/min | race {r['rate']:.1f}/min | "
              f"ratio {r['rate'] / fl:.2f}" + (" (target >= 0.9)" if n == 1 else ""))  # fmt: skip
        if one_floor and n > 1:
            print(f"      race / ({n} x one-guest floor {one_floor:.1f}) = {r['rate'] / (n * one_floor):.2f} "
                  f"(target >= 0.8 on >= {2 * n} cores; this host has {os.cpu_count()})")  # fmt: skip
        sk = r["summary"]["skew_ms"]
        print(f"      fire skew p50 {sk['p50']:.3f} ms p99 {sk['p99']:.3f} ms | servicing lag p50 {lag['p50']:.2f} "
              f"ms p99 {lag['p99']:.2f} ms | verdicts {verdicts}")  # fmt: skip
        for w in r["summary"].get("warnings") or []:
            print(f"      warning: {w}")
        if args.mix:
            m = race(cfg, args, n, ScheduleSpec(kind="random", lo_ms=-100, hi_ms=650, count=args.iterations))
            by: dict[str, list[float]] = defaultdict(list)
            for rec in m["recs"]:
                by[rec["verdict"]].append(rec["duration_s"])
            sk = m["summary"]["skew_ms"]
            print(f"      across the window: {m['rate']:.1f}/min, fire skew p50 {sk['p50']:.3f} ms p99 "
                  f"{sk['p99']:.3f} ms; per iteration: " + ", ".join(
                f"{v} {statistics.mean(ds):.2f} s (n={len(ds)})" for v, ds in sorted(by.items())))  # fmt: skip


if __name__ == "__main__":
    main()
