"""GRPO and RLOO: critic-free policy optimisation from groups of responses (`rlhfkit rloo` is a preset).

For each prompt the policy samples a group of `num_generations` responses; every response is
scored by the rewards (reward models, reward functions, verifiers; weighted sum) and its
advantage comes from its group, by the estimator named in `advantage_estimator`
(rlhfkit.advantages.ADVANTAGE_ESTIMATORS):

- "grpo": (r - mean_group) / std_group (Shao et al. 2024, DeepSeekMath, eq. 3, sec. 4.1.2);
  `scale_rewards false` + `loss_type dr_grpo` is Dr. GRPO (Liu et al. 2025);
- "rloo": r minus the mean of the other responses of the group (Ahmadian et al. 2024, eq. 4);
- "reinforce_pp": REINFORCE++-baseline, r minus the group mean, whitened over the batch (Hu et al. 2025).

DAPO's options (Yu et al. 2025): `epsilon_high` (clip-higher), `loss_type dapo` (token mean),
`dynamic_sampling` (groups whose rewards do not vary are dropped and more prompts sampled;
rlhfkit.recipes.group_sampling) and `overlong_buffer_len` (soft overlong punishment, eq. 13).
`loss_type cispo` is MiniMax-M1's CISPO objective (clipped IS weight, stop-gradient, every token)
with DAPO's token mean. `off_policy_correction` weights each token by the trainer's over the
sampler's probability (truncated or masked), the clip measured against the proximal policy.

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

import dataclasses
import time

import torch
from transformers import TrainerState

from rlhfkit.advantages import (
    ADVANTAGE_ESTIMATORS,
    RunningMoments,
    kl_estimate,
    make_kl_controller,
    overlong_penalty,
    process_scores,
    sampler_agreement,
    zero_variance_share,
)
from rlhfkit.config import ModelArgs, OnPolicyArgs, TrainArgs, require
from rlhfkit.eval import monitor
from rlhfkit.judges.rewards import completion_id_lists
from rlhfkit.logprobs import fast_head_allowed, response_logprobs
from rlhfkit.losses.policy import (
    IMPORTANCE_RATIOS,
    LOSS_NORMALISERS,
    POLICY_OBJECTIVES,
    StepTotals,
    grpo_loss,
)
from rlhfkit.masked import masked_mean
from rlhfkit.recipes import agentic, onpolicy
from rlhfkit.recipes.group_sampling import Round, dynamic_sampling
from rlhfkit.rollout import Trajectory, micro_batches, minibatches
from rlhfkit.rollout.episode_args import EpisodeArgs, load_factory
from rlhfkit.rollout.forward import batched, unwrap
from rlhfkit.rollout.prompts import (
    as_completions,
    prompts_for_step,
    render_prompt,
    rollout_seed,
    rows_of,
)
from rlhfkit.rollout.workers import Job
from rlhfkit.train.memory import report_on_policy
from rlhfkit.train.optim import make_optimizer, make_scheduler
from rlhfkit.train.runs import one_run_per_folder
from rlhfkit.train.sharding import is_sharded
from rlhfkit.train.step import accumulate, backward, check_finite, optimizer_step, step_total

# TRL's loss_type names -> rlhfkit's normalisers
LOSS_TYPE_ALIASES = {"grpo": "sequence", "dapo": "token", "bnpo": "token", "cispo": "token"}


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs, OnPolicyArgs, EpisodeArgs):
    num_generations: int = 4
    """Responses sampled per prompt (the group size G; at least 2)."""
    advantage_estimator: str = "grpo"
    """Group baseline: grpo (group mean and std), rloo (leave-one-out mean) or reinforce_pp (REINFORCE++-baseline: group mean, batch std; Hu et al. 2025)."""
    beta: float = 0.04
    """KL coefficient: weight of the per-token k3 KL in the loss (or of the summed KL in the reward with kl_in_reward)."""
    kl_in_reward: bool = False
    """Put -beta * KL(policy || reference) into each response's reward (RLOO) instead of the loss (GRPO)."""
    epsilon: float = 0.2
    """Clip range of the importance ratio."""
    epsilon_high: float = 0.0
    """Upper clip of the ratio when > 0 (DAPO's clip-higher, e.g. 0.28 with epsilon 0.2; CISPO's weight cap 1 + epsilon_high); 0 = epsilon."""
    importance_sampling_level: str = "token"
    """Importance ratio: token (GRPO/PPO), sequence (GSPO: length-normalised) or sequence_sum (RLOO: whole response)."""
    loss_type: str = "sequence"
    """Loss normalisation: sequence (= grpo), token (= dapo: all tokens of the step), dr_grpo, sequence_sum (REINFORCE), or cispo (objective cispo, token mean)."""
    objective: str = "clip"
    """Per-token objective: clip (PPO's clipped surrogate) or cispo (MiniMax-M1: sg(min(r, 1 + epsilon_high)) A log pi on every token)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards all agree (no gradient) and sample more prompts until the batch is full."""
    dynamic_sampling_max_rounds: int = 3
    """Extra sampling rounds per update at most; when reached, the batch is filled with dropped groups (counted in dynamic_sampling/filled_groups)."""
    overlong_buffer_len: int = 0
    """DAPO's soft overlong punishment: responses longer than max_completion_length minus this lose up to overlong_penalty_factor, linearly (0 = off)."""
    overlong_penalty_factor: float = 1.0
    """Reward lost by a response of max_completion_length tokens under the overlong punishment."""
    async_rollouts: bool = False
    """Generate in rollout worker processes while the trainer trains (hf or static engine, CPU; one training process); docs/scale.md."""
    max_staleness: int = 1
    """Async: rollouts use weights at most this many updates old (0 = always the newest: the synchronous run, bit for bit)."""
    rollout_workers: int = 1
    """Async: rollout worker processes (update k is generated by worker k mod rollout_workers)."""
    rollout_threads: int = 0
    """Async: torch threads per rollout worker (0 = the trainer's count, which keeps max_staleness 0 bit-identical)."""
    rollout_timeout: float = 600.0
    """Async: seconds the trainer waits for a rollout before stopping with a diagnosis naming the worker."""
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
        self._check_episode_args()
        if self.loss_type == "cispo":
            self.objective = "cispo"
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
        require(self.objective in POLICY_OBJECTIVES, "objective", f"must be one of {sorted(POLICY_OBJECTIVES)}")
        require(self.dynamic_sampling_max_rounds >= 0, "dynamic_sampling_max_rounds", "must be >= 0")
        require(0 <= self.overlong_buffer_len <= self.max_completion_length, "overlong_buffer_len",
                "must be in [0, max_completion_length] (0 = off)")
        require(self.max_staleness >= 0 and self.rollout_workers >= 1 and self.rollout_timeout > 0
                and self.rollout_threads >= 0, "max_staleness",
                "async rollouts need max_staleness >= 0, rollout_workers >= 1, rollout_threads >= 0 and rollout_timeout > 0")
        require(not (self.async_rollouts and self.dynamic_sampling), "dynamic_sampling",
                "dynamic sampling's extra rounds are generated in the trainer; turn off async_rollouts or dynamic_sampling")


