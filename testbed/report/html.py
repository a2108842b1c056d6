"""report.html: one self-contained page (inline SVG plots, inline CSS, no network)."""

from __future__ import annotations

import html
import io
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "preserved": "#2e7d32",
    "delivered-before": "#81c784",
    "lost": "#c62828",
    "duplicated": "#6a1b9a",
    "rejected": "#9e9e9e",
    "servicing-failed": "#ef6c00",
    "servicing-skipped": "#ad1457",
    "guest-crash": "#000000",
    "infra-error": "#1565c0",
}


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def loss_plot(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    anchor = (summary.get("window") or {}).get("anchor", "offset_ms")
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for verdict, color in COLORS.items():
        pts = [
            (r.get(anchor) if r.get(anchor) is not None else r.get("planned_offset_ms"))
            for r in records
            if r["verdict"] == verdict
        ]
        xs: list[float] = [float(p) for p in pts if p is not None]
        if xs:
            y = [1 if verdict == "lost" else 0 for _ in xs]
            ax.scatter(xs, y, s=22, color=color, label=f"{verdict} ({len(xs)})", alpha=0.8)
    w = summary.get("window")
    if w:
        ax.axvspan(w["first_loss_ms"], w["last_loss_ms"], color="#c62828", alpha=0.12, label="loss window")
    ax.set_yticks([0, 1], ["not lost", "lost"])
    ax.set_ylim(-0.5, 1.5)
    ax.set_xlabel(f"shutdown offset (ms, anchor: {anchor.replace('_ms', '')})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    return _svg(fig)


def delay_plot(curve: dict[str, Any]) -> str:
    """Loss rate vs the delay after the IC's re-offer, with Wilson 95% bands."""
    pts = curve["curve"]
    xs = [p["delay_ms"] for p in pts]
    fig, ax = plt.subplots(figsize=(9, 3.0))
    ax.fill_between(xs, [p["ci95"][0] for p in pts], [p["ci95"][1] for p in pts], color="#c62828", alpha=0.15,
                    label="Wilson 95%")  # fmt: skip
    ax.plot(xs, [p["rate"] for p in pts], "o-", color="#c62828", label="loss rate")
    if curve.get("safe_delay_ms") is not None:
        ax.axvline(curve["safe_delay_ms"], color="#2e7d32", ls="--", label="no loss from here")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("shutdown delay after the IC's re-offer (ms)")
    ax.set_ylabel("loss rate")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return _svg(fig)


def delay_section(summary: dict[str, Any]) -> str:
    d = summary.get("ic_ready_delay")
    if not d:
        return ""
    rows = [
        [f"{p['delay_ms']:g}", str(p["n"]), str(p["lost"]), _pct(p["rate"]), _ci(p["ci95"])]
        for p in d["curve"]
    ]
    table = _table(["delay ms", "tries", "lost", "loss rate", "Wilson 95%"], rows)
    return f"<h2>How long after ready?</h2><p>{html.escape(d['answer'])}</p>{delay_plot(d)}{table}"


def phase_sweep_section(summary: dict[str, Any]) -> str:
    """The phase timeline (mean arrival of each phase, its spread as a band) with each
    cell's loss rate and Wilson interval laid on it at phase + delay, and the table."""
    ps = summary.get("phase_sweep")
    if not ps:
        return ""
    at = {t["phase"]: t for t in ps["timeline"]}
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for t in ps["timeline"]:
        ax.axvspan(t["mean_ms"] - t["sd_ms"], t["mean_ms"] + t["sd_ms"], color="#90a4ae", alpha=0.2)
        ax.axvline(t["mean_ms"], color="#607d8b", lw=0.8)
        ax.text(t["mean_ms"], 1.08, t["phase"], rotation=60, fontsize=6, ha="left", va="bottom")
    for c in ps["cells"]:
        if c["phase"] in at:
            x = at[c["phase"]]["mean_ms"] + c["delay_ms"]
            err = [[c["rate"] - c["ci95"][0]], [c["ci95"][1] - c["rate"]]]
            ax.errorbar(
                [x], [c["rate"]], yerr=err, fmt="o", ms=4, color=COLORS["lost"] if c["lost"] else "#2e7d32"
            )
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("ms from the servicing request (phase mean + delay)")
    ax.set_ylabel("loss rate")
    ax.grid(alpha=0.3)
    rows = [
        [html.escape(c["phase"]), f"{c['delay_ms']:g}", str(c["n"]),
         html.escape(", ".join(f"{k} {v}" for k, v in sorted(c["counts"].items()))), _pct(c["rate"]), _ci(c["ci95"])]
        for c in ps["cells"]
    ]  # fmt: skip
    table = _table(["phase", "delay ms", "tries", "verdicts", "loss rate", "Wilson 95%"], rows)
    return f"<h2>Phase sweep</h2>{_svg(fig)}{table}"


def phases_section(summary: dict[str, Any]) -> str:
    groups = summary.get("phases_s") or {}
    if not groups:
        return ""
    names = sorted({k for ph in groups.values() for k in ph})
    rows = [[html.escape(g), *(f"{ph[n]:.3f}" if n in ph else "" for n in names)] for g, ph in groups.items()]
    table = _table(["verdict", *(f"{html.escape(n)} s" for n in names)], rows)
    return f"<h2>Where the seconds go (mean per iteration)</h2>{table}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    """An HTML table of cells that are already escaped."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _ci(ci: list[float]) -> str:
    return f"{_pct(ci[0])} to {_pct(ci[1])}"


def timeline_plot(record: dict[str, Any]) -> str:
    tl = record.get("timeline") or []
    if not tl:
        return ""
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(tl) + 1))
    for i, (t, label) in enumerate(tl):
        ax.plot([t], [i], "o", color="#c62828" if "MSG" in label or "shutdown" in label else "#37474f")
        ax.annotate(label[:80], (t, i), xytext=(6, -3), textcoords="offset points", fontsize=7)
    ax.set_yticks([])
    ax.set_xlabel("ms from the servicing request")
    ax.grid(alpha=0.3, axis="x")
    return _svg(fig)


