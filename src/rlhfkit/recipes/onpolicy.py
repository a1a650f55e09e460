"""What the on-policy recipes (PPO, GRPO and RLOO) share, as plain functions.

Each algorithm's `collect` (rollout, rewards, advantages) and `train_on_batch` (its loss and
optimiser steps) stay in the file named after it, so an update reads top to bottom there. This
module holds the bookkeeping around them: loading the policy, its frozen reference and the
rewards; the exact number of updates; resuming; logging an update (metrics averaged over
processes, the KL controller, the hacking and collapse alarms, samples, checkpoints); and the
end of a run (the models saved, the held-out check, final_metrics.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhfkit.advantages import off_policy_weights
from rlhfkit.errors import ConfigError
from rlhfkit.eval import monitor
from rlhfkit.judges.rewards import add_extra_columns
from rlhfkit.judges.specs import load_rewards
from rlhfkit.models import load_policy, load_tokenizer, reference_model, save_model
from rlhfkit.models.lora import disable_dropout, reference_context
from rlhfkit.rollout import Rollout, Trajectory, get_engine
from rlhfkit.rollout.forward import unwrap
from rlhfkit.rollout.prompts import load_prompt_set, prompts_for_step
from rlhfkit.rollout.workers import RolloutPool
from rlhfkit.train.accelerator import make_accelerator, mean_across_processes
from rlhfkit.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhfkit.train.runs import MetricsLogger, atomic_write_json, prepare_run_dir
from rlhfkit.train.savers import OffloadedBetweenCalls, offloaded
from rlhfkit.train.sharding import full_state_dict, shard_frozen


@dataclasses.dataclass
class Run:
    """An on-policy run's shared state. `reference` is the frozen policy the KL is measured
    against (with LoRA: the policy itself, run under `reference_context`)."""

    name: str
    accelerator: Any
    out: Path
    tokenizer: Any
    policy: Any
    reference: Any
    rewards: Any
    eval_reward: Any
    prompts: Any
    engine: Any
    use_lora: bool
    offload_reference: bool
    sharded: bool = False
    logger: MetricsLogger | None = None
    alarm: monitor.Alarms | None = None
    n_updates: int = 0

    def reference_forward(self):
        """The model the reference log-probs come from (the unwrapped policy with LoRA)."""
        return unwrap(self.policy) if self.use_lora else self.reference

    def reference_context(self):
        """Entered around every reference forward: adapters off (LoRA) or the copy on the device."""
        if self.use_lora:
            return reference_context(self.policy)
        return offloaded(self.reference, self.accelerator.device, self.offload_reference)


def start_run(name: str, cfg, reward_funcs) -> Run:
    """Accelerator, run folder, tokenizer, policy, frozen reference, rewards and prompts.

    `reward_funcs`: Python reward functions (TRL signature, or score(prompts, responses)),
    scored after the `--reward` specs.
    """
    accelerator = make_accelerator(cfg)
    out = prepare_run_dir(cfg.output_dir, cfg, accelerator.is_main_process)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    policy = load_policy(cfg.model, cfg.dtype, lora=cfg, attn_implementation=cfg.attn_implementation,
                         gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.disable_dropout:
        disable_dropout(policy)
    reference = reference_model(policy, cfg.use_lora)  # a frozen copy, or the policy itself with LoRA
    if not cfg.use_lora and not cfg.offload_reference:
        reference.to(accelerator.device)
    rewards = load_rewards(cfg.reward, cfg.reward_weights, accelerator.device, cfg.generation_batch_size, reward_funcs)
    if cfg.offload_reference:
        rewards = OffloadedBetweenCalls(rewards, accelerator.device)
    return Run(name, accelerator, out, tokenizer, policy, reference, rewards, monitor.load_eval_reward(cfg, accelerator.device),
               load_prompt_set(cfg.prompts, "train"), get_engine(cfg.engine), cfg.use_lora, cfg.offload_reference)


def count_updates(cfg, num_prompts: int, num_processes: int) -> int:
    """`cfg.max_steps`, or the updates that cover `num_train_epochs` passes over the prompts: the
    ceiling, computed exactly (epochs as the decimal the user wrote), so 1 epoch of 8 prompts
    at 4 per update is 2 updates and a fraction of an update's prompts still gets one."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    epochs = Fraction(repr(float(cfg.num_train_epochs)))
    return max(1, math.ceil(epochs * num_prompts / (cfg.prompts_per_step * num_processes)))


def after_prepare(run: Run, cfg) -> None:
    """Once the policy is prepared: refuse a non-hf engine on a sharded policy, and shard the
    separate reference like the policy (an offloaded one stays a whole copy in CPU memory)."""
    if run.sharded and cfg.engine != "hf":
        raise ConfigError(f"engine '{cfg.engine}' cannot sample from a sharded policy; use --engine hf under FSDP")
    if run.sharded and not cfg.use_lora and not cfg.offload_reference:
        run.reference = shard_frozen(run.accelerator, run.reference)
    run.logger = MetricsLogger(run.out, cfg.report_to, enabled=run.accelerator.is_main_process)
    run.alarm = monitor.make_hacking_alarm(cfg, run.out, run.accelerator.is_main_process)


