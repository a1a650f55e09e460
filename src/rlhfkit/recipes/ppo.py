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

import contextlib
import dataclasses
import time

import torch
from tqdm.auto import tqdm
from transformers import TrainerState

from rlhfkit.advantages import (
    RunningMoments,
    explained_variance,
    gae,
    make_kl_controller,
    masked_whiten,
    process_scores,
    shape_rewards,
)
from rlhfkit.config import ModelArgs, OnPolicyArgs, TrainArgs, require
from rlhfkit.errors import ConfigError
from rlhfkit.eval import monitor
from rlhfkit.judges.rewards import add_extra_columns, completion_id_lists
from rlhfkit.judges.specs import load_rewards
from rlhfkit.logprobs import fast_head_allowed
from rlhfkit.losses.policy import StepTotals, entropy_bonus, ppo_policy_loss, ptx_loss, value_loss
from rlhfkit.train.memory import report_on_policy
from rlhfkit.models import (
    load_policy,
    load_tokenizer,
    reference_context,
    reference_model,
    save_model,
)
from rlhfkit.models.lora import disable_dropout
from rlhfkit.models.reward import unwrap_hf
from rlhfkit.models.value import load_value_model, value_model_source
from rlhfkit.train.savers import OffloadedBetweenCalls, offloaded
from rlhfkit.rollout import Trajectory, get_engine, micro_batches, minibatches
from rlhfkit.rollout.forward import batched, response_logprobs, unwrap
from rlhfkit.rollout.prompts import (
    as_completions,
    load_prompt_set,
    prompts_for_step,
    render_prompt,
    rollout_seed,
)
from rlhfkit.rollout.record import FirstForward
from rlhfkit.train.runs import MetricsLogger, atomic_write_json, one_run_per_folder, prepare_run_dir
from rlhfkit.train.sharding import full_state_dict, is_sharded, shard_frozen, shard_layers_of
from rlhfkit.train.accelerator import make_accelerator, mean_across_processes
from rlhfkit.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhfkit.train.optim import make_optimizer, make_scheduler
from rlhfkit.train.step import check_finite, check_finite_grads

NAME = "ppo"


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs, OnPolicyArgs):
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
    from rlhfkit.data.collate import PadCollator, tokenize_prompt_completion

    if not cfg.ptx_data:
        from rlhfkit.tasks import kindly

        records = kindly.sft_records("train")
    else:
        from rlhfkit.data import load_records

        records = load_records(cfg.ptx_data, required=["prompt", "completion"])
    collate, bs = PadCollator(tok.pad_token_id), cfg.per_device_train_batch_size
    g = torch.Generator().manual_seed(cfg.seed)
    while True:
        for i in torch.randperm(len(records), generator=g).tolist()[: len(records) - bs + 1: bs]:
            yield collate([tokenize_prompt_completion(tok, r["prompt"], r["completion"], 128) for r in records[i:i + bs]])


