"""Supervised (next-token) loss on completion tokens only."""

from __future__ import annotations

import torch

from rlhfkit.logprobs import IGNORE_INDEX, token_logprobs


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: float | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the supervised tokens.

    `labels` is aligned with the inputs (HF convention: position t's logit predicts label
    t+1); prompt and padding positions hold -100. The sum is divided by `num_items`, the
    number of supervised tokens in the *whole optimiser step* (all micro-batches and
    processes), so gradient accumulation and data parallelism give the same update as one
    big batch; without it, by this batch's own count.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    nll = -token_logprobs(logits[:, :-1], target)
    total = (nll * mask).sum()
    count = mask.sum()
    # a step without supervised tokens contributes 0, not 0/0 = NaN
    denom = (num_items or 1) if num_items is not None else count.clamp(min=1)
    loss = total / denom
    return loss, {"nll_sum": total.detach(), "tokens": count.detach()}


SFT_LOSSES = {"nll": sft_loss}
