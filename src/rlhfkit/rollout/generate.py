"""Batched sampling with a KV cache.

A hand-written decoding loop rather than `model.generate`: for the small models rlhfkit
trains on a CPU, the per-step bookkeeping of `generate` (logits processors, stopping
criteria, cache re-validation) costs more than the forward pass itself. The loop below does
one prefill over left-padded prompts and then one single-token forward per step, reusing
the cache, and stops as soon as every row has produced an end-of-sequence token.

`generate` is the "hf" engine behind :data:`rlhfkit.rollout.ENGINES`; it returns a
:class:`~rlhfkit.rollout.record.Rollout` (layout documented there).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from rlhfkit.data.collate import encode_prompt
from rlhfkit.errors import ConfigError
from rlhfkit.logprobs import position_ids_from_mask
from rlhfkit.rollout.record import Rollout
from rlhfkit.train.sharding import forward_is_collective


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of tokens whose
    probability mass reaches `top_p`; the rest get -inf. The most likely token is always kept."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # mass strictly before each token; a token is dropped once that mass already reaches top_p
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits of each row (ties at the k-th value kept); the rest get -inf. 0 = all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None, top_k: int = 0,
                      return_logprob: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One token per row from `logits` (B, V); temperature 0 means greedy.

    The distribution sampled from is softmax(logits / temperature) restricted to the top-k, then
    to the top-p nucleus, renormalised (the order of transformers' and vLLM's samplers). With
    `return_logprob`, also returns (B,) float32: log-prob of each picked token under exactly that
    distribution (0 for greedy, a point mass) -- the behaviour log-prob off-policy corrections need.
    """
    if temperature <= 0:
        tok = logits.argmax(-1)
        return (tok, torch.zeros(tok.shape, dtype=torch.float32, device=tok.device)) if return_logprob else tok
    logits = logits.float() / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    # inverse-CDF sampling: one uniform per row instead of torch.multinomial's exponential
    # draw per vocabulary entry, which dominated a decoding step of a small model
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    # right=True picks the first index whose cdf exceeds u: never a token of zero probability
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    if not return_logprob:
        return tok
    # the trainer's formula (logit - logsumexp, rlhfkit.logprobs), over the kept tokens only
    picked = logits.gather(-1, tok[:, None]).squeeze(-1)
    return tok, picked - torch.logsumexp(logits, dim=-1)


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int | None = None
                   ) -> tuple[list[list[int]], int]:
    """Token ids per prompt, exactly as SFT encodes them (BOS first when the tokenizer has one),
    left-truncated to `max_prompt_length` keeping the BOS. Returns (ids, number truncated).

    Left truncation keeps the words the policy continues from, which matter more than the
    opening ones; sharing SFT's encoder keeps the policy's inputs in the distribution it was
    fine-tuned on.
    """

    out, truncated = [], 0
    for text in prompts:
        ids, cut = encode_prompt(tokenizer, text, max_prompt_length=max_prompt_length)
        if not ids:
            raise ConfigError(f"prompt {text!r} encoded to zero tokens; give non-empty prompts")
        truncated += int(cut)
        out.append(list(ids))
    return out, truncated


