"""Phase trigger vs random timing: how soon each finds the mask-async residual.

    python bench/phases.py [--iterations 40] [--window-ms 300] [--seed 7]

The residual of `mask-async` (the paravisor drains without waiting for the host's
MASK_ACK, so a message already in flight slips past the drain) lives within about a
millisecond of the servicing start. Both arms run the same number of iterations on
the same lab guest: the phase arm fires on the `quiesce` phase with delay 0 (the host
posts while the MASK is on its way); the random arm fires at seeded uniform offsets
over [0, window] ms from the servicing request, the window the sweep would cover
(the servicing start up to the port's close). Prints each arm's loss rate with its
Wilson interval and the iterations to the first loss, and the ratio of the rates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from testbed.engine.options import RunOptions
from testbed.engine.playbook import Playbook, ScheduleSpec, load_vm_config
from testbed.engine.runner import Runner
from testbed.engine.stats import wilson

ROOT = Path(__file__).resolve().parents[1]


def arm(name: str, schedule: ScheduleSpec, iterations: int, seed: int, tmp: Path) -> list[str]:
    cfg = load_vm_config(ROOT / "vm_configs/reference-linux.yaml")
    pb = Playbook(name=f"bench-{name}", vm_config="-", strategy="mask-async", iterations=iterations,
                  schedule=schedule, reset="snapshot", expect={})  # fmt: skip
    res = Runner(pb, cfg, RunOptions(out=tmp / name, seed=seed)).run()
    return [r["verdict"] for r in res.records]


def report(name: str, verdicts: list[str]) -> float:
    counted = [v for v in verdicts if v != "infra-error"]
    k = counted.count("lost")
    lo, hi = wilson(k, len(counted))
    first = next((i + 1 for i, v in enumerate(counted) if v == "lost"), None)
    print(f"{name:>7}: {k}/{len(counted)} lost ({100 * k / max(1, len(counted)):.1f}%, Wilson 95% "
          f"{100 * lo:.1f}-{100 * hi:.1f}%), first loss at iteration {first or 'never'}")  # fmt: skip
    return k / max(1, len(counted))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=40, help="per arm")
    ap.add_argument("--window-ms", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        phase = arm("phase", ScheduleSpec(kind="phases", phases=["quiesce"], delays_ms=[0.0], midpoint=False,
                                          repeat=args.iterations), args.iterations, args.seed, tmp)  # fmt: skip
        rand = arm("random", ScheduleSpec(kind="random", lo_ms=0.0, hi_ms=args.window_ms, count=args.iterations),
                   args.iterations, args.seed, tmp)  # fmt: skip
    p, r = report("phase", phase), report("random", rand)
    print(f"loss rate, phase trigger / random timing: {p / r:.1f}" if r else
          f"random timing found no loss in {len(rand)} iterations; the phase trigger lost {100 * p:.1f}%")  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
