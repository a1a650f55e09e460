"""`rlhfkit report RUN_DIR`: one self-contained HTML page for a run folder and its sub-runs.

The page answers one question: did alignment help the humans (gold panel) or only the
reward model (proxy)? It gathers, from RUN_DIR and every folder below it:

    metrics.jsonl   training curves (matplotlib PNGs, base64-embedded)
    results.json    `rlhfkit eval`'s metric table (gold, proxy, KL, win rates, diversity,
                    perplexity); eval.json, its former name, too
    overopt.json    gold and proxy against sqrt(KL) with Gao et al. 2022 fits
    alarms.jsonl    reward-hacking and collapse (diversity, perplexity) alarms
    samples.jsonl   sample tables

No external asset is referenced (no scripts, fonts or stylesheets from the network), and
every string that comes from data, model outputs above all, is HTML-escaped.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.eval.overopt import FITS
from rlhfkit.eval.run_eval import find_results
from rlhfkit.eval.scorecard import card_rows
from rlhfkit.train.runs import atomic_write_text

MAX_CURVES = 16
MAX_SAMPLES = 12
_PRIORITY = ("rewards/", "frac_reward_zero_std", "episodes/turns", "episodes/tool", "episodes/truncated", "gold", "eval_reward", "win", "proxy", "reward", "kl", "loss", "accuracy", "acc", "entropy", "margin", "perplexity", "len")
# eval.json keys shown as table columns, in order
TABLE_COLUMNS = (
    ("gold", "gold reward"), ("proxy", "proxy (RM)"), ("kl", "KL to ref"), ("win_rate", "win rate vs ref"),
    ("lc_win_rate", "LC win rate"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
    ("self_bleu", "self-BLEU"), ("ead", "EAD"), ("perplexity", "held-out ppl"), ("rm_accuracy", "RM accuracy"),
    ("gold_accuracy", "RM accuracy vs panel"),
    ("mean_length", "mean length"),
)

# leading columns of summary.json's win-rate table, in this order
SUMMARY_COLUMNS = ("method", "round", "id", "win_rate", "win_rate_95ci", "win_rate_lo", "win_rate_hi", "lc_win_rate",
                   "gold", "proxy", "kl", "perplexity", "promoted")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em;display:block;overflow-x:auto;max-width:100%}
td,th{border:1px solid #ddd;padding:.3em .55em;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text{max-width:520px;white-space:pre-wrap;word-break:break-word}
.ci{color:#777;font-size:.85em}.alarm{background:#fff0f0}.note{color:#555;font-size:.9em}
img{max-width:100%;border:1px solid #eee}
"""


def esc(value) -> str:
    """HTML-escape anything (quotes too, so the result is safe inside attributes)."""
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------------------------
# reading the run folder


def _rel(path: Path, root: Path) -> str:
    rel = path.parent.relative_to(root).as_posix()
    return rel if rel != "." else "(top)"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"rlhfkit report: {path}, line {i}: not JSON, skipped")
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _find(root: Path, name: str) -> list[Path]:
    # hidden folders (atomic-write temporaries) and checkpoints are not results
    return sorted(p for p in root.rglob(name)
                  if not any(part.startswith(".") or part == "checkpoints" for part in p.relative_to(root).parts[:-1]))


# ---------------------------------------------------------------------------------------------
# figures


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return '<img alt="figure" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode("ascii") + '">'


def _curve_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, int] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                keys[k] = keys.get(k, 0) + 1
    # one curve per reward function (its mean); spread and abstentions stay in metrics.jsonl
    usable = [k for k, c in keys.items() if c >= 2 and not (k.startswith("rewards/") and not k.endswith("/mean"))]

    def rank(k: str) -> tuple:
        low = k.lower()
        hits = [i for i, p in enumerate(_PRIORITY) if p in low]
        return (min(hits) if hits else len(_PRIORITY), k)

    return sorted(usable, key=rank)[:MAX_CURVES]


