"""Render an A/B analysis (rlhfkit.serving.ab.analyse) as text or as one self-contained HTML page.

The page follows `rlhfkit report`'s approach (rlhfkit/eval/report.py): matplotlib figures drawn
with the Agg backend and embedded as base64 PNGs, no external asset, and every string from the
data HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math

import matplotlib
import matplotlib.pyplot as plt

COLUMNS = (("thumbs_up", "thumbs up"), ("rating", "rating"), ("edit_rate", "edit rate"), ("win_rate", "win rate vs control"),
           ("safety_flag_rate", "safety flags"), ("error_rate", "errors"), ("latency_ms", "latency ms"),
           ("latency_p95_ms", "latency p95 ms"))

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em;display:block;overflow-x:auto;max-width:100%}
td,th{border:1px solid #ddd;padding:.3em .55em;text-align:left}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}.ci{color:#777;font-size:.85em}
.decision{font-size:1.3em;padding:.6em 1em;border-radius:6px;display:inline-block}
.promote{background:#e6f6e6}.roll{background:#fde8e8}.keep{background:#eef2fb}
.breached{background:#fff0f0}.ok{background:#f0fff0}img{max-width:100%;border:1px solid #eee}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def _cell(v: dict | None) -> tuple[str, str]:
    """(point, interval) texts of a {mean, low, high} value."""
    if not v or v.get("mean") is None:
        return "-", ""
    return _fmt(v["mean"]), f"[{_fmt(v.get('low'))}, {_fmt(v.get('high'))}]"


# ---------------------------------------------------------------------------------------------
# text


def render_text(r: dict) -> str:
    lines = [f"experiment {r['experiment']}: control {r['control']}, decision metric {r['metric']}, "
             f"alpha {r['alpha']}, {r['users']} users", ""]
    head = ["arm", "model", "users", "resp"] + [label for _, label in COLUMNS]
    rows = [head]
    for name, a in r["arms"].items():
        rows.append([name, a["model"], str(a["users"]), str(a["responses"])]
                    + [" ".join(_cell(a.get(k))).strip() for k, _ in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    for arm, c in r["comparisons"].items():
        decided = f", decided at {c['first_rejection']} users" if c["first_rejection"] else ""
        lines.append(f"{arm} vs {r['control']}: {r['metric']} {_fmt(c['estimate'])} "
                     f"[{_fmt(c['low'])}, {_fmt(c['high'])}] (confidence sequence), always-valid p = "
                     f"{_fmt(c['p_value'])}: {c['verdict']}{decided}")
        for m, g in c["guardrails"].items():
            lines.append(f"  guardrail {m}: {g['status']} (worst worsening {_fmt(g['worst'])}, margin {_fmt(g['margin'])})")
    lines += ["", f"decision: {r['decision'].upper()}" + (f" {r['arm']}" if r["arm"] else "")]
    lines += [f"  - {why}" for why in r["reasons"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# HTML


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return '<img alt="figure" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode("ascii") + '">'


def sequence_figure(r: dict) -> str | None:
    """Each candidate's effect on the decision metric with its confidence sequence, against users."""
    matplotlib.use("Agg")  # no display needed

    comps = {a: c for a, c in r["comparisons"].items() if c["path"]["n"]}
    if not comps:
        return None
    fig, axes = plt.subplots(1, len(comps), figsize=(5.2 * len(comps), 3.2), squeeze=False)
    for ax, (arm, c) in zip(axes.flat, comps.items()):
        p = c["path"]
        nan = lambda xs: [math.nan if x is None else x for x in xs]  # noqa: E731
        ax.fill_between(p["n"], nan(p["low"]), nan(p["high"]), alpha=0.25, label="confidence sequence")
        ax.plot(p["n"], nan(p["estimate"]), lw=1.3, label="estimate")
        ax.axhline(0.5 if r["metric"] == "win_rate" else 0.0, color="k", lw=0.8)
        if c["first_rejection"]:
            ax.axvline(c["first_rejection"], color="tab:red", ls="--", lw=0.8, label="decided")
        ax.set_title(f"{arm} vs {r['control']}: {r['metric']}", fontsize=9)
        ax.set_xlabel("users", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def arms_figure(r: dict) -> str | None:
    """Per-arm metrics with their intervals, one small panel per metric that has data."""
    matplotlib.use("Agg")  # no display needed

    keys = [(k, label) for k, label in COLUMNS if any((a.get(k) or {}).get("mean") is not None for a in r["arms"].values())]
    if not keys:
        return None
    cols = min(4, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(3.4 * cols, 2.6 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    names = list(r["arms"])
    for ax, (k, label) in zip(axes.flat, keys):
        vals = [r["arms"][n].get(k) or {} for n in names]
        mean = [v.get("mean") if v.get("mean") is not None else math.nan for v in vals]
        err = [[m - (v.get("low") if v.get("low") is not None else m) for m, v in zip(mean, vals)],
               [(v.get("high") if v.get("high") is not None else m) - m for m, v in zip(mean, vals)]]
        ax.bar(names, mean, yerr=err, capsize=4, color=["#8da0cb" if n == r["control"] else "#66c2a5" for n in names])
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def render_html(r: dict) -> str:
    cls = {"promote": "promote", "roll back": "roll"}.get(r["decision"], "keep")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>A/B report: {esc(r['experiment'])}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>A/B report: {esc(r['experiment'])}</h1>",
             f"<p class='decision {cls}'>Decision: <b>{esc(r['decision'])}</b>"
             + (f" &rarr; {esc(r['arm'])}" if r["arm"] else "") + "</p><ul>"
             + "".join(f"<li>{esc(w)}</li>" for w in r["reasons"]) + "</ul>",
             f"<p>Control <b>{esc(r['control'])}</b>; decision metric <b>{esc(r['metric'])}</b>; {r['users']} users; "
             f"the sequential test (mSPRT, Johari et al. 2017) at alpha {esc(r['alpha'])} stays valid however often "
             "this page is looked at.</p>", "<h2>Arms</h2><table><tr><th>arm</th><th>model</th><th>weight</th>"
             "<th>users</th><th>responses</th>" + "".join(f"<th>{esc(label)}</th>" for _, label in COLUMNS) + "</tr>"]
    for name, a in r["arms"].items():
        cells = "".join(f"<td class='num'>{esc(p)} <span class='ci'>{esc(i)}</span></td>"
                        for p, i in (_cell(a.get(k)) for k, _ in COLUMNS))
        parts.append(f"<tr><td>{esc(name)}</td><td>{esc(a['model'])}</td><td class='num'>{esc(a['weight'])}</td>"
                     f"<td class='num'>{a['users']}</td><td class='num'>{a['responses']}</td>{cells}</tr>")
    parts.append("</table>")
    if (fig := arms_figure(r)) is not None:
        parts.append(fig)
    parts.append("<h2>Candidates against the control</h2><table><tr><th>arm</th><th>effect</th><th>confidence sequence</th>"
                 "<th>always-valid p</th><th>verdict</th><th>decided at (users)</th><th>guardrails</th></tr>")
    for arm, c in r["comparisons"].items():
        rails = "<br>".join(f"<span class='{esc(g['status'])}'>{esc(m)}: {esc(g['status'])} (worst {esc(_fmt(g['worst']))}, "
                            f"margin {esc(_fmt(g['margin']))})</span>" for m, g in c["guardrails"].items())
        parts.append(f"<tr><td>{esc(arm)}</td><td class='num'>{esc(_fmt(c['estimate']))}</td>"
                     f"<td class='num'>[{esc(_fmt(c['low']))}, {esc(_fmt(c['high']))}]</td>"
                     f"<td class='num'>{esc(_fmt(c['p_value']))}</td><td>{esc(c['verdict'])}</td>"
                     f"<td class='num'>{esc(c['first_rejection'] or '-')}</td><td>{rails or '-'}</td></tr>")
    parts.append("</table>")
    if (fig := sequence_figure(r)) is not None:
        parts.append(fig)
    parts.append("</body></html>")
    return "\n".join(parts)
