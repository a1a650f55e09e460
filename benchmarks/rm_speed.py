"""Reward-model training throughput: rlhfkit's `reward` loop against TRL's RewardTrainer.

One workload for both, in the same process: 256 preference pairs of the bundled task (prompts
and real continuations), batch 8, one epoch (32 optimiser steps), a 2-layer Llama built from
config (hidden 128, 4 heads, FFN 512) with the same initial weights, fp32, AdamW at the same
learning rate, gradient clipping at 1.0, no logging sinks, no evaluation, no checkpoints.

How the comparison is kept fair:
* the same token ids: pairs are tokenised once ([BOS] prompt + response + EOS) and TRL gets
  them as pre-tokenised `chosen_ids`/`rejected_ids` columns, so it neither re-tokenises nor
  filters anything (nothing exceeds max_length);
* the same batches: TRL reads the dataset in the order rlhfkit's seeded epoch order draws it
  (`train_sampling_strategy="sequential"` over the re-ordered dataset), so every step pads the
  same 16 rows to the same width on both sides;
* the same computation: both concatenate chosen and rejected into one forward of 2B rows;
  TRL's defaults that would change the work (gradient checkpointing on, bf16 on) are turned
  off, so both run plain fp32 without recomputation;
* what differs is how the work is done: rlhfkit packs each batch's sequences end to end
  into rows as wide as the batch's longest sequence (padding-free, position ids restarting per
  sequence, checked equal to the padded forward) so no pad token is computed, steps AdamW with
  torch's multi-tensor kernels (the same update to the bit), and its loop has less per-step
  bookkeeping;
* the timed span is the training loop only (TRL: on_train_begin to on_train_end callbacks;
  rlhfkit: the loop inside `train_one`), the best of several interleaved repeats.
Tokens counted = real (non-pad) tokens processed, identical for both.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SPEED_TOKENIZER, load_average, paired_comparison, peer_available

N_PAIRS, BATCH, LR, SEED = 256, 8, 1e-4, 0


def _pairs(n: int) -> list[dict]:
    """Pairs from the bundled task: a train prompt, its real continuation vs another sentence's."""
    from rlhfkit.tasks import kindly

    recs = kindly.sft_records("train")
    out = []
    for i in range(n):
        a, b = recs[2 * i], recs[2 * i + 1]
        out.append({"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]})
    return out


def _setup(root: Path):
    from rlhfkit.data.preference import encode_comparisons, read_comparisons
    from rlhfkit.models import load_tokenizer, save_model, tiny_reward_model

    tok = load_tokenizer(SPEED_TOKENIZER)
    model = tiny_reward_model(len(tok), hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                              max_position_embeddings=256, seed=SEED, tokenizer=tok)
    save_model(model, tok, root / "init")
    comps, counts = encode_comparisons(read_comparisons(_pairs(N_PAIRS)), tok, 256)
    assert len(comps) == N_PAIRS and not counts.truncated_rows, counts
    return tok, comps


def _run_ours(root: Path, tok, units, padding_free: bool = True) -> dict:
    import shutil

    from rlhfkit.recipes.reward import Config, train_one

    shutil.rmtree(root / "ours", ignore_errors=True)  # a fresh metrics file every run
    cfg = Config(model=str(root / "init"), dataset="-", output_dir=str(root / "ours"), per_device_train_batch_size=BATCH,
                 learning_rate=LR, num_train_epochs=1.0, seed=SEED, report_to="jsonl", progress=False, logging_steps=1,
                 max_grad_norm=1.0, normalize=False, padding_free=padding_free)
    _, final = train_one(cfg, 0, units, [], tok, Path(cfg.output_dir), printer=lambda m: None)
    rows = [json.loads(line) for line in (root / "ours" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"seconds": final["seconds"], "steps": final["steps"], "loss_first": losses[0], "loss_last": losses[-1]}


def _run_trl(root: Path, tok, units) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from rlhfkit.train.batches import epoch_order

    order = epoch_order(len(units), SEED, 0)  # the order rlhfkit's loop draws the examples in
    ds = Dataset.from_list([{"chosen_ids": units[i].sequences[0], "rejected_ids": units[i].sequences[1]} for i in order])
    model = AutoModelForSequenceClassification.from_pretrained(root / "init", num_labels=1)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.t1 = time.perf_counter()

    args = RewardConfig(output_dir=str(root / "trl"), per_device_train_batch_size=BATCH, num_train_epochs=1,
                        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                        max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                        report_to="none", logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no",
                        disable_tqdm=True, dataloader_num_workers=0, max_length=None, seed=SEED,
                        train_sampling_strategy="sequential", optim="adamw_torch")
    clock = Clock()
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": clock.t1 - clock.t0, "steps": trainer.state.global_step, "loss_first": losses[0],
            "loss_last": losses[-1]}


def _padding_fraction(units) -> float:
    """Share of a padded batch's positions that are padding, over the epoch's batches."""
    from rlhfkit.train.batches import epoch_order

    order, padded, real = epoch_order(len(units), SEED, 0), 0, 0
    for i in range(0, len(order) - BATCH + 1, BATCH):
        rows = [r for j in order[i:i + BATCH] for r in units[j].sequences]
        padded += len(rows) * max(len(r) for r in rows)
        real += sum(len(r) for r in rows)
    return 1 - real / padded


def run(quick: bool = False) -> dict:
    global N_PAIRS
    # one thread for both sides: the machine's 2 cores are shared, and oversubscribed threads
    # make timings swing far more than the difference being measured
    torch.set_num_threads(1)
    if quick:
        N_PAIRS = 64
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tok, units = _setup(root)
        tokens = sum(len(r) for u in units for r in u.sequences)
        have_trl = peer_available("trl")
        ours, peer, padded = [], [], []
        load_before = load_average()
        _run_ours(root, tok, units)  # warm-up (allocator, kernels), not timed
        for _ in range(repeats):
            ours.append(_run_ours(root, tok, units))
            if have_trl:
                peer.append(_run_trl(root, tok, units))
            padded.append(_run_ours(root, tok, units, padding_free=False))  # ablation: our loop, padded batches
    best_ours = min(r["seconds"] for r in ours)
    cmp = paired_comparison(ours, peer, deterministic=True)
    out = {
        **{k: cmp[k] for k in ("ratio_runs", "ratio_spread", "comparable", "not_compared_because",
                               "loss_first", "loss_last")},
        "ratio_paired_median": cmp["ratio"],
        "load_average": {"before": load_before, "after": load_average()},
        "ours": tokens / best_ours,
        "peer": tokens / min(r["seconds"] for r in peer) if peer else None,
        "unit": "tokens/s (real tokens, chosen + rejected, training loop only; best of repeats)",
        "tokens_per_epoch": tokens,
        "steps": ours[0]["steps"],
        "ours_seconds": [round(r["seconds"], 3) for r in ours],
        "peer_seconds": [round(r["seconds"], 3) for r in peer],
        "ours_median_tokens_per_s": tokens / statistics.median(r["seconds"] for r in ours),
        "peer_median_tokens_per_s": tokens / statistics.median(r["seconds"] for r in peer) if peer else None,
        "torch_threads": torch.get_num_threads(),
        "workload": f"{N_PAIRS} pairs, batch {BATCH}, 1 epoch, Llama 2 layers hidden 128 heads 4 FFN 512, fp32, "
                    "same token ids, same batch order, one concatenated chosen+rejected forward on both sides",
        "fairness": "TRL gets pre-tokenised ids in rlhfkit's batch order (sequential sampler); gradient "
                    "checkpointing and bf16 (TRL defaults) off; no logging, eval or saving on either side; "
                    "rlhfkit runs padding-free (its default), TRL pads each batch to its longest row",
        "padding_fraction": _padding_fraction(units),
        "note": "measured on a shared 2-core machine; other jobs may have been running",
    }
    if peer:
        assert peer[0]["steps"] == ours[0]["steps"], (peer[0]["steps"], ours[0]["steps"])
    # the headline ratio is the median of paired ratios, and only when both sides did the same computation
    out["ratio"] = cmp["ratio"]
    out["ratio_best_of_repeats"] = out["ours"] / out["peer"] if (out["peer"] and cmp["comparable"]) else None
    out["ours_padded_tokens_per_s"] = tokens / min(r["seconds"] for r in padded)
    out["ours_padded_seconds"] = [round(r["seconds"], 3) for r in padded]
    out["target_ratio"] = 1.5
    return out