def engine_call(tok, prompts, cfg, step: int, process_index: int, round_: int = 0) -> tuple[tuple, dict]:
    """The engine's arguments after (model, tokenizer) for a round of an update, in-process and async alike.
    Round r > 0 of dynamic sampling draws from its own seed."""
    args = ([render_prompt(tok, p) for p in prompts.prompts], cfg.max_completion_length, cfg.temperature, cfg.top_p)
    return args, dict(num_samples=cfg.num_generations, batch_size=cfg.generation_batch_size,
                      seed=rollout_seed(cfg.seed + 7919 * round_, step, process_index),
                      max_prompt_length=cfg.max_prompt_length, top_k=cfg.top_k)


def rollout_job(run, cfg, step: int) -> Job:
    """Update `step`'s rollout as a job for the async rollout workers (its prompts: a pure function of seed and step)."""
    args, kwargs = engine_call(run.tokenizer, onpolicy.update_prompts(run, cfg, step), cfg, step,
                               run.accelerator.process_index)
    return Job(step, args, kwargs)


def sample_round(policy, tok, rewards, eval_reward, prompts, cfg, step, accelerator, engine, trainer_state=None,
                 round_: int = 0) -> Round:
    """Steps 2-3 for one set of prompts: G responses per prompt (prompt-major rows), scored by every
    reward (a failing reward stops the run here, before any update)."""
    if cfg.multi_turn:  # whole episodes with tools / an environment (recipes/agentic.py)
        return agentic.sample_episodes(policy, tok, rewards, eval_reward, prompts, cfg, step, accelerator,
                                       load_factory(cfg), trainer_state, round_)
    args, kwargs = engine_call(tok, prompts, cfg, step, accelerator.process_index, round_)
    roll = engine(unwrap(policy), tok, *args, **kwargs)
    row_prompts, columns = rows_of(prompts, roll.prompt_index)
    completions = as_completions(row_prompts, roll.responses)
    scored = rewards.score(row_prompts, completions, completion_ids=completion_id_lists(roll),
                           trainer_state=trainer_state, **columns)
    eval_scores = eval_reward(row_prompts, completions, **columns) if eval_reward is not None else None
    return Round(roll, row_prompts, columns, completions, scored, eval_scores)


