"""GRPO wall-clock: rlhfkit's `grpo` recipe vs TRL's GRPOTrainer (the installed trl), equal work.

Workload (issue 4): 5 steps x 4 prompts x 4 generations, up to 32 new tokens, one pass per
batch, a Llama from config with 2 layers, hidden 128, 4 heads, FFN 512, fp32, on CPU; the
same initial policy and the same reward model (a one-output sequence classifier of that
size) on both sides; beta = 0.04 (so both sides run a reference forward), token-level loss
normalisation (TRL "dapo" = rlhfkit "token"), group std scaling, lr 1e-6, temperature 1.
TRL's gradient checkpointing (on by default) is turned off so both sides do the same work.
The policy gets 20 SFT steps on the bundled task first (benchmarks.equal_work.warm_start) so
that its responses end with EOS at varied lengths (mean about 18 tokens): with every response
at the maximum length a group-normalised loss is exactly 0 at the first step on both sides,
and agreeing zeros show nothing.

Equal work (benchmarks/equal_work.py): both sides visit the prompts in rlhfkit's order, sample
the same tokens (TRL's `generate` draws with rlhfkit's sampling noise for the same seed) and
give the reward model the same token ids. The first-step losses then agree to float rounding
and the ratio is reported; if they did not, the JSON would say why instead of giving one.

Each side runs in its own subprocess with one torch thread, alternately, `repeats` (5) times, and
is timed from the saved folders to the saved trained policy: ours over the whole `grpo.main`
call, TRL's over loading the models, building the trainer, `trainer.train()` and
`save_model()`. `loop_seconds` gives the training loop alone (ours: the updates; TRL's:
`train()`). The ratio is the median of the paired ratios (peer / ours, each run against the
peer run next to it), with their spread and the load average.
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

from benchmarks.common import SPEED_TOKENIZER, load_average, paired_comparison, peer_available

HERE = Path(__file__).resolve().parent
STEPS, PROMPTS, GENERATIONS, NEW_TOKENS, THREADS, SEED = 5, 4, 4, 32, 1, 0
WARM_STEPS = 20  # SFT steps before the run: mean response ~20 tokens, ~70% end with EOS


def prepare(root: Path, steps: int) -> None:
    """Policy (warm-started so responses end at EOS), reward model and prompts, saved for both sides;
    `peer_order.json` holds the prompts in the order rlhfkit's recipe visits them."""
    from benchmarks.equal_work import warm_start
    from rlhfkit.models import load_tokenizer, tiny_llama, tiny_reward_model
    from rlhfkit.rollout.prompts import prompts_for_step
    from rlhfkit.tasks import kindly

    tok = load_tokenizer(SPEED_TOKENIZER)
    size = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, tokenizer=tok)
    policy = tiny_llama(len(tok), seed=0, **size)
    warm_start(policy, tok, steps=WARM_STEPS, lr=1e-3)
    for name, m in (("policy", policy), ("rm", tiny_reward_model(len(tok), seed=1, **size))):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    prompts = kindly.prompts("train")[: steps * PROMPTS]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    order = [prompts[i] for step in range(steps) for i in prompts_for_step(len(prompts), step, PROMPTS, SEED)]
    (root / "peer_order.json").write_text(json.dumps(order))


