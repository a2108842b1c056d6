"""Does the controller keep up with a fleet? Throughput against the ideal, CPU and memory
per lane, at 1, 16, 64 and 256 lanes.

    python bench/fleet.py [--lanes 1,16,64,256] [--race-ms 1000] [--rounds 6] [--hosts 16]

Every lane races the mock backend (an in-process fake VM whose race takes ``--race-ms``
of wall time and no CPU), spread over ``--hosts`` mock hosts, all drawing from one plan
generator (a random schedule), writing results.jsonl, a folder and evidence per try,
as a real run does (a lane writes its folder's evidence; the record and timeline.json go
to the one writer thread, which fsyncs each batch). The ideal is lanes / race time: what a controller
that costs nothing would reach. For each lane count it prints the tries per second, the
ratio to the ideal over the whole run and over the racing alone (first try's start to
last try's end; the difference is the run's fixed cost: lanes opened, reports written)
(target: >= 0.95 at 64 lanes, >= 0.9 at 256 on 2 cores), the
controller's CPU seconds per try, and its RSS; then the RSS slope per lane (a least-
squares line over the lane counts). The lanes are threads: each spends its time
blocked in the backend's call, where the GIL is released, so a thread per lane costs
a stack and no CPU (the numbers say whether that holds). What did not hold: at 256
lanes, every file syscall a lane made was a point where it released the GIL and then
queued to get it back behind the other lanes; lanes that wrote their own record, fsync
and timeline.json reached 0.78 to 0.87 of the ideal. Handing those to one writer thread
took 256 lanes to 0.94 to 0.95. asyncio would not remove those syscalls (file I/O has no
async form; it would go to a thread pool), so the lanes stay threads.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from testbed.backends.mock.backend import MockBackend
from testbed.engine.fleet import FleetHost
from testbed.engine.options import RunOptions
from testbed.engine.playbook import Playbook, ScheduleSpec, load_vm_config
from testbed.engine.runner import Runner


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(lanes: int, race_ms: float, rounds: int, hosts: int, tmp: Path) -> dict[str, float]:
    """One run of ``lanes x rounds`` tries; its rate, CPU and RSS."""
    cfg_path = tmp / f"mock-{lanes}.yaml"
    cfg_path.write_text(f"name: fleet\nbackend: mock\nrace_ms: {race_ms}\n")
    cfg = load_vm_config(cfg_path)
    n_hosts = min(hosts, lanes)
    per_host = -(-lanes // n_hosts)
    fleet = [FleetHost(f"mock://h{i}", "mock", lambda i=i: MockBackend(f"mock://h{i}"), max_guests=per_host)
             for i in range(n_hosts)]  # fmt: skip
    n = lanes * rounds
    pb = Playbook(name=f"fleet-{lanes}", vm_config="-", iterations=n, expect={}, parallel=min(per_host, 256),
                  schedule=ScheduleSpec(kind="random", lo_ms=-50, hi_ms=400, count=n))  # fmt: skip
    opts = RunOptions(out=tmp / f"run-{lanes}", fleet=fleet if n_hosts > 1 else None,
                      backend=None if n_hosts > 1 else fleet[0].open(),
                      open_backend=None if n_hosts > 1 else fleet[0].open, max_guests=per_host)  # fmt: skip
    runner = Runner(pb, cfg, opts)
    real_lanes = runner.lanes
    cpu0, t0 = time.process_time(), time.monotonic()
    res = runner.run()
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    tries = len(res.records)
    ideal = real_lanes / (race_ms / 1000)
    # The racing itself: from the first try's start to the last try's end. The rest of the
    # wall time is the run's fixed cost (lanes opened and provisioned, the reports written).
    first = min(float(r["started"]) for r in res.records)
    last = max(float(r["started"]) + float(r["duration_s"]) for r in res.records)
    return {"lanes": real_lanes, "tries": tries, "per_s": tries / wall, "ideal": ideal,
            "ratio": tries / wall / ideal, "steady": tries / (last - first) / ideal, "fixed_s": wall - (last - first),
            "cpu_ms_per_try": 1000 * cpu / tries, "rss_mib": rss_mib(),
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lanes", default="1,16,64,256", help="lane counts to measure, comma-separated")
    ap.add_argument(
        "--race-ms", type=float, default=1000.0, help="wall time of one mock race (a fast KVM race: ~1 s)"
    )
    ap.add_argument("--rounds", type=int, default=6, help="tries per lane")
    ap.add_argument("--hosts", type=int, default=16, help="mock hosts the lanes are spread over")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for lanes in (int(x) for x in a.lanes.split(",")):
            rows.append(measure(lanes, a.race_ms, a.rounds, a.hosts, Path(d)))
            r = rows[-1]
            print(f"lanes {r['lanes']:4.0f}: {r['tries']:5.0f} tries, {r['per_s']:8.1f} tries/s, ideal "
                  f"{r['ideal']:8.1f}, ratio {r['ratio']:.3f} (racing alone {r['steady']:.3f}; fixed cost "
                  f"{r['fixed_s']:.2f} s), {r['cpu_ms_per_try']:.2f} ms CPU per try, RSS {r['rss_mib']:.1f} MiB",
                  flush=True)  # fmt: skip
    if len(rows) > 1:
        per_lane = slope([r["lanes"] for r in rows], [r["rss_mib"] for r in rows])
        print(f"RSS slope: {1024 * per_lane:.1f} KiB per lane (least squares over {len(rows)} lane counts); "
              f"cores: {os.cpu_count()}")  # fmt: skip


if __name__ == "__main__":
    main()
