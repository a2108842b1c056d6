"""Matrices: one playbook expanded over dimensions (strategy, paravisor from -> to,
shutdown mode, lab knobs), every combination a cell run as a playbook of its own in
``cells/NN-<name>/`` of the run folder, with its loss rate, Wilson interval and verdict
counts; matrix.json, summary.md and report.html hold the table (cells coloured by
verdict) and the answer per cell.

A cell is a whole run (its own VM provisioned with the cell's strategy and knobs), so
everything a run does holds per cell: results.jsonl, reports, resume, parallel lanes.
``testbed compare A B`` on two matrix folders compares them cell by cell.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

from testbed.core.config import ConfigError, VmConfig
from testbed.engine import requirements
from testbed.engine.options import Progress, RunOptions, RunResult, default_run_dir
from testbed.engine.playbook import Playbook
from testbed.engine.runner import Runner
from testbed.engine.stats import summarize

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Cell:
    index: int
    values: dict[str, Any]
    playbook: Playbook
    cfg: VmConfig

    @property
    def name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items())

    @property
    def folder(self) -> str:
        return f"{self.index:02d}-" + re.sub(r"[^A-Za-z0-9.=-]+", "_", self.name.replace(", ", "_"))[:80]


def expand(pb: Playbook, cfg: VmConfig, path: Path | None = None) -> list[Cell]:
    """Every combination of the matrix's values, as a playbook and vm_config each."""
    assert pb.matrix is not None
    dims = pb.matrix.dimensions
    cells = []
    for i, combo in enumerate(itertools.product(*dims.values())):
        values = dict(zip(dims, combo, strict=True))
        update: dict[str, Any] = {"name": f"{pb.name}[{i}]", "matrix": None, "expect": {}}
        knobs: dict[str, Any] = {}
        c = cfg
        for k, v in values.items():
            if k == "strategy":
                update["strategy"] = v
            elif k == "shutdown":
                update["shutdown"] = v
            elif k == "paravisor":
                boot, _, into = str(v).partition("->")
                c = c.with_paravisor(boot.strip())
                update["image"] = into.strip() or boot.strip()
            else:
                knobs[k.removeprefix("lab.")] = v
        try:
            cell_pb = Playbook.model_validate({**pb.model_dump(), **update})
            cell_cfg = c.with_lab({**pb.lab, **knobs})
        except ValueError as e:
            raise ConfigError(path or Path(pb.name), None, f"matrix cell {values}: {e}") from None
        cells.append(Cell(i, values, cell_pb, cell_cfg))
    return cells


def cell_expect(pb: Playbook, values: dict[str, Any]) -> dict[str, Any]:
    """The playbook's expect, then every matrix expect whose ``where`` the cell matches."""
    assert pb.matrix is not None
    out: dict[str, Any] = dict(pb.expect)
    for e in pb.matrix.expect:
        if all(str(values.get(k)) == str(v) for k, v in e.where.items()):
            out.update(e.expect)
    return out


