"""GRPO wall-clock: rlhfkit's `grpo` recipe vs TRL's GRPOTrainer (the installed trl), same workload.

Workload (issue 4): 5 steps x 4 prompts x 4 generations, up to 32 new tokens, one pass per
batch, a Llama from config with 2 layers, hidden 128, 4 heads, FFN 512, fp32, on CPU; the
same initial policy and the same reward model (a one-output sequence classifier of that
size) on both sides; beta = 0.04 (so both sides run a reference forward), token-level loss
normalisation (TRL "dapo" = rlhfkit "token"), group std scaling, lr 1e-6, temperature 1.
TRL's gradient checkpointing (on by default) is turned off so both sides do the same work.

Each side runs in its own subprocess with one torch thread, alternately, `repeats` times;
medians of wall-clock and CPU seconds are reported. Ours is timed over the whole
`grpo.main` call (loading from disk, training, saving the final policy); TRL's over
`trainer.train()` only.
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

from benchmarks.common import load_average, paired_comparison, peer_available

HERE = Path(__file__).resolve().parent
STEPS, PROMPTS, GENERATIONS, NEW_TOKENS, THREADS = 5, 4, 4, 32, 1


def prepare(root: Path, steps: int) -> None:
    from rlhfkit.models import load_tokenizer, tiny_llama, tiny_reward_model
    from rlhfkit.tasks import kindly

    tok = load_tokenizer("kindly:tokenizer")
    size = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, tokenizer=tok)
    for name, m in (("policy", tiny_llama(len(tok), seed=0, **size)), ("rm", tiny_reward_model(len(tok), seed=1, **size))):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    prompts = kindly.prompts("train")[: steps * PROMPTS]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def side_ours(root: Path, steps: int) -> dict:
    from rlhfkit.recipes import grpo

    out = root / f"ours-{time.time_ns()}"
    cfg = grpo.Config(model=str(root / "policy"), reward_model=str(root / "rm"), prompts=str(root / "prompts.jsonl"),
                      eval_prompts="", output_dir=str(out), max_steps=steps, prompts_per_step=PROMPTS,
                      num_generations=GENERATIONS, per_device_train_batch_size=PROMPTS * GENERATIONS,
                      generation_batch_size=PROMPTS * GENERATIONS, num_mini_batches=1, num_ppo_epochs=1,
                      max_completion_length=NEW_TOKENS, beta=0.04, loss_type="token", learning_rate=1e-6,
                      report_to="jsonl", sample_every=0, seed=0, eval_reward="none", hacking_window=0)
    t0, c0 = time.perf_counter(), time.process_time()
    grpo.main(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    from rlhfkit.runs import read_metrics

    rows = read_metrics(out)
    # the policy loss: TRL logs the same quantity (PPO loss/policy_avg; GRPO loss, = policy loss + beta KL)
    key = next((k for k in ("policy_loss", "loss/policy", "loss") if any(k in r for r in rows)), None)
    losses = [r[key] for r in rows if key in r] if key else []
    return {"seconds": wall, "cpu_seconds": cpu, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "mean_response_length": statistics.mean(r["response_length"] for r in rows)}


def side_trl(root: Path, steps: int) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer

    from rlhfkit.models import load_tokenizer

    tok = load_tokenizer(str(root / "policy"), padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in (root / "prompts.jsonl").read_text().splitlines()]
    args = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=PROMPTS * GENERATIONS,
                      gradient_accumulation_steps=1, num_generations=GENERATIONS, max_completion_length=NEW_TOKENS,
                      max_steps=steps, num_iterations=1, beta=0.04, loss_type="dapo", learning_rate=1e-6,
                      temperature=1.0, gradient_checkpointing=False, report_to="none", save_strategy="no",
                      logging_strategy="steps", logging_steps=1, use_cpu=True, bf16=False, fp16=False, seed=0,
                      dataloader_num_workers=0, disable_tqdm=True)
    rm_tok = load_tokenizer(str(root / "rm"))
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(root / "policy"),
                          reward_funcs=AutoModelForSequenceClassification.from_pretrained(root / "rm"),
                          args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          reward_processing_classes=rm_tok)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
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
    repeats = 1 if quick else 3
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
        "unit": "seconds (lower is better); ratio = peer seconds / ours seconds (higher is better)",
        "note": "measured on a shared 2-core machine under load from other processes",
    }
    if have_peer:
        p = statistics.median(r["seconds"] for r in peer)
        pc = statistics.median(r["cpu_seconds"] for r in peer)
        result.update(peer=round(p, 3), peer_runs=[round(r["seconds"], 3) for r in peer], ratio=round(p / o, 3),
                      peer_cpu_seconds=round(pc, 3), cpu_ratio=round(pc / oc, 3),
                      peer_name=f"trl {peer[0]['trl_version']} GRPOTrainer (trainer.train() only)")
    else:
        result.update(peer=None, ratio=None, peer_note="trl is not installed")
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
