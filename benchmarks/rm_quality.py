"""Reward-model quality on the bundled task, measured against the gold panel.

1. The SFT policy (`benchmarks.common.sft_policy()`) samples K_TRAIN responses for every train
   prompt and K_EVAL for every eval prompt (cached under benchmarks/work/rm_quality/). While the
   bundled base checkpoint is not shipped there is no SFT policy; the benchmark then uses each
   prompt's real continuation plus continuations of other sentences (what the SFT policy
   imitates), starts the reward model from a random 2-layer Llama, and says so in the JSON.
2. Train pairs: each prompt's distinct non-empty samples are paired off at random, so no
   response is in two pairs (K_TRAIN = 16 gives about 24k pairs from the 3,106 train prompts).
   At a fixed label budget this shows the RM twice as many distinct responses as labelling all
   C(4, 2) pairs of 4 samples, and measured better (docs/reward.md). Held-out pairs: all C(K_EVAL, 2)
   pairs of every eval prompt. Each pair is labelled by the simulated annotators (one rater of
   the panel per comparison, Bradley-Terry noise, ties when the rater's scores are close).
3. Reward models start from the SFT policy and train with `rlhfkit reward` (soft-label
   Bradley-Terry, a tie = 0.5, EPOCHS epochs) on the first 1k, 3k and 10k labelled train pairs
   and on all of them; all of them also train a 3-model ensemble (seeds and data orders),
   whose member 0 is the single model of that size. The headline (`gold_accuracy`,
   `label_accuracy`, `ece`) is the ensemble, the reward RL would use; `single` and the curves
   over label counts are single models.
4. Held-out pairs from the eval prompts (disjoint from the train prompts) are scored:
   `gold_accuracy` = agreement with the gold panel on pairs whose gold gap is >= GOLD_GAP
   (the panel separates them clearly), `label_accuracy` = RewardBench-style strict accuracy
   against the annotators' own decisive labels, `ece` = calibration of sigmoid(delta r).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import WORK, locked, sft_policy, stamp

K_TRAIN, K_EVAL, MAX_NEW_TOKENS, GOLD_GAP, SEED = 16, 4, 24, 0.1, 0
LABEL_SIZES = (1000, 3000, 10000)  # plus every labelled train pair, the headline model
EPOCHS, LEARNING_RATE = 2.0, 1e-3
ENSEMBLE = 3


def _policy() -> Path | None:
    """The bundled task's SFT policy, or None while the bundled base checkpoint is not shipped."""
    from rlhfkit.tasks import kindly

    try:
        kindly.base_model_path()
    except FileNotFoundError:
        return None
    return sft_policy()


def _corpus_samples(split: str, n_prompts: int | None, k: int) -> list[dict]:
    """Stand-in for policy samples: each prompt's real continuation plus k-1 continuations of
    other sentences (what an SFT policy imitates), drawn with a fixed seed."""
    from rlhfkit.tasks import kindly

    recs = kindly.prompt_records(split)[:n_prompts]
    rng = np.random.default_rng(SEED + (split == "eval"))
    out = []
    for i, r in enumerate(recs):
        others = rng.choice(len(recs) - 1, size=k - 1, replace=False)
        others = [j + (j >= i) for j in others]
        out.append({"prompt": r["prompt"], "responses": [r["completion"]] + [recs[j]["completion"] for j in others]})
    return out


def _fresh_model(work: Path) -> Path:
    """A randomly initialised Llama (hidden 128, 2 layers) for when no pretrained policy exists."""
    from rlhfkit.models import load_tokenizer, save_model, tiny_llama

    path = work / "init"
    if not (path / "config.json").is_file():
        tok = load_tokenizer("kindly:tokenizer")
        save_model(tiny_llama(len(tok), hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                              tokenizer=tok, seed=SEED), tok, path)
    return path


