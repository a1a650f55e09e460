"""Pieces every training recipe shares, as plain functions.

accelerate does devices, DDP/FSDP/DeepSpeed and mixed precision; these helpers do the rest:
optimiser and schedule, a deterministic data order that survives resumption, resumable
checkpoints written atomically, and the NaN guard.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rlhfkit.errors import NonFiniteError
from rlhfkit.runs import atomic_path
from rlhfkit.sharding import enable_fsdp_on_cpu

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")


def make_accelerator(cfg: Any) -> Accelerator:
    """An Accelerator from a TrainArgs-like config, seeded identically on every process.

    Launched as several processes on a machine without CUDA (`accelerate launch --multi_gpu
    --num_processes 2` on a CPU box), accelerate would otherwise leave every process alone;
    `cpu=True` makes it join them with the gloo backend (DistributedType.MULTI_CPU).
    """
    reset_accelerate_state()
    acc = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=multi_process_cpu(),
    )
    enable_fsdp_on_cpu(acc)  # an FSDP config launched on CPU shards for real (rlhfkit.sharding)
    if acc.device.type == "cpu":
        keep_freed_memory()
    set_seed(cfg.seed)
    return acc


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves blocks above 128 KiB with mmap and returns freed memory at the top of
    the heap, so a training step on the CPU, which frees its activations and allocates the same
    sizes again in the next step, page-faults every page back in: about a tenth of the process
    time of a small model's PPO update went to those faults. Blocks up to `mmap_threshold` (32 MiB,
    the most glibc allows on 64-bit) then come from the heap, and up to `trim_threshold` free bytes
    stay there (the process keeps that much memory after training). Returns whether it applied
    (Linux with glibc only; elsewhere nothing changes).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def multi_process_cpu() -> bool:
    """A launch of several processes on a machine without CUDA: they join over gloo (cpu=True).

    A recipe that asks for the process state before its Accelerator exists must pass this as
    `PartialState(cpu=...)`, or the state is fixed as single-process for the whole launch.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state between recipes run in one process (a notebook).

    accelerate keeps one AcceleratorState per process; a second Accelerator with another
    precision (bf16 after fp32) or accumulation setting would otherwise fail ("AcceleratorState
    has already been initialized and cannot be changed"). Under a multi-process launch the state
    belongs to the launch and is left alone.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW (cfg.optim: torch's, fused, or bitsandbytes' 8-bit); weight decay only on matrices (not on
    biases, norms or 1-d parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    from rlhfkit.precision import MasterWeightOptimizer, optimizer_class

    cls = optimizer_class(getattr(cfg, "optim", "adamw_torch"))
    if cls is torch.optim.AdamW and not any(p.is_cuda for p in decay + no_decay):
        # torch picks the per-tensor loop on CPU; the multi-tensor one gives bitwise the same
        # update in about half the time (one kernel per op for all tensors, not one per tensor)
        kwargs["foreach"] = True
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in decay + no_decay):
        # pure bf16/fp16 weights: the optimiser on fp32 master copies (rlhfkit.precision)
        return MasterWeightOptimizer(groups, cls, **kwargs)
    return cls(groups, **kwargs)


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimiser step `step`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, num_training_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, num_training_steps, cfg.lr_scheduler_type)
    )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch).

    Drawing it from a private generator, not the global RNG, is what lets a resumed run
    replay exactly the batches an uninterrupted run would have seen.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def iterate_batches(n: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                    num_processes: int = 1, process_index: int = 0) -> Iterator[tuple[int, list[int], list[int]]]:
    """Yield (micro_step, local_indices, global_indices) from `start_step` micro-steps on.

    Each global micro-batch holds `batch_size * num_processes` examples taken in epoch
    order; process k gets the k-th slice, so N processes see the same examples per
    optimiser step as one process with an N-times larger batch. A trailing partial global
    batch of an epoch is dropped so every process steps together. The global indices let
    every process normalise a loss by the whole step's token count without communication.
    """
    global_bs = batch_size * num_processes
    per_epoch = n // global_bs
    if per_epoch == 0:
        from rlhfkit.errors import ConfigError

        what = "no training examples" if n == 0 else f"{n} training examples are fewer than one global batch of {global_bs}"
        raise ConfigError(f"config field 'per_device_train_batch_size': {what} "
                          f"({batch_size} per device x {num_processes} processes); give more data or a smaller batch")
    order, order_epoch = None, -1
    for step in range(start_step, total_steps):
        epoch, pos = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(n, seed, epoch), epoch
        chunk = order[pos * global_bs:(pos + 1) * global_bs]
        yield step, chunk[process_index * batch_size:(process_index + 1) * batch_size], chunk


def micro_steps_per_epoch(n: int, batch_size: int, num_processes: int) -> int:
    return n // (batch_size * num_processes)


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict | None = None,
                    keep: int = 2) -> Path | None:
    """Write model, optimiser, scheduler and RNG states plus `state` to checkpoints/step-N.

    All processes must call it (accelerate gathers sharded states); only the main process
    renames the finished folder into place and prunes all but the newest `keep`.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # accelerate warns "Removed shared tensor ..." on every checkpoint of a model with tied
    # embeddings; the tie is restored on load, so the warning is noise to a user
    quiet = logging.getLogger("accelerate.utils.other")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    finally:
        quiet.setLevel(level)
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
        with atomic_path(final) as t:
            shutil.move(str(tmp), t)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict:
    """Restore states saved by :func:`save_checkpoint`; returns its trainer_state (with `step`)."""
    path = Path(path)
    accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())


# ---------------------------------------------------------------------------------------------
# guards


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    """Raise NonFiniteError if any value is NaN or infinite (call before optimizer.step)."""
    for t in tensors:
        if t is not None and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise NonFiniteError(
                f"{name} has {bad} non-finite value(s) (NaN or inf); the step was not applied. "
                "Lower the learning rate, check the reward model's outputs, or enable reward clipping."
            )


def check_finite_grads(model: torch.nn.Module) -> None:
    for n, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise NonFiniteError(f"gradient of {n} is not finite; the step was not applied")


def mean_across_processes(accelerator: Accelerator, values: Sequence[float]) -> list[float]:
    """Average scalars over processes (for logging)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    return (accelerator.reduce(t, reduction="mean") if accelerator.num_processes > 1 else t).tolist()
