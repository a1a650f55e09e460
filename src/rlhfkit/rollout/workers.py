"""Asynchronous rollouts: sampler processes that generate while the trainer trains.

Generation dominates an on-policy update; here it overlaps with training. Rollout workers are
processes of their own (`torch.multiprocessing`, spawn: safe with threads and CUDA alike), each
holding a copy of the policy and running one of the in-process engines (`hf` or `static`) on the
CPU. The protocol, per worker, is one FIFO inbox:

    ("weights", version, state)  load these weights; `version` = optimiser updates applied
    ("job", Job)                 generate update `job.step`'s rollout with the weights now held
    ("stop",)                    exit

and one shared outbox of ("rollout", worker, step, Rollout) or ("error", worker, step, traceback).
The trainer pushes weights after every update (the LoRA adapter only when training one) and
then submits the job of update `step + 1 + max_staleness`; because an inbox is FIFO, that job
runs with weights at least `step + 1` updates old, so every rollout is generated with weights at
most `max_staleness` updates old (`Rollout.policy_version` records which). With `max_staleness`
0 each job waits for the newest weights: the synchronous run, bit for bit (same weights, seed,
engine and thread count), only in another process.

Failures are diagnosed, never waited out: a worker that raises sends its traceback; a worker
that dies is noticed within a second (its exit code named); a rollout that does not come within
`timeout` seconds stops the run naming the worker, its state and the update it was waiting for.
A worker whose trainer is gone exits by itself. Ctrl-C goes to the trainer only (workers ignore
SIGINT); `close()` (run from `finally`, or leaving the `with` block) stops every worker: asked
first, then terminated, then killed.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import signal
import time
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.rollout import get_engine

ASYNC_ENGINES = ("hf", "static")


class RolloutWorkerError(RlhfkitError, RuntimeError):
    """A rollout worker failed, died or did not answer in time; the message says which and why."""


@dataclasses.dataclass
class Job:
    """One update's rollout request: the engine call's arguments after (model, tokenizer)."""

    step: int
    args: tuple
    kwargs: dict[str, Any]


def weights_of(model: torch.nn.Module, adapter_only: bool) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights a worker needs: the LoRA adapter's (peft) or every tensor. Copied, so
    the trainer's next in-place step cannot reach a worker through shared memory."""
    model = getattr(model, "module", model)
    if adapter_only:
        state = get_peft_model_state_dict(model)
    else:
        state = model.state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], adapter_only: bool) -> None:
    if adapter_only:
        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state)


def _worker_main(rank: int, engine_name: str, model, tokenizer, inbox, outbox, threads: int,
                 adapter_only: bool) -> None:
    """A worker's loop (runs in the child process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's: it stops every worker
    torch.set_num_threads(threads)
    engine, version, step, parent = get_engine(engine_name), -1, -1, mp.parent_process()
    try:
        while True:
            try:
                msg = inbox.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return  # the trainer is gone: nobody will read a rollout
                continue
            if msg[0] == "stop":  # a rollout nobody will read must not hold up the exit
                outbox.cancel_join_thread()
                return
            if msg[0] == "weights":
                version = msg[1]
                _load_weights(model, msg[2], adapter_only)
                continue
            job: Job = msg[1]
            step = job.step
            roll = engine(model, tokenizer, *job.args, **job.kwargs)
            roll.policy_version = version
            outbox.put(("rollout", rank, job.step, roll))
    except BaseException:  # noqa: BLE001 -- every failure goes to the trainer, with its traceback
        outbox.put(("error", rank, step, traceback.format_exc()))


class RolloutPool:
    """`num_workers` rollout processes serving the jobs of one run (see the module docstring)."""

    def __init__(self, model, tokenizer, engine: str, num_workers: int = 1, max_staleness: int = 1,
                 timeout: float = 600.0, threads: int = 0, adapter_only: bool = False):
        if engine not in ASYNC_ENGINES:
            raise ConfigError(f"config field 'engine': async rollouts run the {' or '.join(ASYNC_ENGINES)} engine in "
                              f"worker processes, not {engine!r}; with vLLM use vLLM servers (docs/scale.md)")
        if num_workers < 1 or max_staleness < 0 or timeout <= 0:
            raise ConfigError("async rollouts need rollout_workers >= 1, max_staleness >= 0 and rollout_timeout > 0")
        self.max_staleness, self.timeout, self.adapter_only = max_staleness, float(timeout), adapter_only
        ctx = mp.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(num_workers)]
        worker_model = copy.deepcopy(getattr(model, "module", model)).to("cpu").eval()
        threads = threads or torch.get_num_threads()
        self.procs = [ctx.Process(target=_worker_main, name=f"rlhfkit-rollout-{i}", daemon=True,
                                  args=(i, engine, worker_model, tokenizer, self.inboxes[i], self.outbox, threads,
                                        adapter_only))
                      for i in range(num_workers)]
        for p in self.procs:
            p.start()
        self.ready: dict[int, Any] = {}
        self.submitted: dict[int, Job] = {}
        self.version = -1

    # -- trainer side -----------------------------------------------------------------------------

    def push_weights(self, version: int, model) -> None:
        """Send every worker the weights after `version` updates (jobs submitted later use them)."""
        state = weights_of(model, self.adapter_only)
        for inbox in self.inboxes:
            inbox.put(("weights", version, state))
        self.version = version

    def submit(self, job: Job) -> None:
        """Queue `job` on its worker (update k goes to worker k mod workers), behind the weights pushed so far."""
        self.submitted[job.step] = job
        self.inboxes[job.step % len(self.procs)].put(("job", job))

    def result(self, step: int):
        """The rollout of update `step`; raises RolloutWorkerError on a worker's error, death or timeout."""
        if step not in self.submitted:
            raise RolloutWorkerError(f"no rollout of update {step} was submitted to the rollout workers")
        worker = self.procs[step % len(self.procs)]
        deadline = time.monotonic() + self.timeout
        while step not in self.ready:
            try:
                kind, rank, got, payload = self.outbox.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                self._check_alive(step)
                if time.monotonic() >= deadline:
                    raise RolloutWorkerError(
                        f"timed out after {self.timeout:g} s waiting for the rollout of update {step} from "
                        f"{worker.name} (pid {worker.pid}, alive); raise rollout_timeout if generation is this slow") from None
                continue
            if kind == "error":
                raise RolloutWorkerError(f"{self.procs[rank].name} (pid {self.procs[rank].pid}) failed on the rollout "
                                         f"of update {got}:\n{payload}")
            self.ready[got] = payload
        self.submitted.pop(step)
        return self.ready.pop(step)

    def _check_alive(self, step: int) -> None:
        for p in self.procs:
            if not p.is_alive():
                raise RolloutWorkerError(f"{p.name} (pid {p.pid}) exited with code {p.exitcode} while the trainer "
                                         f"was waiting for the rollout of update {step}")

    def engine_for(self, step: int):
        """An engine (rlhfkit.rollout signature) that returns update `step`'s rollout from the workers,
        after checking it was asked for with exactly the arguments the job was generated with."""
        def engine(model, tokenizer, *args, **kwargs):
            job = self.submitted.get(step)
            if job is None or job.args != args or job.kwargs != kwargs:
                raise RolloutWorkerError(f"the rollout of update {step} was requested with other arguments than "
                                         "its job was generated with")
            return self.result(step)
        return engine

    def close(self) -> None:
        """Stop every worker: asked, then terminated, then killed (each waited for at most a few seconds)."""
        for inbox in self.inboxes:
            try:
                inbox.put(("stop",))
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (*self.inboxes, self.outbox):
            q.cancel_join_thread()
            q.close()

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
