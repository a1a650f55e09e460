"""PPO, GRPO and RLOO against a learned reward model on the bundled task, judged by the gold panel.

1. policy_0 = the bundled SFT policy (`benchmarks.common.sft_policy()`).
2. The reward model (the proxy): policy_0 samples 4 responses per train prompt; every pair
   of a prompt's samples is labelled by the simulated annotators (one rater of the gold panel
   per comparison, Bradley-Terry noise, ties); `rlhfkit reward` (Bradley-Terry) trains on
   them from policy_0's weights. The RM never sees the gold panel. Cached under
   benchmarks/work/ppo_quality/.
3. PPO, GRPO and RLOO each train from policy_0 against that RM, once per seed in SEEDS;
   every figure is the mean over the seeds, with the per-seed values beside it (`*_seeds`).
4. Held-out evaluation on the task's eval prompts (disjoint from the train prompts): the
   policy and policy_0 each sample one response per prompt (same seed, temperature 1);
   `gold_win_rate` = share of prompts where the panel scores the policy's response above
   policy_0's (ties half); `kl` = mean over those responses of the summed per-token
   log pi(y|x) - log pi_0(y|x) in nats; `gold_reward`/`proxy_reward` = mean panel / RM score.
5. `gold_proxy_gap` traces, every few updates, the training batch's mean proxy score and mean
   gold score: rising proxy with flat or falling gold is reward hacking.

Targets (issue 4): PPO gold_win_rate >= 0.75 at kl <= 10 nats within 15 minutes on 2 cores.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import WORK, locked, sft_policy, stamp

SEED, K, MAX_NEW_TOKENS, RM_PAIRS = 0, 4, 24, 6000
SEEDS = (0, 1, 2)  # each algorithm trains once per seed (same SFT policy and RM); figures are means with the spread
OUT = WORK / "ppo_quality"

# each algorithm's settings on top of the shared ones below; chosen once, then fixed (PPO's KL
# coefficient and target re-chosen for the word-level base: with 0.05 / 6.0 its policy ended at
# 11.1 nats, with target 5.0 alone at 11.9, with 0.1 / 5.0 at 8.6)
SHARED = dict(max_completion_length=MAX_NEW_TOKENS, temperature=1.0, eval_prompts="kindly", num_eval_prompts=0,
              report_to="jsonl", sample_every=10, seed=SEED, progress=False, generation_batch_size=256,
              score_norm="none", missing_eos_penalty=1.0)
ALGOS = {
    "ppo": dict(max_steps=36, prompts_per_step=64, per_device_train_batch_size=32, num_mini_batches=2, num_ppo_epochs=4,
                learning_rate=3e-4, kl_coef=0.1, target_kl=5.0, kl_horizon=10000, vf_coef=0.5, lam=0.95,
                gamma=1.0),
    "grpo": dict(max_steps=36, prompts_per_step=16, num_generations=4, per_device_train_batch_size=32, num_mini_batches=2,
                 num_ppo_epochs=2, learning_rate=3e-4, beta=0.2, loss_type="sequence"),
    "rloo": dict(max_steps=36, prompts_per_step=16, num_generations=4, per_device_train_batch_size=32, num_mini_batches=2,
                 num_ppo_epochs=2, learning_rate=3e-4, beta=0.05),
}


def preference_data(policy: Path, n_pairs: int) -> Path:
    """Simulated-annotator labels on pairs of policy_0's samples (cached per policy)."""
    import torch

    from rlhfkit.judges import GoldPanel
    from rlhfkit.judges.annotators import SimulatedAnnotators
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout import generate
    from rlhfkit.tasks import kindly
    from rlhfkit.train.runs import atomic_path

    path = OUT / f"prefs-{n_pairs}-{stamp(policy)}.jsonl"
    if path.is_file():
        return path
    prompts = kindly.prompts("train")[: n_pairs // 6 + 1]  # C(4, 2) = 6 pairs per prompt
    tok = load_tokenizer(str(policy))
    model = load_policy(str(policy), trainable=False).eval()
    with torch.no_grad():
        roll = generate(model, tok, prompts, MAX_NEW_TOKENS, num_samples=K, batch_size=256, seed=SEED + 17)
    rng = np.random.default_rng(SEED)
    ps, a, b = [], [], []
    for i, p in enumerate(prompts):
        group = roll.responses[i * K:(i + 1) * K]
        for x, y in itertools.combinations(group, 2):
            if x.strip() and y.strip() and x != y:
                if rng.random() < 0.5:
                    x, y = y, x
                ps.append(p)
                a.append(x)
                b.append(y)
    labels = SimulatedAnnotators(GoldPanel(), seed=SEED).compare(ps, a, b)
    recs = [{"prompt": p, "chosen": x, "rejected": y, "label": lab["label"]} for p, x, y, lab in zip(ps, a, b, labels)]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs[:n_pairs]))
    return path


def reward_model(policy: Path, quick: bool) -> Path:
    """The proxy RM, trained with `rlhfkit reward` on simulated labels (cached)."""
    from rlhfkit.recipes import reward

    n = 1500 if quick else RM_PAIRS
    out = OUT / f"rm-{n}-{stamp(policy)}"
    with locked("ppo_quality_rm"):
        if not (out / "final" / "model.safetensors").is_file():
            data = preference_data(policy, n)
            cfg = reward.Config(model=str(policy), dataset=str(data), output_dir=str(out), loss="bradley_terry",
                                per_device_train_batch_size=32, learning_rate=3e-4, lr_scheduler_type="cosine", warmup_steps=10,
                                num_train_epochs=2.0, seed=SEED, eval_fraction=0.0, report_to="jsonl", progress=False,
                                logging_steps=50, max_length=96, weight_decay=0.01)
            reward.main(cfg, printer=lambda m: None)
    return out / "final"


