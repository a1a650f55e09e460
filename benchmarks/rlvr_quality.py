"""RL from a verifiable reward on the bundled "arith" task: held-out exact-match accuracy of the
SFT policy, after GRPO and after RLOO, and TRL's GRPOTrainer with the same reward function.

1. policy_0: the shipped arith base (src/rlhfkit/tasks/arith/base, made by
   configs/pretrain_arith.yaml) after `rlhfkit sft --config configs/sft_arith.yaml` on the
   task's 1000 noisy demonstrations (a quarter with one wrong digit). Cached under
   benchmarks/work/rlvr_quality/ per base checkpoint.
2. GRPO and RLOO (`rlhfkit grpo` / `rlhfkit rloo`) train from policy_0 on the task's train
   prompts with one reward: the exact-match verifier `py:rlhfkit.tasks.arith:reward_fn`,
   which receives the prompt set's `answer` column as a keyword list.
3. The peer: TRL's GRPOTrainer with the same function as its reward_funcs, the same
   policy_0, prompts (with the `answer` column), number of updates, prompts and generations
   per update, learning rate, beta, completion length and temperature.
   Every learner trains once per seed in SEEDS; its figures are the mean over the seeds,
   each seed's value (`*_seeds`) and a 95% interval resampling problems.
4. Held-out evaluation on the task's 600 eval problems (disjoint from every training
   problem and its mirror): `accuracy*` = share answered exactly right with greedy decoding,
   with a 95 % percentile bootstrap interval over problems; `sampled_accuracy*` = the same
   with one sample at temperature 1 (the distribution RL trains).

Targets: accuracy (GRPO) >= accuracy_sft + 0.20, and GRPO not below the lower end of the peer's interval
(`not_below_peer`). docs/ppo.md compares the two GRPO implementations setting by setting.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks.common import CONFIGS, WORK, locked, peer_available, stamp

SEED = 0
SEEDS = (0, 1, 2)  # every learner trains once per seed (same policy_0, data and budget)
OUT = WORK / "rlvr_quality"
REWARD = "py:rlhfkit.tasks.arith:reward_fn"
# one budget for every learner: updates x prompts per update x generations per prompt
BUDGET = dict(max_steps=150, prompts_per_step=32, num_generations=8, learning_rate=5e-4, max_completion_length=5,
              temperature=1.0)
SHARED = dict(prompts="arith", reward=[REWARD], eval_reward="none", eval_prompts="", num_eval_prompts=0,
              per_device_train_batch_size=256, generation_batch_size=256, num_mini_batches=1, num_ppo_epochs=1,
              report_to="jsonl", sample_every=20, seed=SEED, progress=False, hacking_window=0, warmup_steps=0,
              lr_scheduler_type="constant")
ALGOS = {"grpo": dict(beta=0.0, loss_type="sequence"), "rloo": dict(beta=0.0)}


def data_dir() -> Path:
    from rlhfkit.tasks.arith.__main__ import export

    with locked("rlvr_data"):
        return export(OUT / "data")


def sft_policy(quick: bool = False) -> Path:
    """policy_0: the arith base after SFT with configs/sft_arith.yaml (cached per base checkpoint)."""
    from rlhfkit.config import load_yaml_config
    from rlhfkit.recipes import sft
    from rlhfkit.tasks import arith

    base = arith.base_model_path()
    out = OUT / f"sft-{stamp(base)}{'-quick' if quick else ''}"
    data = data_dir()
    with locked("rlvr_sft"):
        if not (out / "final" / "model.safetensors").is_file():
            cfg = load_yaml_config(sft.Config, CONFIGS / "sft_arith.yaml")
            cfg.model, cfg.dataset, cfg.eval_dataset = str(base), str(data / "sft_train.jsonl"), str(data / "sft_eval.jsonl")
            cfg.output_dir, cfg.progress = str(out), False
            if quick:
                cfg.max_steps = 20
            sft.main(cfg)
    return out / "final"


def evaluate(model_path: Path, n: int = 0) -> dict:
    """Exact-match accuracy on the eval problems: greedy and one sample at temperature 1."""
    import torch

    from rlhfkit.eval.metrics import bootstrap_ci
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout import generate
    from rlhfkit.tasks import arith

    records = arith.prompt_records("eval")[: n or None]
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    tok, model = load_tokenizer(str(model_path)), load_policy(str(model_path))
    out = {}
    with torch.no_grad():
        for name, temperature in (("accuracy", 0.0), ("sampled_accuracy", 1.0)):
            roll = generate(model, tok, prompts, max_new_tokens=BUDGET["max_completion_length"],
                            temperature=temperature, batch_size=300, seed=12345)
            hits = arith.accuracy(prompts, roll.responses, answers)
            ci = bootstrap_ci(hits, seed=SEED)
            out[name] = round(ci["mean"], 4)
            out[name + "_ci"] = [round(ci["lo"], 4), round(ci["hi"], 4)]
            out[name + "_hits"] = [float(h) for h in hits]
            if temperature == 0.0:
                out["examples"] = [{"prompt": p, "completion": c, "answer": a}
                                   for p, c, a in list(zip(prompts, roll.responses, answers))[:5]]
    out["n"] = len(prompts)
    return out


def train_ours(algo: str, policy0: Path, steps: int, seed: int = SEED) -> tuple[Path, dict]:
    from rlhfkit.recipes import grpo, rloo
    from rlhfkit.train.runs import read_metrics

    module = {"grpo": grpo, "rloo": rloo}[algo]
    out = OUT / f"{algo}-s{seed}-{int(time.time())}"
    cfg = module.Config(model=str(policy0), output_dir=str(out),
                        **{**SHARED, **BUDGET, **ALGOS[algo], "max_steps": steps, "seed": seed})
    t0 = time.perf_counter()
    module.main(cfg)
    rows = read_metrics(out)
    curve = [round(r["reward"], 3) for r in rows]
    return out / "final", {"seconds": round(time.perf_counter() - t0, 1), "train_reward_curve": curve,
                           "frac_reward_zero_std_first_last": [rows[0]["frac_reward_zero_std"],
                                                               rows[-1]["frac_reward_zero_std"]]}


def train_trl(policy0: Path, steps: int, seed: int = SEED) -> tuple[Path, dict]:
    """TRL's GRPOTrainer, same policy_0, reward function, prompts and budget."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from rlhfkit.models import load_tokenizer
    from rlhfkit.tasks import arith

    out = OUT / f"trl-s{seed}-{int(time.time())}"
    records = arith.prompt_records("train")
    tok = load_tokenizer(str(policy0), padding_side="left")
    g, p = BUDGET["num_generations"], BUDGET["prompts_per_step"]
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=p * g, gradient_accumulation_steps=1,
                      num_generations=g, max_completion_length=BUDGET["max_completion_length"], max_steps=steps,
                      num_iterations=1, beta=0.0, loss_type="grpo", learning_rate=BUDGET["learning_rate"],
                      lr_scheduler_type="constant", warmup_steps=0, temperature=BUDGET["temperature"],
                      gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=10,
                      use_cpu=True, bf16=False, fp16=False, seed=seed, dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy0), reward_funcs=[arith.reward_fn], args=args,
                          train_dataset=Dataset.from_list(records), processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.save_model(str(out / "final"))
    tok.save_pretrained(str(out / "final"))
    curve = [round(r["reward"], 3) for r in trainer.state.log_history if "reward" in r]
    return out / "final", {"seconds": round(seconds, 1), "train_reward_curve": curve, "trl_version": trl.__version__}


