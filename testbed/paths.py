"""Where testbed keeps things: caches (images, snapshots, probes) and runtime state (leases)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """Built images, downloaded packages, snapshots, the KVM probe result."""
    p = Path(os.environ.get("TESTBED_CACHE_DIR") or platformdirs.user_cache_dir("testbed"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def runtime_dir() -> Path:
    """Leases and the machine-wide guest slots.

    Machine-wide on purpose (not per user or per venv): the guest limit and the
    garbage collector must see every testbed process on the host.
    """
    default = Path("/run/testbed") if os.geteuid() == 0 else Path(platformdirs.user_runtime_dir("testbed"))
    p = Path(os.environ.get("TESTBED_RUNTIME_DIR") or default)
    p.mkdir(parents=True, exist_ok=True)
    return p
