"""Token log-probabilities from logits, position ids, and THE response log-prob forward.

Conventions: `logits[:, t]` predicts token `t + 1`; helpers that take `input_ids` shift
for you. Masks are 1 for tokens that count and 0 elsewhere (any dtype). The response width
R (the last R columns of a prompt + response row) is called `response_width` everywhere.

Imports nothing from rlhfkit, so every layer (losses, models, rollout, recipes, eval) can use it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels) under softmax(logits / temperature), gathered per position.

    `logits` is (..., V) and `labels` (...) already aligned (no shift). Positions whose label
    is IGNORE_INDEX get 0. Computed as logit - logsumexp in float32 at least, which is
    exact and avoids materialising the full log-softmax.
    """
    if temperature != 1.0:
        logits = logits / temperature
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    safe = labels.clamp(min=0)
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    lp = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(lp), lp)


def shifted_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each next token: returns (B, T-1) for `input_ids[:, 1:]`."""
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, in nats."""
    if temperature != 1.0:
        logits = logits / temperature
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False,
                      temperature: float = 1.0) -> torch.Tensor:
    """Sum (or mean) of next-token log-probs per sequence over positions whose label != -100.

    `labels` is aligned with `input_ids` (HF convention), so position t's logit scores
    label t+1. Returns shape (B,).
    """
    lp = token_logprobs(logits[:, :-1], labels[:, 1:], temperature)
    mask = (labels[:, 1:] != IGNORE_INDEX).to(lp.dtype)
    total = (lp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


# ---------------------------------------------------------------------------------------------
# THE response log-prob forward (DPO, reward-free preference losses, RL and eval share it)

_SCALED_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling",
                       "lm_head_multiplier")


def split_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, lm_head) of a plain or LoRA-wrapped HF causal LM whose logits are just
    lm_head(hidden), else None.

    Only for an unwrapped model: under DDP the forward must go through the wrapper (gradient
    sync hooks), and under accelerate's autocast through the patched forward.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    get_decoder, get_head = getattr(inner, "get_decoder", None), getattr(inner, "get_output_embeddings", None)
    if cfg is None or get_decoder is None or get_head is None:
        return None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(getattr(text_cfg, f, None) not in (None, 1.0) for f in _SCALED_HEAD_FIELDS):
        return None
    decoder, head = get_decoder(), get_head()
    return (decoder, head) if decoder is not None and head is not None else None


def fast_head_allowed(mixed_precision: str = "no") -> bool:
    """Whether `response_logprobs(fast_head=True)` may be used: not under DDP (gradient hooks live in
    the wrapper's forward) nor mixed precision (accelerate's autocast lives in the wrapped forward).
    Policy and reference then take the same path, so their log-probs agree to the last bit at step 0."""
    return mixed_precision == "no" and int(os.environ.get("WORLD_SIZE", "1")) == 1


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left padding does not shift them: a left-padded
    row is scored (and generated, and valued) at the positions it would have unpadded. The one
    position-id rule of rlhfkit; left padding gets position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_width: int,
                      response_mask: torch.Tensor | None = None, temperature: float = 1.0,
                      fast_head: bool = False, with_entropy: bool = False,
                      entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log pi(response | prompt) of the last `response_width` columns, from one forward.

    Layout: (B, P + R) rows, prompts left-padded, responses right-padded in the last
    R = `response_width` columns (:func:`rlhfkit.data.preference.collate_responses`, and
    what generation produces). `response_mask` (B, R) marks real response tokens (default:
    the last R columns of `attention_mask`). Position ids follow the attention mask.

    Returns (logprobs (B, R), zero where the mask is 0; entropy (B, R) or None). Only the
    positions predicting response tokens go through the LM head; with `fast_head` (a model
    :func:`split_head` accepts) only the real ones, padding skipped (the entropy, if asked, is
    then 0 at padding). The entropy carries gradients only with `entropy_grad` (an entropy bonus).

    Every caller (rollout old log-probs, reference, training, DPO, eval) goes through here with
    the same `temperature` and `fast_head`, so at the first PPO step the importance ratio is 1
    to the last bit. Arguments after `model` are keywords: a (width, mask) swap cannot pass silently.
    """
    R = int(response_width)
    P = input_ids.shape[1] - R
    if P < 1:
        raise ValueError("response_logprobs needs at least one prompt column (a BOS) before the responses")
    mask = attention_mask[:, P:] if response_mask is None else response_mask
    targets = input_ids[:, P:]
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    parts = split_head(model) if fast_head else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, P - 1:-1]
        keep = mask.bool()
        logits = head(hidden[keep])  # (tokens, V): real response tokens only
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if temperature != 1.0:
            logits = logits / temperature
        picked = -F.cross_entropy(logits, targets[keep], reduction="none")
        ent = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                tok_ent = entropy_from_logits(logits)
            ent = tok_ent.new_zeros(mask.shape).masked_scatter(keep, tok_ent)
        return picked.new_zeros(mask.shape).masked_scatter(keep, picked), ent
    logits = model(**inputs, logits_to_keep=R + 1).logits[:, :-1]
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        logits = logits / temperature
    labels = targets.masked_fill(mask == 0, IGNORE_INDEX)
    lp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                          ignore_index=IGNORE_INDEX).view(mask.shape)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(logits)
    return lp, ent