def over_seeds(runs: list[tuple[Path, dict, dict]], name, seeds) -> dict:
    """A learner's figures over its seeds: the mean accuracy, each seed's, and a 95% interval
    from resampling problems (each problem's hits averaged over the seeds)."""
    import numpy as np

    from rlhfkit.eval.metrics import bootstrap_ci

    out = {}
    for key in ("accuracy", "sampled_accuracy"):
        per_problem = np.mean([ev[f"{key}_hits"] for _, _, ev in runs], axis=0)
        ci = bootstrap_ci(per_problem, seed=SEED)
        out[name(key)] = round(ci["mean"], 4)
        out[name(key) + "_ci"] = [round(ci["lo"], 4), round(ci["hi"], 4)]
        out[name(key) + "_seeds"] = [ev[key] for _, _, ev in runs]
    out[name("seconds_seeds")] = [info["seconds"] for _, info, _ in runs]
    out[name("seeds")] = list(seeds)
    return out


def run(quick: bool = False) -> dict:
    steps = 3 if quick else BUDGET["max_steps"]
    n_eval = 60 if quick else 0
    t_start = time.perf_counter()
    policy0 = sft_policy(quick)
    t_sft = time.perf_counter() - t_start
    sft_eval = evaluate(policy0, n_eval)
    result = {
        "task": "arith: a+b / a-b, operands 00-99, answers as 3 digits least-significant first",
        "budget": {**BUDGET, "max_steps": steps, "algorithms": ALGOS, "reward": REWARD},
        "accuracy_sft": sft_eval["accuracy"], "accuracy_sft_ci": sft_eval["accuracy_ci"],
        "sampled_accuracy_sft": sft_eval["sampled_accuracy"], "sampled_accuracy_sft_ci": sft_eval["sampled_accuracy_ci"],
        "sft_seconds": round(t_sft, 1), "sft_examples": sft_eval["examples"],
    }
    seeds = SEEDS[:1] if quick else SEEDS
    learners = {"grpo": "", "rloo": "_rloo"}
    if peer_available("trl", "GRPOTrainer"):
        learners["trl"] = "peer_"
    else:
        result.update(peer_accuracy=None, peer_note="trl is not installed")
    for learner, prefix in learners.items():
        runs = []
        for seed in seeds:
            path, info = train_trl(policy0, steps, seed) if learner == "trl" else train_ours(learner, policy0, steps, seed)
            runs.append((path, info, evaluate(path, n_eval)))
        name = (lambda key: f"peer_{key}") if learner == "trl" else (lambda key, s=prefix: f"{key}{s}")
        result.update(over_seeds(runs, name, seeds))
        result[f"{learner}_run" if learner != "trl" else "peer_run"] = runs[0][1]
        result[f"{learner}_examples" if learner != "trl" else "peer_examples"] = runs[0][2]["examples"]
        if learner == "trl":
            result["peer_name"] = f"trl {runs[0][1]['trl_version']} GRPOTrainer"
    result["gain"] = round(result["accuracy"] - result["accuracy_sft"], 4)
    result["gain_rloo"] = round(result["accuracy_rloo"] - result["accuracy_sft"], 4)
    result["target_met"] = result["gain"] >= 0.20
    if result.get("peer_accuracy") is not None:  # GRPO must not be below the peer's interval
        result["not_below_peer"] = result["accuracy"] >= result["peer_accuracy_ci"][0]
    result["eval_problems"] = sft_eval["n"]
    result["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    result["note"] = "2-core machine shared with other processes; torch threads = OMP_NUM_THREADS"
    return result


if __name__ == "__main__":
    print(json.dumps(run(quick=True)))
