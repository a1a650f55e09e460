"""Token log-probabilities from logits, and masked reductions.

Conventions: `logits[:, t]` predicts token `t + 1`; helpers that take `input_ids` shift
for you. Masks are 1 for tokens that count and 0 elsewhere (any dtype). Reductions over
an all-zero mask return 0 rather than NaN.
"""

from __future__ import annotations

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


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where mask is 1 (0 where the mask is empty)."""
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default, as in the PPO literature)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased:
        if n.item() < 2:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out positions are left at 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False,
                      temperature: float = 1.0) -> torch.Tensor:
    """Sum (or mean) of next-token log-probs per sequence over positions whose label != -100.

    `labels` is aligned with `input_ids` (HF convention), so position t's logit scores
    label t+1. Returns shape (B,).
    """
    lp = token_logprobs(logits[:, :-1], labels[:, 1:], temperature)
    mask = labels[:, 1:] != IGNORE_INDEX
    return masked_mean(lp, mask, dim=-1) if average else masked_sum(lp, mask, dim=-1)
