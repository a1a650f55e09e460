"""PPO wall-clock: rlhfkit's `ppo` recipe vs TRL 1.12's experimental PPOTrainer, equal work.

Workload (issue 4): 5 updates x 16 episodes x up to 32 new tokens, 4 PPO epochs, one
mini-batch, a Llama from config with 2 layers, hidden 128, 4 heads, FFN 512, fp32, on CPU;
policy, reference, reward and value models of that size with the same initial weights, the
same 80 prompts from the bundled task, temperature 1, KL coefficient 0.05, lr 3e-6.

TRL removed PPOTrainer after 1.12; it needs trl==1.12.0 in its own environment. This
benchmark looks for it in benchmarks/work/trl-1.12.0 (or $TRL_PPO_PATH), installed with

    pip install --no-deps --target benchmarks/work/trl-1.12.0 trl==1.12.0

and runs it in a subprocess with that folder first on PYTHONPATH (the rest of the
environment is shared). Without it, `peer` is null and `peer_note` says why.

Equal work (benchmarks/equal_work.py): TRL visits the prompts in rlhfkit's order (its
shuffling DataLoader made sequential), samples the same tokens (its `generate` draws with
rlhfkit's sampling noise for the same seed) and its reward model reads the token ids
rlhfkit's reads ([BOS] prompt + re-encoded response + EOS). The first-step losses then agree
to about 1e-5 relative (TRL's old log-probs come from the sampling logits at temperature
1 + 1e-7, rlhfkit's from a training forward) and the ratio is reported.

Each side runs in its own subprocess with the same torch thread count, alternately,
`repeats` times, and is timed from the saved folders to the saved trained policy: ours over
the whole `ppo.main` call (loading, training, saving policy and critic), TRL's over loading
the four models, building the trainer, `trainer.train()` and `save_model()`.
`loop_seconds` gives the training loop alone. The ratio is the median of the paired ratios
(peer / ours, each run against the peer run next to it), with their spread, the process CPU
seconds (steadier when other jobs share the machine) and the load average.
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

from benchmarks.common import SPEED_TOKENIZER, load_average, paired_comparison

HERE = Path(__file__).resolve().parent
UPDATES, EPISODES, NEW_TOKENS, EPOCHS, THREADS, SEED = 5, 16, 32, 4, 1, 0
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

    tok = load_tokenizer(SPEED_TOKENIZER)
    policy, rm, vm = _models(tok)
    for name, m in (("policy", policy), ("rm", rm), ("value", vm)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    prompts = kindly.prompts("train")[: n_updates * EPISODES]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    from rlhfkit.rollout.prompts import prompts_for_step

    order = [prompts[i] for step in range(n_updates) for i in prompts_for_step(len(prompts), step, EPISODES, SEED)]
    (root / "peer_order.json").write_text(json.dumps(order))


def side_ours(root: Path, n_updates: int) -> dict:
    from rlhfkit.recipes import ppo

    out = root / f"ours-{time.time_ns()}"
    cfg = ppo.Config(model=str(root / "policy"), reward_model=str(root / "rm"), value_model=str(root / "value"),
                     prompts=str(root / "prompts.jsonl"), eval_prompts="", output_dir=str(out),
                     max_steps=n_updates, prompts_per_step=EPISODES, per_device_train_batch_size=EPISODES,
                     generation_batch_size=EPISODES, num_mini_batches=1, num_ppo_epochs=EPOCHS,
                     max_completion_length=NEW_TOKENS, temperature=1.0, kl_coef=0.05, learning_rate=3e-6,
                     report_to="jsonl", sample_every=0, seed=SEED, eval_reward="none", hacking_window=0)
    t0, c0 = time.perf_counter(), time.process_time()
    res = ppo.main(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    from rlhfkit.train.runs import read_metrics

    rows = read_metrics(out)
    # the policy loss: TRL logs the same quantity (PPO loss/policy_avg; GRPO loss, = policy loss + beta KL)
    key = next((k for k in ("policy_loss", "loss/policy", "loss") if any(k in r for r in rows)), None)
    losses = [r[key] for r in rows if key in r] if key else []
    return {"seconds": wall, "cpu_seconds": cpu, "loss_first": losses[0] if losses else None,
            "reward_first": rows[0].get("score", rows[0].get("reward")),
            "loss_last": losses[-1] if losses else None, "loop_seconds": sum(r["step_seconds"] for r in rows),
            "mean_response_length": statistics.mean(r["response_length"] for r in rows), "updates": res["updates"]}


def side_trl(root: Path, n_updates: int) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from benchmarks.equal_work import (
        rlhfkit_ppo_reward,
        sequential_dataloader,
        shared_sampling_noise,
    )
    from rlhfkit.data.collate import encode_prompt
    from rlhfkit.models import load_tokenizer
    from rlhfkit.rollout.prompts import rollout_seed

    t0, c0 = time.perf_counter(), time.process_time()  # from the saved folders, as rlhfkit's side
    tok = load_tokenizer(SPEED_TOKENIZER, padding_side="left")
    # the prompts in the order rlhfkit's recipe visits them, visited in sequence
    prompts = json.loads((root / "peer_order.json").read_text())
    ids = [encode_prompt(tok, p)[0] for p in prompts]
    ds = Dataset.from_dict({"input_ids": ids})
    trl_ppo.DataLoader = sequential_dataloader(trl_ppo.DataLoader)
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
    shared_sampling_noise(policy, lambda i: rollout_seed(SEED, i))
    trl_ppo.get_reward = rlhfkit_ppo_reward(trl_ppo.get_reward, rm, tok, {tuple(i): p for i, p in zip(ids, prompts)})
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=ds, value_model=vm)
    t1 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t1
    trainer.save_model(str(root / f"trl-{time.time_ns()}"))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    losses = [h["loss/policy_avg"] for h in trainer.state.log_history if "loss/policy_avg" in h]
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "loop_seconds": train_seconds,
            "reward_first": scores[0] if scores else None, "loss_first": losses[0] if losses else None,
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
    repeats = 1 if quick else 5
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
    }
    if have_peer:
        p = statistics.median(r["seconds"] for r in peer)
        pc = statistics.median(r["cpu_seconds"] for r in peer)
        result.update(peer=round(p, 3), peer_runs=[round(r["seconds"], 3) for r in peer], ratio=round(p / o, 3),
                      peer_cpu_seconds=round(pc, 3),
                      peer_loop_seconds=round(statistics.median(r["loop_seconds"] for r in peer), 3), cpu_ratio=round(pc / result["ours_cpu_seconds"], 3),
                      peer_name=f"trl {peer[0]['trl_version']} experimental PPOTrainer (load, train, save)")
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
    if max(load_before[0], result["load_average"]["after"][0]) > 1.5:
        result["note"] = "other processes shared the cores during the run (see load_average)"
    if not cmp["comparable"] and "cpu_ratio" in result:
        result["cpu_ratio"] = None
    return result


if __name__ == "__main__":
    import torch

    torch.set_num_threads(THREADS)
    side, root, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    print(json.dumps((side_ours if side == "ours" else side_trl)(root, n)))
