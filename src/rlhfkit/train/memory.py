"""Memory estimate printed before training, and a refusal with advice when a run cannot fit.

Per device, in bytes:

* weights      parameters x bytes per weight (/ shards under FSDP or ZeRO-3)
* gradients    trainable parameters x bytes per gradient (/ shards under ZeRO-2/3 and FSDP)
* optimiser    AdamW: two moments per trainable parameter, 4 bytes each in fp32 (1 byte each
               with an 8-bit optimiser), plus a 4-byte fp32 master copy when the weights are
               bf16 (pure bf16 training); / shards under ZeRO and FSDP
* activations  per decoder layer and token s*b*h*(34 + 5*a*s/h) bytes at 2-byte activations
               (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
               Models", eq. 1), without the 5as/h attention-score term when the attention kernel
               never materialises the scores (sdpa, flash); doubled for fp32 activations. With
               gradient checkpointing only each layer's input (2*s*b*h bytes at 2 bytes) is kept,
               plus one layer's full activations during its recompute. Plus the logits: fp32
               (b, s, V) twice (logits and their gradient).
* KV cache     2 (K and V) x layers x kv_heads x head_dim x (prompt + response) x rollout batch
               x bytes, for on-policy recipes' generation
* frozen       reference / reward / value models: their weights (a value model also trains:
               count it as a second trained model)

The activation formula is for a GPT-style block; Llama's SwiGLU MLP and grouped-query attention
move it by tens of percent, so the estimate is a guide, and the refusal leaves 10% headroom.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.train.runs import atomic_write_text
from rlhfkit.train.sharding import is_sharded

GiB = 1024**3
DTYPE_BYTES = {"float64": 8, "float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclasses.dataclass
class ModelShape:
    """What the estimate needs to know of a transformer (read from a transformers config)."""

    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any, params: int | None = None) -> ModelShape:
        h, layers = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        if params is None:
            params = llama_param_count(config)
        return cls(params=params, layers=layers, hidden=h, heads=heads, kv_heads=kv, head_dim=head_dim,
                   vocab=config.vocab_size)


def llama_param_count(config: Any) -> int:
    """Parameters of a Llama-shaped model from its config (no bias terms; tied head counted once)."""
    h, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or h // heads
    attn = h * heads * d * 2 + h * kv * d * 2  # q, o and k, v
    mlp = 3 * h * config.intermediate_size
    per_layer = attn + mlp + 2 * h  # two RMSNorm weights
    head = 0 if getattr(config, "tie_word_embeddings", False) else V * h
    return V * h + L * per_layer + h + head


def size(nbytes: float) -> str:
    """Bytes in the largest of GiB, MiB, KiB that gives at least 1 (so small models read too)."""
    for unit, div in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= div or unit == "KiB":
            return f"{nbytes / div:9.2f} {unit}"
    raise AssertionError("unreachable")


@dataclasses.dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    kv_cache: int
    frozen_models: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def summary(self, capacity: int | None = None, table_file: Path | None = None) -> str:
        """One line: the total, the largest term, the free memory and where the full table is."""
        rows = {f.name.replace("_", " "): getattr(self, f.name) for f in dataclasses.fields(self)}
        largest = max(rows, key=rows.get)
        free = f", {size(capacity).strip()} free" if capacity else ""
        where = f"; table in {table_file}" if table_file else ""
        return (f"memory estimate per device: {size(self.total).strip()} (largest: {largest} "
                f"{size(rows[largest]).strip()}{free}){where} (--verbose true prints it)")

    def breakdown(self) -> str:
        """Every term on one line (for an error message)."""
        return ", ".join(f"{f.name.replace('_', ' ')} {size(getattr(self, f.name)).strip()}"
                         for f in dataclasses.fields(self))

    def table(self, capacity: int | None = None) -> str:
        rows = [(f.name.replace("_", " "), getattr(self, f.name)) for f in dataclasses.fields(self)]
        lines = ["memory estimate per device:"]
        lines += [f"  {name:<14}{size(b)}" for name, b in rows]
        lines.append(f"  {'total':<14}{size(self.total)}")
        if capacity:
            lines.append(f"  {'available':<14}{size(capacity)}")
        return "\n".join(lines)


def estimate(shape: ModelShape, *, trainable_params: int | None = None, weight_dtype: str = "float32",
             mixed_precision: str = "no", optimizer: str = "adamw", batch: int = 8, seq_len: int = 512,
             gradient_checkpointing: bool = False, attn_implementation: str = "sdpa", shards: int = 1,
             zero_stage: int = 0, rollout_batch: int = 0, rollout_len: int = 0, frozen_params: int = 0,
             frozen_dtype: str = "bfloat16") -> MemoryEstimate:
    """Bytes per device for training `shape` (see the module docstring for each term).

    `shards` is the number of processes FSDP or ZeRO splits the state over; `zero_stage` 0 means
    FSDP when shards > 1 (everything sharded), else 2 (optimiser + gradients) or 3 (all).
    """
    wb = DTYPE_BYTES[weight_dtype]
    trainable = shape.params if trainable_params is None else trainable_params
    shard_w = shards if (zero_stage in (0, 3) and shards > 1) else 1
    shard_g = shards if shards > 1 else 1
    weights = shape.params * wb // shard_w
    gradients = trainable * wb // shard_g
    moment_bytes = 1 if "8bit" in optimizer else 4
    master = 4 if wb == 2 else 0  # fp32 master copy for bf16/fp16 weights
    opt = trainable * (2 * moment_bytes + master) // shard_g
    act_bytes = 2 if (mixed_precision in ("bf16", "fp16") or wb == 2) else 4
    s, b, h, a = seq_len, batch, shape.hidden, shape.heads
    score_term = 0 if attn_implementation in ("sdpa", "flash_attention_2") else 5 * a * s / h
    full_layer = s * b * h * (34 + score_term) * act_bytes / 2
    if gradient_checkpointing:
        acts = shape.layers * 2 * s * b * h * act_bytes / 2 + full_layer
    else:
        acts = shape.layers * full_layer
    logits = 2 * b * s * shape.vocab * 4
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * rollout_len * rollout_batch * act_bytes
    frozen = frozen_params * DTYPE_BYTES[frozen_dtype] // shard_w
    return MemoryEstimate(weights=int(weights), gradients=int(gradients), optimizer=int(opt),
                          activations=int(acts + logits), kv_cache=int(kv), frozen_models=int(frozen))


def device_capacity() -> int | None:
    """Free bytes on the current CUDA device, or None without one (CPU runs are not refused)."""

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def advice(est: MemoryEstimate, *, gradient_checkpointing: bool, optimizer: str, use_lora: bool,
           batch: int, shards: int) -> list[str]:
    """What to change, biggest saving first."""
    tips = []
    if not gradient_checkpointing and est.activations > 0.2 * est.total:
        tips.append("gradient_checkpointing: true (activations are "
                    f"{est.activations / GiB:.1f} GiB of {est.total / GiB:.1f} GiB)")
    if batch > 1 and est.activations > 0.1 * est.total:
        tips.append(f"a smaller per-device batch ({batch} now) with gradient_accumulation_steps to keep the global batch")
    if not use_lora and est.optimizer + est.gradients > 0.3 * est.total:
        tips.append("use_lora: true (gradients and optimiser state only for the adapters)")
    if "8bit" not in optimizer and est.optimizer > 0.2 * est.total:
        tips.append("an 8-bit optimiser (adamw_8bit, needs bitsandbytes): optimiser state x 1/4")
    if shards == 1:
        tips.append("shard over several GPUs: accelerate launch --config_file configs/accelerate/fsdp2_8gpu.yaml "
                    "(or deepspeed_zero3_8gpu.yaml)")
    if est.frozen_models > 0.1 * est.total:
        tips.append("offload the reference/reward models to CPU between uses")
    return tips


def check_fits(est: MemoryEstimate, capacity: int | None, headroom: float = 0.9, **advice_kwargs) -> None:
    """Raise ConfigError, with what to change, when the estimate exceeds `headroom` x capacity."""
    if capacity is None or est.total <= headroom * capacity:
        return
    tips = advice(est, **advice_kwargs)
    raise ConfigError(
        f"this run needs about {est.total / GiB:.1f} GiB per device and {capacity / GiB:.1f} GiB is free "
        f"({est.breakdown()}). To make it fit: " + "; ".join(tips)
    )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def report(model, cfg: Any, *, batch: int, seq_len: int, rollout_batch: int = 0, rollout_len: int = 0,
           frozen_params: int = 0, shards: int = 1, printer=print, outputs: int | None = None,
           frozen_bytes: int = 0, extra: MemoryEstimate | None = None,
           table_file: Path | None = None) -> MemoryEstimate:
    """Estimate for a loaded model and a recipe config; print it and refuse a run that cannot fit.

    The full table goes to `table_file` (the run folder's memory.txt) and, with the config's
    `verbose`, to the printer; otherwise one line does.

    Reads optional config fields by name (gradient_checkpointing, attn_implementation, optim,
    mixed_precision, use_lora), so it works with every recipe's config. `outputs` replaces the
    vocabulary in the logits term (1 for a reward or value head); `frozen_bytes` adds frozen
    models counted at their own dtype; `extra` adds a second trained model (PPO's critic).
    """
    params = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    weight_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    gc = bool(getattr(cfg, "gradient_checkpointing", False))
    optim = getattr(cfg, "optim", "adamw")
    shape = ModelShape.from_config(model.config, params=params)
    if outputs is not None:
        shape.vocab = outputs
    est = estimate(shape, trainable_params=trainable, weight_dtype=weight_dtype,
                   mixed_precision=getattr(cfg, "mixed_precision", "no"), optimizer=optim, batch=batch,
                   seq_len=seq_len, gradient_checkpointing=gc,
                   attn_implementation=getattr(cfg, "attn_implementation", "") or "sdpa", shards=shards,
                   rollout_batch=rollout_batch, rollout_len=rollout_len, frozen_params=frozen_params)
    est.frozen_models += frozen_bytes // (shards if shards > 1 and getattr(cfg, "zero_stage", 0) in (0, 3) else 1)
    if extra is not None:
        est = MemoryEstimate(*(a + b for a, b in zip(dataclasses.astuple(est), dataclasses.astuple(extra))))
    capacity = device_capacity()
    if table_file is not None:
        atomic_write_text(table_file, est.table(capacity) + "\n")
    printer(est.table(capacity) if getattr(cfg, "verbose", False) else est.summary(capacity, table_file))
    check_fits(est, capacity, gradient_checkpointing=gc, optimizer=optim,
               use_lora=bool(getattr(cfg, "use_lora", False)), batch=batch, shards=shards)
    return est


def report_for_run(accelerator, model, cfg: Any, *, batch: int, seq_len: int, **kwargs) -> MemoryEstimate:
    """:func:`report` with the shard count and printer taken from the run's Accelerator."""

    shards = accelerator.num_processes if is_sharded(accelerator) else 1
    return report(model, cfg, batch=batch, seq_len=seq_len, shards=shards, printer=accelerator.print,
                  table_file=table_file(accelerator, cfg), **kwargs)


def table_file(accelerator, cfg: Any) -> Path | None:
    """The run folder's memory.txt, written by the main process."""
    out = getattr(cfg, "output_dir", None)
    return Path(out) / "memory.txt" if out and accelerator.is_main_process else None


def modules_in(*objects: Any, depth: int = 8) -> list:
    """The distinct torch modules held by `objects` (reward sets, scorers, wrappers), searched through
    attributes, lists and dicts up to `depth` levels; a module found is not searched inside."""

    found, seen = [], set()

    def walk(obj, d):
        if obj is None or isinstance(obj, (str, bytes, int, float, bool)) or id(obj) in seen or d < 0:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, d - 1)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x, d - 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for x in vars(obj).values():
                walk(x, d - 1)

    for o in objects:
        walk(o, depth)
    return found


def tensor_bytes(module) -> int:
    """Bytes of a module's unique parameters at their own dtypes."""
    seen, total = set(), 0
    for t in module.parameters():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def report_on_policy(accelerator, policy, cfg: Any, *, frozen: tuple = (), critic=None) -> MemoryEstimate:
    """The estimate for PPO, GRPO and RLOO, printed and checked like :func:`report_for_run`:

    * the policy trained on micro-batches of per_device_train_batch_size sequences of
      max_prompt_length + max_completion_length tokens;
    * the KV cache of one generation batch (min(generation_batch_size, prompts_per_step x
      num_generations) sequences of that length);
    * the frozen reference and reward models found in `frozen` (reward sets, scorers,
      modules), at their own dtypes; the policy itself (the reference under LoRA) not again;
      with offload_reference only the largest (one is on the device at a time);
    * a trained `critic` (PPO's value model): its weights, gradients, optimiser state and
      activations, with a one-output head instead of the vocabulary.
    """

    shards = accelerator.num_processes if is_sharded(accelerator) else 1
    seq = cfg.max_prompt_length + cfg.max_completion_length
    rollout = min(cfg.generation_batch_size, cfg.prompts_per_step * getattr(cfg, "num_generations", 1))
    mine = {id(m) for m in (policy, getattr(policy, "module", None), critic) if m is not None}
    if critic is not None:
        mine |= {id(m) for m in critic.modules()}
    mine |= {id(m) for m in policy.modules()}
    sizes = [tensor_bytes(m) for m in modules_in(*frozen) if id(m) not in mine]
    # offloaded to CPU between uses: only one frozen model is on the device at a time
    frozen_bytes = max(sizes, default=0) if getattr(cfg, "offload_reference", False) else sum(sizes)
    extra = None
    if critic is not None:
        inner = getattr(critic, "model", critic)
        extra = report(inner, cfg, batch=cfg.per_device_train_batch_size, seq_len=seq, shards=shards,
                       printer=lambda _: None, outputs=1)
    return report(policy, cfg, batch=cfg.per_device_train_batch_size, seq_len=seq, rollout_batch=rollout,
                  rollout_len=seq, shards=shards, printer=accelerator.print, frozen_bytes=frozen_bytes, extra=extra,
                  table_file=table_file(accelerator, cfg))
