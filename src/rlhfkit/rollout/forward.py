"""Helpers for the forwards of on-policy training over (prompt + response) rows.

The forward itself is :func:`rlhfkit.logprobs.response_logprobs` (and position ids
:func:`rlhfkit.logprobs.position_ids_from_mask`); here is how the recipes run it over a rollout:
in row chunks without gradients, and on the module inside DDP when no gradients are synced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
            attention_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Apply `fn(ids, mask)` in chunks of `batch_size` rows and concatenate (no gradients)."""
    return torch.cat([fn(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                      for i in range(0, input_ids.shape[0], batch_size)])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP, for forwards that need no gradient synchronisation."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
