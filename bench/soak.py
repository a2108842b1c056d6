"""Memory and descriptors over a long run: do they stay flat?

    python bench/soak.py [--iterations 1000] [--every 100] [--parallel 1]

Runs one long race (strategy none, random offsets across the window, snapshot reset)
and, every ``--every`` iterations, prints the controller's and the host agents' RSS
and open file descriptors. At the end: the RSS slope after warm-up (the first
sample), in % of the warm-up value per 1000 iterations, and the largest deviation
from it (goal: within 5 %); the fd change (goal: 0); and what was left behind: QEMU
processes, sockets, leases and work dirs in the runtime dir, and cache files beyond
the key set the first iteration needed (image, snapshot; goal: none).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from testbed.core.paths import cache_dir, runtime_dir
from testbed.engine.options import RunOptions
from testbed.engine.playbook import Playbook, ScheduleSpec, load_vm_config
from testbed.engine.runner import Runner

ROOT = Path(__file__).resolve().parents[1]


def leftovers() -> dict[str, list[str]]:
    """Work dirs, leases and sockets in the runtime dir, by kind."""
    rt = runtime_dir()
    return {
        "vm work dirs": sorted(tree(rt / "vms")),
        "leases": sorted(p for p in tree(rt / "leases") if p.endswith(".json")),
        "sockets": sorted(str(p) for p in rt.rglob("*.sock")) if rt.exists() else [],
    }


def rss_kib(pid: int | str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int | str) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def agents() -> list[int]:
    """This process's host agents (local transport: our children running the agent)."""
    out = []
    me = str(os.getpid())
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = stat.rsplit(")", 1)[1].split()[1]
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == me and b"testbed.backends.qemu.agent.program" in cmd:
            out.append(int(d.name))
    return sorted(out)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def slope_pct(samples: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares slope of RSS over iterations after the first sample, in % of the
    first sample per 1000 iterations; and the largest deviation from it, in %."""
    base = samples[0][1]
    xs, ys = [s[0] for s in samples], [s[1] for s in samples]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs) or 1.0
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den
    return 100 * k * 1000 / base, 100 * max(abs(y - base) for y in ys) / base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=1)
    args = ap.parse_args()
    cfg = load_vm_config(ROOT / "vm_configs/reference-linux.yaml")
    pb = Playbook(name="soak", vm_config="-", iterations=args.iterations, parallel=args.parallel,
                  schedule=ScheduleSpec(kind="random", lo_ms=-100, hi_ms=650, count=args.iterations),
                  reset="snapshot", expect={}, collect=["serial"])  # fmt: skip
    cache_before: set[str] = set()  # the key set: what the cache holds once the run is under way
    samples: dict[str, list[tuple[int, int]]] = {"controller": [], "agents": []}
    fd_samples: dict[str, list[int]] = {"controller": [], "agents": []}
    done = 0

    def on_event(ev: dict[str, Any]) -> None:
        nonlocal done
        if ev["event"] != "iteration":
            return
        done += 1
        if done == 1:
            cache_before.update(p for p in tree(cache_dir()) if not p.startswith("grace-calibration"))
        if done % args.every:
            return
        ag = agents()
        c_rss, a_rss = rss_kib("self"), sum(rss_kib(p) for p in ag)
        c_fd, a_fd = fds("self"), sum(fds(p) for p in ag)
        samples["controller"].append((done, c_rss))
        samples["agents"].append((done, a_rss))
        fd_samples["controller"].append(c_fd)
        fd_samples["agents"].append(a_fd)
        print(f"{done:6d} iterations | controller RSS {c_rss / 1024:7.1f} MiB fds {c_fd:4d} | "
              f"{len(ag)} agent(s) RSS {a_rss / 1024:7.1f} MiB fds {a_fd:4d}", flush=True)  # fmt: skip

    before = leftovers()  # a machine's runtime dir may hold other runs' folders: only this run's count
    with tempfile.TemporaryDirectory() as tmp:
        res = Runner(pb, cfg, RunOptions(out=Path(tmp) / "run", seed=11), progress=on_event).run()
        print(f"verdicts {dict(sorted((k, v) for k, v in res.summary['counts'].items() if v))}, "
              f"{res.summary['iterations_per_min']:.1f} iterations/min")  # fmt: skip
    for who in ("controller", "agents"):
        if len(samples[who]) >= 2:
            k, dev = slope_pct(samples[who])
            verdict = "flat" if dev <= 5 else "NOT flat"
            print(f"{who}: RSS slope {k:+.2f} % per 1000 iterations after warm-up, largest deviation "
                  f"{dev:.2f} % ({verdict}, goal within 5 %); fds {fd_samples[who][0]} -> {fd_samples[who][-1]}")  # fmt: skip
    after = leftovers()
    left = {k: sorted(set(v) - set(before[k])) for k, v in after.items()}  # what this run left, not others
    qemus = [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and _is_qemu(d)]
    grown = sorted({p for p in tree(cache_dir()) if not p.startswith("grace-calibration")} - cache_before)
    print(f"left behind: {len(qemus)} QEMU, " + ", ".join(f"{len(v)} {k}" for k, v in left.items())
          + f"; cache files added beyond the first iteration's key set: {len(grown)} {grown[:5]}")  # fmt: skip


def _is_qemu(d: Path) -> bool:
    try:
        return (d / "comm").read_text().startswith("qemu-system")
    except OSError:
        return False


if __name__ == "__main__":
    main()
