"""Best-of-N over-optimisation curve on the bundled task, and rejection-sampling rounds.

Uses the shared pipeline of `benchmarks/dpo_quality.py` (SFT policy and simulated-annotator
comparisons under benchmarks/work/kindly_pipeline) plus a reward model trained on those
comparisons with `rlhfkit reward` (the same stage as `rlhfkit demo`).

Best-of-N. For each held-out prompt, M SFT samples (temperature 1) are scored by the reward
model (proxy) and the gold panel. For N in {1, 2, 4, 8, 16, 32}, the expected gold and proxy
reward of the proxy's favourite among N is computed exactly over all N-subsets of the M
samples (the unbiased estimator of Nakano et al. 2021 / Gao et al. 2022 sec. 3.1, from
`rlhfkit.eval.overopt`), against

* KL_bon = log N - (N-1)/N (analytic; the x-axis of Gao et al.), and
* the measured KL of best-of-N over the empirical distribution of the M samples (see
  `rlhfkit.recipes.best_of_n`): lower than the bound when samples tie or repeat.

Gao et al. 2022 eq. 1, R(d) = d (alpha - beta d) with d = sqrt(KL), is fitted by least squares
to the gold and to the proxy reward relative to N = 1.

Rejection sampling: `rlhfkit rejection-sampling` for R rounds with the reward model as the
judge (K samples per prompt, keep the best, SFT); after each round the policy is evaluated on
the held-out prompts: gold and proxy of one sample per prompt and the KL to the SFT policy.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.dpo_quality import pipeline, pipeline_root

NS = (1, 2, 4, 8, 16, 32)


def reward_model(quick: bool, pipe: dict) -> str:
    from rlhfkit.config import from_dict
    from rlhfkit.recipes import demo

    root = pipeline_root(quick)
    path = root / "reward" / "final"
    if not (path / "config.json").is_file() and not (path / "ensemble.json").is_file():
        cfg = from_dict(demo.Config, dict(output_dir=str(root), quick=quick, seed=0))  # the demo's RM settings
        path = Path(demo.run_reward(cfg, pipe["sft"], Path(pipe["prefs"]), root))
    return str(path)


def bon_points(sft: str, rm: str, prompts: list[str], M: int, max_new_tokens: int) -> dict:
    from rlhfkit.eval.overopt import bon_sweep, fit_bon
    from rlhfkit.judges import GoldPanel
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.models.reward import RewardScorer
    from rlhfkit.recipes.best_of_n import bon_kl_empirical
    from rlhfkit.rollout import generate

    tok = load_tokenizer(sft)
    policy = load_policy(sft, trainable=False).eval()
    roll = generate(policy, tok, prompts, max_new_tokens, num_samples=M, seed=4321, batch_size=128)
    proxy = np.asarray(RewardScorer(rm).score(roll.prompts, roll.responses)).reshape(len(prompts), M)
    gold = np.asarray(GoldPanel().score(roll.prompts, roll.responses)).reshape(len(prompts), M)
    ns = [n for n in NS if n <= M]
    rows = bon_sweep(proxy, gold, ns)
    for row in rows:
        row["kl_measured"] = float(bon_kl_empirical(proxy, row["n"]).mean())
    kl = [r["kl"] for r in rows]
    return {
        "points": rows,
        "fit_gold": fit_bon(kl, [r["gold_delta"] for r in rows]),
        "fit_proxy": fit_bon(kl, [r["proxy_delta"] for r in rows]),
        "fit_gold_measured_kl": fit_bon([r["kl_measured"] for r in rows], [r["gold_delta"] for r in rows]),
        "samples_per_prompt": M,
        "distinct_responses_per_prompt": float(np.mean([len(set(roll.responses[i * M:(i + 1) * M])) for i in range(len(prompts))])),
    }


def rejection_rounds(sft: str, rm: str, prompts: list[str], quick: bool, max_new_tokens: int) -> list[dict]:
    from rlhfkit.eval.run_eval import evaluate
    from rlhfkit.judges import GoldPanel
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.models.reward import RewardScorer
    from rlhfkit.recipes import rejection_sampling as rs

    out = pipeline_root(quick) / "rejection_sampling"
    cfg = rs.Config(model=sft, judge=f"rm:{rm}", rounds=1 if quick else 3, k=4 if quick else 8,
                    prompts_per_round=16 if quick else 384, max_new_tokens=max_new_tokens, per_device_train_batch_size=16,
                    learning_rate=1e-4, num_train_epochs=1.0, output_dir=str(out), progress=False, report_to="jsonl",
                    resume=True, seed=0)
    res = rs.main(cfg)
    tok = load_tokenizer(sft)
    ref = load_policy(sft, trainable=False).eval()
    judge, scorer = GoldPanel(), RewardScorer(rm)
    rows, ref_roll = [], None
    for r, metrics in enumerate(res["rounds"]):
        policy = load_policy(str(out / f"round-{r}" / "final"), trainable=False).eval()
        m, _ = evaluate(policy, ref, tok, prompts, judge, scorer=scorer, max_new_tokens=max_new_tokens, seed=99,
                        n_boot=200, reference_rollout=ref_roll)
        ref_roll = m["_reference"]["rollout"]
        rows.append({"round": r, "gold": m["gold"]["mean"], "gold_sft": m["gold_reference"]["mean"],
                     "proxy": m["proxy"]["mean"], "proxy_sft": m["proxy_reference"]["mean"], "kl": m["kl"]["mean"],
                     "gold_win_rate": m["win_rate"]["mean"], "train_samples_score_mean": metrics["score_mean"],
                     "train_kept_score_mean": metrics["score_kept"], "sft_loss": metrics["sft_loss"]})
    return rows


def run(quick: bool = False) -> dict:
    from rlhfkit.tasks import kindly

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pipe = pipeline(quick)
    rm = reward_model(quick, pipe)
    prompts = kindly.prompts("eval")[: 8 if quick else 128]
    bon = bon_points(pipe["sft"], rm, prompts, 8 if quick else 64, pipe["max_new_tokens"])
    rounds = rejection_rounds(pipe["sft"], rm, kindly.prompts("eval")[: 8 if quick else 128], quick, pipe["max_new_tokens"])
    return {
        "bon": bon["points"],
        "gao_fit_gold": bon["fit_gold"],
        "gao_fit_proxy": bon["fit_proxy"],
        "gao_fit_gold_measured_kl": bon["fit_gold_measured_kl"],
        "samples_per_prompt": bon["samples_per_prompt"],
        "distinct_responses_per_prompt": bon["distinct_responses_per_prompt"],
        "eval_prompts": len(prompts),
        "rejection_sampling_rounds": rounds,
        "reward_model": rm,
        "base_model": pipe["base"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
