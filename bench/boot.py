"""Boot-to-ready + poweroff through the backend, against bare QEMU with the same flags.

    python bench/boot.py [--n 7]

Prints medians for a cold boot and a snapshot restore, both ways, and the
backend overhead ratio (target <= 1.15). Not a test: numbers, measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bare import bare_cycle  # noqa: E402

from testbed.backends.qemu.backend import QemuBackend  # noqa: E402
from testbed.engine.playbook import load_vm_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def backend_cycle(b: QemuBackend, cfg, reset: str) -> float:  # type: ignore[no-untyped-def]
    vm = b.provision(cfg)
    t = time.monotonic()
    try:
        b.start(vm, reset=reset)
        b.powerdown(vm)
        out = b.wait_outcome(vm, 60)
        assert out["reason"] == "guest-shutdown", out
        return time.monotonic() - t
    finally:
        b.destroy(vm)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=9)
    ap.add_argument("--config", default=str(ROOT / "vm_configs/reference-linux.yaml"))
    args = ap.parse_args()
    cfg = load_vm_config(args.config)
    with QemuBackend() as b:
        vm = b.provision(cfg)
        spec = vm.spec()
        snap = b.ensure_snapshot(vm)
        print(f"accel {vm.accel}, kernel {vm.image.manifest['kernel_release']}, QEMU {vm.qemu_version}")
        rows = {}
        for reset in ("cold", "snapshot"):
            bare, ours = [], []
            for _ in range(args.n):  # interleaved, so drift hits both alike
                bare.append(bare_cycle(spec, snap if reset == "snapshot" else None))
                ours.append(backend_cycle(b, cfg, reset))
            rows[reset] = (statistics.median(bare), statistics.median(ours))
    for reset, (bare_m, ours_m) in rows.items():
        print(
            f"{reset:8s} bare QEMU median {bare_m:.3f} s | testbed backend median {ours_m:.3f} s | "
            f"ratio {ours_m / bare_m:.3f} (target <= 1.15)"
        )
    print(
        f"snapshot restore vs cold boot through the backend: {rows['cold'][1] / rows['snapshot'][1]:.1f}x faster"
    )


if __name__ == "__main__":
    main()
