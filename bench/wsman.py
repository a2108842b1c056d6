"""The cost of testbed's WinRM layer against bare pywinrm, on the WS-Man stand-in.

    python bench/wsman.py [--calls 30] [--upload-mib 8]

Both sides talk to the same stand-in on loopback (tests/winrm_standin.py) with NTLM
and message encryption, as a lab host over HTTP would. Baseline: pywinrm's own
``Session.run_cmd`` of a command line of the same length. Measured: a
``Testbed.psm1`` call through ``WinRmPowerShell.invoke`` (the same WS-Man exchanges
plus the base64 JSON wrapping and the error parsing). Target: ratio <= 1.2. Upload:
MiB/s of ``upload`` (base64 lines on stdin, one Send each) for an artifact.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import winrm  # noqa: E402
from winrm_standin import EmulatedHost, running  # noqa: E402

from testbed.transport.powershell import CALL, b64json, encoded_argv  # noqa: E402
from testbed.transport.winrm import WinRmPowerShell  # noqa: E402

MODULE = r"C:\testbed\modules\Testbed-bench.psm1"
USER, PASSWORD = r"LAB\bench", "bench pass"


def timed(fn: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--upload-mib", type=float, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "users").write_text(f"LAB:bench:{PASSWORD}\n")
        os.environ["NTLM_USER_FILE"] = str(Path(tmp, "users"))
        host = EmulatedHost(functions={"Get-TestbedPreflight": lambda: {"HyperV": True}})
        with running(host, auth="ntlm", user=USER, password=PASSWORD) as s:
            ps = WinRmPowerShell(s.endpoint, USER, PASSWORD, auth="ntlm")
            ps.upload(b"# module", MODULE)
            argv = encoded_argv(CALL.format(b64=b64json({"module": MODULE, "function": "Get-TestbedPreflight",
                                                         "params": {}})))  # fmt: skip
            bare = winrm.Session(s.endpoint, auth=(USER, PASSWORD), transport="ntlm")
            base, ours = [], []
            for _ in range(args.calls):  # interleaved, so drift hits both alike
                base += timed(lambda: bare.run_cmd(argv[0], argv[1:]), 1)
                ours += timed(lambda: ps.invoke(MODULE, "Get-TestbedPreflight", {}), 1)
            data = os.urandom(int(args.upload_mib * 1024 * 1024))
            t = time.perf_counter()
            ps.upload(data, r"C:\testbed\cache\bench.bin")
            up_s = time.perf_counter() - t
    b, o = statistics.median(base), statistics.median(ours)
    print(f"module call, median of {args.calls}: bare pywinrm {b:.1f} ms, testbed {o:.1f} ms, ratio {o / b:.2f} "
          f"(target <= 1.2)")  # fmt: skip
    print(f"upload {args.upload_mib:g} MiB: {up_s:.2f} s, {args.upload_mib / up_s:.1f} MiB/s "
          f"({len(data) // WinRmPowerShell.line_bytes + 1} Send messages)")  # fmt: skip


if __name__ == "__main__":
    main()
