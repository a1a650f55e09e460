"""Configuration: one dataclass per recipe, loaded from YAML and overridden by `--field value`.

Every field carries a docstring (the string literal under it); tyro turns it into `--help`.
Shared field groups are plain dataclasses that recipe configs inherit *fields* from
(no behaviour is inherited). Validation and computed fields live in `__post_init__`, one
place per config, and raise :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro
import yaml

T = TypeVar("T")


from rlhfkit.errors import ConfigError  # noqa: E402  (re-exported: config users import it here)


def require(cond: bool, field: str, message: str) -> None:
    """Raise a ConfigError naming `field` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"config field '{field}': {message}")


@dataclasses.dataclass
class ModelArgs:
    model: str = ""
    """Model to start from: a local folder saved with save_pretrained, a hub name, or 'kindly' for the bundled base."""
    tokenizer: str = ""
    """Tokenizer to use (defaults to the model's own)."""
    dtype: str = "float32"
    """Weights dtype when loading: float32, bfloat16 or float16."""
    use_lora: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names to adapt, or 'all-linear'."""
    disable_dropout: bool = True
    """Turn off every dropout layer of the trained models (preference and RL recipes), as TRL does: with dropout on, the policy and its reference disagree at step 0 and the reward of one text varies between forwards. False keeps the model's own dropout."""


@dataclasses.dataclass
class SplitArgs:
    dataset_split: str = "train"
    """Split of `dataset` to train on (a saved DatasetDict, a folder of {split}.jsonl files or a hub dataset)."""
    eval_split: str = ""
    """Held-out split (of `eval_dataset` when given, else of `dataset`); default: test, eval or validation when the dataset folder has one."""


@dataclasses.dataclass
class TrainArgs:
    output_dir: str = "runs/out"
    """Folder for checkpoints, metrics.jsonl, TensorBoard events and the final model."""
    seed: int = 0
    """Random seed for weights, data order and sampling."""
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler: str = "constant"
    """Learning-rate schedule after warm-up: constant, linear or cosine."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    per_device_batch_size: int = 8
    """Micro-batch size per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    num_epochs: float = 1.0
    """Passes over the training data (fractional allowed)."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run num_epochs)."""
    mixed_precision: str = "no"
    """accelerate mixed precision: no, bf16 or fp16."""
    log_every: int = 10
    """Log metrics every N optimiser steps."""
    eval_every: int = 0
    """Evaluate on held-out data every N steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only the final model)."""
    resume: bool = False
    """Resume from the newest checkpoint in output_dir if one exists."""
    overwrite: bool = False
    """Replace an existing run in output_dir (without it, and without --resume true, an existing run folder is refused)."""
    report_to: str = "jsonl,tensorboard"
    """Metric sinks, comma separated: jsonl, tensorboard, none."""
    progress: bool = True
    """Show a progress bar."""

    def _check_train_args(self) -> None:
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(self.per_device_batch_size >= 1, "per_device_batch_size", "must be >= 1")
        require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        require(self.lr_scheduler in ("constant", "linear", "cosine"), "lr_scheduler",
                f"must be constant, linear or cosine, got {self.lr_scheduler!r}")
        require(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision",
                f"must be no, bf16 or fp16, got {self.mixed_precision!r}")
        require(self.num_epochs > 0 or self.max_steps > 0, "num_epochs", "must be > 0 unless max_steps is set")


def _resolve_hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls).get(name)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against a field's type hint, converting int->float where natural."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: value {value!r} does not match {hint}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return type(value)(value) if origin is None else (tuple(value) if origin is tuple else list(value))
    return value


def from_dict(cls: type[T], data: dict, source: str = "config") -> T:
    """Build `cls` from a mapping, rejecting unknown keys and wrongly typed values by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of field: value, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
            f"known fields: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(v, _resolve_hint(cls, k), f"{source}: field '{k}'") for k, v in data.items()}
    return cls(**kwargs)


def load_yaml_config(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return from_dict(cls, data, str(path))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


_TRUTH = {"true": "True", "yes": "True", "1": "True", "false": "False", "no": "False", "0": "False"}


def _normalise_bools(cls: type, argv: list[str]) -> list[str]:
    """Accept `--flag true|yes|1|false|no|0` (any case) for boolean fields, as HfArgumentParser does."""
    hints = typing.get_type_hints(cls)
    bools = {f.name for f in dataclasses.fields(cls) if hints.get(f.name) is bool}
    out = list(argv)
    for i, tok in enumerate(out):
        if tok.startswith("--") and "=" in tok:
            name, val = tok[2:].split("=", 1)
            if name in bools and val.lower() in _TRUTH:
                out[i] = f"--{name}={_TRUTH[val.lower()]}"
        elif tok.startswith("--") and tok[2:] in bools and i + 1 < len(out) and out[i + 1].lower() in _TRUTH:
            out[i + 1] = _TRUTH[out[i + 1].lower()]
    return out


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> T:
    """Parse `--config FILE.yaml` then `--field value` overrides into an instance of `cls`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    default = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file path")
        default = load_yaml_config(cls, argv[i + 1])
        del argv[i:i + 2]
    else:
        for i, a in enumerate(argv):
            if a.startswith("--config="):
                default = load_yaml_config(cls, a.split("=", 1)[1])
                del argv[i]
                break
    argv = _normalise_bools(cls, argv)
    # FlagConversionOff: booleans take a value (`--resume true`), as in HfArgumentParser/TRL
    kwargs: dict[str, Any] = dict(prog=prog, description=description, args=argv, use_underscores=True,
                                  config=(tyro.conf.FlagConversionOff,))
    if default is not None:
        kwargs["default"] = default
    return tyro.cli(cls, **kwargs)