def _samples(policy: Path | None, split: str, n_prompts: int | None, k: int) -> list[dict]:
    """k sampled responses per prompt of `split`, cached per policy and settings."""
    import torch

    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout import generate
    from rlhfkit.tasks import kindly

    if policy is None:
        return _corpus_samples(split, n_prompts, k)
    prompts = kindly.prompts(split)[:n_prompts]
    cache = WORK / "rm_quality" / f"samples-{split}-{len(prompts)}x{k}-{MAX_NEW_TOKENS}-{stamp(policy)}.json"
    with locked("rm_quality_samples"):
        if cache.is_file():
            return json.loads(cache.read_text())
        tok = load_tokenizer(str(policy))
        model = load_policy(str(policy), trainable=False).eval()
        with torch.no_grad():
            roll = generate(model, tok, prompts, MAX_NEW_TOKENS, temperature=1.0, num_samples=k,
                            batch_size=256, seed=SEED + (split == "eval"))
        out = [{"prompt": p, "responses": roll.responses[i * k:(i + 1) * k]} for i, p in enumerate(prompts)]
        from rlhfkit.train.runs import atomic_write_json

        atomic_write_json(cache, out)
        return out


def _label(groups: list[dict], seed: int, pairing: str) -> tuple[list[dict], dict]:
    """Pairs of a prompt's samples, labelled by one simulated annotator each.

    pairing="all": every C(K, 2) pair of distinct non-empty samples (identical and empty ones
    counted in the skips); pairing="disjoint": the distinct non-empty samples paired off in a
    random order, each in one pair (duplicates and empties counted, an odd one out left over).
    """
    from rlhfkit.judges import GoldPanel
    from rlhfkit.judges.annotators import SimulatedAnnotators

    rng = np.random.default_rng(seed)
    prompts, a, b, skipped = [], [], [], {"identical": 0, "empty": 0}
    for g in groups:
        resp = g["responses"]
        if pairing == "all":
            candidates = [(resp[i], resp[j]) for i, j in itertools.combinations(range(len(resp)), 2)]
        else:
            keep = [r for r in dict.fromkeys(resp) if r.strip()]
            skipped["empty"] += sum(1 for r in resp if not r.strip())
            skipped["identical"] += sum(1 for r in resp if r.strip()) - len(keep)
            order = rng.permutation(len(keep))
            candidates = [(keep[i], keep[j]) for i, j in zip(order[0::2], order[1::2])]
        for ra, rb in candidates:
            if not ra.strip() or not rb.strip():
                skipped["empty"] += 1
                continue
            if ra == rb:
                skipped["identical"] += 1
                continue
            if rng.random() < 0.5:  # which side is shown first carries no information
                ra, rb = rb, ra
            prompts.append(g["prompt"])
            a.append(ra)
            b.append(rb)
    ann = SimulatedAnnotators(GoldPanel(), seed=seed)
    labels = ann.compare(prompts, a, b)
    records = [{"prompt": p, "chosen": x, "rejected": y, "label": lab["label"], "annotator_id": lab["annotator_id"]}
               for p, x, y, lab in zip(prompts, a, b, labels)]
    order = rng.permutation(len(records))
    return [records[i] for i in order], skipped


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    from rlhfkit.train.runs import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _train(policy: Path, data: Path, out: Path, ensemble: int) -> dict:
    from rlhfkit.recipes.reward import Config, main

    cfg = Config(model=str(policy), dataset=str(data), output_dir=str(out), loss="soft_label",
                 per_device_train_batch_size=32, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=10,
                 num_train_epochs=EPOCHS, seed=SEED, eval_fraction=0.0, report_to="jsonl",
                 progress=False, logging_steps=50, max_length=96, ensemble_size=ensemble, weight_decay=0.01)
    t0 = time.perf_counter()
    res = main(cfg, printer=lambda m: print(m, flush=True))
    res["train_seconds"] = time.perf_counter() - t0
    return res


def _evaluate(model_path: str, pairs: list[dict], gold, plot: Path | None = None) -> dict:
    from rlhfkit.eval.rm_eval import evaluate_pairs
    from rlhfkit.models.reward import RewardScorer

    scorer = RewardScorer(model_path, normalize=False, batch_size=256, max_length=96)
    res = evaluate_pairs(lambda p, r: scorer.score_with_uncertainty(p, r)[0], pairs, gold, GOLD_GAP, 10, plot)
    res.pop("calibration_bins", None)
    res.pop("annotators", None)
    return res