def curves_figure(rows: list[dict], title: str) -> str | None:
    """A grid of small plots, one per metric (most informative first), against the step."""

    matplotlib.use("Agg")

    keys = _curve_keys(rows)
    if not keys:
        return None
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.5 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r.get("step", i), r[k]) for i, r in enumerate(rows)
               if isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool) and math.isfinite(r[k])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(k, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def overopt_figure(data: dict) -> tuple[str | None, list[dict]]:
    """Gold and proxy (relative to the initial policy) against sqrt(KL), with the fitted forms."""

    matplotlib.use("Agg")


    series = [(name, rows) for name, rows in data.items() if name in FITS and isinstance(rows, list) and len(rows) >= 2]
    if not series:
        return None, []
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 3.6), squeeze=False)
    fits = []
    for ax, (name, rows) in zip(axes.flat, series):
        kl = np.array([max(float(r["kl"]), 0.0) for r in rows])
        gold = np.array([float(r.get("gold_delta", r["gold"])) for r in rows])
        proxy = np.array([float(r.get("proxy_delta", r.get("proxy", float("nan")))) for r in rows])
        d = np.sqrt(kl)
        ax.plot(d, gold, "o", color="tab:green", label="gold (panel)")
        if np.isfinite(proxy).all():
            ax.plot(d, proxy, "s", color="tab:orange", label="proxy (RM)")
        fit_fn, form = FITS[name]
        try:
            fit = fit_fn(kl, gold)
            grid = np.linspace(0, d.max() * 1.1 if d.max() > 0 else 1.0, 100)
            ax.plot(grid, form(grid, fit["alpha"], fit["beta"]), "--", color="tab:green",
                    label=f"fit: d({fit['alpha']:.3g} - {fit['beta']:.3g}{' log' if name == 'rl' else ''} d)")
            fits.append({"sweep": name, **fit})
        except (ValueError, np.linalg.LinAlgError) as e:
            fits.append({"sweep": name, "error": str(e)})
        ax.set_xlabel("d = sqrt(KL to reference)")
        ax.set_ylabel("reward relative to start")
        ax.set_title({"bon": "best-of-N sweep", "rl": "RL (PPO updates)"}[name], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig), fits


# ---------------------------------------------------------------------------------------------
# tables


def _fmt(v) -> str:
    if isinstance(v, dict) and "mean" in v:
        s = _fmt(v["mean"])
        if "lo" in v and "hi" in v:
            s += f'<br><span class="ci">[{_fmt(v["lo"])}, {_fmt(v["hi"])}]</span>'
        return s
    if isinstance(v, float):
        return esc(f"{v:.4g}")
    return esc(v)