def extra_prompts(run, cfg, step: int, round_: int):
    """Dynamic sampling's round `round_` of update `step`: prompts drawn as a pure function of
    (seed, step, round), so a resumed run draws them again."""
    a = run.accelerator
    return run.prompts.select(prompts_for_step(len(run.prompts), step, cfg.prompts_per_step, cfg.seed + round_,
                                               a.num_processes, a.process_index))


def collect(policy, ref_model, ref_ctx, tok, rewards, eval_reward, prompts, cfg, step, beta, running, accelerator, engine,
            single_pass: bool, trainer_state=None, more_prompts=None):
    """Steps 2-5 of an update: G responses per prompt, scored, with old/reference log-probs and advantages.
    `more_prompts(r)`: the prompts of dynamic sampling's extra round r (None = no dynamic sampling)."""
    G, bs, dev = cfg.num_generations, cfg.per_device_train_batch_size, accelerator.device
    # 2.-3. rollout and rewards; with dynamic sampling, groups without reward variance are replaced
    batch, sampling_stats = sample_round(policy, tok, rewards, eval_reward, prompts, cfg, step, accelerator, engine,
                                         trainer_state), {}
    if more_prompts is not None:
        batch, sampling_stats = dynamic_sampling(
            batch, lambda r: sample_round(policy, tok, rewards, eval_reward, more_prompts(r), cfg, step, accelerator,
                                          engine, trainer_state, r), G, cfg.dynamic_sampling_max_rounds, tok.pad_token_id)
    roll, scored, eval_scores = batch.rollout, batch.scored, batch.eval_scores
    # a completion no reward applies to takes its group's mean: it shifts no baseline (TRL's NaN treatment)
    scores = torch.tensor(scored.total_for_groups(G), dtype=torch.float32)
    # 4. old and reference log-probs with the training forward and layout (first ratio exactly 1); a single
    #    pass trains each row once before any step, so its old log-probs are filled in by that forward
    ids, mask = (t.to(dev) for t in roll.sequences())
    response_width, rmask = roll.response_ids.shape[1], roll.response_mask.to(dev).float()
    fast = fast_head_allowed(cfg.mixed_precision)  # one LM-head path for rollout, reference and training
    with ref_ctx():
        ref_logp = batched(lambda i, m: response_logprobs(ref_model, input_ids=i, attention_mask=m, response_width=response_width,
                                                          temperature=cfg.temperature, fast_head=fast)[0], ids, mask, bs)
    old_logp = torch.zeros_like(ref_logp) if single_pass else batched(  # the dtype the training forward gives
        lambda i, m: response_logprobs(unwrap(policy), input_ids=i, attention_mask=m, response_width=response_width,
                                       temperature=cfg.temperature, fast_head=fast)[0], ids, mask, bs)
    check_finite("rollout log-probs", old_logp, ref_logp)
    # 5. rewards -> group advantages (the KL in the reward for RLOO)
    shaped = process_scores(scores, roll.ended_with_eos, cfg.missing_eos_penalty, cfg.score_norm, running,
                            cfg.score_clip or None).to(dev)
    if cfg.overlong_buffer_len:  # DAPO eq. 13, on the reward the advantages are computed from
        overlong = overlong_penalty(roll.response_lengths, cfg.max_completion_length, cfg.overlong_buffer_len,
                                    cfg.overlong_penalty_factor).to(dev)
        shaped = shaped + overlong
        sampling_stats["overlong_penalty_mean"] = overlong.mean().item()
    if cfg.kl_in_reward:
        shaped = shaped - beta * (kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * rmask).sum(-1)
    adv = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator](shaped, G, cfg.scale_rewards)
    adv[torch.as_tensor(scored.unscorable, device=adv.device)] = 0.0  # no signal from an unscorable completion
    traj = Trajectory(ids, mask, rmask, old_logp, ref_logp, scores.to(dev), adv,
                      sampler_logp=None if roll.sampler_logp is None else roll.sampler_logp.to(dev))
    stats = {**scored.stats(), **sampling_stats}
    stats.update(frac_reward_zero_std=zero_variance_share(scores, G),
                 group_reward_std=scores.reshape(-1, G).std(-1).mean().item(),
                 num_truncated_prompts=roll.num_truncated_prompts)
    return roll, scores, eval_scores, traj, stats


