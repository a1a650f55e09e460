"""Training step time and MFU on a GPU, side by side with TRL on the identical workload.

Model: the Qwen2.5-0.5B-shaped Llama of gpu_rollout (random weights, bf16 autocast, sdpa).
SFT: 2048-token-free rows of 512 tokens, batch 8, rlhfkit's loop vs TRL's SFTTrainer, the same
initial weights and batches in the same order (TRL samples sequentially over the rows put in
rlhfkit's epoch order), each side's first and last loss recorded; the ratio is given only when
the first-step losses agree to 1e-4 relative (benchmarks.common.paired_comparison).

MFU = tokens/s x 6N / (measured bf16 matmul peak), N the matmul weights per token (decoder
linears + LM head), the peak from an 8192^3 bf16 matmul on the same device. Target: >= 40%.

Not yet measured by this script: DPO and GRPO step time against TRL on the GPU (the CPU
benchmarks dpo_speed and grpo_speed carry the equal-work harness; their GPU variants are the
next step). The JSON says so rather than leaving the fields out.

On a machine without CUDA it prints one line and exits 0 (nothing measured, no file written).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    cuda_or_say_why,
    load_average,
    measure_matmul_peak,
    paired_comparison,
    peer_available,
    qwen05b_config,
)

SEQ_LEN, BATCH, LR = 512, 8, 1e-5


def matmul_params(model) -> int:
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    return n + model.config.vocab_size * model.config.hidden_size


def fresh_model(cfg):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)


def rows(cfg, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, cfg.vocab_size, (n, SEQ_LEN), generator=g).tolist()


def sft_ours(cfg, tokenizer, data) -> dict:
    from rlhfkit.recipes import sft
    from rlhfkit.training import make_accelerator

    losses: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        c = sft.Config(model="unused", output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1.0, learning_rate=LR,
                       logging_steps=10**9, report_to="none", progress=False, seed=0, bf16=True)
        examples = [{"input_ids": r, "labels": list(r), "attention_mask": [1] * len(r)} for r in data]
        acc = make_accelerator(c)
        model = fresh_model(cfg)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sft.train_causal_lm(c, model, tokenizer, examples, [], acc, Path(d), on_step=lambda s, m: losses.append(m["loss"]))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


def sft_trl(cfg, tokenizer, data) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as d:
        args = SFTConfig(output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                         lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_strategy="steps",
                         logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", bf16=True,
                         max_length=SEQ_LEN, packing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                         train_sampling_strategy="sequential", gradient_checkpointing=False)
        trainer = SFTTrainer(model=fresh_model(cfg), args=args, train_dataset=Dataset.from_dict({"input_ids": data}),
                             processing_class=tokenizer)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


def run(quick: bool = False) -> dict | None:
    if not cuda_or_say_why("gpu_train"):
        return None
    from rlhfkit.models import load_tokenizer
    from rlhfkit.training import epoch_order

    device = torch.device("cuda")
    cfg = qwen05b_config()
    tokenizer = load_tokenizer("kindly:tokenizer")  # only its pad/eos ids are used: rows are token ids
    n = 64 if quick else 256
    data = rows(cfg, n)
    peer_data = [data[i] for i in epoch_order(n, 0, 0)]
    peak = measure_matmul_peak(device, torch.bfloat16)
    load_before = load_average()
    ours, peer = [], []
    has_trl = peer_available("trl")
    for _ in range(1 if quick else 3):
        ours.append(sft_ours(cfg, tokenizer, data))
        if has_trl:
            peer.append(sft_trl(cfg, tokenizer, peer_data))
    cmp = paired_comparison(ours, peer, work=n * SEQ_LEN)
    n_mm = matmul_params(fresh_model(cfg))
    mfu = {side: round(runs["per_second"] * 6 * n_mm / peak, 4) for side, runs in
           (("ours", cmp["ours_side"]), ("peer", cmp["peer_side"])) if runs}
    return {
        "metric": "sft_mfu",
        "device": torch.cuda.get_device_name(device),
        "bf16_matmul_peak_tflops": round(peak / 1e12, 1),
        "sft": {**cmp, "mfu": mfu, "tokens": n * SEQ_LEN},
        "target": {"mfu": 0.40, "grpo_step_ratio_vs_trl": 1.5},
        "dpo": "not measured by this script yet",
        "grpo": "not measured by this script yet",
        "load_average": {"before": load_before, "after": load_average()},
        "workload": {"model": "Qwen2.5-0.5B-shaped Llama, random weights", "seq_len": SEQ_LEN, "batch": BATCH,
                     "rows": n, "mixed_precision": "bf16", "attn": "sdpa", "matmul_params": n_mm},
    }
