"""The run folder's source of truth, results.jsonl: one line per finished iteration,
flushed and fsynced at once. Every report is rebuilt from it (and run.json), also
after Ctrl-C or a crash (a torn last line is skipped, not fatal), so it sits in the
core: the engine writes it, the reports and the CLI read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ResultsWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

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
