"""The forward passes of on-policy training over (prompt + response) rows.

One rule keeps the importance ratio honest: the log-probs used as "old" (at rollout) and
"new" (in training) come from the same function, :func:`response_logprobs`, with the same
temperature scaling and the same padded layout, so on the first mini-batch the ratio is 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rlhfkit.logprobs import entropy_from_logits, token_logprobs


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded prompts: positions count real tokens only, exactly as during generation."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_len: int, temperature: float, with_entropy: bool = False,
                      entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, R) of the last `response_len` tokens under softmax(logits / temperature).

    Only the R positions that predict response tokens go through the LM head. Returns
    (logprobs, entropy or None); the entropy carries gradients only with `entropy_grad`
    (an entropy bonus), since back-propagating a full softmax for a logged metric is wasted work.
    """
    t = input_ids.shape[1]
    keep = torch.arange(t - response_len - 1, t - 1, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                use_cache=False, logits_to_keep=keep)
    logits = out.logits
    logp = token_logprobs(logits, input_ids[:, -response_len:], temperature)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(logits, temperature)
    return logp, ent


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
            attention_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Apply `fn(ids, mask)` in chunks of `batch_size` rows and concatenate (no gradients)."""
    return torch.cat([fn(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                      for i in range(0, input_ids.shape[0], batch_size)])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP, for forwards that need no gradient synchronisation."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
