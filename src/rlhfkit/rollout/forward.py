"""The forward passes of on-policy training over (prompt + response) rows.

One rule keeps the importance ratio honest: the log-probs used as "old" (at rollout) and
"new" (in training) come from the same function, :func:`response_logprobs`, with the same
temperature scaling and the same padded layout, so on the first mini-batch the ratio is 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rlhfkit.logprobs import response_logprobs as shared_response_logprobs


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded prompts: positions count real tokens only, exactly as during generation."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_len: int, temperature: float, with_entropy: bool = False,
                      entropy_grad: bool = False, fast_head: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, R) of the last `response_len` tokens under softmax(logits / temperature).

    The one response log-prob forward, :func:`rlhfkit.logprobs.response_logprobs`, in the
    argument order of the on-policy recipes; positions where `attention_mask` is 0 get 0.
    Returns (logprobs, entropy or None); the entropy carries gradients only with `entropy_grad`.
    `fast_head` sends only real response tokens through the LM head (rlhfkit.logprobs.fast_head_allowed
    says when); a recipe passes the same value to every forward so that rollout, reference and
    training log-probs take one path and agree to the last bit at the first step.
    """
    return shared_response_logprobs(model, input_ids, attention_mask, response_len, None, temperature,
                                    with_entropy=with_entropy, entropy_grad=entropy_grad, fast_head=fast_head)


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
            attention_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Apply `fn(ids, mask)` in chunks of `batch_size` rows and concatenate (no gradients)."""
    return torch.cat([fn(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                      for i in range(0, input_ids.shape[0], batch_size)])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP, for forwards that need no gradient synchronisation."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
