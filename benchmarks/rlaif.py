"""RLAIF on the bundled task: how far AI labels stand from the human panel, and what that costs.

1. policy_0 = the bundled SFT policy (benchmarks.common.sft_policy); two temperature-1 samples
   for each of PROMPTS training prompts.
2. Each labeller labels every pair: simulated human annotators (one panel rater per pair,
   Bradley-Terry noise, ties), and the AI labellers afinn, textblob, their ensemble, and RL-CAI
   with configs/constitution_kindly.md (one principle drawn per pair, each scored by its own
   principle-specific labeller). Agreement and Cohen's kappa are measured against the gold
   panel's noiseless preference (its mean score; equal scores left out) on the pairs both
   decided; ``coverage`` is the share of gold-decided pairs the labeller decided.
3. Same budget: DPO from policy_0 on N pairs labelled by the AI labeller ``AI_LABELLER``, on N
   pairs labelled by the constitution (RL-CAI) and on N pairs labelled by the simulated humans,
   N = the smallest of the three label counts (the first N decided pairs in prompt order),
   identical hyper-parameters and steps.
4. Gold win rate of each DPO policy against policy_0 on EVAL_PROMPTS held-out prompts (one
   sample each, gold panel, ties half), with 95% bootstrap intervals.

JSON: ``labellers`` {name: {agreement, kappa, decided, coverage}}, ``gold_win_rate_ai`` and
``gold_win_rate_human`` ({mean, lo, hi}), ``gold_win_rate_cai``, plus KL and the training details.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import CONFIGS, WORK, sft_policy

PROMPTS = 1536
EVAL_PROMPTS = 256
MAX_NEW_TOKENS = 20
AI_LABELLER = "afinn"
LABELLERS = ("afinn", "textblob", "ensemble:afinn+textblob")
DPO = dict(beta=0.1, learning_rate=2e-4, per_device_train_batch_size=16, num_train_epochs=2.0, max_length=96,
           lr_scheduler_type="linear", warmup_steps=10)


def sample_pairs(sft: str, n: int) -> tuple[list[str], list[str], list[str]]:
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout import generate
    from rlhfkit.tasks import kindly

    prompts = kindly.prompts("train")
    order = np.random.default_rng(0).permutation(len(prompts))[:n]
    prompts = [prompts[i] for i in order]
    tok = load_tokenizer(sft)
    policy = load_policy(sft, trainable=False).eval()
    roll = generate(policy, tok, prompts, MAX_NEW_TOKENS, num_samples=2, seed=0)
    a, b = roll.responses[0::2], roll.responses[1::2]
    keep = [i for i in range(n) if a[i].strip() and b[i].strip() and a[i] != b[i]]
    return [prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep]


def label_all(prompts, a, b) -> tuple[dict[str, list], dict]:
    """{labeller: [label or None per pair]} and the judges' counters."""
    from rlhfkit.judges import load_judge
    from rlhfkit.judges.constitution import constitution_labeller, load_constitution
    from rlhfkit.judges.sources import SimulatedSource

    labels: dict[str, list] = {}
    counters = {}
    labels["simulated_human"] = [x["label"] for x in SimulatedSource(beta=10.0, seed=0).compare(prompts, a, b)]
    for spec in LABELLERS:
        judge = load_judge(spec)
        labels[spec] = [v.label for v in judge.compare(prompts, a, b)]
        counters[spec] = dict(judge.stats)
    cai = constitution_labeller(load_constitution(CONFIGS / "constitution_kindly.md"), None, seed=0)
    labels["constitution_kindly"] = [x["label"] for x in cai(prompts, a, b)]
    return labels, counters


