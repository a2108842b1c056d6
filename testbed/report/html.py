"""report.html: one self-contained page (inline SVG plots, inline CSS, no network)."""

from __future__ import annotations

import html
import io
from typing import Any


def _plt() -> Any:
    """matplotlib's pyplot (headless), imported when a page is drawn: at import it costs
    a third of a second, which every command would pay at start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    _plt().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def loss_plot(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    anchor = (summary.get("window") or {}).get("anchor", "offset_ms")
    fig, ax = _plt().subplots(figsize=(9, 3.2))
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


def rate_plot(curves: list[tuple[str, list[dict[str, Any]]]], xlabel: str) -> str:
    """Loss probability vs offset, one line per curve (an anchor, or a run of a
    comparison), each bucket's Wilson 95% interval as a band."""
    fig, ax = _plt().subplots(figsize=(9, 3.0))
    palette = ["#c62828", "#1565c0", "#6a1b9a", "#ef6c00"]
    for i, (label, rows) in enumerate(curves):
        if not rows:
            continue
        xs = [(b["from_ms"] + b["to_ms"]) / 2 for b in rows]
        c = palette[i % len(palette)]
        ax.fill_between(xs, [b["ci95"][0] for b in rows], [b["ci95"][1] for b in rows], color=c, alpha=0.12)
        ax.plot(xs, [b["rate"] for b in rows], "o-", color=c, ms=3, label=f"{label} (Wilson 95% band)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss probability")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return _svg(fig)


def rate_section(summary: dict[str, Any]) -> str:
    from testbed.engine.stats import ANCHOR_WORDS

    by = summary.get("per_bucket_by_anchor") or {}
    if not by:
        return ""
    curves = [(f"ms {ANCHOR_WORDS[k]}", rows) for k, rows in by.items()]
    return "<h2>Loss probability vs offset</h2>" + rate_plot(curves, "shutdown offset (ms), per anchor")


def delay_plot(curve: dict[str, Any]) -> str:
    """Loss rate vs the delay after the IC's re-offer, with Wilson 95% bands."""
    pts = curve["curve"]
    xs = [p["delay_ms"] for p in pts]
    fig, ax = _plt().subplots(figsize=(9, 3.0))
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


def flaky_section(summary: dict[str, Any]) -> str:
    """The flaky-window search: its answer in words and every arm's tries and interval."""
    f = summary.get("flaky_search")
    if not f:
        return ""
    rows = [[html.escape(a["arm"]), _fmt(a.get("at_ms")), str(a["n"]), str(a["lost"]), _pct(a["rate"]),
             _ci(a["ci95"])] for a in f["arms"]]  # fmt: skip
    table = _table(["arm", "phase at ms", "tries", "lost", "loss rate", "Wilson 95%"], rows)
    return f"<h2>Flaky-window search</h2><p>{html.escape(f['answer'])}</p>{table}"


def hosts_section(summary: dict[str, Any]) -> str:
    """A fleet run: per host its tries, loss rate with its interval, rate and infrastructure
    errors, whether the loss rate depends on the host, and which hosts left and why."""
    ph = summary.get("per_host")
    if not ph:
        return ""
    rows = [[html.escape(h["host"]), str(h["tries"]), str(h["lost"]), _pct(h["rate"]), _ci(h["ci95"]),
             _fmt(h["per_min"]), str(h["infra_errors"]),
             html.escape(h["left"]["reason"]) if h["left"] else "-"] for h in ph["hosts"]]  # fmt: skip
    table = _table(["host", "tries", "lost", "loss rate", "Wilson 95%", "tries/min", "infra errors",
                    "left the run"], rows)  # fmt: skip
    return f"<h2>Per host</h2><p>{html.escape(ph['answer'])}</p>{table}"


def bisect_section(summary: dict[str, Any]) -> str:
    """The bisection: the answer in words, and per build tested its tries, losses,
    interval and the sequential test's decision."""
    b = summary.get("bisect")
    if not b:
        return ""
    colour = {"good": COLORS.get("preserved", "#2e7d32"), "bad": COLORS.get("lost", "#c62828")}
    rows = [[f"<span style='color:{colour.get(x['decision'], '#555')}'><b>{html.escape(x['build'])}</b></span>",
             str(x["n"]), str(x["lost"]), _pct(x["rate"]), _ci(x["ci95"]), html.escape(x["decision"]),
             _fmt(x["decided_after"]), f"{x['llr']:.2f}"] for x in b["builds"]]  # fmt: skip
    table = _table(
        ["build", "tries", "lost", "loss rate", "Wilson 95%", "SPRT", "decided after", "log LR"], rows
    )
    return f"<h2>Bisection</h2><p>{html.escape(b['answer'])}</p>{table}"