def render(run: dict[str, Any], summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    e = html.escape
    lost = next((r for r in records if r["verdict"] == "lost"), None)
    rows = "".join(
        f"<tr><td>{r['iteration']}</td><td>{e(str(r.get('case', '')))}</td><td>{r.get('planned_offset_ms')}</td>"
        f"<td>{_fmt(r.get('offset_ms'))}</td><td>{_fmt(r.get('guest_offset_ms'))}</td>"
        f"<td style='color:{COLORS.get(r['verdict'], '#000')}'><b>{e(r['verdict'])}</b></td>"
        f"<td>{e(r.get('reason', ''))}</td></tr>"
        for r in records
    )
    counts = ", ".join(f"{k}: {v}" for k, v in summary["counts"].items() if v)
    ci = summary.get("loss_ci95", [0, 1])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>testbed: {e(run.get("playbook", ""))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ddd;padding:2px 6px}}pre{{background:#f5f5f5;padding:8px;font-size:11px;overflow-x:auto}}</style>
</head><body>
<h1>{e(run.get("playbook", "run"))}: {e(str(run.get("strategy")))}</h1>
<p>{summary["iterations"]} iterations; {e(counts)}.<br>
Loss rate {_pct(summary.get("loss_rate"))} (Wilson 95%: {_pct(ci[0])} to {_pct(ci[1])}).
{e(summary.get("zero_loss_bound", ""))}<br>
Window: {e(json.dumps(summary.get("window")))}<br>
Fire skew p50 {_fmt(summary["skew_ms"]["p50"])} ms, p99 {_fmt(summary["skew_ms"]["p99"])} ms;
{_fmt(summary.get("iterations_per_min"))} iterations/min{f"; {summary['parallel']} guests at once" if summary.get("parallel", 1) > 1 else ""}.</p>
{"".join(f"<p style='color:#b00'><b>Warning:</b> {e(w)}</p>" for w in summary.get("warnings") or [])}
<h2>Loss vs offset</h2>{loss_plot(records, summary)}
{delay_section(summary)}
{phase_sweep_section(summary)}
{phases_section(summary)}
{("<h2>Timeline of lost iteration " + str(lost["iteration"]) + "</h2>" + timeline_plot(lost)) if lost else ""}
<h2>Manifest</h2><pre>{e(json.dumps(run, indent=2, default=str))}</pre>
<h2>Iterations</h2><table><tr><th>#</th><th>case</th><th>planned ms</th><th>actual ms</th><th>vs paravisor ms</th>
<th>verdict</th><th>reason</th></tr>{rows}</table>
</body></html>"""


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"