def collect(policy, ref_model, ref_ctx, critic, tok, rewards, eval_reward, prompts, cfg, step, kl_ctl, running, acc,
            engine, trainer_state=None):
    """Steps 1-6 of an update: a scored rollout turned into a Trajectory of advantages and returns."""
    dev, bs = acc.device, cfg.per_device_train_batch_size
    # 2. rollout: one response per prompt
    roll = engine(unwrap(policy), tok, [render_prompt(tok, p) for p in prompts.prompts], cfg.max_completion_length,
                  cfg.temperature, cfg.top_p, num_samples=1, batch_size=cfg.generation_batch_size,
                  seed=rollout_seed(cfg.seed, step, acc.process_index), max_prompt_length=cfg.max_prompt_length)
    # 3. run the rewards (reward model, functions, verifiers) and the held-out eval reward
    completions = as_completions(prompts.prompts, roll.responses)
    scored = rewards.score(prompts.prompts, completions, completion_ids=completion_id_lists(roll),
                           trainer_state=trainer_state, **prompts.columns)
    scores = torch.tensor(scored.total, dtype=torch.float32)
    eval_scores = eval_reward(prompts.prompts, completions, **prompts.columns) if eval_reward is not None else None
    # 4. old log-probs, reference log-probs and values: the training forward and layout, no gradients
    ids, mask = (t.to(dev) for t in roll.sequences())
    r_len, rmask = roll.response_ids.shape[1], roll.response_mask.to(dev).float()
    fast = fast_head_allowed(cfg.mixed_precision)  # one LM-head path for rollout, reference and training
    first = None
    if first_step_reuses_rollout(cfg, acc, len(roll)):
        # the forward the first optimiser step would repeat, in that step's row order (so its
        # gradients are summed in the same order as without the reuse)
        order = minibatches(len(roll), cfg.num_mini_batches, cfg.seed, step, 0)[0]
        o = order.to(dev)
        logp, ent = response_logprobs(policy, ids[o], mask[o], r_len, cfg.temperature, with_entropy=True,
                                      entropy_grad=cfg.entropy_coef > 0, fast_head=fast)
        first = FirstForward(order, logp, ent, critic(ids[o], mask[o], r_len))
        back = torch.argsort(o)
        old_logp, old_values = logp.detach()[back], first.values.detach()[back] * rmask
    else:
        old_logp = batched(lambda i, m: response_logprobs(unwrap(policy), i, m, r_len, cfg.temperature, fast_head=fast)[0], ids, mask, bs)
        old_values = batched(lambda i, m: unwrap(critic)(i, m, r_len), ids, mask, bs) * rmask
    with ref_ctx():
        ref_logp = batched(lambda i, m: response_logprobs(ref_model, i, m, r_len, cfg.temperature, fast_head=fast)[0], ids, mask, bs)
    check_finite("rollout log-probs / values", old_logp, ref_logp, old_values)
    # 5. rewards: the (normalised) score at the last token, -beta * KL at every token (Ziegler et al. eq. 2)
    shaped = process_scores(scores, roll.ended_with_eos, cfg.missing_eos_penalty, cfg.score_norm, running,
                            cfg.score_clip or None).to(dev)
    token_rewards, kl = shape_rewards(shaped, old_logp, ref_logp, rmask, kl_ctl.value, cfg.kl_estimator)
    # 6. advantages and returns by GAE (Schulman et al. 2016), advantages whitened over the batch
    adv, returns = gae(token_rewards, old_values, rmask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, rmask)
    traj = Trajectory(ids, mask, rmask, old_logp, ref_logp, scores.to(dev), adv, old_values, returns, first)
    stats = monitor.rollout_stats(roll, scores, kl, old_logp, eval_scores)
    stats.update(scored.stats())
    stats["value_explained_variance"] = explained_variance(old_values, returns, rmask)
    stats["num_truncated_prompts"] = roll.num_truncated_prompts
    stats["non_score_reward"] = (-kl_ctl.value * kl.sum(-1)).mean().item()
    return roll, scores, eval_scores, traj, stats


def first_step_reuses_rollout(cfg, acc, rows: int) -> bool:
    """Whether the first optimiser step's forward is the rollout's old log-prob forward: one
    micro-batch holding every row, on one unsharded process (under DDP the training forward must
    run through the wrapper, which synchronises gradients), with dropout off (with it on, the
    training forward draws its own masks, as in every PPO step, so its ratio is not exactly 1)."""
    return (acc.num_processes == 1 and not is_sharded(acc) and cfg.num_mini_batches == 1 and cfg.disable_dropout
            and cfg.per_device_train_batch_size >= rows and cfg.num_ppo_epochs >= 1)


