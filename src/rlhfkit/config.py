"""Configuration: one dataclass per recipe, loaded from YAML and overridden by `--field value`.

Every field carries a docstring (the string literal under it); tyro turns it into `--help`.
Shared field groups are plain dataclasses that recipe configs inherit *fields* from
(no behaviour is inherited). Validation and computed fields live in `__post_init__`, one
place per config, and raise :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro
import yaml

from rlhfkit import trl_options
from rlhfkit.advantages import KL_ESTIMATORS, OFF_POLICY_CORRECTIONS
from rlhfkit.errors import ConfigError  # re-exported: config users import it here
from rlhfkit.train.optim import optimizer_class

T = TypeVar("T")


def require(cond: bool, field: str, message: str) -> None:
    """Raise a ConfigError naming `field` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"config field '{field}': {message}")


@dataclasses.dataclass
class ModelArgs:
    model: str = ""
    """Model to start from: a local folder saved with save_pretrained, a hub name, or 'kindly' for the bundled base (from Python also a loaded PreTrainedModel, trained in place as by TRL's trainers)."""
    tokenizer: str = ""
    """Tokenizer to use (defaults to the model's own; from Python also a loaded tokenizer)."""
    processing_class: tyro.conf.Suppress[Any] = None
    """From Python: a loaded tokenizer, TRL's name for `tokenizer`."""
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
    attn_implementation: str = ""
    """Attention kernel passed to from_pretrained: eager, sdpa, flash_attention_2, ... (default: transformers' choice)."""
    merge_lora: bool = True
    """With use_lora, save the model merged into full weights (True) or as a standard peft adapter folder (False; a reward model's adapter carries its score head and grown embedding, and loads as --reward rm:FOLDER)."""
    disable_dropout: bool = True
    """Turn off every dropout layer of the trained models (preference and RL recipes), as TRL does: with dropout on, the policy and its reference disagree at step 0 and the reward of one text varies between forwards. False keeps the model's own dropout."""


@dataclasses.dataclass
class SplitArgs:
    max_prompt_length: int = 0
    """Prompts keep at most their last N tokens (0: only max_length limits them), as in TRL."""
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
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler_type: str = "constant"
    """Learning-rate schedule after warm-up: constant, linear or cosine."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    per_device_train_batch_size: int = 8
    """Micro-batch size per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    num_train_epochs: float = 1.0
    """Passes over the training data (fractional allowed)."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run num_train_epochs)."""
    bf16: bool = False
    """Mixed precision in bfloat16 (accelerate's autocast; weights stay in `dtype`)."""
    fp16: bool = False
    """Mixed precision in float16 with loss scaling (GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (transformers' gradient checkpointing, non-reentrant)."""
    optim: str = "adamw_torch"
    """Optimiser (transformers' names): adamw_torch, adamw_torch_fused, adamw_8bit or paged_adamw_8bit (8-bit state; need bitsandbytes)."""
    logging_steps: int = 10
    """Log metrics every N optimiser steps."""
    eval_steps: int = 0
    """Evaluate on held-out data every N steps (0: only at the end)."""
    save_steps: int = 0
    """Write a resumable checkpoint every N steps (0: only the final model)."""
    resume: bool = False
    """Resume from the newest checkpoint in output_dir if one exists."""
    overwrite: bool = False
    """Replace an existing run in output_dir (without it, and without --resume true, an existing run folder is refused)."""
    overwrite_output_dir: bool = False
    """transformers' name for `overwrite`."""
    report_to: str = "jsonl,tensorboard"
    """Metric sinks (accelerate trackers), comma separated: jsonl, csv, tensorboard, wandb (offline unless WANDB_MODE says otherwise), mlflow, all, or none."""
    progress: bool = True
    """Show a progress bar."""
    verbose: bool = False
    """Print the full memory estimate table (one line otherwise; the table is always in output_dir/memory.txt)."""

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the precision chosen by bf16 / fp16: no, bf16 or fp16."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"

    def _check_train_args(self) -> None:
        self.overwrite = self.overwrite or self.overwrite_output_dir
        if getattr(self, "processing_class", None) is not None:  # TRL's name, from Python
            self.tokenizer, self.processing_class = self.processing_class, None
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
        require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        require(self.lr_scheduler_type in ("constant", "linear", "cosine"), "lr_scheduler_type",
                f"must be constant, linear or cosine, got {self.lr_scheduler_type!r}")
        require(not (self.bf16 and self.fp16), "bf16", "bf16 and fp16 cannot both be true")

        optimizer_class(self.optim)  # an unknown name, or an 8-bit one without bitsandbytes, is a config error
        require(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", "must be > 0 unless max_steps is set")


def _resolve_hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls).get(name)