def resume(run: Run, cfg, kl_ctl, running) -> int:
    """The update to start from: 0, or the newest checkpoint's, with the KL controller and the
    running reward moments restored."""
    ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if ckpt is None:
        return 0
    state = load_checkpoint(run.accelerator, ckpt)
    kl_ctl.load_state_dict(state["kl_ctl"])
    running.load_state_dict(state["running_moments"])
    run.accelerator.print(f"{run.name}: resumed from {ckpt} at update {state['step']}")
    return state["step"]


def progress_bar(run: Run, cfg, start: int, desc: str):
    return tqdm(total=run.n_updates, initial=start, desc=desc, disable=not (cfg.progress and run.accelerator.is_main_process))


def update_prompts(run: Run, cfg, step: int):
    """This update's prompts: a pure function of (seed, step), so resuming replays them."""
    accelerator = run.accelerator
    return run.prompts.select(prompts_for_step(len(run.prompts), step, cfg.prompts_per_step, cfg.seed,
                                               accelerator.num_processes, accelerator.process_index))


@dataclasses.dataclass
class Update:
    """One finished update, as `log_update` needs it."""

    step: int
    """0-based index of the update."""
    metrics: dict
    """Rollout and training metrics of this process."""
    rollout: Rollout
    scores: torch.Tensor
    eval_scores: np.ndarray | None
    started: float
    """time.perf_counter() when the update began."""
    rollout_seconds: float


def log_update(run: Run, cfg, update: Update, kl_ctl, running, bar, extra: Callable[[float], dict] | None = None) -> tuple[dict, bool]:
    """Metrics averaged over processes, the adaptive KL controller (Ziegler et al. 2019, sec. 2.2),
    the alarms, samples and checkpoint of one update; returns (metrics, whether to stop the run)."""
    accelerator, done = run.accelerator, update.step + 1
    keys = sorted(update.metrics)
    last = dict(zip(keys, mean_across_processes(accelerator, [float(update.metrics[k]) for k in keys])))
    kl_ctl.update(last["kl"], len(update.rollout) * accelerator.num_processes)
    last.update(**(extra(kl_ctl.value) if extra else {}), kl_coef=kl_ctl.value,
                rollout_seconds=update.rollout_seconds, step_seconds=time.perf_counter() - update.started)
    stop = monitor.check_hacking(run.alarm, last, done, accelerator)  # printed; ends the run after this update
    if done % cfg.logging_steps == 0 or done == run.n_updates or stop:
        run.logger.log(last, done)
    bar.update(1)
    bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.2f}")
    if cfg.sample_every and done % cfg.sample_every == 0 and accelerator.is_main_process:
        samples = add_extra_columns(sample_rows(update.rollout, update.scores, update.eval_scores), run.rewards.last_extra)
        run.logger.log_text("samples", sample_table(samples), done)
        write_samples(run.out, done, samples)
    if cfg.save_steps and done % cfg.save_steps == 0:
        save_checkpoint(accelerator, run.out, done, {"kl_ctl": kl_ctl.state_dict(), "running_moments": running.state_dict()})
    return last, stop


def finish(run: Run, cfg, last: dict, truncated: int, extra_models: dict[str, Any] = ()) -> dict:
    """Save the policy (and `extra_models`: folder name -> (model, state-dict key prefix)), run the
    held-out check and write final_metrics.json; returns {"updates", "last"[, "eval"]}."""
    accelerator = run.accelerator
    if truncated:
        accelerator.print(f"{run.name}: {truncated} prompt(s) were longer than max_prompt_length={cfg.max_prompt_length} "
                  "tokens and were left-truncated")
    run.logger.close()
    result = {"updates": run.n_updates, "last": last}
    # all processes: a sharded model is gathered onto the main process
    states = {"final": full_state_dict(accelerator, run.policy)}
    states.update({folder: full_state_dict(accelerator, model) for folder, (model, _) in dict(extra_models).items()})
    if accelerator.is_main_process:
        save_model(unwrap(run.policy), run.tokenizer, run.out / "final", state_dict=states["final"])
        for folder, (model, prefix) in dict(extra_models).items():
            state = states[folder]
            inner = unwrap(model).model if prefix else unwrap(model)
            save_model(inner, run.tokenizer, run.out / folder,
                       state_dict=None if state is None else {k.removeprefix(prefix): v for k, v in state.items()})
    held_out = monitor.final_check(run.name, cfg, accelerator, run.policy, run.reference_forward(), run.tokenizer,
                                   run.eval_reward, run.rewards, run.reference_context, run.sharded)
    if held_out is not None:
        result["eval"] = held_out
    if accelerator.is_main_process:
        atomic_write_json(run.out / "final_metrics.json", result)
    accelerator.wait_for_everyone()
    return result