def preference_file(path: Path, prompts, a, b, labels, n: int, name: str) -> int:
    """The first n decided pairs as TRL preference records; returns how many were written."""
    rows = []
    for p, x, y, lab in zip(prompts, a, b, labels):
        if lab is None or lab == 0.5:
            continue
        c, r = (x, y) if lab == 1.0 else (y, x)
        rows.append({"prompt": p, "chosen": c, "rejected": r, "label": 1.0, "tie": False, "annotator_id": name})
        if len(rows) == n:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def train_and_evaluate(sft: str, prefs: Path, out: Path, quick: bool, ref_rollout=None) -> tuple[dict, object]:
    from benchmarks.dpo_quality import evaluate_policy
    from rlhfkit.recipes import dpo
    from rlhfkit.tasks import kindly

    hp = dict(DPO, per_device_train_batch_size=2) if quick else DPO
    cfg = dpo.Config(model=sft, dataset=str(prefs), loss="sigmoid", output_dir=str(out), max_steps=2 if quick else -1,
                     logging_steps=10, report_to="jsonl", progress=False, seed=0, **hp)
    t0 = time.perf_counter()
    res = dpo.main(cfg)
    prompts = kindly.prompts("eval")[: 16 if quick else EVAL_PROMPTS]
    ev, ref_rollout = evaluate_policy(str(out / "final"), sft, prompts, MAX_NEW_TOKENS, ref_rollout)
    ev.update(train_seconds=round(time.perf_counter() - t0, 1), steps=res["steps"])
    return ev, ref_rollout


def run(quick: bool = False) -> dict:
    from rlhfkit.eval.agreement import binary_agreement
    from rlhfkit.judges import GoldPanel

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sft = str(sft_policy())
    root = WORK / ("rlaif_quick" if quick else "rlaif")
    prompts, a, b = sample_pairs(sft, 32 if quick else PROMPTS)
    panel = GoldPanel()
    ga, gb = panel.score(prompts, a), panel.score(prompts, b)
    gold = [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(ga, gb)]
    labels, counters = label_all(prompts, a, b)
    labellers = {}
    for name, labs in labels.items():
        res = binary_agreement(labs, gold)
        res["ties"] = sum(x == 0.5 for x in labs)
        res["abstained"] = sum(x is None for x in labs)
        labellers[name] = res
        print(f"rlaif: {name:<26} agreement {res['agreement']:.3f} kappa {res['kappa']:.3f} "
              f"({res['decided']} pairs, coverage {res['coverage']:.2f})")
    trained = {"human": "simulated_human", "ai": AI_LABELLER, "cai": "constitution_kindly"}
    n = min(sum(x in (0.0, 1.0) for x in labels[k]) for k in trained.values())
    counts = {name: preference_file(root / f"prefs_{name}.jsonl", prompts, a, b, labels[k], n, k)
              for name, k in trained.items()}
    human, ref = train_and_evaluate(sft, root / "prefs_human.jsonl", root / "dpo_human", quick)
    ai, _ = train_and_evaluate(sft, root / "prefs_ai.jsonl", root / "dpo_ai", quick, ref)
    cai, _ = train_and_evaluate(sft, root / "prefs_cai.jsonl", root / "dpo_cai", quick, ref)
    for name, ev in (("human", human), ("ai", ai), ("cai (RL-CAI, principle labellers)", cai)):
        print(f"rlaif: DPO on {name} labels: gold win rate {ev['gold_win_rate']:.3f} {ev['win_rate_ci']}, KL {ev['kl']:.2f}")

    def wr(ev):
        return {"mean": ev["gold_win_rate"], "lo": ev["win_rate_ci"][0], "hi": ev["win_rate_ci"][1]}

    return {
        "labellers": labellers,
        "gold_win_rate_ai": wr(ai),
        "gold_win_rate_human": wr(human),
        "gold_win_rate_cai": wr(cai),
        "ai_labeller": AI_LABELLER,
        "pairs_per_policy": counts,
        "pairs_sampled": len(prompts),
        "policy_ai": ai, "policy_human": human, "policy_cai": cai,
        "judge_counters": counters,
        "dpo": DPO,
        "protocol": ("agreement/kappa vs the panel's noiseless preference on pairs both decided; DPO from the SFT "
                     "policy on the same number of AI- and simulated-human-labelled pairs; one temperature-1 sample per "
                     "held-out prompt from policy and SFT, gold panel, ties half, 95% bootstrap intervals"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
