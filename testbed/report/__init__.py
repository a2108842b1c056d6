"""Reports of a run folder, all rebuilt from results.jsonl (and the manifest in run.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.config import check_expectation
from testbed.engine.stats import summarize
from testbed.report.html import render
from testbed.report.jsonl import read_results
from testbed.report.junit import write_junit
from testbed.report.markdown import render_markdown


def evaluate(run: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics plus the playbook's expectations, per case and overall."""
    summary = summarize(records)
    violations: list[str] = []
    for case, expect in (run.get("expect_by_case") or {"": run.get("expect", {})}).items():
        recs = [r for r in records if not case or r.get("case") == case]
        counts = summarize(recs)["counts"] if recs else {}
        for verdict, spec in expect.items():
            n = counts.get(verdict, 0)
            if recs and not check_expectation(spec, n):
                violations.append(f"{case or 'run'}: expected {verdict} {spec}, got {n}")
    infra = summary["counts"]["infra-error"]
    summary["expectations"] = {"violations": violations, "ok": not violations}
    summary["infra_errors_exceeded"] = infra > int(run.get("max_infra_errors", 0))
    summary["interrupted"] = bool(run.get("interrupted"))
    return summary


def exit_code(summary: dict[str, Any]) -> int:
    """0 ok; 1 an expectation violated (wins over 3); 3 infrastructure failures over the limit."""
    if summary["expectations"]["violations"]:
        return 1
    if summary["infra_errors_exceeded"]:
        return 3
    return 0


def write_reports(run_dir: Path) -> dict[str, Any]:
    run_path = run_dir / "run.json"
    run: dict[str, Any] = json.loads(run_path.read_text()) if run_path.exists() else {}
    records = read_results(run_dir / "results.jsonl")
    summary = evaluate(run, records)
    (run_dir / "summary.json").write_text(json.dumps({"manifest": run, **summary}, indent=2, default=str))
    write_junit(run_dir / "junit.xml", run, records)
    (run_dir / "summary.md").write_text(render_markdown(run, summary))
    (run_dir / "report.html").write_text(render(run, summary, records))
    return summary
