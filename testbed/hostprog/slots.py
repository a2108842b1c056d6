"""One machine-wide limit on concurrent guests.

Two TCG guests are what 2 cores carry; more would make every timing result a
lie.  Each running guest holds one of N lock files in the runtime dir (flock on
its own open file, so two guests of one process count twice and a crashed
holder releases its slot), honoured by every testbed process and every
pytest-xdist worker on the machine.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time

from testbed.core.paths import runtime_dir, shared_dir

log = logging.getLogger(__name__)


def max_guests() -> int:
    return int(os.environ.get("TESTBED_MAX_GUESTS", "2"))


class GuestSlot:
    """One guest's place under the limit: ``limit`` (an inventory's ``max_guests`` for
    the host) or else the machine-wide ``TESTBED_MAX_GUESTS`` (2)."""

    def __init__(self, timeout: float = 3600.0, limit: int | None = None) -> None:
        self.timeout = timeout
        self.limit = limit or max_guests()
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        d = runtime_dir() / "slots"
        shared_dir(d)
        for i in range(self.limit):
            fd = _open_lock(d / f"slot-{i}.lock")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.fd = fd
            return True
        return False

    def acquire(self) -> GuestSlot:
        end = time.monotonic() + self.timeout
        if not self.try_acquire():
            log.info("all %d guest slots busy; waiting", self.limit)
            while not self.try_acquire():
                if time.monotonic() > end:
                    raise TimeoutError(f"no free guest slot in {self.timeout:.0f} s")
                time.sleep(0.1)
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the flock
            self.fd = None


def _open_lock(path: os.PathLike[str]) -> int:
    """A slot's lock file, opened read-only (flock needs no more), so another user's
    file (0644 under the usual umask) opens too; created only when absent, because
    fs.protected_regular refuses O_CREAT on someone else's file in a sticky folder."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:  # another process made it just now
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
