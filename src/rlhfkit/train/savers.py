"""Memory savers for training at real sizes.

* gradient checkpointing through transformers (non-reentrant torch.utils.checkpoint).
* attention implementation: sdpa, eager, or flash_attention_2 when flash-attn is installed.
* frozen models (reference, reward) moved to the device only for their forwards
  (:func:`offloaded`, :class:`OffloadedBetweenCalls`).

bf16 autocast is accelerate's `mixed_precision="bf16"`; pure bf16 with fp32 master weights is in
rlhfkit.train.optim.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.train.memory import modules_in

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


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


class OffloadedBetweenCalls:
    """An object holding frozen models (a RewardSet, a scorer) whose models stay in CPU memory and
    move to `device` only for each call of one of `methods` (OpenRLHF's --ref_reward_offload for
    the reward side; the reference uses :func:`offloaded` directly). Other attributes pass through."""

    def __init__(self, obj, device: torch.device | str, methods: tuple[str, ...] = ("score",)):
        self._obj, self._device, self._methods = obj, device, methods
        self._modules = modules_in(obj)
        for m in self._modules:
            m.to("cpu")

    def _on_device(self, fn, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for m in self._modules:
                stack.enter_context(offloaded(m, self._device))
            return fn(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._on_device(self._obj, *args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self._obj, name)
        if name in self._methods and callable(attr):
            return functools.partial(self._on_device, attr)
        return attr
