"""DPO throughput: `rlhfkit dpo` vs TRL's DPOTrainer on the identical workload, side by side.

Workload (issue 5): 256 preference pairs, batch 8 pairs, 1 epoch (32 optimiser steps), a
Llama from config with 2 layers, hidden 128, 4 heads, FFN 512, the bundled 4096-token
tokenizer, fp32 on CPU, sigmoid loss with beta 0.1.

What makes it fair:

* Same pairs and same token sequences. Prompts are the bundled task's training prompts, the
  chosen response the sentence's real continuation and the rejected one another sentence's.
  rlhfkit puts a BOS before the prompt; TRL does not add one for this tokenizer, so TRL's
  prompts are given the BOS token as text, which it tokenizes to the same id. The benchmark
  counts the non-pad tokens of both tokenizations and reports both counts (they must match).
* Same reference handling: both precompute the reference log-probs once before training
  (rlhfkit into a fresh, empty cache folder every run, so nothing is reused between runs;
  TRL with `precompute_ref_log_probs=True`, whose cache is keyed by a dataset fingerprint that
  is random for each in-memory dataset). The precompute is inside the timed region for both.
* Same initial weights (one folder saved once and loaded by both), AdamW at the same learning
  rate, constant schedule, no warm-up, gradient clipping at 1.0, max_length 128, no
  gradient checkpointing, no dropout.
* Logging, evaluation and checkpointing off on both sides (rlhfkit: report_to none and one
  metrics read at the very end; TRL: logging_strategy/save_strategy/eval_strategy "no",
  report_to none, no progress bar). Both end by saving the trained model (rlhfkit always
  does; TRL is asked to with `trainer.save_model`).

Timed region ("end to end"): from a model folder and the preference records to a trained,
saved model: loading the model, tokenising, the reference precompute, the 32 training steps
and the save. The training loop alone is reported too. Each side runs `repeats` times,
alternating, and the median is reported. Both run in one process on the same number of
CPU threads (THREADS);
on a shared machine the absolute figures move with the load, the ratio much less.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SPEED_TOKENIZER, load_average, paired_comparison, peer_available
from rlhfkit.models import load_tokenizer, save_model, tiny_llama
from rlhfkit.train.batches import epoch_order

N_PAIRS, BATCH, MAX_LEN, BETA, LR = 256, 8, 128, 0.1, 1e-4
THREADS = 1  # the same for both; one thread per process is the steadiest choice on a shared 2-core machine


def make_pairs(n: int) -> list[dict]:
    """Real sentences from the bundled task: chosen = the true continuation, rejected = another sentence's."""
    from rlhfkit.tasks import kindly

    recs = kindly.sft_records("train")[: n + 1]
    return [{"prompt": recs[i]["prompt"], "chosen": recs[i]["completion"], "rejected": recs[i + 1]["completion"]}
            for i in range(n)]


def count_tokens_ours(tokenizer, pairs) -> int:
    from rlhfkit.data.preference import encode_preferences

    enc = encode_preferences([(p["prompt"], p["chosen"], p["rejected"]) for p in pairs], None, tokenizer, MAX_LEN)
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in enc.rows)


def run_ours(model_dir: str, data: str) -> dict:
    from rlhfkit.recipes import dpo

    with tempfile.TemporaryDirectory() as d:
        cfg = dpo.Config(model=model_dir, dataset=data, output_dir=d, ref_cache_dir=str(Path(d) / "cache"), loss="sigmoid",
                         beta=BETA, per_device_train_batch_size=BATCH, num_train_epochs=1.0, learning_rate=LR,
                         lr_scheduler_type="constant", max_grad_norm=1.0, max_length=MAX_LEN, logging_steps=1,
                         report_to="jsonl", progress=False, seed=0)
        t0 = time.perf_counter()
        res = dpo.main(cfg)
        total = time.perf_counter() - t0
        losses = [r["loss"] for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines())
                  if "loss" in r]
    return {"total": total, "train_loop": res["seconds"], "steps": res["steps"], "seconds": total,
            "loss_first": losses[0], "loss_last": losses[-1]}


