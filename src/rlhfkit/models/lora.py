"""LoRA through peft, available to every training recipe (`--use_lora true`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rlhfkit.errors import ConfigError


def apply_lora(model: Any, args: Any, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap `model` with LoRA adapters from a ModelArgs (lora_r, lora_alpha, lora_dropout, targets).

    For sequence classification the score head stays fully trainable (peft's
    `modules_to_save`), since a fresh head cannot be learnt through a low-rank update.
    """
    from peft import LoraConfig, get_peft_model

    if args.lora_r < 1:
        raise ConfigError("config field 'lora_r': must be >= 1")
    targets: Any = args.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    cfg = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
    return get_peft_model(model, cfg)


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
