"""Rollout engine `static`: decode into a preallocated (static) KV cache, optionally compiled.

The `hf` engine (rollout/generate.py) grows a DynamicCache by one position per step, so every
step has new tensor shapes and launches a few hundred small kernels from Python. Here the cache
is allocated once for prompt + response length and every decoding step has the same shapes,
which is what lets `torch.compile(mode="reduce-overhead")` capture the step as a CUDA graph
(one launch per token instead of one per operator). The model is the policy being trained,
called in place: no copy of the weights, so the engine always samples from the current policy.

Sampling is shared with the `hf` engine (`sample_next_token`: temperature, top-p, inverse-CDF
draw from one uniform per row, stop at EOS), so for the same seed and the same logits both
engines pick the same tokens, and record the same sampler log-probs (`Rollout.sampler_logp`).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from transformers import StaticCache

from rlhfkit.logprobs import position_ids_from_mask
from rlhfkit.rollout.generate import cache_keyword, sample_next_token


def _decode_step(model, tok: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache_pos: torch.Tensor,
                 cache: StaticCache) -> torch.Tensor:
    out = model(input_ids=tok, attention_mask=attn, position_ids=pos, cache_position=cache_pos,
                use_cache=True, **{cache_keyword(model): cache})
    return out.logits[:, -1, :]


_COMPILED: dict[int, Any] = {}


def _step_fn(model, compile: bool):
    if not compile:
        return _decode_step
    # one compiled step per model object; the graph is keyed on shapes, so a new batch size or
    # cache length recompiles once and is then reused
    key = id(model)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=False, dynamic=False)
    return _COMPILED[key]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | torch.Tensor = (),
             pad_token_id: int = 0, generator: torch.Generator | None = None,
             compile: bool | None = None, top_k: int = 0, with_logprobs: bool = False) -> tuple[torch.Tensor, ...]:
    """Sample up to `max_new_tokens` per row from LEFT-padded prompts (B, P).

    Returns (response_ids (B, R), response_mask (B, R), ended_with_eos (B,)), laid out as the
    `hf` engine lays them out: right-padded with `pad_token_id`, the mask 1 up to and including
    the first stop token, R the number of steps actually taken (decoding stops once every row
    has stopped). `compile=None` compiles on CUDA only: on a CPU the compile time is never
    repaid at the sizes rlhfkit trains there. `with_logprobs` appends the sampler's log-probs (B, R).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    device = input_ids.device
    b, p = input_ids.shape
    total = p + max_new_tokens
    stop = torch.as_tensor(eos_token_id, dtype=torch.long, device=device).reshape(-1)
    compile = (device.type == "cuda") if compile is None else compile
    cache = StaticCache(config=model.config, max_cache_len=total)
    attn = torch.ones((b, total), dtype=attention_mask.dtype, device=device)
    attn[:, :p] = attention_mask
    positions = position_ids_from_mask(attention_mask)
    out = model(input_ids=input_ids, attention_mask=attn[:, :p], position_ids=positions,
                cache_position=torch.arange(p, device=device), use_cache=True, logits_to_keep=1,
                **{cache_keyword(model): cache})
    logits = out.logits[:, -1, :]
    step_fn = _step_fn(model, compile)
    next_pos = positions[:, -1:] + 1
    tokens = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    eos_at = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
    steps = max_new_tokens
    for t in range(max_new_tokens):
        tok, lp = sample_next_token(logits, temperature, top_p, generator, top_k, return_logprob=True)
        tok = tok.masked_fill(finished, pad_token_id)
        tokens[:, t], logps[:, t] = tok, lp.masked_fill(finished, 0.0)
        hit = torch.isin(tok, stop) & ~finished
        eos_at = torch.where(hit, torch.full_like(eos_at, t), eos_at)
        finished |= hit
        if t == max_new_tokens - 1 or bool(finished.all()):
            steps = t + 1
            break
        # the whole preallocated mask every step (fixed shape); positions not yet written are
        # hidden by the causal mask built from cache_position
        logits = step_fn(model, tok[:, None], attn, next_pos, torch.tensor([p + t], device=device), cache)
        if compile:
            logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
        next_pos = next_pos + 1
    tokens = tokens[:, :steps]
    idx = torch.arange(steps, device=device)
    resp_mask = (idx[None, :] <= eos_at[:, None]).long()
    tokens = tokens.masked_fill(resp_mask == 0, pad_token_id)
    if with_logprobs:
        return tokens, resp_mask, finished, logps[:, :steps].masked_fill(resp_mask == 0, 0.0)
    return tokens, resp_mask, finished


def generate_chunk(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                   stop: torch.Tensor, pad_id: int, generator, top_k: int = 0,
                   with_logprobs: bool = False) -> tuple[torch.Tensor, ...]:
    """Drop-in for the `hf` engine's per-batch function (rollout.generate._generate_chunk):
    returns (query, query_mask, response_ids, response_mask, ended_with_eos[, sampler_logp])."""
    device = stop.device
    b, p = len(prompt_ids), max(len(x) for x in prompt_ids)
    query = torch.full((b, p), pad_id, dtype=torch.long)
    qmask = torch.zeros((b, p), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        query[i, p - len(ids):] = torch.tensor(ids, dtype=torch.long)
        qmask[i, p - len(ids):] = 1
    query, qmask = query.to(device), qmask.to(device)
    out = generate(model, query, qmask, max_new_tokens, temperature, top_p, stop, pad_id, generator, top_k=top_k,
                   with_logprobs=with_logprobs)
    return (query, qmask, *out)


def generate_rollout(model, tokenizer, prompts, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     num_samples: int = 1, batch_size: int = 64, seed: int | None = None,
                     max_prompt_length: int | None = None, stop_token_ids=None, top_k: int = 0):
    """The `static` engine with the rollout-engine signature of `rlhfkit.rollout.generate.generate`:
    the same validation, prompt encoding, row order and Rollout, the decoding done by
    :func:`generate_chunk`."""

    hf = importlib.import_module("rlhfkit.rollout.generate")
    original = hf._generate_chunk
    # the hf engine's orchestration (encode, batch, pad, decode text) with this engine's decoding
    hf._generate_chunk = generate_chunk
    try:
        return hf.generate(model, tokenizer, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                           num_samples=num_samples, batch_size=batch_size, seed=seed,
                           max_prompt_length=max_prompt_length, stop_token_ids=stop_token_ids, top_k=top_k)
    finally:
        hf._generate_chunk = original
