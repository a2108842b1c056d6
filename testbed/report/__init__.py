"""Reports of a run folder, all rebuilt from results.jsonl (and the manifest in run.json).

This package only renders; what the results mean (expectations, exit code) is
``testbed.engine.policy``. ``finish_run`` is what the application hands the engine as
``RunOptions.finish``, so a run's end writes every report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.engine.policy import evaluate, exit_code, load_run
from testbed.report.html import render
from testbed.report.junit import write_junit
from testbed.report.markdown import render_markdown


def write_reports(
    run_dir: Path, run: dict[str, Any], records: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    """summary.json, junit.xml, summary.md and report.html of one run folder."""
    (run_dir / "summary.json").write_text(json.dumps({"manifest": run, **summary}, indent=2, default=str))
    write_junit(run_dir / "junit.xml", run, records)
    (run_dir / "summary.md").write_text(render_markdown(run, summary))
    (run_dir / "report.html").write_text(render(run, summary, records))


def finish_run(run_dir: Path) -> tuple[dict[str, Any], int]:
    """Every report of a run folder from results.jsonl and run.json alone (after a run,
    and for ``testbed report DIR``): the summary and the exit code."""
    run, records = load_run(run_dir)
    summary = evaluate(run, records)
    write_reports(run_dir, run, records, summary)
    return summary, exit_code(summary)