def train_on_batch(policy, optimizer, scheduler, traj: Trajectory, cfg, step, accelerator, beta, single_pass) -> dict:
    """Step 6: num_ppo_epochs x num_mini_batches optimiser steps on the policy; averaged metrics."""
    metrics, stopped = [], False
    kl_in_loss = 0.0 if cfg.kl_in_reward else beta
    for epoch in range(cfg.num_ppo_epochs):
        for mb in minibatches(len(traj), cfg.num_mini_batches, cfg.seed, step, epoch):
            num_tokens, num_sequences = step_total(accelerator, traj.response_mask[mb].sum(), len(mb))
            totals = StepTotals(num_tokens, num_sequences, cfg.max_completion_length)
            micro, mb_metrics = micro_batches(mb, cfg.per_device_train_batch_size), []
            for j, idx in enumerate(micro):
                with accumulate(accelerator, [policy], last=j == len(micro) - 1):
                    logp, entropy = response_logprobs(policy, input_ids=traj.input_ids[idx],
                                                      attention_mask=traj.attention_mask[idx],
                                                      response_width=traj.response_width, temperature=cfg.temperature,
                                                      with_entropy=epoch == 0,
                                                      fast_head=fast_head_allowed(cfg.mixed_precision))
                    if single_pass:
                        traj.old_logp[idx] = logp.detach()
                    weights, wm = onpolicy.behaviour_weights(traj, idx, cfg)
                    loss, m = grpo_loss(logp, traj.old_logp[idx], traj.ref_logp[idx] if kl_in_loss else None,
                                        traj.advantages[idx], traj.response_mask[idx], cfg.epsilon, kl_in_loss,
                                        cfg.loss_type, cfg.epsilon_high or None, cfg.max_completion_length,
                                        cfg.importance_sampling_level, totals, cfg.objective, weights)
                    backward(accelerator, loss, "GRPO loss")
                    m.update(wm)
                if entropy is not None:
                    m["entropy"] = masked_mean(entropy, traj.response_mask[idx])
                mb_metrics.append(m)
            grad_norm = optimizer_step(accelerator, [policy], [optimizer], [scheduler], cfg.max_grad_norm, "GRPO gradient")
            sm = onpolicy.average_metrics(mb_metrics)
            sm["policy_loss"] = sum(float(x["policy_loss"]) for x in mb_metrics)  # the step's loss
            if grad_norm is not None:
                sm["grad_norm"] = grad_norm
            metrics.append(sm)
            if cfg.early_stop_kl and sm["approx_kl"] > cfg.early_stop_kl:
                stopped = True
                break
        if stopped:
            break
    out = onpolicy.update_summary(metrics, stopped)
    if "kl" in out:  # the loss's mean per-token k3; "kl" in the metrics is the per-response sum
        out["kl_k3_token_mean"] = out.pop("kl")
    return out


