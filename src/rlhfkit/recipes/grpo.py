"""GRPO and RLOO: critic-free policy optimisation from groups of responses (`rlhfkit rloo` is a preset).

For each prompt the policy samples a group of `num_generations` responses; every response is
scored by the rewards (reward models, reward functions, verifiers; weighted sum) and its
advantage comes from its group, by the estimator named in `advantage_estimator`
(rlhfkit.advantages.ADVANTAGE_ESTIMATORS):

- "grpo": (r - mean_group) / std_group (Shao et al. 2024, DeepSeekMath, eq. 3, sec. 4.1.2);
  `scale_rewards false` + `loss_type dr_grpo` is Dr. GRPO (Liu et al. 2025);
- "rloo": r minus the mean of the other responses of the group (Ahmadian et al. 2024, eq. 4).

The KL to the reference goes into the loss as beta * k3 per token (GRPO, eq. 4) or, with
`kl_in_reward`, into the reward as -beta * summed per-token KL (RLOO, eq. 2). A group of one
response has no baseline: num_generations < 2 is a config error.

    rlhfkit grpo --model runs/sft/final --prompts data/math.jsonl --reward math --reward regex:'\\boxed' \
        --reward_weights 1.0 0.1 --output_dir runs/grpo

From Python: ``rlhfkit.recipes.grpo.main(Config(model=..., prompts=..., reward=["py:rewards.py:fn"]))``,
or ``main(cfg, reward_funcs=[fn, ...])`` with TRL-style functions.

Optimiser-step convention (all on-policy recipes): one mini-batch = one optimiser step. Its rows
go through the model in micro-batches of `per_device_train_batch_size`; each micro-batch's loss is
normalised by the totals of the whole mini-batch (rlhfkit.losses.policy.StepTotals), so the
micro-batch losses add up to the mini-batch loss and `accelerator.backward(loss)` is called on
each with no further division.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from tqdm.auto import tqdm
from transformers import TrainerState

from rlhfkit.advantages import (
    ADVANTAGE_ESTIMATORS,
    RunningMoments,
    kl_estimate,
    make_kl_controller,
    process_scores,
    zero_variance_share,
)
from rlhfkit.config import ModelArgs, OnPolicyArgs, TrainArgs, require
from rlhfkit.errors import ConfigError
from rlhfkit.eval import monitor
from rlhfkit.judges.rewards import add_extra_columns, completion_id_lists
from rlhfkit.judges.specs import load_rewards
from rlhfkit.logprobs import fast_head_allowed, masked_mean
from rlhfkit.losses.policy import IMPORTANCE_RATIOS, LOSS_NORMALISERS, StepTotals, grpo_loss
from rlhfkit.train.memory import report_on_policy
from rlhfkit.models import (
    load_policy,
    load_tokenizer,
    reference_context,
    reference_model,
    save_model,
)
from rlhfkit.models.lora import disable_dropout
from rlhfkit.train.savers import OffloadedBetweenCalls, offloaded
from rlhfkit.rollout import Trajectory, get_engine, micro_batches, minibatches
from rlhfkit.rollout.forward import batched, response_logprobs, unwrap
from rlhfkit.rollout.prompts import (
    as_completions,
    load_prompt_set,
    prompts_for_step,
    render_prompt,
    rollout_seed,
    rows_of,
)
from rlhfkit.train.runs import MetricsLogger, atomic_write_json, one_run_per_folder, prepare_run_dir
from rlhfkit.train.sharding import full_state_dict, is_sharded, shard_frozen
from rlhfkit.train.accelerator import make_accelerator, mean_across_processes
from rlhfkit.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhfkit.train.optim import make_optimizer, make_scheduler
from rlhfkit.train.step import check_finite, check_finite_grads

# TRL's loss_type names -> rlhfkit's normalisers
LOSS_TYPE_ALIASES = {"grpo": "sequence", "dapo": "token", "bnpo": "token"}


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs, OnPolicyArgs):
    num_generations: int = 4
    """Responses sampled per prompt (the group size G; at least 2)."""
    advantage_estimator: str = "grpo"
    """Group baseline: grpo (group mean and std) or rloo (leave-one-out mean)."""
    beta: float = 0.04
    """KL coefficient: weight of the per-token k3 KL in the loss (or of the summed KL in the reward with kl_in_reward)."""
    kl_in_reward: bool = False
    """Put -beta * KL(policy || reference) into each response's reward (RLOO) instead of the loss (GRPO)."""
    epsilon: float = 0.2
    """Clip range of the importance ratio."""
    epsilon_high: float = 0.0
    """Upper clip of the ratio when > 0 (DAPO's clip-higher); 0 = epsilon."""
    importance_sampling_level: str = "token"
    """Importance ratio: token (GRPO/PPO), sequence (GSPO: length-normalised) or sequence_sum (RLOO: whole response)."""
    loss_type: str = "sequence"
    """Loss normalisation: sequence (= grpo), token (= dapo: all tokens of the step), dr_grpo, or sequence_sum (REINFORCE)."""
    scale_rewards: bool = True
    """grpo: divide group-centred rewards by the group std (false for Dr. GRPO); rloo: whiten advantages over the batch."""
    engine: str = "hf"
    """Generation engine: hf (sampling loop), static (static KV cache, compiled on CUDA) or vllm (colocated vLLM, pip install vllm); docs/scale.md."""
    logging_steps: int = 1
    """Write metrics every N updates (each update's metrics are computed either way)."""
    num_ppo_epochs: int = 1
    """Passes over each rollout batch (GRPO's mu; TRL's num_iterations)."""
    output_dir: str = "runs/grpo"
    """Folder for checkpoints, metrics.jsonl, TensorBoard events and the final model."""

    def __post_init__(self) -> None:
        self._check_train_args()
        self._check_on_policy_args()
        self.loss_type = LOSS_TYPE_ALIASES.get(self.loss_type, self.loss_type)
        require(self.model != "", "model", "give the SFT policy to start from (a folder or 'kindly')")
        require(self.num_generations >= 2, "num_generations",
                "a group needs at least 2 responses: with one, every advantage is 0 and nothing is learned")
        require(self.advantage_estimator in ADVANTAGE_ESTIMATORS, "advantage_estimator",
                f"must be one of {sorted(ADVANTAGE_ESTIMATORS)}")
        require(self.loss_type in LOSS_NORMALISERS, "loss_type",
                f"must be one of {sorted(LOSS_NORMALISERS)} (or TRL's grpo, dapo, bnpo)")
        require(self.importance_sampling_level in IMPORTANCE_RATIOS, "importance_sampling_level",
                f"must be one of {sorted(IMPORTANCE_RATIOS)}")
        require(self.beta >= 0 and self.epsilon > 0, "beta", "beta must be >= 0 and epsilon > 0")
        require(self.logging_steps >= 1, "logging_steps", "must be >= 1")


