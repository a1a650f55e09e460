"""CPU limit, measured: SFT model-FLOPs utilisation against this machine's fp32 matmul peak.

MFU = (SFT tokens/s x 6N) / (measured fp32 matmul FLOP/s), with the same thread count for both.

* N counts the weights that take part in a matrix multiply per token: every linear layer of the
  decoder plus the LM head (V x h, also when tied to the embedding, since the head multiply is
  real work); the embedding lookup and the norms are excluded. 6N = 2N forward + 4N backward
  (Kaplan et al. 2020, sec. 2.1). The attention-score FLOPs (12 L h s per token, PaLM, Chowdhery
  et al. 2022, appendix B) are reported beside it as `mfu_with_attention`.
* The peak is the best of several square fp32 matmuls (torch.mm) of sizes 256..2048, the work
  the model's GEMMs do, timed after a warm-up.

Models: the bundled base (2.0M parameters) and a Llama of ~20M parameters (hidden 512, 6 layers,
8 heads, FFN 1376) on the bundled tokenizer. Target: MFU >= 0.35 for the ~20M model. The
machine's load average is recorded before and after: on shared cores both numbers fall.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SPEED_TOKENIZER

SEQ_LEN, BATCH = 128, 8


def matmul_peak_flops(sizes=(256, 512, 1024, 2048), seconds: float = 1.0) -> dict:
    """Best observed fp32 torch.mm FLOP/s (2 n^3 per product) over `sizes`."""
    best, per_size = 0.0, {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        rates = []
        while time.perf_counter() - t0 < seconds:
            s = time.perf_counter()
            torch.mm(a, b)
            rates.append(2 * n**3 / (time.perf_counter() - s))
            reps += 1
        per_size[n] = max(rates)
        best = max(best, per_size[n])
    return {"flops": best, "per_size": {str(k): round(v / 1e9, 2) for k, v in per_size.items()}}


def matmul_params(model) -> int:
    """Weights used in a matmul per token: decoder linears + LM head (see the module docstring)."""
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    cfg = model.config
    return n + cfg.vocab_size * cfg.hidden_size


def sft_tokens_per_second(model, tokenizer, n_rows: int) -> dict:
    from benchmarks.sft_speed import make_rows
    from rlhfkit.recipes import sft
    from rlhfkit.train.accelerator import make_accelerator

    rows = make_rows(tokenizer, n_rows, SEQ_LEN)
    examples = [{"input_ids": r, "labels": list(r), "attention_mask": [1] * len(r)} for r in rows]
    with tempfile.TemporaryDirectory() as d:
        cfg = sft.Config(model="unused", output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=1.0,
                         learning_rate=1e-4, logging_steps=10**9, report_to="none", progress=False, seed=0)
        t0 = time.perf_counter()
        result = sft.train_causal_lm(cfg, model, tokenizer, examples, [], make_accelerator(cfg), Path(d))
        seconds = time.perf_counter() - t0
    return {"tokens": len(rows) * SEQ_LEN, "seconds": seconds, "tokens_per_s": len(rows) * SEQ_LEN / seconds,
            "loss_last": result.get("loss")}


def run(quick: bool = False) -> dict:
    from rlhfkit.models import load_policy, load_tokenizer, tiny_llama
    from rlhfkit.train.memory import count_parameters

    load_before = os.getloadavg()
    tokenizer = load_tokenizer(SPEED_TOKENIZER)
    models = {
        "kindly-base": lambda: load_policy("kindly"),
        "llama-20M": lambda: tiny_llama(len(tokenizer), hidden_size=512, num_layers=6, num_heads=8,
                                        intermediate_size=1376, max_position_embeddings=SEQ_LEN, seed=0,
                                        tokenizer=tokenizer),
    }
    n_rows = 32 if quick else 192
    repeats = 1 if quick else 3
    peaks, out, mfu = [], {}, {}
    for name, build in models.items():
        runs = []
        for _ in range(repeats):
            peaks.append(matmul_peak_flops(seconds=0.3 if quick else 1.0))
            runs.append(sft_tokens_per_second(build(), tokenizer, n_rows))
        model = build()
        cfg = model.config
        n = matmul_params(model)
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        peak = max(p["flops"] for p in peaks)
        attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * SEQ_LEN
        mfu[name] = round(tps * 6 * n / peak, 4)
        out[name] = {"parameters": count_parameters(model), "matmul_parameters": n,
                     "tokens_per_s": round(tps, 1), "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs],
                     "model_flops_per_token": 6 * n, "attention_flops_per_token": attn,
                     "mfu_with_attention": round(tps * (6 * n + attn) / peak, 4)}
    peak = max(p["flops"] for p in peaks)
    return {
        "metric": "mfu",
        "mfu": mfu,
        "target": {"llama-20M": 0.35},
        "matmul_peak_gflops": round(peak / 1e9, 2),
        "matmul_peak_gflops_runs": [round(p["flops"] / 1e9, 2) for p in peaks],
        "matmul_gflops_by_size_last": peaks[-1]["per_size"],
        "models": out,
        "workload": {"seq_len": SEQ_LEN, "batch": BATCH, "rows": n_rows, "dtype": "float32",
                     "threads": torch.get_num_threads(), "repeats": repeats},
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
    }
