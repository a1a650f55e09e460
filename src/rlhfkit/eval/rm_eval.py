"""`rlhfkit eval-rm MODEL DATA`: how good is a reward model, measured honestly.

* ``accuracy``: :func:`rlhfkit.losses.reward.preference_accuracy`, the share of decisively
  labelled pairs whose preferred response gets the strictly higher reward; equal rewards count
  as wrong (RewardBench's rule, Lambert et al. 2024). Pairs labelled as ties are left out of it
  and counted. Rankings contribute all C(K, 2) pairs.
* ``gold_accuracy`` (``--gold``): agreement with the bundled task's gold panel on pairs the
  panel separates clearly (|gold gap| >= ``--gold_gap``), the labels themselves ignored.
* ``ece``: expected calibration error (Naeini et al. 2015) of p = sigmoid(r_a - r_b) against the
  observed preference, over equal-width bins. Each pair enters in both orientations, (p, y)
  and (1 - p, 1 - y), so the result does not depend on which side the data calls "chosen".
  A reliability plot (PNG) shows observed against predicted per bin.
* ``annotators``: per-annotator agreement of the reward model with that annotator's labels.

Scores are the reward model's raw outputs (for an ensemble, the mean over members and heads),
the scale on which the Bradley-Terry probabilities are defined.

    rlhfkit eval-rm runs/rm/final heldout.jsonl --gold --output runs/rm/eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from rlhfkit.data.preference import Comparison, read_comparisons
from rlhfkit.data.readers import load_records
from rlhfkit.errors import DataError, RlhfkitError
from rlhfkit.judges import GoldPanel
from rlhfkit.losses.reward import preference_accuracy
from rlhfkit.models.reward import RewardScorer, sigmoid
from rlhfkit.train.runs import atomic_path, atomic_write_json


def comparison_pairs(comps: Sequence[Comparison]) -> list[Comparison]:
    """Every comparison as pairs (responses = (a, b), label = P(a preferred)); rankings give C(K, 2)."""
    return [p for c in comps for p in c.pairs()]


def score_pairs(score_fn, pairs: Sequence[Comparison]) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each pair's two responses, scoring every distinct (prompt, response) once."""
    keys = list(dict.fromkeys((p.prompt, r) for p in pairs for r in p.responses))
    index = {k: i for i, k in enumerate(keys)}
    scores = np.asarray(score_fn([k[0] for k in keys], [k[1] for k in keys]), dtype=np.float64)
    ra = np.array([scores[index[(p.prompt, p.responses[0])]] for p in pairs])
    rb = np.array([scores[index[(p.prompt, p.responses[1])]] for p in pairs])
    return ra, rb


