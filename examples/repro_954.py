"""Reproduce openvmm #954 on the reference lab, then show #962's protocol fixes it.

    python examples/repro_954.py [--host local|ssh://user@host] [--offset 150]

Strategy `none` (OpenVMM before #962): a shutdown sent through the IC while the
paravisor is being serviced is lost. Strategy `pause-resume` (#962): the same
request, at the same offset, is delivered exactly once after servicing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from testbed.api import open_host

CONFIG = Path(__file__).resolve().parents[1] / "vm_configs" / "reference-linux.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="local")
    ap.add_argument("--offset", type=float, default=150.0, help="ms after the servicing request")
    args = ap.parse_args()
    verdicts = {}
    with open_host(args.host) as host:
        for strategy in ("none", "pause-resume"):
            with host.vm(CONFIG, strategy) as vm:
                r = vm.race(offset_ms=args.offset)
            verdicts[strategy] = r.verdict
            print(
                f"strategy {strategy}: {r.verdict} (fired {r.offset_ms:.2f} ms after the servicing request, "
                f"{r.guest_offset_ms:.2f} ms after the paravisor started servicing): {r.reason}"
            )
            for line in r.evidence:
                print(f"    {line}")
    reproduced = verdicts == {"none": "lost", "pause-resume": "preserved"}
    print(
        "REPRODUCED: lost without the fix, preserved with it" if reproduced else f"NOT REPRODUCED: {verdicts}"
    )
    return 0 if reproduced else 1


if __name__ == "__main__":
    raise SystemExit(main())