def train_on_batch(policy, critic, optimizers, traj: Trajectory, cfg, step, acc, ptx_iter, schedulers=()) -> dict:
    """Step 7: num_ppo_epochs x num_mini_batches optimiser steps on policy and critic; averaged metrics."""
    metrics, stopped = [], False
    for epoch in range(cfg.num_ppo_epochs):
        # 7a. shuffle the rollout batch and split it into mini-batches: one optimiser step each
        for mb in minibatches(len(traj), cfg.num_mini_batches, cfg.seed, step, epoch):
            n_tok = traj.response_mask[mb].sum().reshape(1)
            if acc.num_processes > 1:
                n_tok = acc.reduce(n_tok, "sum") / acc.num_processes
            totals = StepTotals(float(n_tok), float(len(mb)), cfg.max_completion_length)
            micro, mb_metrics = micro_batches(mb, cfg.per_device_train_batch_size), []
            for j, idx in enumerate(micro):
                with contextlib.ExitStack() as sync:  # all-reduce gradients once, on the last micro-batch
                    if j < len(micro) - 1:
                        for model in (policy, critic):
                            sync.enter_context(acc.no_sync(model))
                    ids, mask, rmask = traj.input_ids[idx], traj.attention_mask[idx], traj.response_mask[idx]
                    # 7b. new log-probs (entropy: in the loss when it has a weight, else a first-epoch metric)
                    bonus = cfg.entropy_coef > 0
                    first, traj.first_forward = traj.first_forward, None  # the rollout's forward, used once
                    if first is not None and torch.equal(idx, first.index):
                        logp, ent = first.logp, first.entropy
                    else:
                        first = None
                        logp, ent = response_logprobs(policy, ids, mask, traj.response_len, cfg.temperature,
                                                      with_entropy=bonus or epoch == 0, entropy_grad=bonus,
                                                      fast_head=fast_head_allowed(cfg.mixed_precision))
                    # 7c. clipped surrogate (Schulman et al. 2017 eq. 7) and clipped value loss
                    pl, pm = ppo_policy_loss(logp, traj.old_logp[idx], traj.advantages[idx], rmask, cfg.cliprange,
                                             totals=totals)
                    el, em = entropy_bonus(ent, rmask, cfg.entropy_coef, totals) if ent is not None else (0.0, {})
                    values = first.values if first is not None else critic(ids, mask, traj.response_len)
                    vl, vm = value_loss(values, traj.values[idx], traj.returns[idx], rmask,
                                        cfg.cliprange_value or None, totals)
                    loss = pl + el + cfg.vf_coef * vl
                    if ptx_iter is not None:  # 7d. PPO-ptx (InstructGPT eq. 2), a share of it per micro-batch
                        b = {k: v.to(acc.device) for k, v in next(ptx_iter).items()}
                        xl, xm = ptx_loss(policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                          b["labels"], cfg.ptx_coef)
                        loss, pm = loss + xl * len(idx) / len(mb), {**pm, **xm}
                    check_finite("PPO loss", loss)
                    acc.backward(loss)
                mb_metrics.append({**pm, **em, **vm, "loss": loss.detach()})
            # 7e. clip the gradient norm (a non-finite gradient shows in the norm), then step
            if cfg.max_grad_norm:
                norms = [acc.clip_grad_norm_(m.parameters(), cfg.max_grad_norm) for m in (policy, critic)]
                check_finite("PPO gradient norm", *norms)
            else:
                norms = [None]
                for model in (policy, critic):
                    check_finite_grads(model)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            for sched in schedulers:
                sched.step()
            sm = monitor.average_metrics(mb_metrics)
            for key in ("policy_loss", "value_loss", "loss"):  # the step's losses are sums over micro-batches
                sm[key] = sum(float(m[key]) for m in mb_metrics)
            if norms[0] is not None:
                sm["grad_norm"] = float(norms[0])
            metrics.append(sm)
            # 7f. stop this batch's remaining epochs once the policy moved too far (approx-KL)
            if cfg.early_stop_kl and sm["approx_kl"] > cfg.early_stop_kl:
                stopped = True
                break
        if stopped:
            break
    return monitor.update_summary(metrics, stopped)


