from __future__ import annotations

import json
import re
from pathlib import Path

from junitparser import JUnitXml

from testbed.report import finish_run


def make_run(tmp_path: Path, verdicts: list[str], expect: dict[str, object], max_infra: int = 0) -> Path:
    d = tmp_path / "run"
    d.mkdir(parents=True)
    (d / "run.json").write_text(
        json.dumps({"playbook": "t", "strategy": "none", "expect": expect, "max_infra_errors": max_infra})
    )
    with (d / "results.jsonl").open("w") as f:
        for i, v in enumerate(verdicts):
            f.write(
                json.dumps(
                    {
                        "iteration": i,
                        "case": "t",
                        "planned_offset_ms": 10.0 * i,
                        "offset_ms": 10.0 * i,
                        "verdict": v,
                        "reason": f"because {v}",
                        "evidence": [f"line for {v}"],
                        "skew_ms": 0.05,
                        "started": 100.0 + i,
                        "duration_s": 1.0,
                        "timeline": [
                            [0.0, "host sent get: SERVICE"],
                            [5.0, "host sent vmbus: MSG"],
                        ],
                    }
                )
                + "\n"
            )
        f.write('{"iteration": 99, "verd')  # a line torn by a crash
    return d


def test_reports_rebuild_from_results_alone(tmp_path: Path) -> None:
    d = make_run(tmp_path, ["preserved", "lost", "lost", "infra-error", "rejected"], {"lost": 0})
    s, code = finish_run(d)
    assert s["counts"]["lost"] == 2 and s["product_iterations"] == 4
    assert code == 1 and "expected lost 0, got 2" in s["expectations"]["violations"][0]
    xml = JUnitXml.fromfile(str(d / "junit.xml"))
    cases = [c for suite in xml for c in suite]
    assert len(cases) == 5
    failures = [c for c in cases if c.result and c.result[0]._tag == "failure"]
    assert len(failures) == 2 and "line for lost" in failures[0].result[0].text
    errors = [c for c in cases if c.result and c.result[0]._tag == "error"]
    assert len(errors) == 1
    html = (d / "report.html").read_text()
    assert "<svg" in html and "Timeline of lost iteration" in html
    # self-contained: no external scripts, styles, images or fonts
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html
    assert json.loads((d / "summary.json").read_text())["manifest"]["playbook"] == "t"
    assert "VIOLATED" in (d / "summary.md").read_text()


def test_exit_codes_expectation_wins_over_infra(tmp_path: Path) -> None:
    d = make_run(tmp_path, ["infra-error", "infra-error", "preserved"], {"lost": ">0"}, max_infra=1)
    s, code = finish_run(d)
    assert s["infra_errors_exceeded"] and not s["expectations"]["ok"]
    assert code == 1
    d2 = make_run(tmp_path / "b", ["infra-error", "infra-error", "lost"], {"lost": ">0"}, max_infra=1)
    assert finish_run(d2)[1] == 3
    d3 = make_run(tmp_path / "c", ["lost", "preserved"], {"lost": ">0"})
    assert finish_run(d3)[1] == 0


def test_a_run_that_measured_nothing_exits_3_not_1(tmp_path: Path) -> None:
    """Every iteration infra-error: the positive control's "lost >0" is neither met nor
    violated; the run failed as infrastructure (it used to exit 1)."""
    d = make_run(tmp_path, ["infra-error"] * 3, {"lost": ">0"}, max_infra=5)
    s, code = finish_run(d)
    assert code == 3 and s["measured_nothing"] and not s["expectations"]["violations"]


def test_servicing_skipped_never_passes_silently(tmp_path: Path) -> None:
    """A playbook that expects only `lost: 0` still fails on servicing that did not
    happen; a negative control that asks for it can have it."""
    d = make_run(tmp_path, ["preserved", "servicing-skipped"], {"lost": 0})
    s, code = finish_run(d)
    assert code == 1 and s["failures"] == 1
    assert "expected servicing-skipped 0, got 1" in s["expectations"]["violations"][0]
    d2 = make_run(tmp_path / "b", ["servicing-skipped"], {"servicing-skipped": ">0"})
    assert finish_run(d2)[1] == 0


def test_delay_phase_and_time_sections_render(tmp_path: Path) -> None:
    d = make_run(tmp_path, ["lost", "preserved", "lost", "preserved"], {})
    lines = [json.loads(ln) for ln in (d / "results.jsonl").read_text().splitlines()[:-1]]
    for i, r in enumerate(lines):
        r.update(phases_s={"start": 0.2, "race": 1.0 + i}, shutdown_mode="ic-ready" if i < 2 else "phase",
                 planned_offset_ms=[0.0, 300.0, 0.0, 0.0][i], phase=[None, None, "save-start", "exec"][i],
                 phase_times_ms={"save-start": 1.0, "exec": 301.0}, skew_ms=0.05)  # fmt: skip
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    s, _ = finish_run(d)
    assert s["ic_ready_delay"]["safe_delay_ms"] == 300.0
    assert [c["phase"] for c in s["phase_sweep"]["cells"]] == ["save-start", "exec"]
    page = (d / "report.html").read_text()
    assert "How long after ready?" in page and "Phase sweep" in page and "Where the seconds go" in page
    assert "<td>save-start</td><td>0</td><td>1</td><td>lost 1</td>" in page
    md = (d / "summary.md").read_text()
    assert "| save-start | 1.0 | 0 | 1 | lost 1 |" in md and "mean seconds per iteration (all)" in md


def test_the_manifest_shows_nested_settings_as_nested_tables() -> None:
    from testbed.report.html import manifest_table

    page = manifest_table({"playbook": "t", "vm_settings": {"name": "m", "lab": {"save_ms": 300}},
                           "expect": {"lost": 0}, "builds": ["a", "b"], "empty": {}})  # fmt: skip
    assert (
        '<table class="nested"><tr><th>name</th><td>m</td></tr><tr><th>lab</th><td><table class="nested">'
        in page
    )
    assert "<th>save_ms</th><td>300</td>" in page and "<td>a, b</td>" in page
    assert "{" not in page and "&quot;" not in page and "empty" not in page  # never a JSON string