class MatrixRunner:
    """Runs the cells one after another (each may use parallel lanes) and writes the table."""

    def __init__(self, pb: Playbook, cfg: VmConfig, opts: RunOptions, progress: Progress | None = None,
                 playbook_path: Path | None = None) -> None:  # fmt: skip
        self.pb, self.opts, self.playbook_path = pb, opts, playbook_path
        self.progress = progress or (lambda _e: None)
        if opts.backend is not None:  # the matrix's own dimensions first, at their file:line
            backend = opts.backend
            requirements.refuse_missing(requirements.asks(pb, []), backend.capabilities, backend.kind,
                                        playbook_path or Path(pb.name))  # fmt: skip
        self.cells = expand(pb, cfg, playbook_path)
        # Each cell's runner refuses what its backend cannot do before anything runs.
        self.runners = [Runner(self._cell_playbook(c), c.cfg, self._cell_opts(c, Path(".")), playbook_path=playbook_path)
                        for c in self.cells]  # fmt: skip

    def _cell_playbook(self, c: Cell) -> Playbook:
        return c.playbook.model_copy(update={"expect": cell_expect(self.pb, c.values)})

    def _cell_opts(self, c: Cell, run_dir: Path) -> RunOptions:
        resume = run_dir / "cells" / c.folder if self.opts.resume else None
        if resume is not None and not (resume / "results.jsonl").exists():
            resume = None
        return dataclasses.replace(self.opts, out=run_dir / "cells" / c.folder, resume=resume)

    def describe(self) -> str:
        dims = " x ".join(
            f"{k} ({len(v)})" for k, v in (self.pb.matrix.dimensions if self.pb.matrix else {}).items()
        )
        return f"a matrix of {len(self.cells)} cells over {dims}; each: {self.runners[0].describe()}"

    def run(self) -> RunResult:
        run_dir = self.opts.resume or self.opts.out or default_run_dir(self.pb.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        results: list[tuple[Cell, RunResult]] = []
        interrupted = False
        for c in self.cells:
            self.progress({"event": "cell", "cell": c.name, "index": c.index, "cells": len(self.cells)})
            opts = self._cell_opts(c, run_dir)
            if self.opts.open_backend is not None and c.index > 0:
                opts.backend = self.opts.open_backend()  # the runner closed the last one
            r = Runner(self._cell_playbook(c), c.cfg, opts, progress=self.progress,
                       playbook_path=self.playbook_path).run()  # fmt: skip
            results.append((c, r))
            if r.exit_code == 130:
                interrupted = True
                break
        summary = write_matrix(run_dir, self.pb, results)
        code = 130 if interrupted else max((r.exit_code for _c, r in results), default=0)
        return RunResult(run_dir, summary, code, None)


def cell_row(c: Cell, r: RunResult, run_dir: Path) -> dict[str, Any]:
    s = r.summary
    return {"index": c.index, "name": c.name, "values": c.values, "dir": str(r.run_dir.relative_to(run_dir)),
            "counts": {k: v for k, v in s["counts"].items() if v}, "lost": s["counts"]["lost"],
            "n": s["product_iterations"], "rate": s["loss_rate"], "ci95": s["loss_ci95"],
            "window": (s.get("window") or {}).get("words"), "exit_code": r.exit_code,
            "violations": s["expectations"]["violations"]}  # fmt: skip


def write_matrix(run_dir: Path, pb: Playbook, results: list[tuple[Cell, RunResult]]) -> dict[str, Any]:
    """matrix.json, summary.md and report.html of a matrix run folder."""
    assert pb.matrix is not None
    rows = [cell_row(c, r, run_dir) for c, r in results]
    summary = {"matrix": {"dimensions": pb.matrix.dimensions, "cells": rows, "playbook": pb.name}}
    (run_dir / "matrix.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_dir / "summary.md").write_text(matrix_markdown(pb.name, rows))
    (run_dir / "report.html").write_text(matrix_html(pb.name, rows), encoding="utf-8")
    return summary


def _cell_text(row: dict[str, Any]) -> str:
    if not row["n"]:
        return "no product iteration (infra-error only)"
    lo, hi = row["ci95"]
    return f"{row['lost']}/{row['n']} lost ({100 * row['rate']:.0f}%, 95% [{100 * lo:.0f}%, {100 * hi:.0f}%])"


def matrix_markdown(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"# {name}: a matrix of {len(rows)} cells", "", "| cell | lost | verdicts | expectations |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
        ok = "VIOLATED: " + "; ".join(r["violations"]) if r["violations"] else "met"
        lines.append(f"| {r['name']} | {_cell_text(r)} | {verdicts} | {ok} |")
    return "\n".join(lines) + "\n"


def matrix_html(name: str, rows: list[dict[str, Any]]) -> str:
    """The table: one row per cell, coloured by what it showed (losses red, none green,
    nothing measured grey), each linking to the cell's own report."""
    e = html.escape
    body = []
    for r in rows:
        colour = "#eeeeee" if not r["n"] else "#ffcdd2" if r["lost"] else "#c8e6c9"
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
        ok = "VIOLATED: " + "; ".join(r["violations"]) if r["violations"] else "met"
        body.append(f"<tr style='background:{colour}'><td><a href='{e(r['dir'])}/report.html'>{e(r['name'])}</a></td>"
                    f"<td>{e(_cell_text(r))}</td><td>{e(verdicts)}</td><td>{e(r['window'] or '')}</td>"
                    f"<td>{e(ok)}</td></tr>")  # fmt: skip
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>testbed matrix: {e(name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ddd;padding:3px 6px}}</style></head><body>
<h1>{e(name)}: {len(rows)} cells</h1>
<table><tr><th>cell</th><th>lost</th><th>verdicts</th><th>window</th><th>expectations</th></tr>{"".join(body)}</table>
</body></html>"""


def compare_cells(a: Path, b: Path) -> list[dict[str, Any]]:
    """Two matrix runs cell by cell (by the cell's values): losses and Fisher's p."""
    from testbed.core.runfolder import read_results
    from testbed.engine.stats import fisher_exact

    def cells(d: Path) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in json.loads((d / "matrix.json").read_text())["matrix"]["cells"]}

    ca, cb = cells(a), cells(b)
    out = []
    for name in [n for n in ca if n in cb]:
        sa = summarize(read_results(a / ca[name]["dir"] / "results.jsonl"))
        sb = summarize(read_results(b / cb[name]["dir"] / "results.jsonl"))
        la, na, lb, nb = (
            sa["counts"]["lost"],
            sa["product_iterations"],
            sb["counts"]["lost"],
            sb["product_iterations"],
        )
        out.append({"cell": name, "a": (la, na), "b": (lb, nb), "p": fisher_exact(la, na - la, lb, nb - lb)})
    return out


def is_matrix_run(d: Path) -> bool:
    return (d / "matrix.json").exists()
