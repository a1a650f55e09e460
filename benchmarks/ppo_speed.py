"""PPO wall-clock: rlhfkit's `ppo` recipe vs TRL 1.12's experimental PPOTrainer, same workload.

Workload (issue 4): 5 updates x 16 episodes x up to 32 new tokens, 4 PPO epochs, one
mini-batch, a Llama from config with 2 layers, hidden 128, 4 heads, FFN 512, fp32, on CPU;
policy, reference, reward and value models of that size with the same initial weights, the
same 80 prompts from the bundled task, temperature 1, KL coefficient 0.05, lr 3e-6.

TRL removed PPOTrainer after 1.12; it needs trl==1.12.0 in its own environment. This
benchmark looks for it in benchmarks/work/trl-1.12.0 (or $TRL_PPO_PATH), installed with

    pip install --no-deps --target benchmarks/work/trl-1.12.0 trl==1.12.0

and runs it in a subprocess with that folder first on PYTHONPATH (the rest of the
environment is shared). Without it, `peer` is null and `peer_note` says why.

Each side runs in its own subprocess with the same torch thread count, alternately,
`repeats` times; the median is reported, as wall-clock seconds and as the process's CPU
seconds (steadier when other jobs share the machine). Ours is timed over the whole `ppo.main` call
(loading models from disk, the training loop and saving the final policy and critic);
TRL's over `trainer.train()` only (its models are built in memory beforehand), which
favours TRL.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_average, paired_comparison

HERE = Path(__file__).resolve().parent
UPDATES, EPISODES, NEW_TOKENS, EPOCHS, THREADS = 5, 16, 32, 4, 1
TRL_PATH = Path(os.environ.get("TRL_PPO_PATH", HERE / "work" / "trl-1.12.0"))


def _models(tokenizer):
    from rlhfkit.models import tiny_llama, tiny_reward_model

    size = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, tokenizer=tokenizer)
    return (tiny_llama(len(tokenizer), seed=0, **size), tiny_reward_model(len(tokenizer), seed=1, **size),
            tiny_reward_model(len(tokenizer), seed=2, **size))


def prepare(root: Path, n_updates: int) -> None:
    """Save policy, reward model and value model (same weights for both sides) and the prompts."""
    from rlhfkit.models import load_tokenizer
    from rlhfkit.tasks import kindly

    tok = load_tokenizer("kindly:tokenizer")
    policy, rm, vm = _models(tok)
    for name, m in (("policy", policy), ("rm", rm), ("value", vm)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    prompts = kindly.prompts("train")[: n_updates * EPISODES]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def side_ours(root: Path, n_updates: int) -> dict:
    from rlhfkit.recipes import ppo

    out = root / f"ours-{time.time_ns()}"
    cfg = ppo.Config(model=str(root / "policy"), reward_model=str(root / "rm"), value_model=str(root / "value"),
                     prompts=str(root / "prompts.jsonl"), eval_prompts="", output_dir=str(out),
                     max_steps=n_updates, prompts_per_step=EPISODES, per_device_train_batch_size=EPISODES,
                     generation_batch_size=EPISODES, num_mini_batches=1, num_ppo_epochs=EPOCHS,
                     max_completion_length=NEW_TOKENS, temperature=1.0, kl_coef=0.05, learning_rate=3e-6,
                     report_to="jsonl", sample_every=0, seed=0, eval_reward="none", hacking_window=0)
    t0, c0 = time.perf_counter(), time.process_time()
    res = ppo.main(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    from rlhfkit.runs import read_metrics

    rows = read_metrics(out)
    # the policy loss: TRL logs the same quantity (PPO loss/policy_avg; GRPO loss, = policy loss + beta KL)
    key = next((k for k in ("policy_loss", "loss/policy", "loss") if any(k in r for r in rows)), None)
    losses = [r[key] for r in rows if key in r] if key else []
    return {"seconds": wall, "cpu_seconds": cpu, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "loop_seconds": sum(r["step_seconds"] for r in rows),
            "mean_response_length": statistics.mean(r["response_length"] for r in rows), "updates": res["updates"]}


def side_trl(root: Path, n_updates: int) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhfkit.data.collate import encode_prompt
    from rlhfkit.models import load_tokenizer

    tok = load_tokenizer("kindly:tokenizer", padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in (root / "prompts.jsonl").read_text().splitlines()]
    ds = Dataset.from_dict({"input_ids": [encode_prompt(tok, p)[0] for p in prompts]})
    args = PPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=EPISODES, gradient_accumulation_steps=1,
                     num_mini_batches=1, total_episodes=n_updates * EPISODES, num_ppo_epochs=EPOCHS,
                     response_length=NEW_TOKENS, local_rollout_forward_batch_size=EPISODES, temperature=1.0,
                     kl_coef=0.05, learning_rate=3e-6, report_to="none", save_strategy="no", logging_strategy="steps", logging_steps=1,
                     num_sample_generations=0, use_cpu=True, bf16=False, fp16=False, seed=0, stop_token="eos",
                     dataloader_num_workers=0, disable_tqdm=True)
    policy = AutoModelForCausalLM.from_pretrained(root / "policy")
    ref = AutoModelForCausalLM.from_pretrained(root / "policy")
    rm = AutoModelForSequenceClassification.from_pretrained(root / "rm")
    vm = AutoModelForSequenceClassification.from_pretrained(root / "value")
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=ds, value_model=vm)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    losses = [h["loss/policy_avg"] for h in trainer.state.log_history if "loss/policy_avg" in h]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "trl_version": trl.__version__}


def _subprocess(side: str, root: Path, n_updates: int, pythonpath: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.ppo_speed", side, str(root), str(n_updates)]
    out = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    n_updates = 2 if quick else UPDATES
    repeats = 1 if quick else 3
    have_peer = (TRL_PATH / "trl" / "experimental" / "ppo").is_dir()
    ours, peer = [], []
    load_before = load_average()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        prepare(root, n_updates)
        for _ in range(repeats):
            ours.append(_subprocess("ours", root, n_updates))
            if have_peer:
                peer.append(_subprocess("trl", root, n_updates, str(TRL_PATH)))
    o = statistics.median(r["seconds"] for r in ours)
    result = {
        "workload": {"updates": n_updates, "episodes_per_update": EPISODES, "max_new_tokens": NEW_TOKENS,
                     "ppo_epochs": EPOCHS, "model": "Llama 2 layers, hidden 128, 4 heads, FFN 512, fp32",
                     "torch_threads": THREADS},
        "ours": round(o, 3), "ours_runs": [round(r["seconds"], 3) for r in ours],
        "ours_cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in ours), 3),
        "ours_loop_seconds": round(statistics.median(r["loop_seconds"] for r in ours), 3),
        "ours_mean_response_length": ours[0]["mean_response_length"],
        "unit": "seconds (lower is better); ratio = peer seconds / ours seconds (higher is better)",
        "note": "measured on a shared 2-core machine under load from other processes",
    }
    if have_peer:
        p = statistics.median(r["seconds"] for r in peer)
        pc = statistics.median(r["cpu_seconds"] for r in peer)
        result.update(peer=round(p, 3), peer_runs=[round(r["seconds"], 3) for r in peer], ratio=round(p / o, 3),
                      peer_cpu_seconds=round(pc, 3), cpu_ratio=round(pc / result["ours_cpu_seconds"], 3),
                      peer_name=f"trl {peer[0]['trl_version']} experimental PPOTrainer (trainer.train() only)")
    else:
        result.update(peer=None, ratio=None,
                      peer_note=f"TRL's PPOTrainer exists only up to trl 1.12 and was not found at {TRL_PATH}; "
                                "install it there with `pip install --no-deps --target "
                                "benchmarks/work/trl-1.12.0 trl==1.12.0`. No recorded figure is substituted.")
    cmp = paired_comparison(ours, peer)
    # a speed ratio only for equal work: the first-step losses must agree (rollouts sampled by two
    # different samplers usually differ, and then the JSON says so instead of giving a ratio)
    result.update({k: cmp[k] for k in ("ratio_runs", "ratio_spread", "comparable", "not_compared_because",
                                       "loss_first", "loss_last")},
                  ratio=cmp["ratio"], load_average={"before": load_before, "after": load_average()})
    if not cmp["comparable"] and "cpu_ratio" in result:
        result["cpu_ratio"] = None
    return result


if __name__ == "__main__":
    import torch

    torch.set_num_threads(THREADS)
    side, root, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    print(json.dumps((side_ours if side == "ours" else side_trl)(root, n)))