def run_trl(model_dir: str, tokenizer, pairs) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    bos = tokenizer.bos_token
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                         lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                         beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                         precompute_ref_batch_size=2 * BATCH, max_length=MAX_LEN, logging_strategy="steps",
                         logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                         bf16=False, fp16=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                         train_sampling_strategy="sequential")
        t0 = time.perf_counter()
        ds = Dataset.from_list([{**p, "prompt": bos + p["prompt"]} for p in pairs])
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
        t1 = time.perf_counter()
        trainer.train()
        t2 = time.perf_counter()
        trainer.save_model(str(Path(d) / "final"))
        total = time.perf_counter() - t0
        tokens = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                     for e in trainer.train_dataset)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"total": total, "train_loop": t2 - t1, "steps": trainer.state.global_step, "tokens": tokens,
            "seconds": total, "loss_first": losses[0], "loss_last": losses[-1]}



def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    tokenizer = load_tokenizer(SPEED_TOKENIZER)
    n = 64 if quick else N_PAIRS
    repeats = 1 if quick else 3
    pairs = make_pairs(n)
    tokens = count_tokens_ours(tokenizer, pairs)
    has_trl = peer_available("trl")
    ours_runs, peer_runs = [], []
    with tempfile.TemporaryDirectory() as work:
        model_dir = str(Path(work) / "model")
        save_model(tiny_llama(len(tokenizer), hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                              seed=0, tokenizer=tokenizer), tokenizer, model_dir)
        data = Path(work) / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        # TRL samples sequentially over the pairs put in the order rlhfkit's loop draws them
        peer_pairs = [pairs[i] for i in epoch_order(n, 0, 0)]
        load_before = load_average()
        for _ in range(repeats):  # alternating: each pair of runs sees about the same machine load
            ours_runs.append(run_ours(model_dir, str(data)))
            if has_trl:
                peer_runs.append(run_trl(model_dir, tokenizer, peer_pairs))
    cmp = paired_comparison(ours_runs, peer_runs, deterministic=True)
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    ours = tokens / med(ours_runs, "total")
    peer_tokens = peer_runs[0]["tokens"] if peer_runs else None
    peer = peer_tokens / med(peer_runs, "total") if peer_runs else None
    out = {
        "metric": "tokens_per_second (end to end: load, tokenise, reference precompute, train, save)",
        "ours": round(ours, 1),
        "peer": round(peer, 1) if peer else None,
        **{k: cmp[k] for k in ("ratio", "ratio_runs", "ratio_spread", "comparable", "not_compared_because",
                               "loss_first", "loss_last")},
        "ratio_definition": "median over alternating pairs of (peer end-to-end seconds / ours)",
        "loss_note": "the first DPO loss is ln 2 on any data (policy == reference); the last-step losses show "
                     "whether both sides trained on the same batches",
        "load_average": {"before": load_before, "after": load_average()},
        "target_ratio": 2.0,
        "peer_name": "trl.DPOTrainer" if has_trl else None,
        "train_loop_tokens_per_second": {"ours": round(tokens / med(ours_runs, "train_loop"), 1),
                                         "peer": round(peer_tokens / med(peer_runs, "train_loop"), 1) if peer_runs else None},
        "tokens": {"ours": tokens, "peer": peer_tokens},
        "seconds_ours": [{k: round(r[k], 3) for k in ("total", "train_loop")} for r in ours_runs],
        "seconds_peer": [{k: round(r[k], 3) for k in ("total", "train_loop")} for r in peer_runs],
        "workload": {"pairs": n, "batch_pairs": BATCH, "epochs": 1, "layers": 2, "hidden": 128, "heads": 4, "ffn": 512,
                     "vocab": len(tokenizer), "dtype": "float32", "loss": "sigmoid", "beta": BETA, "max_length": MAX_LEN,
                     "reference": "precomputed once by both, inside the timed region", "threads": torch.get_num_threads()},
    }
    if peer_runs:
        out["train_loop_ratio"] = round(out["train_loop_tokens_per_second"]["ours"] / out["train_loop_tokens_per_second"]["peer"], 3)
    return out
