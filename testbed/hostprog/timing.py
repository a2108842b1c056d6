"""Host-side timing: fire at a target instant of the monotonic clock.

Stdlib only, valid on Python 3.9: this runs on lab hosts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

SPIN_NS = 2_000_000  # sleep until 2 ms before a target, then spin


async def sleep_until_ns(target_ns: int) -> None:
    """Sleep until ~2 ms before the target (so a TCG vCPU keeps its core), then
    spin on the monotonic clock: the fire lands within microseconds of the plan."""
    while (left := target_ns - time.monotonic_ns()) > SPIN_NS:
        await asyncio.sleep((left - SPIN_NS) / 1e9)
    while time.monotonic_ns() < target_ns:
        pass


async def wait_for(fut: asyncio.Future[Any], timeout_s: float) -> bool:
    """Wait for a future without cancelling it; False on timeout.

    ``asyncio.TimeoutError`` is caught by name: before Python 3.11 it is not the
    builtin ``TimeoutError``, and the agent runs on 3.9 hosts."""
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        return True
    except asyncio.TimeoutError:
        return False
