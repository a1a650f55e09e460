"""Load and save policies, references and reward models in Hugging Face format.

Everything goes through transformers' Auto classes, so a path can be a local folder written
by `save_pretrained` or a hub name; rlhfkit's own outputs are plain safetensors checkpoints
that transformers, vLLM and TRL open unchanged. The bundled task's files resolve from the
names ``kindly`` / ``kindly:base`` (the shipped base model) and ``kindly:tokenizer``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from rlhfkit.errors import ConfigError
from rlhfkit.models.lora import apply_lora
from rlhfkit.models.lora import disable_dropout as _off
from rlhfkit.models.paths import resolve_path
from rlhfkit.train.runs import atomic_path
from rlhfkit.train.savers import enable_gradient_checkpointing
from rlhfkit.train.sharding import unsharded_copy


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence what a user cannot act on while loading/saving: transformers' per-tensor progress
    bars ("Loading weights", "Writing model shards") and its load report, which lists the fresh
    score head of every new reward model as MISSING (that head is meant to be new)."""

    bar, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"config field 'dtype': {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str, padding_side: str = "right", distinct_pad: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token.

    A tokenizer without one borrows its EOS token as padding (attention masks keep the two
    apart); one with neither is refused with a message naming the path. With `distinct_pad`
    (reward models) a pad token equal to EOS is replaced by a new `<|pad|>` token: transformers'
    sequence classifiers pool the last token that is not the pad id, so with pad == EOS they
    would score the token before the final EOS while rlhfkit scores the EOS itself.
    """
    if isinstance(path, PreTrainedTokenizerBase):
        tok = copy.deepcopy(path)  # given in Python: the caller's keeps its padding side and tokens
    else:
        if isinstance(path, torch.nn.Module):  # given in Python: its tokenizer is in its folder, as in TRL
            path = _folder_of(path)
        resolved = resolve_path(path)
        if adapter_base(resolved) and not (Path(resolved) / "tokenizer_config.json").is_file():
            resolved = resolve_path(adapter_base(resolved))  # a peft adapter saved without one: its base's
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(resolved)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load a tokenizer from {path!r}: {_one_line(e)}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(
                f"tokenizer {path!r} has neither a pad nor an EOS token; add one "
                "(tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it again"
            )
        tok.pad_token = tok.eos_token
    if distinct_pad and tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = padding_side
    return tok


def load_policy(path: str, dtype: str = "float32", lora: Any = None, trainable: bool = True,
                disable_dropout: bool = False, attn_implementation: str = "",
                gradient_checkpointing: bool = False) -> PreTrainedModel:
    """A causal LM from `path`; with `lora` (a ModelArgs with use_lora) LoRA adapters are added;
    `disable_dropout` zeroes every dropout (see :func:`rlhfkit.models.lora.disable_dropout`).

    `path` may be a peft adapter folder: its base loads and the adapter is merged in (peft's
    ``AutoPeftModelForCausalLM``, then ``merge_and_unload``), so the policy starts as base +
    adapter, which a LoRA run's reference is too. A checkpoint that lacks weights of the causal
    LM (a reward model's folder has no LM head) is refused rather than trained from random ones.

    `path` may also be a model loaded in Python (TRL's ``model=``): see :func:`_policy_object`.
    """
    if isinstance(path, torch.nn.Module):
        return _policy_object(path, lora, trainable, disable_dropout, gradient_checkpointing)
    resolved = resolve_path(path)
    base = adapter_base(resolved)  # a peft adapter folder: its base, then the adapter merged in
    if base and read_json(Path(resolved) / ADAPTER_CONFIG).get("task_type") == "SEQ_CLS":
        raise ConfigError(f"cannot load a policy from {path!r}: it is a reward model's adapter (task_type SEQ_CLS in "
                          f"{ADAPTER_CONFIG}); pass the causal LM it was trained from, or use it as --reward rm:{path}")
    source = resolve_path(base) if base else resolved
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(dtype), output_loading_info=True,
                                                               **_attn_kwargs(attn_implementation))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a causal LM from {base or path!r}: {_one_line(e)}") from e
    _refuse_fresh_weights(base or path, source, info)
    if base:
        _refuse_adapter_on_adapter(path, lora)
        model = load_adapter(model, resolved, base)
    return _ready_for_training(model, lora, trainable, disable_dropout, gradient_checkpointing)


def load_reward_model(path: str, dtype: str = "float32", lora: Any = None, num_labels: int = 1,
                      tokenizer: Any = None, attn_implementation: str = "",
                      gradient_checkpointing: bool = False) -> PreTrainedModel:
    """An AutoModelForSequenceClassification with one output (a fresh head when `path` is an LM).

    A peft adapter folder (``adapter_config.json``, no weights) loads onto its base and is merged
    (see :func:`load_adapter`). With `tokenizer`, the embeddings grow to cover tokens it added
    (a distinct pad token) and `config.pad_token_id` is set from it, before any LoRA adapter is
    attached. `path` may also be a model loaded in Python: see :func:`_classifier_object`.
    """
    if isinstance(path, torch.nn.Module):
        return _classifier_object(path, dtype, lora, num_labels, tokenizer, attn_implementation, gradient_checkpointing)
    resolved = resolve_path(path)
    base = adapter_base(resolved)
    try:
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(resolve_path(base) if base else resolved,
                                                                       dtype=_dtype(dtype), num_labels=num_labels,
                                                                       **_attn_kwargs(attn_implementation))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a sequence-classification model from {base or path!r}: {_one_line(e)}") from e
    if base:
        _refuse_adapter_on_adapter(path, lora)
        model = load_adapter(model, resolved, base)
    if tokenizer is not None:
        grow_embeddings(model, len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        tok_path = resolved if Path(resolved).is_dir() else path
        try:
            tok = load_tokenizer(tok_path)
            model.config.pad_token_id = tok.pad_token_id
        except ConfigError:
            pass  # the caller sets it once it has a tokenizer; scoring needs it to find the last token
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None and getattr(lora, "use_lora", False):
        model = apply_lora(model, lora, task_type="SEQ_CLS")
    return model


ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def adapter_base(path: str | Path) -> str | None:
    """The base model a peft adapter folder was trained on (``base_model_name_or_path`` in its
    adapter_config.json); None when `path` is not an adapter folder (no adapter config, or full
    weights beside it)."""
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file() or any((folder / w).is_file() for w in _WEIGHT_FILES):
        return None
    base = read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{folder / ADAPTER_CONFIG}: 'base_model_name_or_path' is empty, so the adapter's base model "
                          f"is unknown; set it to the base model's folder or hub name")
    return str(base)


def grow_embeddings(model: PreTrainedModel, vocab: int) -> None:
    """Resize the embeddings to `vocab` rows when a tokenizer added tokens (a new pad token).

    The model remembers that it grew, so :func:`save_model` writes the resized embedding into a
    LoRA adapter (peft's ``save_embedding_layers``), without which the adapter would not load.
    New rows are drawn like the model's own initialisation; only the pad token is new and
    attention masks hide it, so its values never change a score.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab > rows:
        model.resize_token_embeddings(vocab, mean_resizing=False)
        model._rlhfkit_grown_from = rows


def load_adapter(model: PreTrainedModel, folder: str | Path, base: str) -> PreTrainedModel:
    """A peft adapter saved in `folder` loaded onto `model` (its base) and merged into it.

    As peft's ``AutoPeftModel``: the base's embeddings first grow to the adapter's tokenizer (an
    adapter saved after adding a pad token holds the resized embedding), then
    ``PeftModel.from_pretrained``. Merging gives a plain transformers model, so a recipe trains it
    in full or puts a fresh LoRA adapter on it, and a LoRA policy's reference is base + adapter.
    """

    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file():
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(folder)
        grow_embeddings(model, len(tok))
        if tok.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tok.pad_token_id
    try:
        with quiet_transformers():
            peft_model = PeftModel.from_pretrained(model, str(folder))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load the peft adapter {folder} onto its base model {base!r}: {_one_line(e)}") from e
    grown = getattr(model, "_rlhfkit_grown_from", None)
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(True)  # peft froze the base; merged, it is a model like any from_pretrained
    if grown is not None:
        merged._rlhfkit_grown_from = grown
    return merged


def _refuse_adapter_on_adapter(path: str, lora: Any) -> None:
    """A new adapter saved unmerged would name the first adapter's base and lose the first adapter."""
    if lora is not None and getattr(lora, "use_lora", False) and not getattr(lora, "merge_lora", True):
        raise ConfigError(f"config field 'merge_lora': {path!r} is a peft adapter, merged into its base before "
                          f"training; a second adapter saved unmerged would not include it: use --merge_lora true")


def _refuse_fresh_weights(name: str, folder: str, info: dict) -> None:
    """ConfigError when transformers had to initialise weights the checkpoint lacks (tied weights,
    such as a tied LM head, are not reported missing)."""
    missing = sorted(info.get("missing_keys") or [])
    if not missing:
        return
    archs = read_json(Path(folder) / "config.json").get("architectures") or []
    rm = any("SequenceClassification" in a for a in archs) or any(
        k.startswith(("score.", "classifier.")) for k in info.get("unexpected_keys") or [])
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    hint = (f"it looks like a reward model ({', '.join(archs) or 'a score head'}); pass the causal LM it was trained from"
            if rm else "pass a causal LM checkpoint (AutoModelForCausalLM) with all its weights")
    raise ConfigError(f"cannot load a policy from {name!r}: the checkpoint has no {shown}, so they would start "
                      f"random; {hint}")


# ---------------------------------------------------------------------------------------------
# models given in Python (TRL's trainers take `model=` a loaded PreTrainedModel)


def _ready_for_training(model: PreTrainedModel, lora: Any, trainable: bool, disable_dropout: bool,
                       gradient_checkpointing: bool) -> PreTrainedModel:
    """What every policy gets after loading: gradient checkpointing, LoRA adapters, dropout off, train/eval mode."""
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None and getattr(lora, "use_lora", False):
        model = apply_lora(model, lora, task_type="CAUSAL_LM")
    if disable_dropout:
        _off(model)
    model.train(trainable)
    return model


def _folder_of(model: torch.nn.Module) -> str:
    """The folder (or hub name) a model given in Python was loaded from."""
    name = getattr(getattr(model, "module", model), "name_or_path", "") or ""
    if not name:
        raise ConfigError(f"the {type(model).__name__} given as model was not loaded from a folder, so its tokenizer "
                          "is unknown: pass the loaded tokenizer too (processing_class=... or tokenizer=...)")
    return name


def _policy_object(model: torch.nn.Module, lora: Any, trainable: bool, disable_dropout: bool,
                   gradient_checkpointing: bool) -> PreTrainedModel:
    """A policy given in Python: trained in place, as by TRL's trainers; a frozen one (a reference) is a
    copy. Its dtype and attention kernel are its own."""
    model = model if trainable else copy.deepcopy(model)
    return _ready_for_training(model, lora, trainable, disable_dropout, gradient_checkpointing)


def _classifier_object(model: torch.nn.Module, dtype: str, lora: Any, num_labels: int, tokenizer: Any,
                       attn_implementation: str, gradient_checkpointing: bool) -> PreTrainedModel:
    """A reward or value model from a model given in Python: itself when it is a sequence classifier
    (trained in place, as by TRL's RewardTrainer), else a fresh head over a copy of its weights (PPO's
    critic started from a policy object), through a temporary save_pretrained folder."""
    model = getattr(model, "module", model)
    if not type(model).__name__.endswith("ForSequenceClassification"):
        with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
            model.save_pretrained(tmp)
            model = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=_dtype(dtype), num_labels=num_labels,
                                                                       **_attn_kwargs(attn_implementation))
    if tokenizer is not None:
        grow_embeddings(model, len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None and getattr(lora, "use_lora", False):
        model = apply_lora(model, lora, task_type="SEQ_CLS")
    return model


def _attn_kwargs(attn_implementation: str) -> dict:
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


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
        to_save, state_dict = unsharded_copy(to_save, state_dict), None
    kwargs = {}
    if hasattr(to_save, "peft_config"):
        # an adapter over embeddings grown for a new pad token carries them (peft's save_embedding_layers),
        # else it could not load onto its base; said explicitly, so peft needs no look at the base's config
        kwargs["save_embedding_layers"] = getattr(to_save.get_base_model(), "_rlhfkit_grown_from", None) is not None
    with atomic_path(path) as tmp, quiet_transformers():
        tmp.mkdir()
        to_save.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
    return path


def weights_fingerprint(model: Any) -> str:
    """sha256 over a model's weights (LoRA adapter tensors excluded: a reference runs without them)."""

    h = hashlib.sha256()
    inner = getattr(model, "module", model)
    for name, t in sorted(inner.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def max_positions(model: Any) -> int | None:
    """The longest sequence a model's position embeddings cover (None: no fixed limit known)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    cfg = getattr(inner, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(model: Any, max_length: int, field: str = "max_length") -> None:
    """ConfigError when `max_length` exceeds the model's positions (GPT-2 would index past its
    learned position table; RoPE models would run on positions they never saw)."""
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise ConfigError(f"config field '{field}': {max_length} is more than the model's {limit} positions "
                          f"(max_position_embeddings / n_positions); use --{field} {limit} or less")


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
