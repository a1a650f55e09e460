"""PPO with a KL penalty: the classic RLHF loop.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"), Stiennon et al.
2020 and Ouyang et al. 2022 (InstructGPT): sample responses from the policy, score them with
the rewards (a reward model, reward functions, verifiers), subtract beta * KL(policy ||
reference) per token, estimate advantages with a learned critic (GAE) and take several epochs
of clipped-surrogate steps on the batch. The update is written out below in the order of
lm-human-preference-details' train_policy_accelerate.py and CleanRL's ppo.py.

    rlhfkit ppo --model runs/sft/final --reward rm:runs/rm/final --output_dir runs/ppo

Optimiser-step convention (as in every on-policy recipe): one mini-batch = one optimiser step;
its micro-batches' losses are normalised by the mini-batch's token count
(rlhfkit.losses.policy.StepTotals), so they add up to the mini-batch loss, and
`accelerator.backward(loss)` is called on each with no further division.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers import TrainerState

from rlhfkit.advantages import (
    RunningMoments,
    explained_variance,
    gae,
    make_kl_controller,
    process_scores,
    sampler_agreement,
    shape_rewards,
)
from rlhfkit.config import ModelArgs, OnPolicyArgs, TrainArgs, require
from rlhfkit.data import load_records
from rlhfkit.data.collate import PadCollator, tokenize_prompt_completion
from rlhfkit.eval import monitor
from rlhfkit.judges.rewards import completion_id_lists
from rlhfkit.logprobs import fast_head_allowed, response_logprobs
from rlhfkit.losses.policy import StepTotals, entropy_bonus, ppo_policy_loss, ptx_loss, value_loss
from rlhfkit.masked import masked_whiten
from rlhfkit.models.lora import disable_dropout
from rlhfkit.models.reward import unwrap_hf
from rlhfkit.models.value import load_value_model, value_model_source
from rlhfkit.recipes import agentic, onpolicy
from rlhfkit.rollout import Trajectory, micro_batches, minibatches
from rlhfkit.rollout.episode_args import EpisodeArgs, load_factory
from rlhfkit.rollout.forward import batched, unwrap
from rlhfkit.rollout.prompts import (
    as_completions,
    render_prompt,
    rollout_seed,
)
from rlhfkit.rollout.record import FirstForward
from rlhfkit.tasks import kindly
from rlhfkit.train.memory import report_on_policy
from rlhfkit.train.optim import make_optimizer, make_scheduler
from rlhfkit.train.runs import one_run_per_folder
from rlhfkit.train.sharding import is_sharded, shard_layers_of
from rlhfkit.train.step import accumulate, backward, check_finite, optimizer_step, step_total

NAME = "ppo"


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs, OnPolicyArgs, EpisodeArgs):
    kl_coef: float = 0.05
    """KL coefficient beta of the per-token penalty in the reward (initial value when target_kl is set)."""
    cliprange: float = 0.2
    """Clip range of the policy's importance ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value prediction around its rollout-time value (0 disables)."""
    value_model: str = ""
    """Critic initialisation: a folder, or '' for the first rm: reward (when it shares the policy's tokenizer) else the policy."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    whiten_advantages: bool = True
    """Whiten advantages over each rollout batch."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of an SFT loss on `ptx_data` mixed into each step (0 = off)."""
    ptx_data: str = ""
    """prompt/completion data for PPO-ptx ('' = the bundled SFT records when training on the bundled task)."""
    engine: str = "hf"
    """Generation engine: hf (sampling loop), static (static KV cache, compiled on CUDA) or vllm (colocated vLLM, pip install vllm); docs/scale.md."""
    logging_steps: int = 1
    """Write metrics every N updates (each update's metrics are computed either way)."""
    output_dir: str = "runs/ppo"
    """Folder for checkpoints, metrics.jsonl, TensorBoard events and the final model."""

    def __post_init__(self) -> None:
        self._check_train_args()
        self._check_on_policy_args()
        self._check_episode_args()
        require(self.model != "", "model", "give the SFT policy to start from (a folder or 'kindly')")
        require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        require(self.cliprange > 0, "cliprange", "must be > 0")
        require(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma and lam must be in [0, 1]")
        require(self.vf_coef >= 0 and self.entropy_coef >= 0 and self.ptx_coef >= 0, "vf_coef",
                "vf_coef, entropy_coef and ptx_coef must be >= 0")
        require(self.ptx_coef == 0 or bool(self.ptx_data) or self.prompts.split(":")[0] == "kindly", "ptx_data",
                "PPO-ptx needs prompt/completion data: pass --ptx_data FILE")


def ptx_batches(cfg: Config, tok):
    """An endless stream of SFT micro-batches for PPO-ptx."""

    if not cfg.ptx_data:
        records = kindly.sft_records("train")
    else:
        records = load_records(cfg.ptx_data, required=["prompt", "completion"])
    collate, bs = PadCollator(tok.pad_token_id), cfg.per_device_train_batch_size
    g = torch.Generator().manual_seed(cfg.seed)
    while True:
        for i in torch.randperm(len(records), generator=g).tolist()[: len(records) - bs + 1: bs]:
            yield collate([tokenize_prompt_completion(tok, r["prompt"], r["completion"], 128) for r in records[i:i + bs]])


def collect(policy, ref_model, ref_ctx, critic, tok, rewards, eval_reward, prompts, cfg, step, kl_ctl, running, accelerator,
            engine, trainer_state=None):
    """Steps 1-6 of an update: a scored rollout turned into a Trajectory of advantages and returns."""
    dev, bs = accelerator.device, cfg.per_device_train_batch_size
    # 2. rollout: one response per prompt
    if cfg.multi_turn:  # 2.-3. one episode per prompt with tools / an environment, scored (recipes/agentic.py)
        episodes = agentic.sample_episodes(policy, tok, rewards, eval_reward, prompts, cfg, step, accelerator,
                                           load_factory(cfg), trainer_state, num_samples=1)
        roll, scored, eval_scores = episodes.rollout, episodes.scored, episodes.eval_scores
    else:
        roll = engine(unwrap(policy), tok, [render_prompt(tok, p) for p in prompts.prompts], cfg.max_completion_length,
                      cfg.temperature, cfg.top_p, num_samples=1, batch_size=cfg.generation_batch_size,
                      seed=rollout_seed(cfg.seed, step, accelerator.process_index),
                      max_prompt_length=cfg.max_prompt_length, top_k=cfg.top_k)
        # 3. run the rewards (reward model, functions, verifiers) and the held-out eval reward
        completions = as_completions(prompts.prompts, roll.responses)
        scored = rewards.score(prompts.prompts, completions, completion_ids=completion_id_lists(roll),
                               trainer_state=trainer_state, **prompts.columns)
        eval_scores = eval_reward(prompts.prompts, completions, **prompts.columns) if eval_reward is not None else None
    scores = torch.tensor(scored.total, dtype=torch.float32)
    # 4. old log-probs, reference log-probs and values: the training forward and layout, no gradients
    ids, mask = (t.to(dev) for t in roll.sequences())
    response_width, rmask = roll.response_ids.shape[1], roll.response_mask.to(dev).float()
    fast = fast_head_allowed(cfg.mixed_precision)  # one LM-head path for rollout, reference and training
    first = None
    if first_step_reuses_rollout(cfg, accelerator, len(roll)):
        # the forward the first optimiser step would repeat, in that step's row order (so its
        # gradients are summed in the same order as without the reuse)
        order = minibatches(len(roll), cfg.num_mini_batches, cfg.seed, step, 0)[0]
        o = order.to(dev)
        logp, ent = response_logprobs(policy, input_ids=ids[o], attention_mask=mask[o], response_width=response_width,
                                      temperature=cfg.temperature, with_entropy=True,
                                      entropy_grad=cfg.entropy_coef > 0, fast_head=fast)
        first = FirstForward(order, logp, ent, critic(ids[o], mask[o], response_width))
        back = torch.argsort(o)
        old_logp, old_values = logp.detach()[back], first.values.detach()[back] * rmask
    else:
        old_logp = batched(lambda i, m: response_logprobs(unwrap(policy), input_ids=i, attention_mask=m, response_width=response_width,
                                                          temperature=cfg.temperature, fast_head=fast)[0], ids, mask, bs)
        old_values = batched(lambda i, m: unwrap(critic)(i, m, response_width), ids, mask, bs) * rmask
    with ref_ctx():
        ref_logp = batched(lambda i, m: response_logprobs(ref_model, input_ids=i, attention_mask=m, response_width=response_width,
                                                          temperature=cfg.temperature, fast_head=fast)[0], ids, mask, bs)
    check_finite("rollout log-probs / values", old_logp, ref_logp, old_values)
    # 5. rewards: the (normalised) score at the last token, -beta * KL at every token (Ziegler et al. eq. 2)
    shaped = process_scores(scores, roll.ended_with_eos, cfg.missing_eos_penalty, cfg.score_norm, running,
                            cfg.score_clip or None).to(dev)
    token_rewards, kl = shape_rewards(shaped, old_logp, ref_logp, rmask, kl_ctl.value, cfg.kl_estimator)
    # 6. advantages and returns by GAE (Schulman et al. 2016), advantages whitened over the batch
    adv, returns = gae(token_rewards, old_values, rmask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, rmask)
    sampler_logp = None if roll.sampler_logp is None else roll.sampler_logp.to(dev)
    traj = Trajectory(ids, mask, rmask, old_logp, ref_logp, scores.to(dev), adv, old_values, returns, first, sampler_logp)
    stats = monitor.rollout_stats(roll, scores, kl, old_logp, eval_scores)
    if sampler_logp is not None:  # trainer-sampler agreement, measured in every run
        stats.update(sampler_agreement(old_logp, sampler_logp, rmask))
    stats.update(scored.stats())
    stats["value_explained_variance"] = explained_variance(old_values, returns, rmask)
    stats["num_truncated_prompts"] = roll.num_truncated_prompts
    stats["non_score_reward"] = (-kl_ctl.value * kl.sum(-1)).mean().item()
    return roll, scores, eval_scores, traj, stats


def first_step_reuses_rollout(cfg, accelerator, rows: int) -> bool:
    """Whether the first optimiser step's forward is the rollout's old log-prob forward: one
    micro-batch holding every row, on one unsharded process (under DDP the training forward must
    run through the wrapper, which synchronises gradients), with dropout off (with it on, the
    training forward draws its own masks, as in every PPO step, so its ratio is not exactly 1)."""
    return (accelerator.num_processes == 1 and not is_sharded(accelerator) and cfg.num_mini_batches == 1 and cfg.disable_dropout
            and cfg.per_device_train_batch_size >= rows and cfg.num_ppo_epochs >= 1)


def train_on_batch(policy, critic, optimizers, traj: Trajectory, cfg, step, accelerator, ptx_iter, schedulers=()) -> dict:
    """Step 7: num_ppo_epochs x num_mini_batches optimiser steps on policy and critic; averaged metrics."""
    metrics, stopped = [], False
    for epoch in range(cfg.num_ppo_epochs):
        # 7a. shuffle the rollout batch and split it into mini-batches: one optimiser step each
        for mb in minibatches(len(traj), cfg.num_mini_batches, cfg.seed, step, epoch):
            num_tokens, num_sequences = step_total(accelerator, traj.response_mask[mb].sum(), len(mb))
            totals = StepTotals(num_tokens, num_sequences, cfg.max_completion_length)
            micro, mb_metrics = micro_batches(mb, cfg.per_device_train_batch_size), []
            for j, idx in enumerate(micro):
                with accumulate(accelerator, (policy, critic), last=j == len(micro) - 1):
                    loss, m = micro_batch_loss(policy, critic, traj, idx, mb, totals, cfg, epoch, ptx_iter, accelerator.device)
                    backward(accelerator, loss, "PPO loss")
                mb_metrics.append(m)
            # 7e. clip the gradient norm (a non-finite gradient shows in the norm), then step
            grad_norm = optimizer_step(accelerator, (policy, critic), optimizers, schedulers, cfg.max_grad_norm, "PPO gradient")
            sm = onpolicy.average_metrics(mb_metrics)
            for key in ("policy_loss", "value_loss", "loss"):  # the step's losses are sums over micro-batches
                sm[key] = sum(float(m[key]) for m in mb_metrics)
            if grad_norm is not None:
                sm["grad_norm"] = grad_norm
            metrics.append(sm)
            # 7f. stop this batch's remaining epochs once the policy moved too far (approx-KL)
            if cfg.early_stop_kl and sm["approx_kl"] > cfg.early_stop_kl:
                stopped = True
                break
        if stopped:
            break
    return onpolicy.update_summary(metrics, stopped)


def micro_batch_loss(policy, critic, traj: Trajectory, idx, mb, totals: StepTotals, cfg, epoch: int, ptx_iter,
                     device) -> tuple[torch.Tensor, dict]:
    """7b-7d for one micro-batch: its share of the step's loss (normalised by `totals`) and metrics."""
    ids, mask, rmask = traj.input_ids[idx], traj.attention_mask[idx], traj.response_mask[idx]
    # 7b. new log-probs (entropy: in the loss when it has a weight, else a first-epoch metric)
    bonus = cfg.entropy_coef > 0
    first, traj.first_forward = traj.first_forward, None  # the rollout's forward, used once
    if first is not None and torch.equal(idx, first.index):
        logp, ent = first.logp, first.entropy
    else:
        first = None
        logp, ent = response_logprobs(policy, input_ids=ids, attention_mask=mask, response_width=traj.response_width,
                                      temperature=cfg.temperature, with_entropy=bonus or epoch == 0,
                                      entropy_grad=bonus, fast_head=fast_head_allowed(cfg.mixed_precision))
    # 7c. clipped surrogate (Schulman et al. 2017 eq. 7) and clipped value loss
    weights, weight_metrics = onpolicy.behaviour_weights(traj, idx, cfg)  # off-policy correction (or none)
    policy_loss, metrics = ppo_policy_loss(logp, traj.old_logp[idx], traj.advantages[idx], rmask, cfg.cliprange,
                                           totals=totals, is_weights=weights)
    metrics.update(weight_metrics)
    entropy_loss, entropy_metrics = (entropy_bonus(ent, rmask, cfg.entropy_coef, totals) if ent is not None
                                     else (0.0, {}))
    values = first.values if first is not None else critic(ids, mask, traj.response_width)
    v_loss, value_metrics = value_loss(values, traj.values[idx], traj.returns[idx], rmask,
                                       cfg.cliprange_value or None, totals)
    loss = policy_loss + entropy_loss + cfg.vf_coef * v_loss
    if ptx_iter is not None:  # 7d. PPO-ptx (InstructGPT eq. 2), a share of it per micro-batch
        b = {k: v.to(device) for k, v in next(ptx_iter).items()}
        pretrain_loss, pretrain_metrics = ptx_loss(
            policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"], cfg.ptx_coef)
        loss, metrics = loss + pretrain_loss * len(idx) / len(mb), {**metrics, **pretrain_metrics}
    return loss, {**metrics, **entropy_metrics, **value_metrics, "loss": loss.detach()}


@one_run_per_folder
def main(cfg: Config, reward_funcs=None, reward_fn=None) -> dict:
    """Train; returns the last update's metrics and, with an eval reward, the held-out evaluation.

    `reward_funcs`: Python reward functions (TRL signature, or score(prompts, responses)) scored
    after the `--reward` specs.
    """
    run = onpolicy.start_run(NAME, cfg, reward_funcs if reward_funcs is not None else reward_fn)
    accelerator, tok = run.accelerator, run.tokenizer
    critic = load_value_model(value_model_source(cfg.value_model, cfg.model, cfg.reward, tok, accelerator.print), tok,
                              cfg.dtype, attn_implementation=cfg.attn_implementation,
                              gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.disable_dropout:
        disable_dropout(critic)
    report_on_policy(accelerator, run.policy, cfg, frozen=(run.reference, run.rewards, run.eval_reward), critic=critic)
    run.n_updates = onpolicy.count_updates(cfg, len(run.prompts), accelerator.num_processes)
    policy_optimizer, value_optimizer = make_optimizer(run.policy, cfg), make_optimizer(critic, cfg)
    schedulers = [make_scheduler(o, cfg, run.n_updates * cfg.num_ppo_epochs * cfg.num_mini_batches)
                  for o in (policy_optimizer, value_optimizer)]
    run.sharded = is_sharded(accelerator)  # policy and critic sharded, and a separate reference (after_prepare)
    if run.sharded:  # accelerate's FSDP2 prepares one model (with its optimiser) per call
        shard_layers_of(critic, unwrap_hf(critic.model))
        (run.policy, policy_optimizer), (critic, value_optimizer) = (
            accelerator.prepare(run.policy, policy_optimizer), accelerator.prepare(critic, value_optimizer))
    else:
        run.policy, critic, policy_optimizer, value_optimizer = accelerator.prepare(run.policy, critic, policy_optimizer,
                                                                           value_optimizer)
    accelerator.register_for_checkpointing(*schedulers)
    onpolicy.after_prepare(run, cfg)
    kl_ctl, running = make_kl_controller(cfg.kl_coef, cfg.target_kl or None, cfg.kl_horizon), RunningMoments()
    start = onpolicy.resume(run, cfg, kl_ctl, running)
    ptx_iter = ptx_batches(cfg, tok) if cfg.ptx_coef > 0 else None
    truncated, last = 0, {}
    bar = onpolicy.progress_bar(run, cfg, start, NAME)
    for step in range(start, run.n_updates):
        t0 = time.perf_counter()
        monitor.measure_perplexity(run.alarm, run.policy, tok, step)  # every perplexity_every updates
        # 1. this update's prompts
        prompts = onpolicy.update_prompts(run, cfg, step)
        # 2.-6. rollout, rewards, old/reference log-probs, values, KL-shaped rewards, GAE
        roll, scores, eval_scores, traj, stats = collect(run.policy, run.reference_forward(), run.reference_context,
                                                         critic, tok, run.rewards, run.eval_reward, prompts, cfg, step,
                                                         kl_ctl, running, accelerator, run.engine,
                                                         TrainerState(global_step=step, max_steps=run.n_updates))
        t_roll = time.perf_counter() - t0
        # 7. epochs x mini-batches of clipped policy and value steps
        train_stats = train_on_batch(run.policy, critic, (policy_optimizer, value_optimizer), traj, cfg, step, accelerator,
                                     ptx_iter, schedulers)
        # 8. metrics, the adaptive KL controller, alarm, samples, checkpoint
        truncated += roll.num_truncated_prompts
        metrics = {**stats, **train_stats, "learning_rate": schedulers[0].get_last_lr()[0]}
        update = onpolicy.Update(step, metrics, roll, scores, eval_scores, t0, t_roll)
        last, stop_run = onpolicy.log_update(run, cfg, update, kl_ctl, running, bar)
        if stop_run:
            break
    bar.close()
    return onpolicy.finish(run, cfg, last, truncated, {"value": (critic, "model.")})
