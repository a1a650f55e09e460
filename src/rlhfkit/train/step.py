"""THE optimiser step: one accumulation convention for every recipe.

An optimiser step covers M micro-batches on each of P processes. The convention:

1. Each micro-batch's loss is its *sum* over loss items (tokens, pairs, responses) divided by
   the whole step's item count per process: the count over all processes and micro-batches,
   divided by P (`step_total`). A recipe whose loss function returns a per-micro-batch mean
   multiplies it by `share(micro_items, step_items)` instead, which is the same thing.
2. `backward` runs on every micro-batch; inside `accumulate`, gradients are all-reduced once,
   on the step's last micro-batch (DDP's `no_sync` on the others).
3. DDP averages gradients over the P processes, which cancels the "divided by P" of (1).
   Nothing else divides: the step's gradient is the gradient of the mean over every item of
   the step, exactly as if it were one batch on one process.

Why not accelerate's `gradient_accumulation_steps` / `accumulate()`: it divides every
micro-batch loss by the fixed M, which is right only when every micro-batch holds the same
number of items. A token-mean loss over micro-batches with unequal token counts then weights
tokens of short micro-batches more (the gradient-accumulation bug transformers fixed in 4.46,
huggingface/transformers#34191; DAPO's token mean is over the whole step, Yu et al. 2025,
sec. 3.3). So every Accelerator here is built with gradient_accumulation_steps=1 and this
module does the accumulation.

`optimizer_step` then clips the gradient norm (a non-finite gradient shows in the norm; without
clipping every gradient is checked), steps the optimisers and the schedules (stepped by hand,
once per optimiser step: accelerate's wrapped scheduler steps once per process), and zeroes
the gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch

from rlhfkit.errors import NonFiniteError

__all__ = ["accumulate", "backward", "check_finite", "check_finite_grads", "optimizer_step", "share", "step_total"]


def check_finite(name: str, *tensors: torch.Tensor | None) -> None:
    """Raise NonFiniteError if any value is NaN or infinite (called before a step is applied)."""
    for t in tensors:
        if t is not None and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise NonFiniteError(
                f"{name} has {bad} non-finite value(s) (NaN or inf); the step was not applied. "
                "Lower the learning rate, check the reward model's outputs, or enable reward clipping."
            )


def check_finite_grads(model: torch.nn.Module) -> None:
    """Raise NonFiniteError naming the first parameter whose gradient is NaN or infinite."""
    for n, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise NonFiniteError(f"gradient of {n} is not finite; the step was not applied")


def step_total(accelerator, *counts: float) -> list[float]:
    """The step's item counts over all processes, divided by the process count (convention 1).

    `counts` are this process's counts for the whole step (all its micro-batches). One
    all-reduce for all of them; on one process they come back unchanged.
    """
    if accelerator.num_processes == 1:
        return [float(c) for c in counts]
    t = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=accelerator.device)
    return (accelerator.reduce(t, "sum") / accelerator.num_processes).tolist()


def share(micro_items: float, step_items: float) -> float:
    """Weight of a micro-batch whose loss is a mean over its `micro_items` items: its items'
    share of the step's per-process total (mean x share = sum / step total, convention 1)."""
    return float(micro_items) / max(float(step_items), 1.0)


@contextlib.contextmanager
def accumulate(accelerator, models: Sequence[torch.nn.Module], last: bool):
    """Gradients of this micro-batch stay local unless it is the step's `last` (convention 2)."""
    with contextlib.ExitStack() as stack:
        if not last and accelerator.num_processes > 1:
            for model in models:
                stack.enter_context(accelerator.no_sync(model))
        yield


def backward(accelerator, loss: torch.Tensor, what: str) -> None:
    """Backward of one micro-batch's loss, normalised by the step's totals; refuses a NaN loss."""
    check_finite(what, loss)
    accelerator.backward(loss)


def optimizer_step(accelerator, models: Sequence[torch.nn.Module], optimizers: Iterable,
                   schedulers: Iterable = (), max_grad_norm: float = 0.0, what: str = "gradient") -> float | None:
    """Clip, check, step and zero: the end of every optimiser step. Returns the first model's
    gradient norm before clipping (None without clipping)."""
    norm = None
    if max_grad_norm and max_grad_norm > 0:
        norms = [accelerator.clip_grad_norm_(m.parameters(), max_grad_norm) for m in models]
        check_finite(f"{what} norm", *norms)
        norm = float(norms[0])
    else:
        for m in models:
            check_finite_grads(m)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    for sched in schedulers:
        sched.step()
    return norm
