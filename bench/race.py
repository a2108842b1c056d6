"""Iterations per minute of the servicing + shutdown race, next to the floor.

    python bench/race.py [--iterations 24] [--strategy none] [--reset snapshot]

The floor is bare QEMU (no testbed) doing launch -> ready -> poweroff of the
same image with the same reset method, measured in the same run. Prints the
rate, the ratio to the floor (target >= 0.8), rates per verdict class, and the
fire skew p50/p99 (target p99 <= 1 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bare import bare_cycle  # noqa: E402

from testbed.backends.qemu.backend import QemuBackend  # noqa: E402
from testbed.config import LabOverrides, Playbook, ScheduleSpec, load_vm_config  # noqa: E402
from testbed.engine.runner import Runner, RunOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=24)
    ap.add_argument("--strategy", default="none")
    ap.add_argument("--reset", default="snapshot", choices=["snapshot", "cold"])
    ap.add_argument("--lo", type=float, default=-100)
    ap.add_argument("--hi", type=float, default=650)
    ap.add_argument("--save-ms", type=int, default=None, help="override the lab's save_ms (window width)")
    ap.add_argument("--restore-ms", type=int, default=None)
    args = ap.parse_args()
    cfg = load_vm_config(ROOT / "vm_configs/reference-linux.yaml")
    knobs = {k: v for k, v in (("save_ms", args.save_ms), ("restore_ms", args.restore_ms)) if v is not None}
    cfg = cfg.with_lab(LabOverrides(**knobs))
    with QemuBackend() as b:
        vm = b.provision(cfg)
        snap = b.ensure_snapshot(vm) if args.reset == "snapshot" else None
        spec = vm.spec()
    floor = [bare_cycle(spec, snap) for _ in range(7)]
    floor_rate = 60 / statistics.median(floor)
    pb = Playbook(
        name="bench-race",
        vm_config="-",
        strategy=args.strategy,
        iterations=args.iterations,
        schedule=ScheduleSpec(kind="random", lo_ms=args.lo, hi_ms=args.hi, count=args.iterations),
        reset=args.reset,
        expect={},
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = Runner(pb, cfg, RunOptions(out=Path(tmp) / "run", seed=7)).run()
    recs = res.records
    rate = 60 / statistics.mean(r["duration_s"] for r in recs)
    by = defaultdict(list)
    for r in recs:
        by[r["verdict"]].append(r["duration_s"])
    sk = res.summary["skew_ms"]
    print(
        f"reset {args.reset}, strategy {args.strategy}, {len(recs)} iterations, accel {recs[0]['accel']}, "
        f"save_ms {cfg.lab.save_ms}, restore_ms {cfg.lab.restore_ms}, grace {res.summary.get('grace_ms', '?')}"
    )
    print(
        f"floor (bare QEMU launch->ready->poweroff): median {statistics.median(floor):.3f} s = {floor_rate:.1f}/min"
    )
    print(f"race: {rate:.1f} iterations/min | ratio to floor {rate / floor_rate:.2f} (target >= 0.8)")
    for v, ds in sorted(by.items()):
        print(
            f"  {v:17s} n={len(ds):3d} mean {statistics.mean(ds):.3f} s -> {60 / statistics.mean(ds):.1f}/min"
        )
    print(
        f"fire skew: p50 {sk['p50']:.4f} ms, p99 {sk['p99']:.4f} ms, max {sk['max']:.4f} ms (target p99 <= 1 ms)"
    )


if __name__ == "__main__":
    main()
