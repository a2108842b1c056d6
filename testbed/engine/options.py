"""What a caller asks of a run beyond its playbook (the command line's overrides, the
backend to use, where the reports go) and what a run gives back."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from testbed.backends.base import Backend
from testbed.core.runfolder import read_results
from testbed.engine.fleet import FleetHost
from testbed.engine.playbook import ScheduleSpec


@dataclass
class RunOptions:
    strategy: str | None = None
    iterations: int | None = None
    offsets: ScheduleSpec | None = None  # --offsets: its count sets the iterations unless given too
    seed: int | None = None
    out: Path | None = None
    stop_on_loss: bool | None = None
    keep_failed: bool = False
    max_duration_s: float | None = None
    resume: Path | None = None
    reset: str | None = None
    backend: Backend | None = None  # None: the vm_config's kind on this machine
    host_spec: str | None = None  # what the user named the host by (URI or inventory name)
    inventory: Path | None = None
    vm_config: Path | None = None  # --vm-config: replaced the playbook's (run.json records it for repro)
    parallel: int | None = None  # --parallel: lanes (guests racing at once); None: the playbook's
    max_guests: int | None = None  # the host's inventory limit; None: the machine-wide slot limit
    # Opens one more backend on the same host (a lane's own agent and connection); None:
    # this machine's, when ``backend`` is None too.
    open_backend: Callable[[], Backend] | None = None
    builds: list[str] | None = None  # testbed bisect --builds: replaces the playbook's bisect builds
    # --host a,b,c: the hosts the lanes are spread over (None: one host, from backend and
    # open_backend); see testbed.engine.fleet.
    fleet: list[FleetHost] | None = None
    # What the run's end writes: the summary and exit code (None: summary.json alone,
    # ``policy.conclude``); the application passes ``testbed.report.finish_run``.
    finish: Callable[[Path], tuple[dict[str, Any], int]] | None = None


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    exit_code: int
    stopped: str | None = None

    @functools.cached_property
    def records(self) -> list[dict[str, Any]]:
        """Every finished iteration, whole, read from results.jsonl when first asked for:
        during the run only a slim copy of each is kept (``SLIM``), so memory stays flat."""
        return read_results(self.run_dir / "results.jsonl")


# What the runner itself reads back from earlier iterations (the in-run grace, the
# adaptive, flaky and bisect searches, phase midpoints, the infra streak, calibration).
Progress = Callable[[dict[str, Any]], None]


def default_run_dir(playbook: str) -> Path:
    """Where a run goes without --out: runs/<time>-<playbook>."""
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{playbook}"
