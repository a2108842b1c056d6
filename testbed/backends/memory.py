"""Host memory held by this process's VMs, per host, for backends whose host reports its
free memory (Hyper-V, OpenVMM).

A run's lanes share a host, and every lane provisions (each reading the same free
memory) before any VM starts: so each lane holds its VM's share against the others, and
a lane that does not fit is ``HostFull`` (the engine starts the run with the lanes it
has and says why) rather than a VM that fails to start, or starves the others, later.
"""

from __future__ import annotations

import threading

from testbed.core.errors import HostFull

_held: dict[str, int] = {}
_lock = threading.Lock()


class MemoryHold:
    """One backend's share of one host's free memory."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.mb = 0

    def take(self, free_mb: int | None, need_mb: int) -> None:
        """Hold ``need_mb`` of the ``free_mb`` the host reported (None: unknown, nothing held)."""
        if free_mb is None:
            return
        with _lock:
            others = _held.get(self.host, 0) - self.mb
            if free_mb - others < need_mb:
                raise HostFull(f"{free_mb} MB free on {self.host}, {others} MB held by this run's other VMs, "
                               f"and one more needs {need_mb} MB")  # fmt: skip
            _held[self.host] = others + need_mb
            self.mb = need_mb

    def release(self) -> None:
        with _lock:
            _held[self.host] = _held.get(self.host, 0) - self.mb
            self.mb = 0