def step_totals(acc, rmask: torch.Tensor, max_length: int) -> StepTotals:
    """Totals of one optimiser step over all processes, per process (DDP averages the gradients)."""
    t = torch.tensor([rmask.sum().item(), float(rmask.shape[0])], device=acc.device)
    if acc.num_processes > 1:
        t = acc.reduce(t, "sum") / acc.num_processes
    return StepTotals(float(t[0]), float(t[1]), max_length)


def collect(policy, ref_model, ref_ctx, tok, rewards, eval_reward, prompts, cfg, step, beta, running, acc, engine,
            single_pass: bool, trainer_state=None):
    """Steps 2-5 of an update: G responses per prompt, scored, with old/reference log-probs and advantages."""
    G, bs, dev = cfg.num_generations, cfg.per_device_train_batch_size, acc.device
    # 2. rollout: G responses per prompt, prompt-major rows
    roll = engine(unwrap(policy), tok, [render_prompt(tok, p) for p in prompts.prompts], cfg.max_completion_length,
                  cfg.temperature, cfg.top_p, num_samples=G, batch_size=cfg.generation_batch_size,
                  seed=rollout_seed(cfg.seed, step, acc.process_index), max_prompt_length=cfg.max_prompt_length)
    row_prompts, columns = rows_of(prompts, roll.prompt_index)
    completions = as_completions(row_prompts, roll.responses)
    # 3. score every reward; a failing reward stops the run here, before any update
    scored = rewards.score(row_prompts, completions, completion_ids=completion_id_lists(roll),
                           trainer_state=trainer_state, **columns)
    # a completion no reward applies to takes its group's mean: it shifts no baseline (TRL's NaN treatment)
    scores = torch.tensor(scored.total_for_groups(G), dtype=torch.float32)
    eval_scores = eval_reward(row_prompts, completions, **columns) if eval_reward is not None else None
    # 4. old and reference log-probs with the training forward and layout (first ratio exactly 1); a single
    #    pass trains each row once before any step, so its old log-probs are filled in by that forward
    ids, mask = (t.to(dev) for t in roll.sequences())
    r_len, rmask = roll.response_ids.shape[1], roll.response_mask.to(dev).float()
    fast = fast_head_allowed(cfg.mixed_precision)  # one LM-head path for rollout, reference and training
    old_logp = torch.zeros_like(rmask) if single_pass else batched(
        lambda i, m: response_logprobs(unwrap(policy), i, m, r_len, cfg.temperature, fast_head=fast)[0], ids, mask, bs)
    with ref_ctx():
        ref_logp = batched(lambda i, m: response_logprobs(ref_model, i, m, r_len, cfg.temperature, fast_head=fast)[0], ids, mask, bs)
    check_finite("rollout log-probs", old_logp, ref_logp)
    # 5. rewards -> group advantages (the KL in the reward for RLOO)
    shaped = process_scores(scores, roll.ended_with_eos, cfg.missing_eos_penalty, cfg.score_norm, running,
                            cfg.score_clip or None).to(dev)
    if cfg.kl_in_reward:
        shaped = shaped - beta * (kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * rmask).sum(-1)
    adv = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator](shaped, G, cfg.scale_rewards)
    adv[torch.as_tensor(scored.unscorable, device=adv.device)] = 0.0  # no signal from an unscorable completion
    traj = Trajectory(ids, mask, rmask, old_logp, ref_logp, scores.to(dev), adv)
    stats = scored.stats()
    stats.update(frac_reward_zero_std=zero_variance_share(scores, G),
                 group_reward_std=scores.reshape(-1, G).std(-1).mean().item(),
                 num_truncated_prompts=roll.num_truncated_prompts)
    return roll, scores, eval_scores, traj, stats


