"""Rollout tokens/s on a GPU against the memory-bandwidth bound and against HF `generate`.

Model: Qwen2.5-0.5B-shaped Llama (random bf16 weights, ~494M parameters). Prompts of 128
tokens, 256 new tokens per row (no stop token, so every row decodes all 256), batch 1, 16, 64,
256. Engines: rlhfkit `hf` (the Python sampling loop over a DynamicCache), rlhfkit `static`
(static KV cache, decode step compiled with CUDA graphs), and transformers' `model.generate`
(sampling, the same temperature and top-p).

Bound: decoding is memory bound, so one step of batch B cannot be faster than reading the
weights once plus every row's KV cache: bytes(step) = weight bytes + B x KV bytes at the mean
context length (128 + 128). tokens/s bound = B x bandwidth / bytes(step), with the bandwidth
measured on this device by a large device-to-device copy. Target: the static engine at >= 50%
of the bound at batch 64.

On a machine without CUDA it prints one line and exits 0 (nothing measured, no file written).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import cuda_or_say_why, measure_bandwidth, qwen05b_config, sync

PROMPT, RESPONSE, BATCHES, TEMPERATURE, TOP_P = 128, 256, (1, 16, 64, 256), 1.0, 1.0


def kv_bytes_per_row(cfg, context: int, dtype_bytes: int = 2) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * dtype_bytes


def time_engine(engine: str, model, prompts: torch.Tensor, device) -> float:
    """Seconds to decode RESPONSE tokens for every row of `prompts` (after one warm-up)."""
    import importlib

    from rlhfkit.rollout import static

    hf_loop = importlib.import_module("rlhfkit.rollout.generate")
    mask = torch.ones_like(prompts)
    never = torch.tensor([-1], device=device)  # no token id matches: every row decodes RESPONSE tokens
    g = torch.Generator(device=device).manual_seed(0)

    def once():
        if engine == "hf":
            rows = prompts.tolist()
            return hf_loop._generate_chunk(model, rows, RESPONSE, TEMPERATURE, TOP_P, never, 2, g)[2]
        if engine == "static":
            return static.generate(model, prompts, mask, RESPONSE, TEMPERATURE, TOP_P, never, 2, g, compile=True)[0]
        return model.generate(input_ids=prompts, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                              top_p=TOP_P, max_new_tokens=RESPONSE, min_new_tokens=RESPONSE, pad_token_id=2)

    with torch.inference_mode():
        once()  # warm-up (compiles the static engine's step for this shape)
        sync(device)
        t0 = time.perf_counter()
        out = once()
        sync(device)
    assert out.shape[-1] >= RESPONSE
    return time.perf_counter() - t0


def measure(device, cfg, batches=BATCHES, engines=("static", "hf", "hf_generate")) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = measure_bandwidth(device)
    rows = {}
    for b in batches:
        prompts = torch.randint(3, cfg.vocab_size, (b, PROMPT), device=device)
        step_bytes = weight_bytes + b * kv_bytes_per_row(cfg, PROMPT + RESPONSE // 2)
        bound = b * bandwidth / step_bytes
        row = {"bound_tokens_per_s": round(bound, 1)}
        for engine in engines:
            try:
                seconds = time_engine(engine, model, prompts, device)
            except torch.cuda.OutOfMemoryError:
                row[engine] = "out of memory"
                torch.cuda.empty_cache()
                continue
            tps = b * RESPONSE / seconds
            row[engine] = {"tokens_per_s": round(tps, 1), "fraction_of_bound": round(tps / bound, 3),
                           "seconds": round(seconds, 3)}
        rows[str(b)] = row
    return {"bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_bytes": weight_bytes, "batches": rows,
            "parameters": sum(p.numel() for p in model.parameters())}


def run(quick: bool = False) -> dict | None:
    if not cuda_or_say_why("gpu_rollout"):
        return None
    device = torch.device("cuda")
    result = measure(device, qwen05b_config(), batches=(1, 64) if quick else BATCHES)
    at64 = result["batches"].get("64", {}).get("static")
    return {
        "metric": "rollout_tokens_per_second",
        "device": torch.cuda.get_device_name(device),
        "target": {"static_fraction_of_bound_at_batch_64": 0.5},
        "static_fraction_of_bound_at_batch_64": at64["fraction_of_bound"] if isinstance(at64, dict) else None,
        **result,
        "workload": {"model": "Qwen2.5-0.5B-shaped Llama, random bf16 weights", "prompt_tokens": PROMPT,
                     "response_tokens": RESPONSE, "temperature": TEMPERATURE, "top_p": TOP_P},
        "torch": torch.__version__,
    }
