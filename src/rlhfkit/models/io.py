"""Load and save policies, references and reward models in Hugging Face format.

Everything goes through transformers' Auto classes, so a path can be a local folder written
by `save_pretrained` or a hub name; rlhfkit's own outputs are plain safetensors checkpoints
that transformers, vLLM and TRL open unchanged. The bundled task's files resolve from the
names ``kindly`` / ``kindly:base`` (the shipped base model) and ``kindly:tokenizer``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhfkit.errors import ConfigError
from rlhfkit.runs import atomic_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(name: str) -> str:
    """Map the bundled task's short names to files shipped in the package; pass others through."""
    if name in ("kindly", "kindly:base"):
        from rlhfkit.tasks import kindly

        return str(kindly.base_model_path())
    if name == "kindly:tokenizer":
        from rlhfkit.tasks import kindly

        return str(kindly.tokenizer_path())
    return name


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"config field 'dtype': {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token.

    A tokenizer without one borrows its EOS token as padding (attention masks keep the two
    apart); one with neither is refused with a message naming the path.
    """
    resolved = resolve_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {path!r}: {e}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(
                f"tokenizer {path!r} has neither a pad nor an EOS token; add one "
                "(tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it again"
            )
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_policy(path: str, dtype: str = "float32", lora: Any = None, trainable: bool = True) -> PreTrainedModel:
    """A causal LM from `path`; with `lora` (a ModelArgs with use_lora) LoRA adapters are added."""
    resolved = resolve_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a causal LM from {path!r}: {e}") from e
    if lora is not None and getattr(lora, "use_lora", False):
        from rlhfkit.models.lora import apply_lora

        model = apply_lora(model, lora, task_type="CAUSAL_LM")
    model.train(trainable)
    return model


def load_reward_model(path: str, dtype: str = "float32", lora: Any = None, num_labels: int = 1) -> PreTrainedModel:
    """An AutoModelForSequenceClassification with one output (a fresh head when `path` is an LM)."""
    resolved = resolve_path(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(resolved, dtype=_dtype(dtype), num_labels=num_labels)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a sequence-classification model from {path!r}: {e}") from e
    if model.config.pad_token_id is None:
        tok_path = resolved if Path(resolved).is_dir() else path
        try:
            tok = load_tokenizer(tok_path)
            model.config.pad_token_id = tok.pad_token_id
        except ConfigError:
            pass  # the caller sets it once it has a tokenizer; scoring needs it to find the last token
    if lora is not None and getattr(lora, "use_lora", False):
        from rlhfkit.models.lora import apply_lora

        model = apply_lora(model, lora, task_type="SEQ_CLS")
    return model


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | Path,
               extra_files: dict[str, str | bytes] | None = None, merge_lora: bool = True,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """`save_pretrained` (safetensors) into a temporary folder, then rename onto `path`.

    LoRA models are merged into their base before saving (so the result loads with plain
    transformers) unless `merge_lora` is False, in which case the adapter is saved.
    """
    path = Path(path)
    to_save = model
    if merge_lora and hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        to_save = copy.deepcopy(model).merge_and_unload()
    to_save = getattr(to_save, "module", to_save)  # unwrap DDP if the caller did not
    if state_dict is not None:
        from rlhfkit.sharding import unsharded_copy

        to_save, state_dict = unsharded_copy(to_save, state_dict), None
    with atomic_path(path) as tmp:
        tmp.mkdir()
        to_save.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
    return path


def reference_model(policy: PreTrainedModel, use_lora: bool = False) -> PreTrainedModel:
    """The frozen reference the KL is measured against.

    With LoRA the policy itself serves as the reference under `policy.disable_adapter()`
    (one copy of the weights in memory), so this returns the policy; callers wrap the
    reference forward in :func:`rlhfkit.models.lora.reference_context`. Otherwise a frozen
    deep copy in eval mode.
    """
    if use_lora:
        return policy
    ref = copy.deepcopy(getattr(policy, "module", policy))
    ref.eval()
    ref.requires_grad_(False)
    return ref


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}
