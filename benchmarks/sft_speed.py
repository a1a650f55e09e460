"""SFT throughput: rlhfkit's loop vs TRL's SFTTrainer on the identical workload.

Workload (the foundation issue): 256 sequences x 64 tokens, batch 8, 1 epoch, a Llama
from config with 2 layers, hidden 128, 4 heads, FFN 512, fp32, on CPU. Both trainers get
the same pre-tokenised rows (every token a target, no padding), the same initial weights,
AdamW at the same learning rate with a linear schedule and no warm-up, gradient clipping at
1.0, evaluation and checkpointing off, and the same batches in the same order (TRL samples
sequentially over the rows put in rlhfkit's epoch order). Each side's loss at the first and
last step is recorded; the speed ratio is reported only when the first-step losses agree to
1e-4 relative, as the median of the paired ratios of alternating runs, with their spread and
the load average.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SPEED_TOKENIZER, load_average, paired_comparison, peer_available
from rlhfkit.models import load_tokenizer, tiny_llama

N_SEQ, SEQ_LEN, BATCH = 256, 64, 8


def make_rows(tokenizer, n: int, seq_len: int) -> list[list[int]]:
    """Real text from the bundled corpus, cut into rows of exactly seq_len tokens."""
    from rlhfkit.tasks import kindly

    ids: list[int] = []
    for line in kindly.corpus_lines("train"):
        ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= n * seq_len:
            break
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def fresh_model(tokenizer):
    return tiny_llama(len(tokenizer), hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, seed=0,
                      tokenizer=tokenizer)


def run_ours(tokenizer, rows) -> dict:
    from rlhfkit.recipes import sft
    from rlhfkit.train.accelerator import make_accelerator

    losses: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        cfg = sft.Config(model="unused", output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1.0,
                         learning_rate=1e-4, lr_scheduler_type="linear", logging_steps=10**9, report_to="none",
                         progress=False, seed=0)
        examples = [{"input_ids": r, "labels": list(r), "attention_mask": [1] * len(r)} for r in rows]
        model = fresh_model(tokenizer)
        acc = make_accelerator(cfg)
        t0 = time.perf_counter()
        # on_step gets the step's loss, which the loop computes anyway (no extra work)
        sft.train_causal_lm(cfg, model, tokenizer, examples, [], acc, Path(d),
                            on_step=lambda step, m: losses.append(m["loss"]))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


def run_trl(tokenizer, rows) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as d:
        ds = Dataset.from_dict({"input_ids": rows})
        # logging every step (for the per-step loss TRL computes anyway) and sequential sampling
        # over rows already in rlhfkit's epoch order: both sides see the same batches in turn
        args = SFTConfig(output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=1e-4,
                         lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, logging_strategy="steps",
                         logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                         bf16=False, fp16=False, max_length=SEQ_LEN, packing=False, dataloader_num_workers=0, seed=0,
                         disable_tqdm=True, train_sampling_strategy="sequential")
        trainer = SFTTrainer(model=fresh_model(tokenizer), args=args, train_dataset=ds, processing_class=tokenizer)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


def run(quick: bool = False) -> dict:
    from rlhfkit.train.batches import epoch_order

    torch.manual_seed(0)
    tokenizer = load_tokenizer(SPEED_TOKENIZER)
    n = 64 if quick else N_SEQ
    rows = make_rows(tokenizer, n, SEQ_LEN)
    # the peer samples sequentially, so hand it the rows in the order rlhfkit's loop draws them
    peer_rows = [rows[i] for i in epoch_order(n, 0, 0)]
    tokens = n * SEQ_LEN
    repeats = 1 if quick else 5
    has_trl = peer_available("trl")
    load_before = load_average()
    ours, peer = [], []
    for _ in range(repeats):  # alternating: each pair of runs sees about the same machine load
        ours.append(run_ours(tokenizer, rows))
        if has_trl:
            peer.append(run_trl(tokenizer, peer_rows))
    cmp = paired_comparison(ours, peer, work=tokens, deterministic=True)
    return {
        "metric": "tokens_per_second",
        "ours": cmp["ours_side"]["per_second"],
        "peer": cmp["peer_side"]["per_second"] if peer else None,
        **{k: cmp[k] for k in ("ratio", "ratio_runs", "ratio_spread", "comparable", "not_compared_because",
                               "loss_first", "loss_last")},
        "ratio_definition": "median over alternating pairs of (peer seconds / ours seconds)",
        "target_ratio": 1.5,
        "peer_name": "trl.SFTTrainer" if has_trl else None,
        "seconds_ours": cmp["ours_side"]["seconds_runs"],
        "seconds_peer": cmp["peer_side"]["seconds_runs"] if peer else [],
        "steps": {"ours": ours[0]["steps"], "peer": peer[0]["steps"] if peer else None},
        "load_average": {"before": load_before, "after": load_average()},
        "workload": {"sequences": n, "seq_len": SEQ_LEN, "batch": BATCH, "epochs": 1, "layers": 2, "hidden": 128,
                     "heads": 4, "ffn": 512, "dtype": "float32", "threads": torch.get_num_threads()},
    }