def metric_table(evals: list[tuple[str, dict]]) -> str:
    cols = [(k, label) for k, label in TABLE_COLUMNS if any(k in e for _, e in evals)]
    head = "<tr><th>model</th>" + "".join(f"<th>{esc(label)}</th>" for _, label in cols) + "</tr>"
    body = []
    for name, e in evals:
        label = e.get("name") or name
        cells = "".join(f'<td class="num">{_fmt(e[k]) if k in e else ""}</td>' for k, _ in cols)
        body.append(f"<tr><td>{esc(label)}</td>{cells}</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def records_table(rows: list[dict], columns: Sequence[str] | None = None, text_columns: Sequence[str] = ()) -> str:
    if not rows:
        return ""
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    head = "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cls = "text" if c in text_columns or isinstance(v, str) else "num"
            cells.append(f'<td class="{cls}">{_fmt(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def gain_split_rows(evals: list[tuple[str, dict]]) -> list[dict]:
    """One row per evaluation that has the gold panel's gain split (rlhfkit.eval.metrics.gold_gain_split)."""
    rows = []
    for name, e in evals:
        split = e.get("gold_gain_split")
        if not isinstance(split, dict):
            continue
        rows.append({"model": e.get("name") or name, "gold gain": split["gain"],
                     "sentiment term": split["sentiment_term"], "quality term": split["quality_term"],
                     "sentiment share": split["sentiment_share"],
                     "sentiment c (ref)": f'{split["sentiment"]["policy"]["mean"]:.3f} '
                                          f'({split["sentiment"]["reference"]["mean"]:.3f})',
                     "q = 1 share (ref)": f'{split["q1_share"]["policy"]["mean"]:.3f} '
                                          f'({split["q1_share"]["reference"]["mean"]:.3f})'})
    return rows


# ---------------------------------------------------------------------------------------------
# the page


def build_report(run_dir: str | Path, title: str | None = None) -> str:
    """Return the report HTML for `run_dir` (read-only; see :func:`write_report`)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"report: run folder {root} does not exist")
    title = title or f"rlhfkit report: {root.resolve().name}"
    parts = [f"<h1>{esc(title)}</h1>",
             f'<p class="note">Run folder <code>{esc(root.resolve())}</code>, generated {esc(time.strftime("%Y-%m-%d %H:%M:%S"))}. '
             "Gold = the held-out human panel; proxy = the learned reward model. Intervals are 95% bootstrap intervals.</p>"]
    parts += _summary_section(root)
    parts += _evaluation_section(root)
    parts += _agreement_section(root)
    parts += _overopt_section(root)
    parts += _alarm_section(root)
    parts += _sampler_section(root)
    parts += _curves_section(root)
    parts += _samples_section(root)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _summary_section(root: Path) -> list[str]:
    """Win rates of a comparison run (summary.json)."""
    parts: list[str] = []
    summary = root / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if isinstance(data.get("win_rates"), list) and data["win_rates"]:
            first = [c for c in SUMMARY_COLUMNS if any(c in r for r in data["win_rates"])]
            rest = [c for r in data["win_rates"] for c in r if c not in first]
            parts.append("<h2>Win rates against the SFT reference</h2>")
            parts.append(records_table(data["win_rates"], first + list(dict.fromkeys(rest))))
    return parts


def _evaluation_section(root: Path) -> list[str]:
    """Every eval results.json, oldest first, and the split of gold gains."""
    parts: list[str] = []
    evals = []
    for p in sorted(find_results(root), key=lambda q: q.stat().st_mtime):  # the order they were made
        try:
            evals.append((_rel(p, root), json.loads(p.read_text())))
        except json.JSONDecodeError as e:
            print(f"rlhfkit report: {p}: not JSON ({e}), skipped")
    if evals:
        parts.append("<h2>Evaluation</h2>")
        parts.append(metric_table(evals))
        for name, e in evals:  # multi-turn evaluations: what the episodes did (rlhfkit.eval.episodes)
            if isinstance(e.get("episodes"), dict):
                parts.append(f"<h2>Episodes: {esc(e.get('name') or name)}</h2>")
                parts.append(records_table(episode_rows(e["episodes"])))
        for name, e in evals:  # helpful, harmless, honest, capable: rlhfkit.eval.scorecard
            if isinstance(e.get("scorecard"), dict):
                parts.append(f"<h2>Scorecard: {esc(e.get('name') or name)}</h2>")
                parts.append(records_table(card_rows(e["scorecard"])))
        splits = gain_split_rows(evals)
        if splits:
            parts.append("<h2>What moved: sentiment or quality</h2>")
            parts.append('<p class="note">The gold panel scores a response g = q&middot;c &minus; (1 &minus; q): c is '
                         "the raters' mean sentiment, q the quality factor (real words, no repetition, two words "
                         "or more). Per prompt the gain over the reference splits exactly into a sentiment term "
                         "(mean q &times; change in c) and a quality term (mean c+1 &times; change in q).</p>")
            parts.append(records_table(splits))
    return parts


def episode_rows(episodes: dict) -> list[dict]:
    """One row per side (policy, reference): each count's mean per episode with its interval."""
    def cell(v: dict) -> str:
        return f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"

    return [{"side": side, **{k: cell(v) for k, v in counts.items()}} for side, counts in episodes.items()]


def _agreement_section(root: Path) -> list[str]:
    """Agreement of AI-judge labels with the reference labels."""
    parts: list[str] = []
    agreements = [(p, json.loads(p.read_text())) for p in _find(root, "agreement.json")]
    if agreements:  # labels came from a judge: how far they stand from the reference (rlhfkit agreement)
        parts.append("<h2>Label agreement (AI judge against the reference)</h2>")
        keys = ("a", "b", "pairs", "decided", "agreement", "kappa", "krippendorff_alpha", "coverage")
        parts.append(records_table([{"where": _rel(p, root), **{k: d[k] for k in keys if k in d}}
                                    for p, d in agreements]))
        for p, d in agreements:
            if isinstance(d.get("confusion"), dict):
                parts.append(f"<h3>Confusion ({esc(_rel(p, root))}): rows a, columns b</h3>")
                parts.append(records_table([{"a": r, **row} for r, row in d["confusion"].items()]))
    return parts


def _overopt_section(root: Path) -> list[str]:
    """Gold against proxy reward with the Gao et al. fits."""
    parts: list[str] = []
    for p in _find(root, "overopt.json"):
        img, fits = overopt_figure(json.loads(p.read_text()))
        if img:
            where = _rel(p, root)
            parts.append("<h2>Over-optimisation: gold vs proxy" + ("" if where == "(top)" else f" ({esc(where)})") + "</h2>")
            parts.append('<p class="note">Gao et al. 2022 forms: best-of-N d(&alpha; - &beta; d), '
                         "RL d(&alpha; - &beta; log d), d = sqrt(KL). Proxy rising while gold falls is reward hacking.</p>")
            parts.append(img)
            parts.append(records_table(fits))
    return parts


def _alarm_section(root: Path) -> list[str]:
    """The reward-hacking and collapse alarms."""
    parts: list[str] = []
    alarms = [(p, _read_jsonl(p)) for p in _find(root, "alarms.jsonl")]
    parts.append("<h2>Reward-hacking and collapse alarms</h2>")
    if any(rows for _, rows in alarms):
        for p, rows in alarms:
            if rows:
                parts.append(f'<h3 class="alarm">{esc(_rel(p, root))}: {len(rows)} alarm(s)</h3>')
                parts.append(records_table(rows))
    else:
        parts.append('<p class="note">None raised.</p>')
    return parts


def sampler_rows(root: Path) -> list[dict]:
    """Per run with sampler metrics: how far the rollout engine's log-probs stood from the
    trainer's (sampler/kl, sampler/max_abs_diff) and, with async workers, the staleness."""
    out = []
    for p in _find(root, "metrics.jsonl"):
        rows = [r for r in _read_jsonl(p) if "sampler/kl" in r]
        if not rows:
            continue
        kl = [float(r["sampler/kl"]) for r in rows]
        row = {"run": _rel(p, root), "updates": len(rows), "sampler/kl mean": float(np.mean(kl)),
               "sampler/kl max": max(kl), "sampler/max_abs_diff max": max(float(r.get("sampler/max_abs_diff", 0.0))
                                                                          for r in rows)}
        stale = [float(r["async/staleness"]) for r in rows if "async/staleness" in r]
        if stale:
            row.update({"staleness mean": float(np.mean(stale)), "staleness max": max(stale)})
        out.append(row)
    return out


def _sampler_section(root: Path) -> list[str]:
    """The rollout engine against the trainer (docs/ppo.md, off-policy correction)."""
    rows = sampler_rows(root)
    if not rows:
        return []
    return ["<h2>Sampler against trainer</h2>",
            '<p class="note">sampler/kl is the mean per-token KL(sampler || trainer) on the sampled tokens: '
            "about 1e-6 when both compute the same float32 distribution, larger with bf16, another engine or "
            "stale weights (async workers), where the off-policy correction (--off_policy_correction tis or mis) "
            "carries the difference.</p>", records_table(rows)]


def _curves_section(root: Path) -> list[str]:
    """Training curves of every metrics.jsonl."""
    parts: list[str] = []
    metric_files = _find(root, "metrics.jsonl")
    if metric_files:
        parts.append("<h2>Training curves</h2>")
    for p in metric_files:
        rows = _read_jsonl(p)
        img = curves_figure(rows, _rel(p, root)) if rows else None
        if img:
            parts.append(f"<h3>{esc(_rel(p, root))}</h3>{img}")
    return parts


def _samples_section(root: Path) -> list[str]:
    """Sample responses of every samples.jsonl."""
    parts: list[str] = []
    sample_files = _find(root, "samples.jsonl")
    if sample_files:
        parts.append("<h2>Samples</h2>")
    for p in sample_files:
        rows = _read_jsonl(p)[:MAX_SAMPLES]
        if rows:
            parts.append(f"<h3>{esc(_rel(p, root))}</h3>")
            parts.append(records_table(rows, text_columns=("prompt", "response", "reference", "transcript",
                                                            "reference_transcript")))
    return parts


def write_report(run_dir: str | Path, output: str | Path | None = None, title: str | None = None) -> Path:
    """Write the report (atomically) to `output` (default RUN_DIR/report.html) and return its path."""
    out = Path(output) if output else Path(run_dir) / "report.html"
    atomic_write_text(out, build_report(run_dir, title))
    return out


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run folder (sub-folders are included)")
    parser.add_argument("--output", default=None, help="HTML file to write (default RUN_DIR/report.html)")
    parser.add_argument("--title", default=None, help="page title")
    args = parser.parse_args(argv)

    try:
        path = write_report(args.run_dir, args.output, args.title)
    except RlhfkitError as e:
        print(f"rlhfkit report: {e}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
