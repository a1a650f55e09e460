"""LoRA through peft, available to every training recipe (`--use_lora true`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from rlhfkit.errors import ConfigError


def apply_lora(model: Any, args: Any, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap `model` with LoRA adapters from a ModelArgs (lora_r, lora_alpha, lora_dropout, targets).

    For sequence classification the score head stays fully trainable (peft's
    `modules_to_save`), since a fresh head cannot be learnt through a low-rank update.
    """

    if args.lora_r < 1:
        raise ConfigError("config field 'lora_r': must be >= 1")
    targets: Any = args.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    # GPT-2's projections are transformers' Conv1D, whose weight is stored transposed: peft
    # needs fan_in_fan_out=True for them (it would set it itself, with a warning)
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    cfg = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
        fan_in_fan_out=conv1d,
    )
    try:
        with warnings.catch_warnings():
            # peft reads the model's `is_gradient_checkpointing`, which transformers 5 deprecates
            # in favour of `is_activation_checkpointing`: nothing a user could change
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            return get_peft_model(model, cfg)
    except ValueError as e:
        if "not found" not in str(e) and "target" not in str(e).lower():
            raise
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if type(m).__name__ in ("Linear", "Conv1D") and "." in n})
        raise ConfigError(f"config field 'lora_target_modules': {args.lora_target_modules!r} matches no module of "
                          f"{type(model).__name__}; its linear layers are {', '.join(linear)} (or use all-linear)") from None


def disable_dropout(model: Any) -> int:
    """Set p = 0 on every torch.nn.Dropout in `model` (LoRA's own dropout included); returns how many.

    TRL's `disable_dropout_in_model` does the same for DPO, reward and on-policy trainers: a
    preference or RL loss compares forwards of the same text (policy vs reference, chosen vs
    rejected, old vs new log-probs), and dropout noise makes those differ at step 0. Attention
    modules that keep their rate as a float (`self.attention_dropout` in Llama, Qwen2, Mistral)
    are zeroed too; the saved config is left as the user wrote it.
    """

    count = 0
    for module in getattr(model, "modules", lambda: [])():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
            count += 1
    inner = getattr(model, "module", model)
    for sub in getattr(inner, "modules", lambda: [])():
        # eager/sdpa attention modules read `self.attention_dropout` at forward time
        if isinstance(getattr(sub, "attention_dropout", None), float) and sub.attention_dropout > 0:
            sub.attention_dropout = 0.0
            count += 1
    return count


def is_lora(model: Any) -> bool:
    return hasattr(getattr(model, "module", model), "peft_config")


@contextlib.contextmanager
def reference_context(model: Any) -> Iterator[Any]:
    """Run the reference forward: adapters disabled on a LoRA policy, a no-op otherwise."""
    inner = getattr(model, "module", model)
    if is_lora(inner):
        with inner.disable_adapter():
            yield inner
    else:
        yield inner
