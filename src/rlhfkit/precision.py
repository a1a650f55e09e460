"""Precision and memory savers for training at real sizes.

* bf16 autocast: accelerate's `mixed_precision="bf16"` (weights and optimiser in fp32, matmuls
  in bf16). Works on CPU too, which is how the tests run it.
* pure bf16: weights and gradients in bf16, the optimiser keeping fp32 master weights and fp32
  moments (:class:`MasterWeightOptimizer`). Half the weight and gradient memory of fp32, and
  none of the update is lost to bf16 rounding: an Adam step smaller than a bf16 ulp still
  accumulates in the fp32 master (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.1).
* 8-bit optimiser state through bitsandbytes (Dettmers et al. 2022, "8-bit Optimizers via
  Block-wise Quantization") when it is installed.
* gradient checkpointing through transformers (non-reentrant torch.utils.checkpoint).
* attention implementation: sdpa, eager, or flash_attention_2 when flash-attn is installed.
* reference and reward models held in bf16 and moved to the CPU between uses (:func:`offloaded`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator

import torch

from rlhfkit.errors import ConfigError

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def check_attn_implementation(name: str, field: str = "attn_implementation") -> str:
    """Validate an attention implementation name; flash_attention_2 needs the flash-attn package."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"config field '{field}': {name!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(f"config field '{field}': flash_attention_2 needs `pip install flash-attn` "
                          "(CUDA only); use sdpa, which needs nothing extra")
    return name


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Non-reentrant checkpointing (the one torch recommends) gives the same gradients as a plain
    backward; the KV cache is switched off since a recomputed forward must not extend it.
    With LoRA (a peft model) the frozen embeddings' outputs are made to require grad, without
    which no gradient would reach the checkpointed adapters.
    """
    base = getattr(model, "get_base_model", lambda: model)()
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"config field 'gradient_checkpointing': {type(base).__name__} does not support it")
    # transformers 5 renamed the method and its keyword (the old names warn); accept either
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(base.config, "use_cache", None):
        base.config.use_cache = False
    if hasattr(model, "peft_config"):
        model.enable_input_require_grads()
    return model


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


def optimizer_class(name: str, field: str = "optim") -> type[torch.optim.Optimizer]:
    """The optimiser class for `name`: adamw (torch), adamw_8bit / paged_adamw_8bit (bitsandbytes)."""
    if name == "adamw":
        return torch.optim.AdamW
    if name not in OPTIMIZERS:
        raise ConfigError(f"config field '{field}': {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"config field '{field}': {name} needs `pip install bitsandbytes` (rlhfkit[gpu]); "
                          "use adamw, or shard the optimiser state with a ZeRO/FSDP config instead")
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit


@contextlib.contextmanager
def offloaded(model: torch.nn.Module, device: torch.device | str, enabled: bool = True) -> Iterator[torch.nn.Module]:
    """Use `model` on `device` inside the block and park it in CPU memory afterwards.

    For the reference and reward models of PPO/GRPO, which are needed for one forward per
    rollout batch: between those forwards their GPU memory goes to the policy's activations.
    """
    if not enabled:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
