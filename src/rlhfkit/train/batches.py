"""The order examples are trained in: deterministic per (seed, epoch), so a resumed run replays
exactly the batches an uninterrupted run would have seen, and split over processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rlhfkit.errors import ConfigError


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


def total_optimizer_steps(n: int, cfg, num_processes: int) -> int:
    """`cfg.max_steps`, or the optimiser steps of `cfg.num_train_epochs` epochs over `n` examples."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = micro_steps_per_epoch(n, cfg.per_device_train_batch_size, num_processes)
    return max(1, int(cfg.num_train_epochs * per_epoch) // cfg.gradient_accumulation_steps)


def optimizer_steps(n: int, cfg, start_step: int, total_steps: int, num_processes: int = 1,
                    process_index: int = 0, seed: int | None = None) -> Iterator[list[tuple[int, list[int], list[int]]]]:
    """The micro-batches of each optimiser step from `start_step` on: lists of
    `cfg.gradient_accumulation_steps` (micro_step, local_indices, global_indices)."""
    accum = cfg.gradient_accumulation_steps
    step: list[tuple[int, list[int], list[int]]] = []
    for item in iterate_batches(n, cfg.per_device_train_batch_size, cfg.seed if seed is None else seed,
                                start_step * accum, total_steps * accum, num_processes, process_index):
        step.append(item)
        if len(step) == accum:
            yield step
            step = []
