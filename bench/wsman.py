"""The cost of testbed's WinRM layer against bare pywinrm, on the WS-Man stand-in.

    python bench/wsman.py [--calls 30] [--upload-mib 8] [--iterations 6]

Both sides talk to the same stand-in on loopback (tests/winrm_standin.py) with NTLM
and message encryption, as a lab host over HTTP would. Baseline: pywinrm's own
``Session.run_cmd`` of a command line of the same length. Measured: a
``Testbed.psm1`` call through ``WinRmPowerShell.invoke`` (the same WS-Man exchanges
plus the base64 JSON wrapping and the error parsing; run_cmd opens and deletes a shell
per command, testbed keeps one warm shell per connection, hence a ratio below 1).
Target: ratio <= 1.2. Upload:
MiB/s of ``upload`` (base64 lines on stdin, one Send each) for an artifact.

Per reset mode (``--iterations N``, real lab guests behind the emulated Hyper-V
host): module calls (= powershell.exe starts), WS-Man requests and stand-in
seconds per iteration, measured; and the seconds a real host would spend, from
the cost table HOST_COSTS_S below (a model: stated, not measured here, since this
machine has no Hyper-V). The ratio compares snapshot with cold.
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


# What a real host spends per module call (s): VM creation with its differencing disk,
# a Linux VTL0 boot to shutdown-IC OK, a checkpoint, a restore from saved state,
# removal; plus each powershell.exe start with the module import over WinRM.
HOST_COSTS_S = {
    "New-TestbedVm": 3.0,
    "Start-TestbedVm": 25.0,
    "Save-TestbedCheckpoint": 4.0,
    "Restore-TestbedVm": 4.0,
    "Remove-TestbedVm": 2.0,
}
POWERSHELL_START_S = 0.6


def per_reset(iterations: int) -> None:
    """Run the same fixed schedule with each reset through the stand-in; count and model."""
    from hyperv_emulator import EmulatedHyperV  # noqa: PLC0415

    from testbed.backends.hyperv.backend import HyperVBackend  # noqa: PLC0415
    from testbed.core.config import Artifact  # noqa: PLC0415
    from testbed.engine.options import RunOptions  # noqa: PLC0415
    from testbed.engine.playbook import Playbook, ScheduleSpec, load_vm_config  # noqa: PLC0415
    from testbed.engine.runner import Runner  # noqa: PLC0415

    ref = load_vm_config(ROOT / "vm_configs" / "reference-linux.yaml")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "users").write_text(f"LAB:bench:{PASSWORD}\n")
        os.environ["NTLM_USER_FILE"] = str(Path(tmp, "users"))
        Path(tmp, "openhcl.bin").write_bytes(b"IGVM bench image\n" * 100)
        Path(tmp, "vtl0.vhdx").write_bytes(b"VHDX bench image\n" * 50)
        cfg = load_vm_config(ROOT / "vm_configs" / "hyperv-openhcl.yaml")
        hv = cfg.hyperv.model_copy(update={  # type: ignore[attr-defined]
            "igvm": Artifact(path=str(Path(tmp, "openhcl.bin"))), "vtl0_vhd": Artifact(path=str(Path(tmp, "vtl0.vhdx"))),
            "shutdown_grace_ms": 3000.0, "com3_servicing_start_pattern": r"^PV svc-start "})  # fmt: skip
        cfg = cfg.model_copy(update={"hyperv": hv})
        offsets = [(-300.0, 100.0, 1500.0)[i % 3] for i in range(iterations)]
        for reset in ("cold", "snapshot"):
            emu = EmulatedHyperV(ref, "none")
            host = EmulatedHost(files=emu.files, functions=emu.functions())
            try:
                with running(host, auth="ntlm", user=USER, password=PASSWORD) as s:
                    pb = Playbook(name="wsman-bench", vm_config="-", iterations=iterations, expect={}, grace_ms=1500,
                                  schedule=ScheduleSpec(kind="fixed", offsets_ms=offsets), reset=reset)  # fmt: skip
                    backend = HyperVBackend(WinRmPowerShell(s.endpoint, USER, PASSWORD, auth="ntlm"))
                    backend.preflight(cfg)  # the module upload and the host check, outside the count
                    n_calls, n_req = len(host.calls), len(s.requests)
                    t = time.perf_counter()
                    recs = Runner(pb, cfg, RunOptions(out=Path(tmp, reset), backend=backend)).run().records
                    wall = time.perf_counter() - t
                    calls = [c[0] for c in host.calls[n_calls:] if c[0] != "Get-TestbedPreflight"]
                    requests = len(s.requests) - n_req
            finally:
                emu.close()
            modeled = sum(HOST_COSTS_S.get(c, 0.0) for c in calls) + POWERSHELL_START_S * len(calls)
            rows[reset] = (len(calls) / iterations, requests / iterations, wall / iterations, modeled / iterations,
                           sorted({r["reset"] for r in recs}), [r["verdict"] for r in recs])  # fmt: skip
    for reset, (c, q, w, m, used, verdicts) in rows.items():
        print(f"reset {reset:8s} (used {','.join(used)}): {c:.1f} module calls (powershell.exe starts) and "
              f"{q:.0f} WS-Man requests per iteration; stand-in {w:.2f} s/iteration; a real host, modeled: "
              f"{m:.1f} s/iteration of host overhead; verdicts {verdicts}")  # fmt: skip
    print(f"snapshot / cold, modeled host seconds per iteration: {rows['snapshot'][3] / rows['cold'][3]:.2f}")


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
    ap.add_argument("--iterations", type=int, default=6, help="per reset mode, on real lab guests (0: skip)")
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
    if args.iterations:
        per_reset(args.iterations)


if __name__ == "__main__":
    main()
