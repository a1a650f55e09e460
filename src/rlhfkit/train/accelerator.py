"""The Accelerator every recipe trains under, and process-wide settings that go with it.

accelerate does devices, DDP/FSDP/DeepSpeed and mixed precision. The Accelerator is built with
gradient_accumulation_steps=1: accumulation is rlhfkit's own (rlhfkit.train.step says why).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from rlhfkit.train.sharding import enable_fsdp_on_cpu


def make_accelerator(cfg: Any) -> Accelerator:
    """An Accelerator from a TrainArgs-like config, seeded identically on every process.

    Launched as several processes on a machine without CUDA (`accelerate launch --multi_gpu
    --num_processes 2` on a CPU box), accelerate would otherwise leave every process alone;
    `cpu=True` makes it join them with the gloo backend (DistributedType.MULTI_CPU).
    """
    reset_accelerate_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=1,  # rlhfkit.train.step accumulates (its docstring says why)
        mixed_precision=cfg.mixed_precision,
        cpu=multi_process_cpu(),
    )
    enable_fsdp_on_cpu(accelerator)  # an FSDP config launched on CPU shards for real (rlhfkit.train.sharding)
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    set_seed(cfg.seed)
    return accelerator


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
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def mean_across_processes(accelerator: Accelerator, values: Sequence[float]) -> list[float]:
    """Average scalars over processes (for logging)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    return (accelerator.reduce(t, reduction="mean") if accelerator.num_processes > 1 else t).tolist()
