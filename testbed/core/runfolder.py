"""The run folder's source of truth, results.jsonl: one line per finished iteration,
written, flushed and fsynced by one writer thread as lanes hand records over. Every
report is rebuilt from it (and run.json), also after Ctrl-C or a crash (a torn last
line is skipped, not fatal), so it sits in the core: the engine writes it, the reports
and the CLI read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any


class ResultsWriter:
    """Appends records to results.jsonl from a thread of its own, so a lane hands its
    record over and races on: at 256 lanes, lanes that waited for their own line's write
    and fsync spent more time queueing for the GIL around those syscalls than racing
    (bench/fleet.py). The writer takes every record queued since its last pass, writes
    them in one go, flushes and fsyncs (group commit: one fsync covers a burst of lanes).

    What a crash can cost: a killed controller loses only the records still queued (the
    writer flushes each batch at once, so the page cache has the rest); a resume reruns
    those tries, as it reruns any try that was in flight. A failed write (disk full, the
    folder gone) is raised by the next ``write`` and by ``close``, never swallowed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = path.open("a", encoding="utf-8")
        self._queue: queue.SimpleQueue[tuple[dict[str, Any], dict[Path, Any]] | None] = queue.SimpleQueue()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._drain, name="results-writer", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, Any], files: dict[Path, Any] | None = None) -> None:
        """Queue ``record``, and ``files`` (path -> data written there as JSON, before the
        record's line, so a recorded try has its files); raises the writer's OSError once
        a write has failed."""
        if self._error is not None:
            raise self._error
        self._queue.put((record, files or {}))

    def _drain(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._queue.get_nowait())
            records = [r for r in batch if r is not None]
            if records and self._error is None:
                try:
                    for _, files in records:
                        for path, data in files.items():
                            # Compact: an indent makes json fall back to its Python encoder
                            # (10x slower); `python -m json.tool` shows it.
                            path.write_text(json.dumps(data, default=str), encoding="utf-8")
                    self._f.write("".join(json.dumps(r, default=str) + "\n" for r, _ in records))
                    self._f.flush()
                    os.fsync(self._f.fileno())
                except OSError as e:
                    self._error = e
            if len(records) < len(batch):  # close() was called: everything before it is written
                return

    def close(self) -> None:
        """Write and fsync every queued record, then close the file (raising a failed write)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        try:
            self._f.close()
        except OSError as e:
            self._error = self._error or e
        if self._error is not None:
            raise self._error


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
