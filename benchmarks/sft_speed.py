"""SFT throughput: rlhfkit's loop vs TRL's SFTTrainer on the identical workload.

Workload (the foundation issue): 256 sequences x 64 tokens, batch 8, 1 epoch, a Llama
from config with 2 layers, hidden 128, 4 heads, FFN 512, fp32, on CPU. Both trainers get
the same pre-tokenised rows (every token a target, no padding), the same initial weights,
AdamW at the same learning rate with a linear schedule and no warm-up, gradient clipping at
1.0, logging, evaluation and checkpointing off. Each side runs `repeats` times alternately;
the median wall time of the whole training call is reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import peer_available
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


def run_ours(tokenizer, rows) -> float:
    from rlhfkit.recipes import sft
    from rlhfkit.training import make_accelerator

    with tempfile.TemporaryDirectory() as d:
        cfg = sft.Config(model="unused", output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1.0,
                         learning_rate=1e-4, lr_scheduler_type="linear", logging_steps=10**9, report_to="none",
                         progress=False, seed=0)
        examples = [{"input_ids": r, "labels": list(r), "attention_mask": [1] * len(r)} for r in rows]
        model = fresh_model(tokenizer)
        acc = make_accelerator(cfg)
        t0 = time.perf_counter()
        sft.train_causal_lm(cfg, model, tokenizer, examples, [], acc, Path(d))
        return time.perf_counter() - t0


def run_trl(tokenizer, rows) -> float:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as d:
        ds = Dataset.from_dict({"input_ids": rows})
        args = SFTConfig(output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=1e-4,
                         lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, logging_strategy="no",
                         save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, bf16=False,
                         fp16=False, max_length=SEQ_LEN, packing=False, dataloader_num_workers=0, seed=0,
                         disable_tqdm=True)
        trainer = SFTTrainer(model=fresh_model(tokenizer), args=args, train_dataset=ds, processing_class=tokenizer)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0



def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    tokenizer = load_tokenizer("kindly:tokenizer")
    n = 64 if quick else N_SEQ
    rows = make_rows(tokenizer, n, SEQ_LEN)
    tokens = n * SEQ_LEN
    repeats = 1 if quick else 3
    has_trl = peer_available("trl")
    ours_t, peer_t = [], []
    for _ in range(repeats):
        ours_t.append(run_ours(tokenizer, rows))
        if has_trl:
            peer_t.append(run_trl(tokenizer, rows))
    ours = tokens / statistics.median(ours_t)
    peer = tokens / statistics.median(peer_t) if peer_t else None
    return {
        "metric": "tokens_per_second",
        "ours": round(ours, 1),
        "peer": round(peer, 1) if peer else None,
        "ratio": round(ours / peer, 3) if peer else None,
        "target_ratio": 1.5,
        "peer_name": "trl.SFTTrainer" if has_trl else None,
        "seconds_ours": [round(t, 3) for t in ours_t],
        "seconds_peer": [round(t, 3) for t in peer_t],
        "workload": {"sequences": n, "seq_len": SEQ_LEN, "batch": BATCH, "epochs": 1, "layers": 2, "hidden": 128,
                     "heads": 4, "ffn": 512, "dtype": "float32", "threads": torch.get_num_threads()},
    }