# string fields that hold a comma-separated list: YAML may give them as a list (TRL's report_to and
# lora_target_modules are lists)
COMMA_FIELDS = frozenset({"report_to", "lora_target_modules", "methods"})
# HfArgumentParser's string_to_bool, any case
_BOOL_STRINGS = {"true": True, "yes": True, "y": True, "t": True, "1": True,
                 "false": False, "no": False, "n": False, "f": False, "0": False}


def _from_string(value: str, hint: type, where: str) -> Any:
    """A string in a YAML file for an int, float or bool field, converted as HfArgumentParser converts a
    command-line string (YAML 1.1 reads `1e-5`, without a dot, as a string)."""
    try:
        if hint is bool:
            return _BOOL_STRINGS[value.strip().lower()]
        return hint(value.strip())
    except (KeyError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}[hint]
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None


def _joined(name: str, value: list | tuple, where: str) -> str:
    """A YAML list for a comma-separated field (`report_to: [tensorboard, jsonl]`)."""
    if not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of names, got {value!r}")
    return ",".join(value) if value or name != "report_to" else "none"  # TRL's report_to: [] logs nowhere


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against a field's type hint, converting where the meaning is plain: int ->
    float, a string to the field's int/float/bool, a scalar to a one-item list."""
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
    if hint in (int, float, bool) and isinstance(value, str):
        return _from_string(value, hint, where)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            value = [value]  # `reward: gold` for `reward: [gold]`
        item = (typing.get_args(hint) or (Any,))[0]
        items = [v if item is Any else _coerce(v, item, where) for v in value]
        return tuple(items) if origin is tuple or hint is tuple else items
    return value


def _unknown_field_message(cls: type, names: list[str], source: str) -> str:
    """One line: what each name is (a TRL option with its rlhfkit equivalent, an unsupported option, or a
    typo with the closest field names)."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    config_name = f"{cls.__module__.rsplit('.', 1)[-1]} Config"
    return f"{source}: " + "; ".join(trl_options.explain(n, fields, config_name) for n in names)


def from_dict(cls: type[T], data: dict, source: str = "config") -> T:
    """Build `cls` from a mapping, rejecting unknown keys and wrongly typed values by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of field: value, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = trl_options.renamed(data, set(fields), source)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(_unknown_field_message(cls, unknown, source))
    kwargs = {}
    for k, v in data.items():
        where = f"{source}: field '{k}'"
        if k in COMMA_FIELDS and isinstance(v, list | tuple):
            v = _joined(k, v, where)
        kwargs[k] = _coerce(v, _resolve_hint(cls, k), where)
    return cls(**kwargs)


def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping a YAML config file holds (a missing file, bad YAML or a non-mapping: ConfigError)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def load_yaml_config(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, read_yaml_mapping(path), str(path))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


_TRUTH = {k: str(v) for k, v in _BOOL_STRINGS.items()}


def _normalise_bools(cls: type, argv: list[str]) -> list[str]:
    """Accept `--flag true|yes|y|t|1|false|no|n|f|0` (any case) for boolean fields, as HfArgumentParser does."""
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


def _renamed_flags(argv: list[str], known: set[str]) -> list[str]:
    """`--model_name_or_path X` as `--model X`: TRL's names of rlhfkit's fields (trl_options.ALIASES)."""
    out = []
    for a in argv:
        name, eq, value = a[2:].partition("=")
        new = trl_options.ALIASES.get(name) if a.startswith("--") else None
        out.append(f"--{new}{eq}{value}" if new in known else a)
    return out


_UNCHECKED: dict[type, type] = {}