@one_run_per_folder
def main(cfg: Config, reward_funcs=None, reward_fn=None) -> dict:
    """Train; returns the last update's metrics and, with an eval reward, the held-out evaluation.

    `reward_funcs`: Python reward functions (TRL signature, or score(prompts, responses)) scored
    after the `--reward` specs.
    """
    acc = make_accelerator(cfg)
    out = prepare_run_dir(cfg.output_dir, cfg, acc.is_main_process)
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    policy = load_policy(cfg.model, cfg.dtype, lora=cfg, attn_implementation=cfg.attn_implementation,
                         gradient_checkpointing=cfg.gradient_checkpointing)
    ref_model = reference_model(policy, cfg.use_lora)  # with LoRA: the policy itself, adapters off
    if not cfg.use_lora and not cfg.offload_reference:
        ref_model.to(acc.device)
    rewards = load_rewards(cfg.reward, cfg.reward_weights, acc.device, cfg.generation_batch_size,
                           reward_funcs if reward_funcs is not None else reward_fn)
    rewards = OffloadedBetweenCalls(rewards, acc.device) if cfg.offload_reference else rewards
    critic = load_value_model(value_model_source(cfg.value_model, cfg.model, cfg.reward, tok, acc.print), tok,
                              cfg.dtype, attn_implementation=cfg.attn_implementation,
                              gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.disable_dropout:
        for model in (policy, ref_model, critic):
            disable_dropout(model)
    eval_reward = monitor.load_eval_reward(cfg, acc.device)
    report_on_policy(acc, policy, cfg, frozen=(ref_model, rewards, eval_reward), critic=critic)
    prompt_set = load_prompt_set(cfg.prompts, "train")
    engine = get_engine(cfg.engine)
    n_updates = cfg.max_steps if cfg.max_steps > 0 else max(
        1, int(cfg.num_train_epochs * len(prompt_set) / (cfg.prompts_per_step * acc.num_processes) + 0.999999))
    opt_p, opt_v = make_optimizer(policy, cfg), make_optimizer(critic, cfg)
    schedulers = [make_scheduler(o, cfg, n_updates * cfg.num_ppo_epochs * cfg.num_mini_batches) for o in (opt_p, opt_v)]
    sharded = is_sharded(acc)  # policy and critic sharded, and a separate reference below
    if sharded:  # accelerate's FSDP2 prepares one model (with its optimiser) per call
        if cfg.engine != "hf":
            raise ConfigError(f"engine '{cfg.engine}' cannot sample from a sharded policy; use --engine hf under FSDP")
        shard_layers_of(critic, unwrap_hf(critic.model))
        (policy, opt_p), (critic, opt_v) = acc.prepare(policy, opt_p), acc.prepare(critic, opt_v)
    else:
        policy, critic, opt_p, opt_v = acc.prepare(policy, critic, opt_p, opt_v)
    acc.register_for_checkpointing(*schedulers)
    if sharded and not cfg.use_lora and not cfg.offload_reference:  # offloaded: a whole copy parked in CPU memory
        ref_model = shard_frozen(acc, ref_model)
    ref_fwd = unwrap(policy) if cfg.use_lora else ref_model

    def ref_ctx():
        return reference_context(policy) if cfg.use_lora else offloaded(ref_model, acc.device, cfg.offload_reference)

    kl_ctl = make_kl_controller(cfg.kl_coef, cfg.target_kl or None, cfg.kl_horizon)
    running, start = RunningMoments(), 0
    if cfg.resume and (ckpt := latest_checkpoint(cfg.output_dir)) is not None:
        state = load_checkpoint(acc, ckpt)
        start = state["step"]
        kl_ctl.load_state_dict(state["kl_ctl"])
        running.load_state_dict(state["running_moments"])
        acc.print(f"ppo: resumed from {ckpt} at update {start}")
    ptx_iter = ptx_batches(cfg, tok) if cfg.ptx_coef > 0 else None
    logger = MetricsLogger(out, cfg.report_to, enabled=acc.is_main_process)
    alarm = monitor.make_hacking_alarm(cfg, out, acc.is_main_process)
    truncated, last = 0, {}
    bar = tqdm(total=n_updates, initial=start, desc=NAME, disable=not (cfg.progress and acc.is_main_process))
    for step in range(start, n_updates):
        t0 = time.perf_counter()
        monitor.measure_perplexity(alarm, policy, tok, step)  # every perplexity_every updates, from the start
        # 1. this update's prompts: a pure function of (seed, step), so resuming replays them
        prompts = prompt_set.select(prompts_for_step(len(prompt_set), step, cfg.prompts_per_step, cfg.seed,
                                                     acc.num_processes, acc.process_index))
        # 2.-6. rollout, rewards, old/reference log-probs, values, KL-shaped rewards, GAE
        roll, scores, eval_scores, traj, stats = collect(policy, ref_fwd, ref_ctx, critic, tok, rewards, eval_reward,
                                                         prompts, cfg, step, kl_ctl, running, acc, engine,
                                                         TrainerState(global_step=step, max_steps=n_updates))
        t_roll = time.perf_counter() - t0
        # 7. epochs x mini-batches of clipped policy and value steps
        train_stats = train_on_batch(policy, critic, (opt_p, opt_v), traj, cfg, step, acc, ptx_iter, schedulers)
        # 8. metrics, the adaptive KL controller (Ziegler et al. sec. 2.2), alarm, samples, checkpoint
        truncated += roll.num_truncated_prompts
        merged = {**stats, **train_stats, "learning_rate": schedulers[0].get_last_lr()[0]}
        keys = sorted(merged)
        last = dict(zip(keys, mean_across_processes(acc, [float(merged[k]) for k in keys])))
        kl_ctl.update(last["kl"], len(roll) * acc.num_processes)
        last.update(kl_coef=kl_ctl.value, rollout_seconds=t_roll, step_seconds=time.perf_counter() - t0)
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
        acc.print(f"ppo: {truncated} prompt(s) were longer than max_prompt_length={cfg.max_prompt_length} "
                  "tokens and were left-truncated")
    logger.close()
    result = {"updates": n_updates, "last": last}
    # all processes: a sharded policy and critic are gathered onto the main process
    p_state, v_state = full_state_dict(acc, policy), full_state_dict(acc, critic)
    if acc.is_main_process:
        save_model(unwrap(policy), tok, out / "final", state_dict=p_state)
        save_model(unwrap(critic).model, tok, out / "value",
                   state_dict=None if v_state is None else {k.removeprefix("model."): v for k, v in v_state.items()})
    held_out = monitor.final_check("ppo", cfg, acc, policy, ref_fwd, tok, eval_reward, rewards, ref_ctx, sharded)
    if held_out is not None:
        result["eval"] = held_out
    if acc.is_main_process:
        atomic_write_json(out / "final_metrics.json", result)
    acc.wait_for_everyone()
    return result
