"""The run folder's source of truth, results.jsonl: one line per finished iteration,
flushed and fsynced at once. Every report is rebuilt from it (and run.json), also
after Ctrl-C or a crash (a torn last line is skipped, not fatal), so it sits in the
core: the engine writes it, the reports and the CLI read it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class ResultsWriter:
    """Appends records; each ``write`` returns once its line is on disk. Safe from many
    threads, with group commit: lanes that finish together (a fleet's lanes often do)
    each write and flush their line, and one fsync covers every line flushed before it,
    so a burst of N lanes waits for about one fsync, not N in a row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = path.open("a", encoding="utf-8")
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._written = 0  # lines flushed to the file
        self._synced = 0  # lines known to be on disk

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with self._write_lock:
            self._f.write(line)
            self._f.flush()
            self._written += 1
            mine = self._written
        with self._sync_lock:
            if self._synced >= mine:
                return  # another writer's fsync came after this line was flushed
            upto = self._written  # every line flushed by now is covered by this fsync
            os.fsync(self._f.fileno())
            self._synced = upto

    def close(self) -> None:
        self._f.close()


def read_results(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash mid-write
    return out
