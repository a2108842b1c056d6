"""junit.xml: one testcase per iteration; failures carry their evidence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite


def write_junit(path: Path, run: dict[str, Any], records: list[dict[str, Any]]) -> None:
    suite = TestSuite(run.get("playbook", "testbed"))
    own = run.get("backend_record") or {}
    for k, v in {
        **{k: run.get(k) for k in ("host_kind", "strategy", "accel", "seed", "run_dir")},
        **own,
    }.items():
        if v is not None and not isinstance(v, dict | list):
            suite.add_property(k, str(v))
    for r in records:
        name = f"iteration-{r['iteration']:04d} offset={r.get('planned_offset_ms')}ms"
        tc = TestCase(
            name,
            classname=f"testbed.{run.get('playbook', 'run')}.{r.get('case', 'race')}",
            time=float(r.get("duration_s") or 0),
        )
        evidence = "\n".join(r.get("evidence", []))
        text = f"{r['verdict']}: {r.get('reason', '')}\n{evidence}\nfolder: {r.get('dir', '')}"
        if r["verdict"] in ("lost", "duplicated"):
            f = Failure(f"{r['verdict']}: {r.get('reason', '')}", r["verdict"])
            f.text = text
            tc.result = [f]
        elif r["verdict"] == "infra-error":
            e = Error(r.get("reason", ""), "infra-error")
            e.text = text
            tc.result = [e]
        elif r["verdict"] == "rejected":
            tc.result = [Skipped(f"rejected: {r.get('reason', '')}")]
        tc.system_out = text
        suite.add_testcase(tc)
    xml = JUnitXml()
    xml.add_testsuite(suite)
    xml.write(str(path), pretty=True)