def run(quick: bool = False) -> dict:
    import torch

    from rlhfkit.data.preference import read_comparisons
    from rlhfkit.eval.rm_eval import comparison_pairs
    from rlhfkit.judges import GoldPanel

    # one thread: on the shared 2-core machine two OpenMP threads per process oversubscribe
    # the cores and run an order of magnitude slower
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    policy = _policy()
    n_train_prompts, n_eval_prompts = (300, 100) if quick else (None, None)
    train_groups = _samples(policy, "train", n_train_prompts, K_TRAIN)
    eval_groups = _samples(policy, "eval", n_eval_prompts, K_EVAL)
    t_sample = time.perf_counter() - t0
    work = WORK / "rm_quality" / ("quick" if quick else "full")
    start = policy if policy is not None else _fresh_model(work)
    train_recs, train_skipped = _label(train_groups, SEED, "disjoint")
    eval_recs, eval_skipped = _label(eval_groups, SEED + 1, "all")
    heldout = comparison_pairs(read_comparisons(eval_recs))
    gold = GoldPanel()
    sizes = (300, 1000) if quick else LABEL_SIZES
    if len(train_recs) < sizes[-1]:
        raise RuntimeError(f"only {len(train_recs)} labelled train pairs; need {sizes[-1]}")
    if len(train_recs) > sizes[-1]:
        sizes = (*sizes, len(train_recs))
    curve, runs = {}, {}
    for n in sizes:
        data = _write_jsonl(work / f"train-{n}.jsonl", train_recs[:n])
        ens = 1 if quick or n != sizes[-1] else ENSEMBLE
        res = _train(start, data, work / f"rm-{n}", ens)
        single = str(work / f"rm-{n}" / "final") if ens == 1 else str(work / f"rm-{n}" / "final" / "member-0")
        runs[n] = {"single": _evaluate(single, heldout, gold, work / f"rm-{n}-reliability.png" if n == sizes[-1] else None),
                   "train_seconds": res["train_seconds"], "counts": res["counts"], "skipped": res["skipped"]}
        if ens > 1:
            runs[n]["ensemble"] = _evaluate(str(work / f"rm-{n}" / "final"), heldout, gold)
        curve[str(n)] = runs[n]["single"]["gold_accuracy"]
    head = runs[sizes[-1]]
    best = head.get("ensemble") or head["single"]
    out = {
        "gold_accuracy": best["gold_accuracy"],
        "label_accuracy": best["accuracy"],
        "ece": best["ece"],
        "headline_model": f"ensemble of {ENSEMBLE} reward models (mean reward)" if "ensemble" in head else "single reward model",
        "num_train_labels": sizes[-1],
        "gold_gap": GOLD_GAP,
        "num_heldout_pairs": best["num_pairs"],
        "num_heldout_gold_clear": best["num_gold_clear"],
        "heldout_label_gold_agreement": best.get("label_gold_agreement"),
        "gold_accuracy_vs_labels": curve,
        "label_accuracy_vs_labels": {str(n): runs[n]["single"]["accuracy"] for n in sizes},
        "ece_vs_labels": {str(n): runs[n]["single"]["ece"] for n in sizes},
        "single": head["single"],
        "ensemble": head.get("ensemble"),
        "ensemble_size": ENSEMBLE if "ensemble" in head else 1,
        "train_seconds": {str(n): round(runs[n]["train_seconds"], 1) for n in sizes},
        "sample_seconds": round(t_sample, 1),
        "truncated_rows": {str(n): runs[n]["counts"].get("truncated_rows", 0) for n in sizes},
        "ties_skipped_in_training": {str(n): runs[n]["counts"].get("ties_skipped", 0) for n in sizes},
        "pairs_not_labelled": {"train": train_skipped, "eval": eval_skipped},
        "samples_per_prompt": {"train": K_TRAIN, "eval": K_EVAL},
        "pairing": {"train": "disjoint (each response in one pair)", "eval": "all pairs of a prompt's samples"},
        "epochs": EPOCHS,
        "learning_rate": LEARNING_RATE,
        "num_labelled_train_pairs": len(train_recs),
        "policy": str(policy) if policy is not None else None,
        "responses": "SFT policy samples" if policy is not None else
                     "corpus continuations (no SFT policy: the bundled base checkpoint is not shipped yet)",
        "reward_model_init": str(start),
        "target_gold_accuracy": 0.80,
        "note": "held-out pairs come from eval prompts disjoint from the train prompts; gold is never shown to the RM",
    }
    return out