def phase_sweep_section(summary: dict[str, Any]) -> str:
    """The phase timeline (mean arrival of each phase, its spread as a band) with each
    cell's loss rate and Wilson interval laid on it at phase + delay, and the table."""
    ps = summary.get("phase_sweep")
    if not ps:
        return ""
    at = {t["phase"]: t for t in ps["timeline"]}
    fig, ax = _plt().subplots(figsize=(9, 3.4))
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
    fig, ax = _plt().subplots(figsize=(9, 0.35 * len(tl) + 1))
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
td,th{{border:1px solid #ddd;padding:2px 6px}}pre{{background:#f5f5f5;padding:8px;font-size:11px;overflow-x:auto}}
table.manifest th{{text-align:left;vertical-align:top;background:#fafafa}}table.nested{{margin:0}}ol{{margin:0;padding-left:1.2em}}</style>
</head><body>
<h1>{e(run.get("playbook", "run"))}: {e(str(run.get("strategy")))}</h1>
<p>{summary["iterations"]} iterations; {e(counts)}.<br>
Loss rate {_pct(summary.get("loss_rate"))} (Wilson 95%: {_pct(ci[0])} to {_pct(ci[1])}).
{e(summary.get("zero_loss_bound", ""))}<br>
Window: {e(summary["window"]["words"]) if summary.get("window") else "no loss, no window"}{"".join("; " + e(x) for x in summary.get("window_edges") or [])}<br>
Fire skew p50 {_fmt(summary["skew_ms"]["p50"])} ms, p99 {_fmt(summary["skew_ms"]["p99"])} ms;
{_fmt(summary.get("iterations_per_min"))} iterations/min{f"; {summary['parallel']} guests at once" if summary.get("parallel", 1) > 1 else ""}.</p>
{"".join(f"<p style='color:#b00'><b>Warning:</b> {e(w)}</p>" for w in summary.get("warnings") or [])}
<h2>Loss vs offset</h2>{loss_plot(records, summary)}
{rate_section(summary)}
{delay_section(summary)}
{flaky_section(summary)}
{bisect_section(summary)}
{hosts_section(summary)}
{phase_sweep_section(summary)}
{phases_section(summary)}
{("<h2>Timeline of lost iteration " + str(lost["iteration"]) + "</h2>" + timeline_plot(lost)) if lost else ""}
<h2>Manifest</h2>{manifest_table(run)}
<h2>Iterations</h2><table><tr><th>#</th><th>case</th><th>planned ms</th><th>actual ms</th><th>vs paravisor ms</th>
<th>verdict</th><th>reason</th></tr>{rows}</table>
</body></html>"""


def render_compare(names: list[str], summaries: list[dict[str, Any]], p: float, verdict: str) -> str:
    """``testbed compare A B --html``: both runs' loss probability vs offset on one plot
    (the sharpest anchor both have), their rates with Wilson intervals, and Fisher's p."""
    from testbed.engine.stats import ANCHOR_WORDS

    e = html.escape
    common = [k for k in ANCHOR_WORDS if all((s.get("per_bucket_by_anchor") or {}).get(k) for s in summaries)]
    anchor = "guest_offset_ms" if "guest_offset_ms" in common else (common[0] if common else None)
    plot = (rate_plot([(n, (s["per_bucket_by_anchor"] or {})[anchor]) for n, s in zip(names, summaries, strict=True)],
                      f"shutdown offset (ms {ANCHOR_WORDS[anchor]})") if anchor else
            "<p>The runs share no offset anchor: no curve to draw.</p>")  # fmt: skip
    rows = [[e(n), str(s["counts"]["lost"]), str(s["product_iterations"]), _pct(s["loss_rate"]), _ci(s["loss_ci95"]),
             e((s.get("window") or {}).get("words", "no loss"))] for n, s in zip(names, summaries, strict=True)]  # fmt: skip
    table = _table(["run", "lost", "n", "loss rate", "Wilson 95%", "window"], rows)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>testbed compare</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ddd;padding:2px 6px}}</style></head><body>
<h1>{e(names[0])} vs {e(names[1])}</h1>
<p>Fisher exact test (two-sided): p = {p:.4g}: {e(verdict)} at 5%.</p>
<h2>Loss probability vs offset</h2>{plot}
<h2>Loss rates</h2>{table}
</body></html>"""


def manifest_table(run: dict[str, Any]) -> str:
    """run.json as a table: a value per row; nested settings (vm_settings, lab, expect,
    the backend's record) as nested tables, so each setting can be read at a glance."""
    return f'<table class="manifest">{_manifest_rows(run)}</table>'


def _manifest_rows(d: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for k, v in d.items():
        if v is None or v == {} or v == []:
            continue
        rows.append(f"<tr><th>{e(str(k))}</th><td>{_manifest_value(v)}</td></tr>")
    return "".join(rows)


def _manifest_value(v: Any) -> str:
    e = html.escape
    if isinstance(v, dict):
        return f'<table class="nested">{_manifest_rows(v)}</table>'
    if isinstance(v, list):
        if all(not isinstance(x, dict | list) for x in v):
            return e(", ".join(str(x) for x in v))
        return "<ol>" + "".join(f"<li>{_manifest_value(x)}</li>" for x in v) + "</ol>"
    return e(str(v))


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"
