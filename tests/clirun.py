"""Running the ``testbed`` command in a test: a command that overruns its timeout is
asked where it waits (SIGUSR1: the CLI prints every thread's stack) before it is killed,
so a hang in CI arrives with its stacks instead of a bare TimeoutExpired."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "testbed.cli", *args]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip
    out, err = communicate(p, timeout)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def communicate(p: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """``p.communicate(timeout)``; on overrun, the stacks (SIGUSR1), then kill and fail."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGUSR1)
        time.sleep(2)
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"{' '.join(map(str, p.args))} ran over {timeout:.0f} s; its stacks and output:\n"
                    f"{err[-12000:]}\n--- stdout ---\n{out[-3000:]}")  # fmt: skip
