"""Active learning for preference labels on the bundled task (issue 7, item 5).

Setting: a fixed set of 300 candidate responses (continuations of "say it kindly" training
prompts) and a pool of 3,000 distinct pairs among them to label; 2,000 further pairs are held
out for evaluation. Labels come from `rlhfkit.judges.SimulatedAnnotators` (one panel rater per
label, Bradley-Terry noise, ties). The reward model is `rlhfkit.feedback.active.HashedEnsemble`:
5 linear Bradley-Terry models on hashed unigrams, bigrams and a length bin, each fit on a
bootstrap resample (a fit takes well under a second on CPU).

Each strategy starts from the same `seed_labels` random labels and then asks for `batch`
labels per round until `budget`:
- random: uniformly from the unlabelled pool;
- uncertainty: the pairs where the ensemble's members disagree most relative to their mean
  difference (lowest |mean d| / std d, d = r(a) - r(b); see rlhfkit.feedback.active).

Gold accuracy: the share of held-out pairs (gold panel-mean gap >= `min_gap`) whose order the
ensemble's mean reward gets right. Reported: the accuracy curve, and the labels needed to first
reach each target accuracy, averaged over seeds (a seed that never reaches a target within the
budget makes that mean null; per-seed values are listed). Ties cost a label but teach nothing.
"""

from __future__ import annotations

import numpy as np

TARGETS = (0.70, 0.75, 0.80)


def _candidates(rng: np.random.Generator, n_responses: int) -> tuple[list[str], list[str]]:
    """A fixed candidate set: `n_responses` (prompt, continuation) records of the training split."""
    from rlhfkit.tasks import kindly

    recs = kindly.prompt_records("train")
    idx = rng.permutation(len(recs))[:n_responses]
    return [recs[i]["prompt"] for i in idx], [recs[i]["completion"] for i in idx]


def _pairs(rng: np.random.Generator, prompts: list[str], responses: list[str], n: int):
    """`n` distinct pairs (i, j), i != j, of candidates; the prompt is response i's own."""
    seen, out = set(), []
    while len(out) < n:
        i, j = (int(x) for x in rng.integers(0, len(responses), size=2))
        if i != j and (i, j) not in seen and (j, i) not in seen:
            seen.add((i, j))
            out.append((i, j))
    return [prompts[i] for i, _ in out], [responses[i] for i, _ in out], [responses[j] for _, j in out]


def _curve(strategy: str, xa, xb, labels: np.ndarray, test_diff: np.ndarray, test_sign: np.ndarray,
           seed: int, seed_labels: int, batch: int, budget: int) -> list[tuple[int, float]]:
    from scipy import sparse

    from rlhfkit.feedback.active import EPS, HashedEnsemble

    rng = np.random.default_rng(seed)
    n = len(labels)
    chosen = list(rng.permutation(n)[:seed_labels])
    remaining = np.setdiff1d(np.arange(n), chosen)
    curve = []
    while True:
        idx = np.asarray(chosen)
        lab = labels[idx]
        keep = lab != 0.5  # a tie carries no order; the label was still paid for
        sign = np.where(lab[keep] == 1.0, 1.0, -1.0)
        diff = sparse.diags(sign) @ (xa[idx[keep]] - xb[idx[keep]])
        model = HashedEnsemble(members=5, dim=xa.shape[1], seed=seed).fit_features(diff)
        pred = model.feature_scores(test_diff).mean(0)
        curve.append((len(chosen), float(np.mean(np.sign(pred) == test_sign))))
        if len(chosen) >= budget or len(remaining) == 0:
            return curve
        take = min(batch, len(remaining))
        if strategy == "random":
            pick = rng.choice(remaining, size=take, replace=False)
        else:
            d = model.feature_scores(xa[remaining]) - model.feature_scores(xb[remaining])
            z = np.abs(d.mean(0)) / (d.std(0) + EPS)
            pick = remaining[np.argsort(z, kind="stable")[:take]]
        chosen += list(pick)
        remaining = np.setdiff1d(remaining, pick)


def _needed(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((n for n, acc in curve if acc >= target), None)


def run(quick: bool = False) -> dict:
    from rlhfkit.feedback.active import hashed_features
    from rlhfkit.judges import GoldPanel, SimulatedAnnotators

    seeds = [0, 1] if quick else [0, 1, 2, 3, 4]
    n_responses = 300
    pool_size, test_size = (1500, 1000) if quick else (3000, 2000)
    seed_labels, batch, budget = (20, 20, 200) if quick else (20, 20, 600)
    min_gap = 0.05
    panel = GoldPanel()
    dim = 2**12

    results: dict[str, list] = {"random": [], "uncertainty": []}
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        cp, cr = _candidates(rng, n_responses)
        pp, pa, pb = _pairs(rng, cp, cr, pool_size + test_size)
        tp, ta, tb = pp[pool_size:], pa[pool_size:], pb[pool_size:]
        pp, pa, pb = pp[:pool_size], pa[:pool_size], pb[:pool_size]
        gap = panel.score(tp, ta) - panel.score(tp, tb)
        keep = np.abs(gap) >= min_gap
        test_diff = hashed_features([x for x, k in zip(ta, keep) if k], dim) - \
            hashed_features([x for x, k in zip(tb, keep) if k], dim)
        test_sign = np.sign(gap[keep])
        annot = SimulatedAnnotators(panel, seed=seed)
        labels = np.array([r["label"] for r in annot.compare(pp, pa, pb)])
        xa, xb = hashed_features(pa, dim), hashed_features(pb, dim)
        for strategy in results:
            curve = _curve(strategy, xa, xb, labels, test_diff, test_sign, seed, seed_labels, batch, budget)
            results[strategy].append(curve)

    out: dict = {"reward_model": "HashedEnsemble: 5 bootstrap linear Bradley-Terry models on 2^12 hashed "
                                 "unigram+bigram+length-bin features (rlhfkit.feedback.active)",
                 "annotators": "rlhfkit.judges.SimulatedAnnotators(GoldPanel(), beta=10, tie_margin=0.02)",
                 "seeds": seeds, "candidate_responses": n_responses, "pool_pairs": pool_size,
                 "test_pairs_max": test_size, "min_gold_gap": min_gap,
                 "seed_labels": seed_labels, "batch": batch, "budget": budget}
    for strategy, curves in results.items():
        accs = np.array([[acc for _, acc in c] for c in curves])
        sizes = [n for n, _ in curves[0]]
        needed = {}
        for t in TARGETS:
            per_seed = [_needed(c, t) for c in curves]
            reached = [x for x in per_seed if x is not None]
            needed[f"{t:.2f}"] = {"mean_labels": float(np.mean(reached)) if len(reached) == len(seeds) else None,
                                  "per_seed": per_seed}
        out[strategy] = {"labels": sizes, "mean_gold_accuracy": [round(float(x), 4) for x in accs.mean(0)],
                         "final_gold_accuracy": round(float(accs[:, -1].mean()), 4), "labels_to_target": needed}
    # headline: the highest target both strategies reach on every seed, and the label ratio
    for t in sorted(TARGETS, reverse=True):
        r = out["random"]["labels_to_target"][f"{t:.2f}"]["mean_labels"]
        u = out["uncertainty"]["labels_to_target"][f"{t:.2f}"]["mean_labels"]
        if r is not None and u is not None:
            out.update(target_accuracy=t, labels_random=r, labels_uncertainty=u,
                       label_savings=round(1 - u / r, 4))
            break
    else:
        out.update(target_accuracy=None, labels_random=None, labels_uncertainty=None, label_savings=None)
    return out