@one_run_per_folder
def main(cfg: Config, reward_funcs=None, reward_fn=None) -> dict:
    """Train; returns the last update's metrics and, with an eval reward, the held-out evaluation.

    `reward_funcs`: Python reward functions (TRL signature) scored after the `--reward` specs.
    """
    run = onpolicy.start_run("grpo", cfg, reward_funcs if reward_funcs is not None else reward_fn)
    accelerator, tok = run.accelerator, run.tokenizer
    report_on_policy(accelerator, run.policy, cfg, frozen=(run.reference, run.rewards, run.eval_reward))
    run.n_updates = onpolicy.count_updates(cfg, len(run.prompts), accelerator.num_processes)
    optimizer = make_optimizer(run.policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, run.n_updates * cfg.num_ppo_epochs * cfg.num_mini_batches)
    run.policy, optimizer = accelerator.prepare(run.policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    run.sharded = is_sharded(accelerator)  # the policy is sharded, and a separate reference (after_prepare)
    onpolicy.after_prepare(run, cfg)
    kl_ctl, running = make_kl_controller(cfg.beta, cfg.target_kl or None, cfg.kl_horizon), RunningMoments()
    start = onpolicy.resume(run, cfg, kl_ctl, running)
    # one epoch of one mini-batch trains each row once: its old log-probs are the training forward's
    single_pass = cfg.num_ppo_epochs * cfg.num_mini_batches == 1 and not cfg.kl_in_reward
    truncated, last = 0, {}
    bar = onpolicy.progress_bar(run, cfg, start, cfg.advantage_estimator)
    pool = onpolicy.start_rollout_pool(run, cfg, start, lambda s: rollout_job(run, cfg, s))  # None unless async
    try:
        for step in range(start, run.n_updates):
            t0 = time.perf_counter()
            monitor.measure_perplexity(run.alarm, run.policy, tok, step)  # every perplexity_every updates
            # 1. this update's prompts and their extra columns
            prompts = onpolicy.update_prompts(run, cfg, step)
            # 2.-5. rollout, rewards, old/reference log-probs, group advantages
            beta = kl_ctl.value
            more_prompts = (lambda r, s=step: extra_prompts(run, cfg, s, r)) if cfg.dynamic_sampling else None
            roll, scores, eval_scores, traj, stats = collect(run.policy, run.reference_forward(), run.reference_context, tok,
                                                             run.rewards, run.eval_reward, prompts, cfg, step, beta, running,
                                                             accelerator, pool.engine_for(step) if pool else run.engine,
                                                             single_pass,
                                                             TrainerState(global_step=step, max_steps=run.n_updates),
                                                             more_prompts)
            t_roll = time.perf_counter() - t0
            # 6. epochs x mini-batches of clipped policy steps; then the workers get the new weights
            train_stats = train_on_batch(run.policy, optimizer, scheduler, traj, cfg, step, accelerator, beta, single_pass)
            if pool:
                onpolicy.advance_rollout_pool(pool, run, cfg, step + 1, lambda s: rollout_job(run, cfg, s))
                stats["async/staleness"] = float(step - roll.policy_version)
            # 7. metrics (per reward, groups without signal, KL), the KL controller, alarm, samples, checkpoint
            kl = kl_estimate(traj.old_logp, traj.ref_logp, "k1") * traj.response_mask
            stats.update(monitor.rollout_stats(roll, scores, kl, traj.old_logp, eval_scores))
            if traj.sampler_logp is not None:  # trainer-sampler agreement, measured in every run
                stats.update(sampler_agreement(traj.old_logp, traj.sampler_logp, traj.response_mask))
            truncated += roll.num_truncated_prompts
            metrics = {**train_stats, **stats, "learning_rate": scheduler.get_last_lr()[0]}
            update = onpolicy.Update(step, metrics, roll, scores, eval_scores, t0, t_roll)
            last, stop_run = onpolicy.log_update(run, cfg, update, kl_ctl, running, bar, lambda value: {"beta": value})
            if stop_run:
                break
    finally:
        if pool:
            pool.close()
    bar.close()
    return onpolicy.finish(run, cfg, last, truncated)