def _stop_ids(model, tokenizer, extra: Sequence[int] | None) -> list[int]:
    ids: set[int] = set(extra or [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` (transformers 5.x, which
    deprecates `past_key_values`) or `past_key_values` (older releases); read from the forward
    signature of the model under any peft / DDP wrapper, once per model class."""

    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    key = type(inner)
    if key not in _CACHE_KEYWORD:
        params = inspect.signature(inner.forward).parameters
        if "cache" not in params and "past_key_values" not in params and isinstance(
                getattr(inner, "model", None), torch.nn.Module):
            # a wrapper passing its arguments through (e.g. the reference of a LoRA policy, run
            # with adapters off): the wrapped model decides, asked each time
            return cache_keyword(inner.model)
        _CACHE_KEYWORD[key] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORD[key]


_CACHE_KEYWORD: dict[type, str] = {}


def _all_finished(finished: torch.Tensor, lockstep: bool) -> bool:
    """Every row has ended: on this process, or with `lockstep` on every process (an all-reduce)."""
    done = bool(finished.all())
    if not lockstep:
        return done
    pending = torch.tensor([0 if done else 1], device=finished.device)
    torch.distributed.all_reduce(pending)
    return int(pending.item()) == 0


def _generate_chunk(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
                    top_p: float, stop: torch.Tensor, pad_id: int, generator,
                    lockstep: bool = False, top_k: int = 0, with_logprobs: bool = False) -> tuple[torch.Tensor, ...]:
    """Decode one batch of prompts. With `lockstep` (a sharded model, whose every forward is a
    collective) the loop runs until the rows of every process have ended; a process whose rows
    ended first feeds padding without sampling, so its tokens and its generator's draws are those
    of a run on its own. A sharded model samples under no_grad, not inference_mode: parameters
    all-gathered in inference mode would be inference tensors, which the next training forward's
    all-gather may not write into. Returns (query, query_mask, response_ids, response_mask,
    ended_with_eos), and with `with_logprobs` the sampler's log-probs (B, R) float32 last."""
    with torch.no_grad() if lockstep else torch.inference_mode():
        out = _decode(model, prompt_ids, max_new_tokens, temperature, top_p, stop, pad_id, generator, lockstep, top_k)
    return out if with_logprobs else out[:5]


def _decode(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
            stop: torch.Tensor, pad_id: int, generator, lockstep: bool, top_k: int = 0) -> tuple[torch.Tensor, ...]:
    device = stop.device
    b, p = len(prompt_ids), max(len(x) for x in prompt_ids)
    query = torch.full((b, p), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p + max_new_tokens), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        query[i, p - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attn[i, p - len(ids):] = 1
    query, attn = query.to(device), attn.to(device)
    attn[:, p:] = 1  # every sampled position is visible; rows that finished are ignored anyway
    positions = position_ids_from_mask(attn[:, :p])
    cache = cache_keyword(model)
    out = model(input_ids=query, attention_mask=attn[:, :p], position_ids=positions,
                **{cache: DynamicCache()}, use_cache=True, logits_to_keep=1)
    next_pos = positions[:, -1:] + 1
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    eos_at = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
    width = max_new_tokens  # columns this process generated: up to the step its last row ended
    for t in range(max_new_tokens):
        if width == max_new_tokens:
            tok, lp = sample_next_token(out.logits[:, -1, :], temperature, top_p, generator, top_k, return_logprob=True)
            tok = tok.masked_fill(finished, pad_id)
            tokens[:, t], logps[:, t] = tok, lp.masked_fill(finished, 0.0)
            hit = torch.isin(tok, stop) & ~finished
            eos_at = torch.where(hit, torch.full_like(eos_at, t), eos_at)
            finished |= hit
            if bool(finished.all()):
                width = t + 1
        else:  # this process is done; it keeps the other processes' forwards company
            tok = torch.full((b,), pad_id, dtype=torch.long, device=device)
        if t == max_new_tokens - 1 or _all_finished(finished, lockstep):
            break
        out = model(input_ids=tok[:, None], attention_mask=attn[:, : p + t + 1], position_ids=next_pos,
                    **{cache: getattr(out, cache)}, use_cache=True)
        next_pos = next_pos + 1
    tokens = tokens[:, :width]
    steps = torch.arange(tokens.shape[1], device=device)
    resp_mask = (steps[None, :] <= eos_at[:, None]).long()
    tokens = tokens.masked_fill(resp_mask == 0, pad_id)
    return query, attn[:, :p], tokens, resp_mask, finished, logps[:, :width].masked_fill(resp_mask == 0, 0.0)


def _pad_to(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, num_samples: int = 1, batch_size: int = 64, seed: int | None = None,
             max_prompt_length: int | None = None, stop_token_ids: Sequence[int] | None = None,
             top_k: int = 0) -> Rollout:
    """Sample `num_samples` responses per prompt, `batch_size` rows per forward.

    Rows are ordered prompt-major (the samples of prompt i are rows i*K .. i*K+K-1), which is
    what group baselines (GRPO, RLOO) expect. With `seed` set, sampling uses a private
    generator, so the same seed gives the same rollout whatever else consumed the global RNG.
    Prompts longer than `max_prompt_length` tokens are left-truncated and counted in
    `Rollout.num_truncated_prompts`.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    if not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"top_p must be in (0, 1] and top_k >= 0, got {top_p} and {top_k}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ConfigError("the tokenizer has no pad token; rlhfkit.models.load_tokenizer sets one")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # sampling needs no gradient sync
    device = next(model.parameters()).device
    ids, truncated = encode_prompts(tokenizer, prompts, max_prompt_length)
    rows = [i for i in range(len(ids)) for _ in range(num_samples)]
    stop = torch.tensor(_stop_ids(model, tokenizer, stop_token_ids), dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    # a sharded model all-gathers its parameters in every forward: each process must run as many
    # chunks and decoding steps as the busiest one (the extra chunks' rows are dropped)
    lockstep = forward_is_collective(model)
    starts = list(range(0, len(rows), batch_size))
    n_chunks = len(starts)
    if lockstep:
        n_chunks_t = torch.tensor([n_chunks], device=device)
        torch.distributed.all_reduce(n_chunks_t, op=torch.distributed.ReduceOp.MAX)
        n_chunks = int(n_chunks_t.item())
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for c in range(n_chunks):
            chunk = rows[starts[c]:starts[c] + batch_size] if c < len(starts) else None
            prompt_ids = [ids[i] for i in chunk] if chunk else [ids[0] if ids else [pad_id]]
            result = _generate_chunk(model, prompt_ids, max_new_tokens, temperature, top_p, stop, pad_id, generator,
                                     **({"lockstep": True} if lockstep else {}), top_k=top_k, with_logprobs=True)
            if chunk:
                chunks.append(result)
    finally:
        model.train(was_training)
    p = max(c[0].shape[1] for c in chunks)
    r = max(c[2].shape[1] for c in chunks)
    query = torch.cat([_pad_to(c[0], p, pad_id, left=True) for c in chunks])
    qmask = torch.cat([_pad_to(c[1], p, 0, left=True) for c in chunks])
    resp = torch.cat([_pad_to(c[2], r, pad_id, left=False) for c in chunks])
    rmask = torch.cat([_pad_to(c[3], r, 0, left=False) for c in chunks])
    ended = torch.cat([c[4] for c in chunks])
    sampler_logp = torch.cat([_pad_to(c[5], r, 0, left=False) for c in chunks])
    texts = tokenizer.batch_decode([row[m.bool()].tolist() for row, m in zip(resp, rmask)],
                                   skip_special_tokens=True)
    return Rollout(prompts=[prompts[i] for i in rows], responses=texts, query_ids=query, query_mask=qmask,
                   response_ids=resp, response_mask=rmask, ended_with_eos=ended,
                   prompt_index=torch.tensor(rows, dtype=torch.long), num_truncated_prompts=truncated,
                   sampler_logp=sampler_logp)