def train_on_batch(policy, optimizer, scheduler, traj: Trajectory, cfg, step, acc, beta, single_pass) -> dict:
    """Step 6: num_ppo_epochs x num_mini_batches optimiser steps on the policy; averaged metrics."""
    metrics, stopped = [], False
    kl_in_loss = 0.0 if cfg.kl_in_reward else beta
    for epoch in range(cfg.num_ppo_epochs):
        for mb in minibatches(len(traj), cfg.num_mini_batches, cfg.seed, step, epoch):
            totals = step_totals(acc, traj.response_mask[mb], cfg.max_completion_length)
            micro, mb_metrics = micro_batches(mb, cfg.per_device_train_batch_size), []
            for j, idx in enumerate(micro):
                with acc.no_sync(policy) if j < len(micro) - 1 else contextlib.nullcontext():
                    logp, ent = response_logprobs(policy, traj.input_ids[idx], traj.attention_mask[idx],
                                                  traj.response_len, cfg.temperature, with_entropy=epoch == 0,
                                                  fast_head=fast_head_allowed(cfg.mixed_precision))
                    if single_pass:
                        traj.old_logp[idx] = logp.detach()
                    loss, m = grpo_loss(logp, traj.old_logp[idx], traj.ref_logp[idx] if kl_in_loss else None,
                                        traj.advantages[idx], traj.response_mask[idx], cfg.epsilon, kl_in_loss,
                                        cfg.loss_type, cfg.epsilon_high or None, cfg.max_completion_length,
                                        cfg.importance_sampling_level, totals)
                    check_finite("GRPO loss", loss)
                    acc.backward(loss)
                if ent is not None:
                    m["entropy"] = masked_mean(ent, traj.response_mask[idx])
                mb_metrics.append(m)
            grad_norm = None
            if cfg.max_grad_norm:  # a non-finite gradient shows in the norm
                grad_norm = acc.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                check_finite("GRPO gradient norm", grad_norm)
            else:
                check_finite_grads(policy)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sm = monitor.average_metrics(mb_metrics)
            sm["policy_loss"] = sum(float(x["policy_loss"]) for x in mb_metrics)  # the step's loss
            if grad_norm is not None:
                sm["grad_norm"] = float(grad_norm)
            metrics.append(sm)
            if cfg.early_stop_kl and sm["approx_kl"] > cfg.early_stop_kl:
                stopped = True
                break
        if stopped:
            break
    out = monitor.update_summary(metrics, stopped)
    if "kl" in out:  # the loss's mean per-token k3; "kl" in the metrics is the per-response sum
        out["kl_k3_token_mean"] = out.pop("kl")
    return out


