"""report.html and the compare page in a real headless browser (Debian's chromium):
they render, the plots are in the rendered page, and the page loads nothing from the
network. Chromium's own background requests (updates, time) are measured on an empty
page in the same test and set apart; every host name resolves to nothing, so nothing
leaves the machine either way."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.report import finish_run

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    BROWSER is None and os.environ.get("TESTBED_REQUIRE_BROWSER") != "1",
    reason="no chromium here (apt-get install chromium); CI sets TESTBED_REQUIRE_BROWSER=1",
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--enable-logging=stderr",
         "--v=1", "--host-resolver-rules=MAP * ~NOTFOUND"]  # fmt: skip


def render(page: Path, profile: Path) -> tuple[str, set[str]]:
    """The DOM after rendering, and every URL the page asked the network for."""
    assert BROWSER is not None, "TESTBED_REQUIRE_BROWSER=1 but no chromium: apt-get install chromium"
    p = subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    urls = set(re.findall(r"NotifyBeforeURLRequest: (\S+)", p.stderr))
    # Without the query: chromium's own requests carry fresh nonces each run.
    return p.stdout, {
        u.split("?", 1)[0] for u in urls if not u.startswith(("file:", "data:", "blob:", "chrome"))
    }


def make_run(d: Path, lose_from: float, lose_to: float, seed: int) -> Path:
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"playbook": d.name, "strategy": "none", "expect": {}}))
    rng = random.Random(seed)
    with (d / "results.jsonl").open("w") as f:
        for i in range(60):
            off = rng.uniform(-100, 600)
            lost = lose_from <= off <= lose_to and rng.random() < 0.9
            f.write(json.dumps({"iteration": i, "case": "t", "planned_offset_ms": off, "offset_ms": off,
                                "guest_offset_ms": off - 8, "verdict": "lost" if lost else "preserved",
                                "reason": "r", "skew_ms": 0.05, "started": 100.0 + i, "duration_s": 1.0,
                                "phases_s": {"start": 0.2, "race": 0.6}}) + "\n")  # fmt: skip
    finish_run(d)
    return d


def test_report_and_compare_render_with_their_plots_and_nothing_external(tmp_path: Path) -> None:
    a = make_run(tmp_path / "before", 30, 330, 1)
    b = make_run(tmp_path / "after", 1000, 1000, 2)
    cmp_page = tmp_path / "compare.html"
    p = subprocess.run([sys.executable, "-m", "testbed.cli", "compare", str(a), str(b), "--html", str(cmp_page)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><title>blank</title>")
    _dom, background = render(blank, tmp_path / "profile0")
    dom, urls = render(a / "report.html", tmp_path / "profile1")
    assert urls - background == set(), urls - background
    # Rendered: the loss scatter and the loss probability per anchor; the window in words.
    assert len(re.findall(r"<svg\b", dom)) == 2
    assert "Loss probability vs offset" in dom and "after the paravisor's servicing start" in dom
    assert re.search(r"loses from -?\d+ ± \d+ ms to \d+ ± \d+ ms after the paravisor", dom), dom[:500]
    assert (
        '<h2>Manifest</h2><table class="manifest">' in dom and "<th>playbook</th>" in dom
    )  # a table, not raw JSON
    cdom, curls = render(cmp_page, tmp_path / "profile2")
    assert curls - background == set(), curls - background
    assert len(re.findall(r"<svg\b", cdom)) == 1 and "Fisher exact test" in cdom
    assert cdom.count("Wilson 95% band") >= 2  # both runs' curves on the one plot


def test_the_check_sees_a_page_that_loads_from_the_network(tmp_path: Path) -> None:
    """The same check on a page with an external image and script finds both: it can fail."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://example.invalid/x.png">'
                   '<script src="https://cdn.example.invalid/a.js"></script></body></html>')  # fmt: skip
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><title>blank</title>")
    _d, background = render(blank, tmp_path / "p0")
    _d, urls = render(bad, tmp_path / "p1")
    assert urls - background == {"http://example.invalid/x.png", "https://cdn.example.invalid/a.js"}