def _finished(out: Path, cfg) -> tuple[dict | None, float]:
    """A completed run of exactly this config: its result and its minutes, from the run
    folder's start time (meta.json) to the moment final_metrics.json was written."""
    import dataclasses
    from datetime import datetime

    import yaml

    done, meta, saved = out / "final_metrics.json", out / "meta.json", out / "config.yaml"
    if not (done.is_file() and meta.is_file() and saved.is_file()):
        return None, 0.0
    if yaml.safe_load(saved.read_text()) != yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)):
        return None, 0.0
    started = datetime.strptime(json.loads(meta.read_text())["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    return json.loads(done.read_text()), (done.stat().st_mtime - started) / 60


def train(algo: str, policy: Path, rm: Path, quick: bool, seed: int = SEED) -> dict:
    import importlib

    from rlhfkit.eval.overopt import read_alarms
    from rlhfkit.train.runs import read_metrics

    mod = importlib.import_module(f"rlhfkit.recipes.{algo}")
    out = OUT / ("quick" if quick else "full") / f"{algo}-seed{seed}"
    kw = {**SHARED, **ALGOS[algo], "seed": seed}
    if quick:
        kw.update(max_steps=4, num_eval_prompts=64)
    # overwrite: a run of other settings may hold the folder (a finished run of these is reused)
    cfg = mod.Config(model=str(policy), reward_model=str(rm), output_dir=str(out), overwrite=True, **kw)
    res, minutes = _finished(out, cfg)
    if res is None:
        for stale in ("metrics.jsonl", "samples.jsonl"):
            (out / stale).unlink(missing_ok=True)
        t0 = time.perf_counter()
        res = mod.main(cfg)
        minutes = (time.perf_counter() - t0) / 60
    rows = read_metrics(out)
    every = max(1, len(rows) // 10)
    gap = [{"step": r["step"], "proxy_reward": round(r["proxy_reward"], 4), "gold_reward": round(r["gold_reward"], 4),
            "kl": round(r["kl"], 3)} for r in rows[::every]]
    ev = res["eval"]
    # what the run's alarms saw (reward hacking, diversity collapse, perplexity blow-up), reported as is
    alarms = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()}
              for e in read_alarms(out / "alarms.jsonl")]
    return {"gold_win_rate": ev["gold_win_rate"], "alarms": alarms, "kl": ev["kl"], "gold_reward": ev["gold_reward"],
            "proxy_reward": ev["proxy_reward"], "minutes": round(minutes, 2),
            "gold_reward_sft": ev["gold_reward_reference"], "proxy_reward_sft": ev["proxy_reward_reference"],
            "response_length_words": ev["response_length_words"], "updates": res["updates"], "gold_proxy_gap": gap,
            "settings": {k: v for k, v in ALGOS[algo].items()},
            # the gold gain's parts: sentiment term and quality term (rlhfkit.eval.metrics.gold_gain_split)
            "gold_gain_split": {k: ev[k] for k in ev if k.startswith(("gold_gain", "q1_share"))}}


def over_seeds(runs: list[dict]) -> dict:
    """One algorithm's runs over the seeds: the first seed's full record, the headline figures as
    their mean over seeds, and each figure's per-seed values (`*_seeds`) for the spread."""
    out = dict(runs[0])
    for key in ("gold_win_rate", "kl", "gold_reward", "proxy_reward", "minutes"):
        values = [r[key] for r in runs]
        out[key], out[f"{key}_seeds"] = float(np.mean(values)), values
    out["gold_gain_split_seeds"] = [r["gold_gain_split"] for r in runs]
    out["alarms_seeds"] = [r["alarms"] for r in runs]
    return out


def run(quick: bool = False) -> dict:
    import torch

    torch.set_num_threads(1)  # on a shared 2-core machine one thread beats two fighting for cores
    t0 = time.perf_counter()
    policy = sft_policy()
    rm = reward_model(policy, quick)
    rm_minutes = (time.perf_counter() - t0) / 60
    seeds = SEEDS[:1] if quick else SEEDS
    table = {algo: over_seeds([train(algo, policy, rm, quick, seed) for seed in seeds]) for algo in ALGOS}
    ppo = table["ppo"]
    from rlhfkit.tasks import kindly

    return {
        "gold_win_rate": ppo["gold_win_rate"], "gold_win_rate_seeds": ppo["gold_win_rate_seeds"],
        "kl": ppo["kl"], "kl_seeds": ppo["kl_seeds"], "seeds": list(seeds), "gold_reward": ppo["gold_reward"],
        "gold_gain_split": ppo["gold_gain_split"],
        "proxy_reward": ppo["proxy_reward"], "minutes": ppo["minutes"],
        "targets": {"gold_win_rate": ">= 0.75 (mean over seeds)", "kl": "<= 10 nats (every seed)", "minutes": "<= 15"},
        "meets_targets": bool(ppo["gold_win_rate"] >= 0.75 and max(ppo["kl_seeds"]) <= 10 and ppo["minutes"] <= 15),
        "algorithms": table,
        "num_eval_prompts": 64 if quick else len(kindly.prompts("eval")),
        "policy": str(policy), "reward_model": str(rm), "rm_and_sft_minutes": round(rm_minutes, 2),
        "note": "2-core machine shared with other jobs; minutes are wall-clock under that load",
    }