# ---------------------------------------------------------------------------------------------
# per-update bookkeeping


def average_metrics(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Averages of per-mini-batch metrics over an update; *_min / *_max keep the extremes."""
    if not metrics:
        return {}
    out: dict[str, float] = {}
    for key in metrics[0]:
        vals = [float(m[key]) for m in metrics if key in m]
        out[key] = min(vals) if key.endswith("_min") else max(vals) if key.endswith("_max") else sum(vals) / len(vals)
    return out


def update_summary(metrics: list[dict[str, Any]], stopped: bool) -> dict[str, float]:
    """One update's metrics from its optimiser steps: averages (extremes for *_min / *_max), the
    first step's importance ratio (1 up to rounding when old and new log-probs agree), the step
    count and whether the approx-KL early stop cut the epochs short."""
    out = average_metrics(metrics)
    out.update(first_ratio_mean=metrics[0]["ratio_mean"], first_ratio_min=metrics[0]["ratio_min"],
               first_ratio_max=metrics[0]["ratio_max"], optimizer_steps=len(metrics), early_stopped=float(stopped))
    return out


def sample_rows(rollout: Rollout, scores: torch.Tensor, eval_scores: np.ndarray | None, n: int = 8) -> list[dict]:
    return [{"prompt": rollout.prompts[i], "response": rollout.responses[i], "reward": scores[i].item(),
             "eval_reward": None if eval_scores is None else float(eval_scores[i])} for i in range(min(n, len(rollout)))]


def sample_table(rows: list[dict]) -> str:
    """A markdown table of sample rows (TensorBoard renders it)."""
    out = ["| prompt | response | reward | eval reward |", "|---|---|---|---|"]
    for r in rows:
        g = "" if r["eval_reward"] is None else f"{r['eval_reward']:.3f}"
        cells = [str(r["prompt"]).replace("|", "\\|").replace("\n", " "), r["response"].replace("|", "\\|")
                 .replace("\n", " ")]
        out.append(f"| {cells[0]} | {cells[1]} | {r['reward']:.3f} | {g} |")
    return "\n".join(out)


def write_samples(output_dir: str | Path, step: int, rows: list[dict]) -> None:
    """Append sample rows of this update to samples.jsonl."""
    with open(Path(output_dir) / "samples.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({"step": step, **r}) + "\n")


def behaviour_weights(traj: Trajectory, idx: torch.Tensor, cfg) -> tuple[torch.Tensor | None, dict]:
    """The off-policy weights pi_prox / pi_sampler of rows `idx` and their metrics; (None, {}) when
    the correction is off or the engine recorded no sampler log-probs. The proximal policy is the one
    the rollout was scored with (old_logp); the clip is measured against it (decoupled PPO,
    Hilton et al. 2021), the weight corrects for the sampler (rlhfkit.advantages.off_policy_weights)."""
    if cfg.off_policy_correction == "none" or traj.sampler_logp is None:
        return None, {}
    return off_policy_weights(traj.old_logp[idx], traj.sampler_logp[idx], traj.response_mask[idx],
                              cfg.off_policy_correction, cfg.off_policy_level, cfg.off_policy_cap)


def start_rollout_pool(run: Run, cfg, start: int, job_for: Callable[[int], Any]) -> RolloutPool | None:
    """With `async_rollouts`: rollout workers holding the weights after `start` updates, already
    generating updates start .. start + max_staleness (docs/scale.md); None otherwise."""
    if not getattr(cfg, "async_rollouts", False):
        return None
    if run.accelerator.num_processes > 1 or run.sharded:
        raise ConfigError("config field 'async_rollouts': rollout workers serve one training process; "
                          "launch without accelerate's --num_processes > 1 or turn async_rollouts off")
    pool = RolloutPool(unwrap(run.policy), run.tokenizer, cfg.engine, cfg.rollout_workers, cfg.max_staleness,
                       cfg.rollout_timeout, cfg.rollout_threads, adapter_only=cfg.use_lora)
    try:
        pool.push_weights(start, run.policy)
        for step in range(start, min(start + cfg.max_staleness + 1, run.n_updates)):
            pool.submit(job_for(step))
    except BaseException:
        pool.close()
        raise
    return pool


def advance_rollout_pool(pool: RolloutPool, run: Run, cfg, done: int, job_for: Callable[[int], Any]) -> None:
    """After `done` updates: push the new weights (the adapter only with LoRA) and submit update
    done + max_staleness, which the FIFO inbox makes run on them (or newer)."""
    nxt = done + cfg.max_staleness
    if nxt < run.n_updates:
        pool.push_weights(done, run.policy)
        pool.submit(job_for(nxt))
