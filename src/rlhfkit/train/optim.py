"""Optimisers and learning-rate schedules.

* AdamW by transformers' `optim` names: torch's (multi-tensor on CPU), torch's fused kernel, or
  bitsandbytes' 8-bit state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").
* pure bf16: weights and gradients in bf16, the optimiser keeping fp32 master weights and fp32
  moments (:class:`MasterWeightOptimizer`). None of the update is lost to bf16 rounding: an Adam
  step smaller than a bf16 ulp still accumulates in the fp32 master (Micikevicius et al. 2018,
  "Mixed Precision Training", sec. 3.1).
* warmup then constant, linear or cosine decay, stepped by hand once per optimiser step.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Iterable
from typing import Any

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.train.checkpoints import latest_checkpoint, load_checkpoint

# transformers TrainingArguments' `optim` names (adamw: rlhfkit's former name for adamw_torch)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw", "adamw_8bit", "paged_adamw_8bit")


def make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW (cfg.optim: torch's, fused, or bitsandbytes' 8-bit); weight decay only on matrices (not on
    biases, norms or 1-d parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    cls = optimizer_class(getattr(cfg, "optim", "adamw_torch"))
    if cls is torch.optim.AdamW and not any(p.is_cuda for p in decay + no_decay):
        # torch picks the per-tensor loop on CPU; the multi-tensor one gives bitwise the same
        # update in about half the time (one kernel per op for all tensors, not one per tensor)
        kwargs["foreach"] = True
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in decay + no_decay):
        # pure bf16/fp16 weights: the optimiser on fp32 master copies (MasterWeightOptimizer below)
        return MasterWeightOptimizer(groups, cls, **kwargs)
    return cls(groups, **kwargs)


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimiser step `step`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, num_training_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, num_training_steps, cfg.lr_scheduler_type)
    )


class MasterWeightOptimizer(torch.optim.Optimizer):
    """Train bf16 (or fp16) weights with an optimiser that works on fp32 master copies.

    Each step copies the low-precision gradients into the fp32 masters, steps the inner
    optimiser there (so its moments are fp32 as well) and writes the masters back, rounded, into
    the model's parameters. Memory per parameter: 2 (weight) + 2 (grad) + 4 (master) + 8 (Adam
    moments) = 16 bytes, against 16 for fp32 training, but the forward and backward run on
    bf16 weights and activations.
    """

    def __init__(self, param_groups: Iterable[dict] | Iterable[torch.nn.Parameter],
                 inner_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **inner_kwargs):
        groups = list(param_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.model_params: list[torch.nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        master_groups = []
        for g in groups:
            params = [p for p in g["params"] if p.requires_grad]
            masters = [p.detach().float().clone().requires_grad_(True) for p in params]
            self.model_params += params
            self.masters += masters
            master_groups.append({**g, "params": masters})
        self.inner = inner_cls(master_groups, **inner_kwargs)
        # share the inner optimiser's groups and state so LR schedulers and accelerate see them
        self.defaults = self.inner.defaults
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self.model_params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        loss = self.inner.step(closure)
        for p, m in zip(self.model_params, self.masters):
            p.copy_(m)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        with torch.no_grad():
            for m, saved, p in zip(self.masters, state_dict["masters"], self.model_params):
                m.copy_(saved)
                p.copy_(saved)


def to_pure_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Cast all floating-point weights and buffers to bf16 (pair with :class:`MasterWeightOptimizer`)."""
    return model.to(torch.bfloat16)


def optimizer_class(name: str, field: str = "optim"):
    """The optimiser class for `name` (transformers' names): adamw_torch, adamw_torch_fused (torch's
    fused kernel), adamw_8bit / paged_adamw_8bit (bitsandbytes, when installed)."""
    if name in ("adamw", "adamw_torch"):
        return torch.optim.AdamW
    if name == "adamw_torch_fused":
        return functools.partial(torch.optim.AdamW, fused=True)
    if name not in OPTIMIZERS:
        raise ConfigError(f"config field '{field}': {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"config field '{field}': {name} needs `pip install bitsandbytes` (rlhfkit[gpu]); "
                          "use adamw_torch, or shard the optimiser state with a ZeRO/FSDP config instead")
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit


def prepare_training(accelerator, model: torch.nn.Module, cfg: Any, total_steps: int, output_dir,
                     who: str, printer=None) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, int]:
    """Optimiser and schedule for `model`, prepared by accelerate, resumed from the newest
    checkpoint under `output_dir` when `cfg.resume`; returns (model, optimizer, scheduler, step).

    The scheduler is stepped by hand once per optimiser step (rlhfkit.train.step): accelerate's
    wrapper would step it once per process, which changes the schedule with the process count.
    """
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    step = 0
    ckpt = latest_checkpoint(output_dir) if getattr(cfg, "resume", False) else None
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt)["step"]
        (printer or accelerator.print)(f"{who}: resumed from {ckpt} at step {step}")
    return model, optimizer, scheduler, step