def side_ours(root: Path, steps: int) -> dict:
    from rlhfkit.recipes import grpo

    out = root / f"ours-{time.time_ns()}"
    cfg = grpo.Config(model=str(root / "policy"), reward_model=str(root / "rm"), prompts=str(root / "prompts.jsonl"),
                      eval_prompts="", output_dir=str(out), max_steps=steps, prompts_per_step=PROMPTS,
                      num_generations=GENERATIONS, per_device_train_batch_size=PROMPTS * GENERATIONS,
                      generation_batch_size=PROMPTS * GENERATIONS, num_mini_batches=1, num_ppo_epochs=1,
                      max_completion_length=NEW_TOKENS, beta=0.04, loss_type="token", learning_rate=1e-6,
                      report_to="jsonl", sample_every=0, seed=SEED, eval_reward="none", hacking_window=0)
    t0, c0 = time.perf_counter(), time.process_time()
    grpo.main(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    from rlhfkit.train.runs import read_metrics

    rows = read_metrics(out)
    # the policy loss: TRL logs the same quantity (PPO loss/policy_avg; GRPO loss, = policy loss + beta KL)
    key = next((k for k in ("policy_loss", "loss/policy", "loss") if any(k in r for r in rows)), None)
    losses = [r[key] for r in rows if key in r] if key else []
    return {"seconds": wall, "cpu_seconds": cpu, "loop_seconds": sum(r["step_seconds"] for r in rows),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "reward_first": rows[0].get("reward"),
            "mean_response_length": statistics.mean(r["response_length"] for r in rows)}


def side_trl(root: Path, steps: int) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.equal_work import (
        rlhfkit_reward_encoding,
        shared_sampling_noise,
    )
    from rlhfkit.models import load_tokenizer
    from rlhfkit.rollout.prompts import rollout_seed

    t0, c0 = time.perf_counter(), time.process_time()  # from the saved folders, as rlhfkit's side
    tok = load_tokenizer(str(root / "policy"), padding_side="left")
    # rlhfkit's order of prompts, visited in sequence; rlhfkit puts the tokenizer's BOS before a
    # prompt (as SFT does) where TRL tokenises the bare text, so the BOS is written out for TRL
    bos = tok.bos_token if tok.bos_token_id is not None and tok("x").input_ids[:1] != [tok.bos_token_id] else ""
    prompts = [bos + p for p in json.loads((root / "peer_order.json").read_text())]
    args = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=PROMPTS * GENERATIONS,
                      gradient_accumulation_steps=1, num_generations=GENERATIONS, max_completion_length=NEW_TOKENS,
                      max_steps=steps, num_iterations=1, beta=0.04, loss_type="dapo", learning_rate=1e-6,
                      temperature=1.0, gradient_checkpointing=False, report_to="none", save_strategy="no",
                      logging_strategy="steps", logging_steps=1, use_cpu=True, bf16=False, fp16=False, seed=0,
                      dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False)
    rm_tok = rlhfkit_reward_encoding(load_tokenizer(str(root / "rm")), prompts, bos)
    policy = AutoModelForCausalLM.from_pretrained(root / "policy")
    shared_sampling_noise(policy, lambda i: rollout_seed(SEED, i))
    trainer = GRPOTrainer(model=policy,
                          reward_funcs=AutoModelForSequenceClassification.from_pretrained(root / "rm"),
                          args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          reward_processing_classes=rm_tok)
    t1 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t1
    trainer.save_model(str(root / f"trl-{time.time_ns()}"))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "loop_seconds": train_seconds,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "reward_first": rewards[0] if rewards else None,
            "trl_version": trl.__version__}


def _subprocess(side: str, root: Path, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "benchmarks.grpo_speed", side, str(root), str(steps)]
    out = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])



def run(quick: bool = False) -> dict:
    steps = 2 if quick else STEPS
    repeats = 1 if quick else 5
    have_peer = peer_available("trl", "GRPOTrainer")
    ours, peer = [], []
    load_before = load_average()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        prepare(root, steps)
        for _ in range(repeats):
            ours.append(_subprocess("ours", root, steps))
            if have_peer:
                peer.append(_subprocess("trl", root, steps))
    o = statistics.median(r["seconds"] for r in ours)
    oc = statistics.median(r["cpu_seconds"] for r in ours)
    result = {
        "workload": {"steps": steps, "prompts_per_step": PROMPTS, "generations": GENERATIONS,
                     "max_new_tokens": NEW_TOKENS, "beta": 0.04, "torch_threads": THREADS,
                     "model": "Llama 2 layers, hidden 128, 4 heads, FFN 512, fp32"},
        "ours": round(o, 3), "ours_runs": [round(r["seconds"], 3) for r in ours], "ours_cpu_seconds": round(oc, 3),
        "ours_mean_response_length": ours[0]["mean_response_length"],
        "ours_loop_seconds": round(statistics.median(r["loop_seconds"] for r in ours), 3),
        "unit": "seconds (lower is better); ratio = peer seconds / ours seconds (higher is better)",
    }
    if have_peer:
        p = statistics.median(r["seconds"] for r in peer)
        pc = statistics.median(r["cpu_seconds"] for r in peer)
        result.update(peer=round(p, 3), peer_runs=[round(r["seconds"], 3) for r in peer], ratio=round(p / o, 3),
                      peer_cpu_seconds=round(pc, 3),
                      peer_loop_seconds=round(statistics.median(r["loop_seconds"] for r in peer), 3), cpu_ratio=round(pc / oc, 3),
                      peer_name=f"trl {peer[0]['trl_version']} GRPOTrainer (load, train, save)")
    else:
        result.update(peer=None, ratio=None, peer_note="trl is not installed")
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
