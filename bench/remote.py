"""Firing skew and iterations/min over SSH (with network delay in the path) vs local.

    python bench/remote.py [--iterations 16] [--delay-ms 20] [--jitter-ms 5]

Starts a real sshd on loopback behind a delaying TCP relay (tests/sshd.py; tc
netem is used by the tests where the kernel has it), runs the same race locally
and over SSH, and prints skew p50/p99 and the rate of both, with their ratio.
The race is fired by the host agent on the host, so the delay should not reach
the skew; it does cost setup round trips per iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from sshd import delay_proxy, run_sshd  # noqa: E402

from testbed.backends.qemu.backend import QemuBackend  # noqa: E402
from testbed.engine.options import RunOptions  # noqa: E402
from testbed.engine.playbook import Playbook, ScheduleSpec, load_vm_config  # noqa: E402
from testbed.engine.runner import Runner  # noqa: E402
from testbed.transport.ssh import SshTransport  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--delay-ms", type=float, default=20)
    ap.add_argument("--jitter-ms", type=float, default=5)
    args = ap.parse_args()
    cfg = load_vm_config(ROOT / "vm_configs/reference-linux.yaml")
    pb = Playbook(name="bench-remote", vm_config="-", strategy="pause-resume", iterations=args.iterations,
                  schedule=ScheduleSpec(kind="random", lo_ms=-50, hi_ms=600, count=args.iterations),
                  reset="snapshot", expect={})  # fmt: skip
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows["local"] = Runner(pb, cfg, RunOptions(out=d / "local", seed=3)).run().summary
        with contextlib.ExitStack() as st:
            s = st.enter_context(run_sshd(d / "sshd"))
            port = st.enter_context(delay_proxy((s.host, s.port), args.delay_ms, args.jitter_ms))
            kh = d / "kh"
            kh.write_text(f"[127.0.0.1]:{port} {s.host_pub}\n")
            t = SshTransport("127.0.0.1", port, "root", identity=str(s.key), known_hosts=str(kh))
            rows["ssh"] = (
                Runner(pb, cfg, RunOptions(out=d / "ssh", seed=3, backend=QemuBackend(t))).run().summary
            )
    for name, s in rows.items():
        sk = s["skew_ms"]
        print(
            f"{name:5s} skew p50 {sk['p50']:.4f} ms p99 {sk['p99']:.4f} ms | {s['iterations_per_min']:.1f} it/min "
            f"| {s['counts']}"
        )
    print(
        f"ssh/local rate ratio {rows['ssh']['iterations_per_min'] / rows['local']['iterations_per_min']:.2f} "
        f"(network: {args.delay_ms} ms +- {args.jitter_ms} ms each way)"
    )


if __name__ == "__main__":
    main()
