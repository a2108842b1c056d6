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


RUNTIME_DIR = "/tmp/testbed"  # one for every user of the machine (see runtime_dir)


def shared_dir(p: Path) -> Path:
    """A folder every user of the machine can add to (mode 1777, like /tmp: each user
    may remove only their own files); made so only by its owner."""
    p.mkdir(parents=True, exist_ok=True)
    st = p.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o7777 != 0o1777:
        os.chmod(p, 0o1777)
    return p


def runtime_dir() -> Path:
    """Leases, VM work dirs and the machine-wide guest slots.

    Machine-wide on purpose (not per user or per venv, root or not): the guest
    limit and the garbage collector must see every testbed process on the host,
    or two users would run four guests on a machine that carries two.
    """
    return shared_dir(Path(os.environ.get("TESTBED_RUNTIME_DIR") or RUNTIME_DIR))
