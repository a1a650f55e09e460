"""ILQL against DPO and KTO on the same rated SFT samples of the bundled task (`rlhfkit ilql`, docs/ilql.md).

1. SFT policy: the cached one of benchmarks.common.sft_policy.
2. Data: two temperature-1 SFT samples for each of PROMPTS training prompts, each scored by the gold
   panel (a scalar rating in [-1, 1]).
3. ILQL on every sample with its score; DPO (sigmoid) and KTO on the same samples as pairs, the
   better-scored one chosen (equal scores and empty responses left out); KTO sees each pair as one desirable and one
   undesirable example (rlhfkit dpo --loss kto).
4. Gold win rate against SFT on EVAL_PROMPTS held-out prompts, one temperature-1 sample each, ties
   half, 95 % bootstrap interval; ILQL decoded with its heads at each beta of BETAS (beta 0 is its LM
   alone, the behaviour policy pi_beta).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks.common import WORK, sft_policy, stamp

OUT = WORK / "ilql_quality"
PROMPTS, EVAL_PROMPTS, MAX_NEW_TOKENS, BETAS = 768, 256, 24, (0.0, 1.0, 4.0)
# trlX's ILQL defaults except the target heads' Polyak rate: trlX's 0.001 every 5 steps moves them
# by under 5 % in this run's ~200 steps, leaving the decoding rule to the heads' random start. One
# epoch at 5e-5 left the Q heads near uniform (win rate 0.500 at every beta); 2 epochs at 3e-4 here
ILQL = dict(tau=0.7, gamma=0.99, cql_scale=0.1, awac_scale=1.0, alpha=0.05, target_sync_steps=1, two_qs=True,
            learning_rate=3e-4, per_device_train_batch_size=16, num_train_epochs=2.0, lr_scheduler_type="constant",
            warmup_steps=0, max_completion_length=MAX_NEW_TOKENS + 1, report_to="jsonl", progress=False,
            logging_steps=10, seed=0)
DPO = {"sigmoid": dict(beta=0.1, learning_rate=1e-3), "kto": dict(beta=0.1, learning_rate=2e-4)}


def rated_samples(sft: str, root: Path) -> tuple[str, str, dict]:
    """(rated.jsonl for ILQL, pairs.jsonl for DPO/KTO, counts), cached."""
    from rlhfkit.judges import GoldPanel
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout import generate
    from rlhfkit.tasks import kindly

    rated, pairs, counts = root / "rated.jsonl", root / "pairs.jsonl", root / "counts.json"
    if counts.is_file():
        return str(rated), str(pairs), json.loads(counts.read_text())
    prompts = kindly.prompts("train")[:PROMPTS]
    tok = load_tokenizer(sft)
    with torch.no_grad():
        roll = generate(load_policy(sft, trainable=False).eval(), tok, prompts, MAX_NEW_TOKENS, num_samples=2,
                        batch_size=256, seed=11)
    rows_p = [prompts[i] for i in roll.prompt_index.tolist()]
    scores = GoldPanel().score(rows_p, roll.responses)
    recs = [{"prompt": p, "completion": r, "reward": float(s)} for p, r, s in zip(rows_p, roll.responses, scores)]
    pair_recs = []
    for a, b in zip(recs[0::2], recs[1::2]):
        if a["reward"] != b["reward"] and a["completion"].strip() and b["completion"].strip():
            hi, lo = (a, b) if a["reward"] > b["reward"] else (b, a)
            pair_recs.append({"prompt": a["prompt"], "chosen": hi["completion"], "rejected": lo["completion"]})
    root.mkdir(parents=True, exist_ok=True)
    rated.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_recs))
    info = {"samples": len(recs), "pairs": len(pair_recs), "mean_gold_of_samples": float(scores.mean())}
    counts.write_text(json.dumps(info))
    return str(rated), str(pairs), info


def train_ilql(sft: str, data: str, out: Path, quick: bool) -> tuple[str, dict]:
    from rlhfkit.recipes import ilql

    t0 = time.perf_counter()
    res = ilql.main(ilql.Config(model=sft, dataset=data, output_dir=str(out), overwrite=True,
                                **dict(ILQL, max_steps=2 if quick else -1)))
    return str(out / "final"), {"steps": res["steps"], "train_seconds": round(time.perf_counter() - t0, 1),
                                "final_losses": {k: res[k] for k in ("loss_q", "loss_v", "loss_cql", "loss_awac")}}


def train_dpo(loss: str, sft: str, pairs: str, out: Path, quick: bool) -> tuple[str, dict]:
    from rlhfkit.recipes import dpo

    t0 = time.perf_counter()
    res = dpo.main(dpo.Config(model=sft, dataset=pairs, loss=loss, output_dir=str(out), overwrite=True,
                              per_device_train_batch_size=16, num_train_epochs=1.0, max_steps=2 if quick else -1,
                              max_length=96, lr_scheduler_type="linear", warmup_steps=0 if quick else 5,
                              report_to="jsonl", progress=False, seed=0, **DPO[loss]))
    return str(out / "final"), {"steps": res["steps"], "train_seconds": round(time.perf_counter() - t0, 1)}


def win_rates(policies: dict[str, torch.nn.Module], sft: str) -> dict:
    from rlhfkit.eval.run_eval import evaluate
    from rlhfkit.judges import GoldPanel
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.tasks import kindly

    tok, ref = load_tokenizer(sft), load_policy(sft, trainable=False).eval()
    prompts, out, ref_rollout = kindly.prompts("eval")[:EVAL_PROMPTS], {}, None
    for name, policy in policies.items():
        with torch.no_grad():
            m, _ = evaluate(policy, ref, tok, prompts, GoldPanel(), max_new_tokens=MAX_NEW_TOKENS, seed=1234,
                            n_boot=1000, reference_rollout=ref_rollout)
        ref_rollout = m["_reference"]["rollout"]
        out[name] = {"gold_win_rate": m["win_rate"]["mean"], "ci": [m["win_rate"]["lo"], m["win_rate"]["hi"]],
                     "kl": m["kl"]["mean"], "gold": m["gold"]["mean"], "gold_sft": m["gold_reference"]["mean"],
                     "mean_length": m["mean_length"], "distinct_1": m["distinct_1"]}
        print(f"ilql_quality[{name}]: win rate {out[name]['gold_win_rate']:.3f} {out[name]['ci']}, KL {out[name]['kl']:.2f}")
    return out


def run(quick: bool = False) -> dict:
    from rlhfkit.models import load_policy
    from rlhfkit.models.ilql import load_ilql_policy

    torch.set_num_threads(1)  # a shared 2-core machine
    global PROMPTS, EVAL_PROMPTS
    if quick:
        PROMPTS, EVAL_PROMPTS = 32, 16
    t0 = time.perf_counter()
    sft = str(sft_policy())
    root = OUT / (f"quick-{stamp(sft)}" if quick else stamp(sft))
    rated, pairs, counts = rated_samples(sft, root)
    ilql_path, ilql_info = train_ilql(sft, rated, root / "ilql", quick)
    trained = {loss: train_dpo(loss, sft, pairs, root / loss, quick) for loss in DPO}
    policies = {f"ilql_beta{b:g}": load_ilql_policy(ilql_path, beta=b) for b in BETAS}
    policies.update({("dpo" if k == "sigmoid" else k): load_policy(p, trainable=False).eval() for k, (p, _) in trained.items()})
    wr = win_rates(policies, sft)
    best_beta = max(BETAS, key=lambda b: wr[f"ilql_beta{b:g}"]["gold_win_rate"])
    return {
        "gold_win_rate_ilql": wr[f"ilql_beta{BETAS[-1]:g}"]["gold_win_rate"], "ilql_beta": BETAS[-1],
        "gold_win_rate_ilql_best_beta": {"beta": best_beta, **wr[f"ilql_beta{best_beta:g}"]},
        "gold_win_rate_dpo": wr["dpo"]["gold_win_rate"], "gold_win_rate_kto": wr["kto"]["gold_win_rate"],
        "policies": wr, "data": counts, "ilql_training": ilql_info,
        "dpo_training": {k: v for k, (_, v) in trained.items()},
        "settings": {"ilql": ILQL, "dpo": DPO, "prompts": PROMPTS, "eval_prompts": EVAL_PROMPTS, "betas": list(BETAS)},
        "protocol": "one temperature-1 sample per held-out prompt from policy and SFT; gold panel; ties half",
        "minutes": round((time.perf_counter() - t0) / 60, 2),
    }
