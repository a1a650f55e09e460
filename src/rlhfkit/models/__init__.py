"""Load, build and save policy, reference, reward and value models (HF formats, LoRA via peft)."""

from rlhfkit.models.factory import (
    tiny_llama,
    tiny_llama_config,
    tiny_reward_model,
)
from rlhfkit.models.io import (
    check_max_length,
    load_policy,
    load_reward_model,
    load_tokenizer,
    max_positions,
    reference_model,
    resolve_path,
    save_model,
    weights_fingerprint,
)
from rlhfkit.models.lora import apply_lora, disable_dropout, is_lora, reference_context

__all__ = [
    "apply_lora",
    "check_max_length",
    "disable_dropout",
    "is_lora",
    "load_policy",
    "load_reward_model",
    "load_tokenizer",
    "max_positions",
    "reference_context",
    "reference_model",
    "resolve_path",
    "save_model",
    "tiny_llama",
    "tiny_llama_config",
    "tiny_reward_model",
    "weights_fingerprint",
]
