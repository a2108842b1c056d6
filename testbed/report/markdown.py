"""summary.md: what a person pastes into an issue."""

from __future__ import annotations

from typing import Any


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ci(ci: list[float]) -> str:
    return f"{_pct(ci[0])} to {_pct(ci[1])}"


def _table(head: list[str], rows: list[list[object]]) -> list[str]:
    """An indented markdown table between blank lines, as summary.md's lists nest them."""
    out = ["", "  | " + " | ".join(head) + " |", "  |" + "---|" * len(head)]
    return out + ["  | " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _header(run: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """The title and the headline numbers: what was run, and how often it lost."""
    lines = [
        f"# {run.get('playbook', 'run')} ({run.get('strategy')})",
        "",
        f"- iterations: {s['iterations']} ({s['product_iterations']} counted; infra-error excluded)",
        "- verdicts: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items() if v),
        f"- loss rate: {_pct(s['loss_rate'])}, Wilson 95% [{_pct(s['loss_ci95'][0])}, {_pct(s['loss_ci95'][1])}]",
    ]
    if s.get("zero_loss_bound"):
        lines.append(f"- {s['zero_loss_bound']}")
    return lines


def _window(s: dict[str, Any]) -> list[str]:
    """The vulnerable window, when the strategy searched for one."""
    w = s.get("window")
    if not w:
        return []
    return [f"- vulnerable window: {w['words']} (losses seen from {w['first_loss_ms']:.1f} to "
            f"{w['last_loss_ms']:.1f} ms; the nearest tries without a loss at {w['bracket_ms']})"] + [
        f"  - {edge}" for edge in s.get("window_edges") or []]  # fmt: skip


def _ic_ready_delay(s: dict[str, Any]) -> list[str]:
    """The answer and the loss curve of the delay-after-IC-ready sweep."""
    d = s.get("ic_ready_delay")
    if not d:
        return []
    return [f"- after the IC is ready: {d['answer']}"] + [
        f"  - {p['delay_ms']:g} ms: {p['lost']}/{p['n']} lost ({_pct(p['rate'])}, 95% [{_pct(p['ci95'][0])}, "
        f"{_pct(p['ci95'][1])}])"
        for p in d["curve"]
    ]


def _stream(s: dict[str, Any]) -> list[str]:
    """The message stream's accounting each way, its loss window and the offsets it tested."""
    st = s.get("stream")
    if not st:
        return []
    h, g = st["host_to_guest"], st["guest_to_host"]
    lines = [
        f"- stream, host -> guest: {h['sent']} messages: {h['delivered']} delivered once, {h['lost']} lost, "
        f"{h['duplicated']} duplicated, {h['reordered']} reordered, {h['refused']} refused (IC not ready)",
        f"- stream, guest -> host: {g['received']} received, {g['lost']} lost, {g['duplicated']} "
        f"duplicated, {g['reordered']} reordered",
    ]
    if st["lost_window_ms"]:
        w, wg = st["lost_window_ms"], st["lost_window_guest_ms"]
        lines.append(
            f"- the stream's loss window: {w[0]:.1f} to {w[1]:.1f} ms after the servicing request"
            + (f" ({wg[0]:.1f} to {wg[1]:.1f} ms after the paravisor's start)" if wg else "")
        )
    if st.get("offsets_per_min"):
        lines.append(f"- offsets tested: {st['offsets_per_min']:.0f}/min with the stream "
                     f"({st['offsets_per_iteration']:.0f} per iteration), {st['shutdown_offsets_per_min']:.1f}/min "
                     "by the shutdown alone")  # fmt: skip
    return lines


def _bisect(s: dict[str, Any]) -> list[str]:
    """The bisect's answer and one table row per build it tried."""
    bi = s.get("bisect")
    if not bi:
        return []
    return [f"- bisect: {bi['answer']}"] + _table(
        ["build", "tries", "lost", "95%", "SPRT", "decided after"],
        [[x["build"], x["n"], x["lost"], _ci(x["ci95"]), x["decision"], x["decided_after"] or "-"]
         for x in bi["builds"]])  # fmt: skip


def _flaky_search(s: dict[str, Any]) -> list[str]:
    """The flaky-window search's answer and one table row per arm."""
    fs = s.get("flaky_search")
    if not fs:
        return []
    return [f"- flaky-window search: {fs['answer']}"] + _table(
        ["arm", "tries", "lost", "95%"],
        [[a["arm"], a["n"], a["lost"], _ci(a["ci95"])] for a in fs["arms"]],
    )


def _per_host(s: dict[str, Any]) -> list[str]:
    """A fleet run: one table row per host, whether the loss rate depends on the host,
    and which hosts left the run, when and why."""
    ph = s.get("per_host")
    if not ph:
        return []
    rows = [[h["host"], h["tries"], h["n"], h["lost"], _ci(h["ci95"]),
             f"{h['per_min']:.1f}" if h["per_min"] else "-", h["infra_errors"],
             f"left: {h['left']['reason']}" if h["left"] else "-"] for h in ph["hosts"]]  # fmt: skip
    return [f"- per host: {ph['answer']}"] + _table(
        ["host", "tries", "counted", "lost", "95%", "tries/min", "infra errors", "left the run"], rows
    )


def _phase_sweep(s: dict[str, Any]) -> list[str]:
    """One table row per (phase, delay) cell, with where the phase fell on average."""
    ps = s.get("phase_sweep")
    if not ps:
        return []
    at = {t["phase"]: t["mean_ms"] for t in ps["timeline"]}
    lines = [
        "- phase sweep (fired on servicing phases; phase at mean ms from the request):",
        "",
        "  | phase | at ms | delay ms | tries | verdicts | lost | 95% |",
        "  |---|---|---|---|---|---|---|",
    ]
    for c in ps["cells"]:
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted(c["counts"].items()))
        where = f"{at[c['phase']]:.1f}" if c["phase"] in at else "?"
        lines.append(f"  | {c['phase']} | {where} | {c['delay_ms']:g} | {c['n']} | {verdicts} | "
                     f"{_pct(c['rate'])} | {_pct(c['ci95'][0])} to {_pct(c['ci95'][1])} |")  # fmt: skip
    return lines + [""]


def _timing(s: dict[str, Any]) -> list[str]:
    """How tightly the two requests were fired, and how late servicing really started."""
    lines: list[str] = []
    sk = s["skew_ms"]
    if sk["p50"] is not None:
        lines.append(f"- fire skew: p50 {sk['p50']:.3f} ms, p99 {sk['p99']:.3f} ms")
    lag = (s.get("spread") or {}).get("servicing_lag_ms")
    if lag:
        lines.append(f"- servicing lag (request to the paravisor's start): p50 {lag['p50']:.3f} ms, "
                     f"p99 {lag['p99']:.3f} ms")  # fmt: skip
    return lines


def _conduct(run: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """How the run went: parallelism, warnings, where the time went and the rate."""
    lines: list[str] = []
    if s.get("parallel", 1) > 1:
        lines.append(
            f"- {s['parallel']} guests raced at once"
            + (f" ({run['parallel_note']})" if run.get("parallel_note") else "")
        )
    lines += [f"- WARNING: {w}" for w in s.get("warnings") or []]
    lines += [
        f"- mean seconds per iteration ({group}): " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items())
        for group, ph in (s.get("phases_s") or {}).items()
    ]
    if s.get("iterations_per_min"):
        lines.append(f"- rate: {s['iterations_per_min']:.1f} iterations/min")
    return lines


def _host(run: dict[str, Any]) -> list[str]:
    """What it ran on, so a reader can tell whether their setup matches."""
    return [
        f"- {run.get('host_kind') or 'host'} {run.get('host')}: accel {run.get('accel')}, "
        + "".join(f"{k} {v}, " for k, v in backend_fields(run).items())
        + f"paravisor {run.get('paravisor')}, seed {run.get('seed')}"
    ]


def _outcome(s: dict[str, Any]) -> list[str]:
    """Whether the run met its expectations, and whether its numbers are to be trusted whole."""
    ex = s["expectations"]
    lines = ["- expectations: " + ("met" if ex["ok"] else "VIOLATED: " + "; ".join(ex["violations"]))]
    if s.get("infra_errors_exceeded"):
        lines.append("- infrastructure errors exceeded the playbook's max_infra_errors")
    if s.get("interrupted"):
        lines.append("- the run was interrupted; these are the iterations that finished")
    return lines


def render_markdown(run: dict[str, Any], s: dict[str, Any]) -> str:
    """summary.md, one small function per section, in the order a reader wants them."""
    lines = [
        *_header(run, s),
        *_window(s),
        *_ic_ready_delay(s),
        *_stream(s),
        *_bisect(s),
        *_flaky_search(s),
        *_per_host(s),
        *_phase_sweep(s),
        *_timing(s),
        *_conduct(run, s),
        *_host(run),
        *_outcome(s),
    ]
    return "\n".join(lines) + "\n"


# Record fields every backend has, printed on their own; the rest are the backend's own.
_COMMON = ("vm", "host", "accel", "paravisor", "strategy", "workdir")


def backend_fields(run: dict[str, Any]) -> dict[str, Any]:
    """The backend's own record fields (QEMU's kernel and version, OpenVMM's version, a
    Hyper-V host's build), scalars only, as the backend named them."""
    own = run.get("backend_record") or {}
    return {k: v for k, v in own.items()
            if k not in _COMMON and v is not None and not isinstance(v, dict | list) and len(str(v)) <= 60}  # fmt: skip