def accuracy(delta: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """:func:`rlhfkit.losses.reward.preference_accuracy` on arrays: (accuracy, decisive pairs)."""
    acc, n = preference_accuracy(torch.as_tensor(delta, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.float64))
    return float(acc), int(n)


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE = sum_b n_b / N * |mean(p_b) - mean(y_b)| over equal-width bins of p, both orientations."""
    p = np.concatenate([p, 1 - p])
    y = np.concatenate([y, 1 - y])
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n}
        if n:
            row.update(predicted=float(p[sel].mean()), observed=float(y[sel].mean()))
            ece += n / len(p) * abs(row["predicted"] - row["observed"])
        table.append(row)
    return float(ece), table


def reliability_plot(table: list[dict], path: str | Path, title: str = "") -> Path:
    """Observed preference rate against predicted sigmoid(delta r), one bar per bin (PNG)."""

    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    rows = [r for r in table if r["count"]]
    centers = [(r["lo"] + r["hi"]) / 2 for r in rows]
    width = table[0]["hi"] - table[0]["lo"]
    ax.bar(centers, [r["observed"] for r in rows], width=width * 0.9, alpha=0.7, label="observed", edgecolor="k")
    ax.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], "o", color="C3", label="bin mean")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(a preferred) = sigmoid(r_a - r_b)",
           ylabel="observed preference rate", title=title or "reward-model reliability")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def annotator_agreement(delta: np.ndarray, labels: np.ndarray, annotators: Sequence[Any]) -> dict[str, dict]:
    """Per annotator: decisive labels seen and the share the reward model agrees with."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, a in enumerate(annotators):
        if a is not None and labels[i] != 0.5:
            groups[str(a)].append(i)
    out = {}
    for a, idx in sorted(groups.items()):
        acc, n = accuracy(delta[idx], labels[idx])
        out[a] = {"n": n, "agreement": acc}
    return out


def evaluate_pairs(score_fn, pairs: Sequence[Comparison], gold: Any = None, gold_gap: float = 0.1, bins: int = 10,
                   plot: str | Path | None = None) -> dict[str, Any]:
    """All metrics of the module docstring for `pairs`, scored by `score_fn(prompts, responses)`."""
    if not pairs:
        raise RlhfkitError("no comparisons to evaluate")
    ra, rb = score_pairs(score_fn, pairs)
    delta, labels = ra - rb, np.array([p.label for p in pairs], dtype=np.float64)
    acc, n_dec = accuracy(delta, labels)
    ece, table = expected_calibration_error(sigmoid(delta), labels, bins)
    out: dict[str, Any] = {"accuracy": acc, "num_pairs": len(pairs), "num_decisive": n_dec,
                           "num_labelled_ties": int((labels == 0.5).sum()), "num_reward_ties": int((delta == 0).sum()),
                           "ece": ece, "calibration_bins": table, "mean_abs_reward_gap": float(np.abs(delta).mean())}
    if gold is not None:
        ga, gb = score_pairs(gold.score, pairs)
        gdelta = ga - gb
        clear = np.abs(gdelta) >= gold_gap
        gold_labels = (gdelta[clear] > 0).astype(np.float64)
        out["gold_gap"] = gold_gap
        out["num_gold_clear"] = int(clear.sum())
        out["gold_accuracy"] = accuracy(delta[clear], gold_labels)[0] if clear.any() else float("nan")
        decisive_clear = clear & (labels != 0.5)
        if decisive_clear.any():
            # how often the labels themselves agree with the panel: the ceiling a label-fitting RM is chasing
            out["label_gold_agreement"] = float(((labels[decisive_clear] > 0.5) == (gdelta[decisive_clear] > 0)).mean())
    annotators = [p.annotator for p in pairs]
    if any(a is not None for a in annotators):
        out["annotators"] = annotator_agreement(delta, labels, annotators)
    if plot:
        out["reliability_plot"] = str(reliability_plot(table, plot, f"ECE = {ece:.3f} ({len(pairs)} pairs)"))
    return out


def cli(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhfkit eval-rm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a reward model folder (or an ensemble folder with ensemble.json)")
    ap.add_argument("data", help="preference/ranking data: .jsonl/.json/.parquet, dataset folder or hub name")
    ap.add_argument("--output", default="", help="write the JSON result here (and the plot beside it)")
    ap.add_argument("--plot", default="", help="reliability plot PNG path (default: beside --output)")
    ap.add_argument("--gold", action="store_true", help="also score against the bundled task's gold panel")
    ap.add_argument("--gold_gap", type=float, default=0.1, help="a pair is 'clearly separated' if |gold gap| >= this")
    ap.add_argument("--bins", type=int, default=10, help="calibration bins")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=512, help="truncate prompt+response to this many tokens")
    ap.add_argument("--on_bad_record", choices=("error", "skip"), default="error")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        result = run(args)
    except RlhfkitError as e:
        print(f"rlhfkit eval-rm: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=float))
    return 0


def run(args: argparse.Namespace) -> dict:
    scorer = RewardScorer(args.model, device=args.device, batch_size=args.batch_size, max_length=args.max_length,
                          normalize=False)
    comps = read_comparisons(load_records(args.data, split="train"), scorer.tokenizers[0], on_bad=args.on_bad_record,
                             log=lambda m: print(m, file=sys.stderr))
    if not comps:
        raise DataError("no usable preference or ranking records", source=str(args.data))
    gold = GoldPanel() if args.gold else None
    plot = args.plot or (str(Path(args.output).with_suffix("")) + "_reliability.png" if args.output else None)
    result = evaluate_pairs(lambda p, r: scorer.score_with_uncertainty(p, r)[0], comparison_pairs(comps), gold,
                            args.gold_gap, args.bins, plot)
    result.update(model=str(args.model), data=str(args.data), skipped=dict(comps.report.reasons),
                  truncated_rows=scorer.truncated)
    if scorer.truncated:
        print(f"eval-rm: {scorer.truncated} prompt+response texts were longer than {args.max_length} tokens and truncated",
              file=sys.stderr)
    if args.output:
        atomic_write_json(args.output, result)
    return result