def _unchecked(cls: type[T]) -> type[T]:
    """`cls` with its checks (`__post_init__`) turned off: the YAML file's values and the command
    line's overrides are merged in it, and the merged values are checked once, by `cls` itself
    (a YAML file may leave a required field to the command line)."""
    if cls not in _UNCHECKED:
        _UNCHECKED[cls] = type(cls.__name__, (cls,), {"__post_init__": lambda self: None, "__doc__": cls.__doc__,
                                                     "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _UNCHECKED[cls]


def _field_values(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def _take_config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """(`--config FILE` or `--config=FILE`, the other arguments)."""
    for i, a in enumerate(argv):
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if a.startswith("--config="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _tyro_message(panel: str) -> str:
    """tyro's error panel as one line: its first paragraph, without the title and the rules (rich draws
    it as a Unicode box, or plainer without a terminal)."""
    lines: list[str] = []
    for line in panel.splitlines():
        text = line.strip().strip("│|").strip()
        if line.strip().startswith(("╭", "╰", "+")) or not text:
            continue
        if set(text) <= {"─", "-"}:
            if lines:
                break
            continue
        if not lines and text.lower().endswith("error") and ":" not in text:
            continue  # the title ("Value error")
        lines.append(text)
    return " ".join(lines) or "cannot parse the arguments"


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> T:
    """Parse `--config FILE.yaml` then `--field value` overrides into an instance of `cls`.

    The file's values and the overrides are merged first and checked together once, so a file
    without a required field (TRL's YAML without `model`) is completed by `--model` for every
    recipe. Every error is a one-line ConfigError.
    """
    path, argv = _take_config_file(list(sys.argv[1:] if argv is None else argv))
    loose = _unchecked(cls)
    default = from_dict(loose, read_yaml_mapping(path), path) if path is not None else loose()
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    argv = _renamed_flags(argv, known)
    flags = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]
    unknown = sorted({f for f in flags if f not in known and f != "help"})
    if unknown:
        raise ConfigError(_unknown_field_message(cls, unknown, "command line"))
    argv = _normalise_bools(cls, argv)
    # FlagConversionOff: booleans take a value (`--resume true`), as in HfArgumentParser/TRL
    kwargs: dict[str, Any] = dict(prog=prog, description=description, args=argv, use_underscores=True,
                                  config=(tyro.conf.FlagConversionOff,), default=default)
    if "-h" in argv or "--help" in argv:
        return tyro.cli(loose, **kwargs)  # prints the help and exits
    panel = io.StringIO()
    try:
        with contextlib.redirect_stderr(panel), contextlib.redirect_stdout(panel):
            parsed = tyro.cli(loose, **kwargs)
    except SystemExit:
        raise ConfigError(f"command line: {_tyro_message(panel.getvalue())} (see {prog or 'the command'} --help)") from None
    return cls(**_field_values(parsed))



# ---------------------------------------------------------------------------------------------
# on-policy recipes (PPO, GRPO/RLOO): what they share. Names follow TRL's PPOConfig/GRPOConfig.


@dataclasses.dataclass
class OnPolicyArgs:
    reward: typing.Annotated[list[str], tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """Reward(s), repeatable: rm:PATH, gold, py:module:fn, py:file.py:fn, judge:SPEC, math, regex:PATTERN, length:MAX."""
    reward_weights: list[float] = dataclasses.field(default_factory=list)
    """Weight of each --reward in the total (default 1 each)."""
    reward_model: str = ""
    """Shorthand for --reward rm:PATH ('gold' = --reward gold)."""
    eval_reward: str = ""
    """Held-out reward for monitoring and the final evaluation ('gold' on the bundled task by default; any reward spec; 'none')."""
    prompts: str = "kindly"
    """Training prompts: 'kindly' (bundled), a bundled task name, or a JSONL/JSON/parquet/dataset with 'prompt' or 'messages' (+ extra columns)."""
    eval_prompts: str = "auto"
    """Held-out prompts for the final evaluation: auto (a bundled task's eval split when training on one, else none), a file, or '' (skip)."""
    num_eval_prompts: int = 200
    """How many held-out prompts the final evaluation uses (0 = all)."""
    max_prompt_length: int = 64
    """Prompts longer than this many tokens are left-truncated (the count is printed)."""
    max_completion_length: int = 24
    """Maximum response length in tokens."""
    temperature: float = 1.0
    """Sampling temperature; the same scaling is applied to training log-probs."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Sample from the k most likely tokens only (0 = all); the sampler records its log-probs under this truncated distribution."""
    off_policy_correction: str = "none"
    """Importance weights pi_trainer/pi_sampler on the policy-gradient term (decoupled PPO; Yao et al. 2025): none, tis (truncated at off_policy_cap) or mis (masked above it). docs/ppo.md."""
    off_policy_level: str = "token"
    """Off-policy weight per token, or per sequence (the product over the response's tokens)."""
    off_policy_cap: float = 2.0
    """C of the off-policy correction: weights above C are cut to C (tis) or set to 0 (mis)."""
    prompts_per_step: int = 16
    """Prompts sampled per update, per process."""
    generation_batch_size: int = 64
    """Rows generated per forward pass (independent of the training micro-batch)."""
    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Optimiser steps per pass over a rollout batch (the batch is shuffled and split)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator used in the reward: k1, k2, k3, abs or mse."""
    target_kl: float = 0.0
    """Adaptive KL controller target in nats per response (Ziegler et al. 2019); 0 = fixed coefficient."""
    kl_horizon: int = 10000
    """Horizon (in episodes) of the adaptive KL controller."""
    early_stop_kl: float = 0.0
    """Stop a step's remaining epochs once the mean approx-KL of a mini-batch exceeds this (0 = never)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of responses that hit max_completion_length without EOS."""
    score_norm: str = "none"
    """Reward normalisation: none, batch (whiten per batch) or running (running mean/std)."""
    score_clip: float = 0.0
    """Clip rewards to [-score_clip, score_clip] after normalisation (0 = no clipping)."""
    sample_every: int = 10
    """Log a table of sample responses every N updates (0 = never)."""
    hacking_window: int = 10
    """Alarms: updates per window over which the training reward rising while the eval reward falls fires the reward-hacking alarm; distinct-1/2 of the rollouts 20% below the first updates' fires the collapse alarm (0 = both off)."""
    stop_on_hacking: bool = False
    """End training when the reward-hacking or collapse alarm fires (the final model and evaluation are still written)."""
    perplexity_data: str = "auto"
    """Held-out text whose perplexity the collapse alarm watches: auto (the bundled corpus when training on the bundled task, else none), 'kindly', a .txt file, or '' (off)."""
    perplexity_every: int = 10
    """Measure that perplexity every N updates, from update 0 (0 = never); above 1.5x the starting policy's the collapse alarm fires."""
    offload_reference: bool = False
    """Keep the frozen reference and reward models in CPU memory and move them to the GPU only for their forwards (OpenRLHF's --ref_reward_offload): frees their memory for the policy's rollout and training, at the cost of a copy per use."""

    def _check_on_policy_args(self) -> None:
        """Checks; the rewards themselves are checked when loaded (a Python run may pass functions)."""

        if self.reward_model:
            self.reward = [*self.reward, "gold" if self.reward_model == "gold" else f"rm:{self.reward_model}"]
            self.reward_model = ""
        require(self.max_completion_length >= 1, "max_completion_length", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0 (training log-probs divide by it)")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.top_k >= 0, "top_k", "must be >= 0 (0 = no top-k)")
        require(self.off_policy_correction in ("none", *OFF_POLICY_CORRECTIONS), "off_policy_correction",
                f"must be none or one of {sorted(OFF_POLICY_CORRECTIONS)}")
        require(self.off_policy_level in ("token", "sequence"), "off_policy_level", "must be token or sequence")
        require(self.off_policy_cap > 0, "off_policy_cap", "must be > 0")
        require(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        require(self.generation_batch_size >= 1, "generation_batch_size", "must be >= 1")
        require(self.num_ppo_epochs >= 1, "num_ppo_epochs", "must be >= 1")
        require(self.num_mini_batches >= 1, "num_mini_batches", "must be >= 1")
        require(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {sorted(KL_ESTIMATORS)}")
        require(self.score_norm in ("none", "batch", "running"), "score_norm", "must be none, batch or running")
        require(self.perplexity_every >= 0, "perplexity_every", "must be >= 0 (0 = never)")
        # one optimiser-step convention: a mini-batch is one optimiser step, split into micro-batches of
        # per_device_train_batch_size rows whose losses are normalised by the mini-batch's totals and summed
        require(getattr(self, "gradient_accumulation_steps", 1) == 1, "gradient_accumulation_steps",
                "on-policy recipes take one optimiser step per mini-batch (num_mini_batches per epoch), "
                "accumulating micro-batches of per_device_train_batch_size rows; leave it at 1")
        require(getattr(self, "eval_steps", 0) == 0, "eval_steps",
                "on-policy recipes evaluate once at the end (the eval reward is logged every update); leave it at 0")