@one_run_per_folder
def main(cfg: Config, reward_funcs=None, reward_fn=None) -> dict:
    """Train; returns the last update's metrics and, with an eval reward, the held-out evaluation.

    `reward_funcs`: Python reward functions (TRL signature) scored after the `--reward` specs.
    """
    acc = make_accelerator(cfg)
    out = prepare_run_dir(cfg.output_dir, cfg, acc.is_main_process)
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    policy = load_policy(cfg.model, cfg.dtype, lora=cfg, attn_implementation=cfg.attn_implementation,
                         gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.disable_dropout:
        disable_dropout(policy)
    ref_model = reference_model(policy, cfg.use_lora)
    if not cfg.use_lora and not cfg.offload_reference:
        ref_model.to(acc.device)
    rewards = load_rewards(cfg.reward, cfg.reward_weights, acc.device, cfg.generation_batch_size,
                           reward_funcs if reward_funcs is not None else reward_fn)
    rewards = OffloadedBetweenCalls(rewards, acc.device) if cfg.offload_reference else rewards
    eval_reward = monitor.load_eval_reward(cfg, acc.device)
    report_on_policy(acc, policy, cfg, frozen=(ref_model, rewards, eval_reward))
    prompt_set = load_prompt_set(cfg.prompts, "train")
    engine = get_engine(cfg.engine)
    n_updates = cfg.max_steps if cfg.max_steps > 0 else max(
        1, int(cfg.num_train_epochs * len(prompt_set) / (cfg.prompts_per_step * acc.num_processes) + 0.999999))
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, n_updates * cfg.num_ppo_epochs * cfg.num_mini_batches)
    policy, optimizer = acc.prepare(policy, optimizer)
    acc.register_for_checkpointing(scheduler)
    sharded = is_sharded(acc)  # the policy is sharded, and a separate reference below
    if sharded and cfg.engine != "hf":
        raise ConfigError(f"engine '{cfg.engine}' cannot sample from a sharded policy; use --engine hf under FSDP")
    if sharded and not cfg.use_lora and not cfg.offload_reference:  # offloaded: a whole copy parked in CPU memory
        ref_model = shard_frozen(acc, ref_model)
    ref_fwd = unwrap(policy) if cfg.use_lora else ref_model

    def ref_ctx():
        return reference_context(policy) if cfg.use_lora else offloaded(ref_model, acc.device, cfg.offload_reference)

    kl_ctl = make_kl_controller(cfg.beta, cfg.target_kl or None, cfg.kl_horizon)
    running, start = RunningMoments(), 0
    if cfg.resume and (ckpt := latest_checkpoint(cfg.output_dir)) is not None:
        state = load_checkpoint(acc, ckpt)
        start = state["step"]
        kl_ctl.load_state_dict(state["kl_ctl"])
        running.load_state_dict(state["running_moments"])
        acc.print(f"grpo: resumed from {ckpt} at update {start}")
    logger = MetricsLogger(out, cfg.report_to, enabled=acc.is_main_process)
    alarm = monitor.make_hacking_alarm(cfg, out, acc.is_main_process)
    single_pass = cfg.num_ppo_epochs * cfg.num_mini_batches == 1 and not cfg.kl_in_reward
    truncated, last = 0, {}
    bar = tqdm(total=n_updates, initial=start, desc=cfg.advantage_estimator, disable=not (cfg.progress and acc.is_main_process))
    for step in range(start, n_updates):
        t0 = time.perf_counter()
        monitor.measure_perplexity(alarm, policy, tok, step)  # every perplexity_every updates, from the start
        # 1. this update's prompts (a pure function of seed and step) and their extra columns
        prompts = prompt_set.select(prompts_for_step(len(prompt_set), step, cfg.prompts_per_step, cfg.seed,
                                                     acc.num_processes, acc.process_index))
        # 2.-5. rollout, rewards, old/reference log-probs, group advantages
        beta = kl_ctl.value
        roll, scores, eval_scores, traj, stats = collect(policy, ref_fwd, ref_ctx, tok, rewards, eval_reward, prompts,
                                                         cfg, step, beta, running, acc, engine, single_pass,
                                                         TrainerState(global_step=step, max_steps=n_updates))
        t_roll = time.perf_counter() - t0
        # 6. epochs x mini-batches of clipped policy steps
        train_stats = train_on_batch(policy, optimizer, scheduler, traj, cfg, step, acc, beta, single_pass)
        # 7. metrics (per reward, groups without signal, KL), the KL controller, alarm, samples, checkpoint
        kl = kl_estimate(traj.old_logp, traj.ref_logp, "k1") * traj.response_mask
        stats.update(monitor.rollout_stats(roll, scores, kl, traj.old_logp, eval_scores))
        truncated += roll.num_truncated_prompts
        merged = {**train_stats, **stats, "learning_rate": scheduler.get_last_lr()[0]}
        keys = sorted(merged)
        last = dict(zip(keys, mean_across_processes(acc, [float(merged[k]) for k in keys])))
        kl_ctl.update(last["kl"], len(roll) * acc.num_processes)
        last.update(beta=kl_ctl.value, kl_coef=kl_ctl.value, rollout_seconds=t_roll,
                    step_seconds=time.perf_counter() - t0)
        stop_run = monitor.check_hacking(alarm, last, step + 1, acc)  # printed; ends the run after this update
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == n_updates or stop_run:
            logger.log(last, step + 1)
        bar.update(1)
        bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.2f}")
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0 and acc.is_main_process:
            samples = add_extra_columns(monitor.sample_rows(roll, scores, eval_scores), rewards.last_extra)
            logger.log_text("samples", monitor.sample_table(samples), step + 1)
            monitor.write_samples(out, step + 1, samples)
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
            save_checkpoint(acc, out, step + 1, {"kl_ctl": kl_ctl.state_dict(), "running_moments": running.state_dict()})
        if stop_run:
            break
    bar.close()
    if truncated:
        acc.print(f"grpo: {truncated} prompt(s) were longer than max_prompt_length={cfg.max_prompt_length} "
                  "tokens and were left-truncated")
    logger.close()
    result = {"updates": n_updates, "last": last}
    state = full_state_dict(acc, policy)  # all processes: gathers a sharded policy onto the main one
    if acc.is_main_process:
        save_model(unwrap(policy), tok, out / "final", state_dict=state)
    held_out = monitor.final_check("grpo", cfg, acc, policy, ref_fwd, tok, eval_reward, rewards, ref_ctx, sharded)
    if held_out is not None:
        result["eval"] = held_out
    if acc.is_main_process:
        atomic_write_json(out / "final_metrics.json", result)
    acc.wait_for_everyone()
    return result
