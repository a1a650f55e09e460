"""GRPO: group-relative policy optimisation, no critic (Shao et al. 2024, DeepSeekMath).

For each prompt the policy samples a group of `num_generations` responses; each response's
advantage is its reward-model score relative to its group, (r - mean) / std (eq. 3, sec.
4.1.2), shared by all its tokens. The KL to the reference is not in the reward but in the
loss, as beta * k3 per token (eq. 4). `scale_rewards false` with `loss_type dr_grpo` gives
Dr. GRPO (Liu et al. 2025): no std division and a constant loss denominator.

    rlhfkit grpo --model runs/sft/final --reward_model runs/rm/final --output_dir runs/grpo
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch

from rlhfkit.advantages import (
    RunningMoments,
    group_advantages,
    kl_estimate,
    make_kl_controller,
    process_scores,
)
from rlhfkit.config import ModelArgs, TrainArgs, require
from rlhfkit.data.prompts import load_prompts
from rlhfkit.losses.policy import LOSS_NORMALISERS, grpo_loss
from rlhfkit.models import (
    load_policy,
    load_tokenizer,
    reference_context,
    reference_model,
    save_model,
)
from rlhfkit.rl import (
    OnPolicyArgs,
    check_hacking,
    evaluate_gold,
    group_rollout,
    make_gold_judge,
    make_hacking_alarm,
    make_reward_fn,
    policy_update,
    prompts_for_step,
    rollout_stats,
    sample_table,
    total_updates,
    unwrap,
    write_samples,
)
from rlhfkit.runs import MetricsLogger, atomic_write_json, prepare_run_dir
from rlhfkit.training import (
    latest_checkpoint,
    load_checkpoint,
    make_accelerator,
    make_optimizer,
    mean_across_processes,
    save_checkpoint,
)


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs, OnPolicyArgs):
    num_generations: int = 4
    """Responses sampled per prompt (the group size G)."""
    kl_coef: float = 0.04
    """beta: weight of the per-token k3 KL to the reference in the loss (the KL is reported either way)."""
    loss_type: str = "sequence"
    """Loss normalisation: sequence (GRPO: per-response token mean), token (DAPO) or dr_grpo (Dr. GRPO)."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group std (GRPO); false for Dr. GRPO."""
    clip_eps_high: float = 0.0
    """Upper clip of the ratio when > 0 (DAPO's clip-higher); 0 = symmetric clip_eps."""
    num_ppo_epochs: int = 1
    """Passes over each rollout batch (GRPO's mu)."""
    output_dir: str = "runs/grpo"
    """Folder for checkpoints, metrics.jsonl, TensorBoard events and the final model."""

    def __post_init__(self) -> None:
        self._check_train_args()
        self._check_on_policy_args()
        require(self.model != "", "model", "give the SFT policy to start from (a folder or 'kindly')")
        require(self.num_generations >= 2, "num_generations", "a group needs at least 2 responses")
        require(self.loss_type in LOSS_NORMALISERS and self.loss_type != "sequence_sum", "loss_type",
                "must be sequence, token or dr_grpo")


def main(cfg: Config, reward_fn=None) -> dict:
    """Train; returns the final held-out evaluation (when a gold judge exists) and the last metrics."""
    acc = make_accelerator(cfg)
    out = prepare_run_dir(cfg.output_dir, cfg, acc.is_main_process)
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    policy = load_policy(cfg.model, cfg.dtype, lora=cfg)
    ref_model = reference_model(policy, cfg.use_lora)
    if not cfg.use_lora:
        ref_model.to(acc.device)
    reward_fn = reward_fn or make_reward_fn(cfg.reward_model, acc.device, cfg.generation_batch_size)
    judge = make_gold_judge(cfg)
    prompts = load_prompts(cfg.prompts, "train")
    n_updates = total_updates(len(prompts), cfg, acc.num_processes)
    optimizer = make_optimizer(policy, cfg)
    policy, optimizer = acc.prepare(policy, optimizer)
    ref_fwd = unwrap(policy) if cfg.use_lora else ref_model

    def ref_ctx():
        return reference_context(policy) if cfg.use_lora else contextlib.nullcontext()

    kl_ctl = make_kl_controller(cfg.kl_coef, cfg.target_kl or None, cfg.kl_horizon)
    running, start = RunningMoments(), 0
    if cfg.resume and (ckpt := latest_checkpoint(cfg.output_dir)) is not None:
        state = load_checkpoint(acc, ckpt)
        start = state["step"]
        kl_ctl.load_state_dict(state["kl_ctl"])
        running.load_state_dict(state["running_moments"])
        acc.print(f"grpo: resumed from {ckpt} at update {start}")
    logger = MetricsLogger(out, cfg.report_to, enabled=acc.is_main_process)
    alarm = make_hacking_alarm(cfg, out, acc.is_main_process)
    max_len = cfg.max_new_tokens
    truncated, last = 0, {}
    for step in range(start, n_updates):
        t0 = time.perf_counter()
        step_prompts = prompts_for_step(prompts, step, cfg.prompts_per_step, cfg.seed, acc.num_processes,
                                        acc.process_index)
        single_pass = cfg.num_ppo_epochs * cfg.num_mini_batches == 1
        roll, scores, batch = group_rollout(policy, ref_fwd, ref_ctx, tok, reward_fn, step_prompts, cfg, step,
                                            acc.device, acc.process_index, need_ref=True, need_old=not single_pass)
        if single_pass:  # each row is trained on once, before any update: its old log-probs are its fresh ones
            batch["old_logp"] = torch.zeros(batch["rmask"].shape, device=acc.device)
        rewards = process_scores(scores, roll.ended_with_eos, cfg.missing_eos_penalty, cfg.score_norm, running,
                                 cfg.score_clip or None)
        adv = group_advantages(rewards, cfg.num_generations, scale=cfg.scale_rewards).to(acc.device)
        beta = kl_ctl.value

        def loss_fn(logp, idx, batch=batch, adv=adv, beta=beta, single_pass=single_pass):  # bound now
            if single_pass:
                batch["old_logp"][idx] = logp.detach()
            return grpo_loss(logp, batch["old_logp"][idx], batch["ref_logp"][idx] if beta else None, adv[idx],
                             batch["rmask"][idx], cfg.clip_eps, beta, cfg.loss_type,
                             cfg.clip_eps_high or None, max_len)

        gold = np.asarray(judge(roll.prompts, roll.responses)) if judge is not None else None
        t_roll = time.perf_counter() - t0
        train_stats = policy_update(policy, optimizer, batch, cfg, step, acc, loss_fn, "GRPO")
        kl = kl_estimate(batch["old_logp"], batch["ref_logp"], "k1") * batch["rmask"]
        stats = rollout_stats(roll, scores, kl, batch["old_logp"], gold)
        stats["group_reward_std"] = rewards.reshape(-1, cfg.num_generations).std(-1).mean().item()
        if "kl" in train_stats:  # the loss's mean per-token k3; "kl" below is the per-response sum
            train_stats["kl_k3_token_mean"] = train_stats.pop("kl")
        truncated += roll.num_truncated_prompts
        merged = {**train_stats, **stats}  # "kl" = summed per-response KL of the rollout
        keys = sorted(merged)
        last = dict(zip(keys, mean_across_processes(acc, [float(merged[k]) for k in keys])))
        kl_ctl.update(last["kl"], len(roll) * acc.num_processes)
        last.update(kl_coef=kl_ctl.value, rollout_seconds=t_roll, step_seconds=time.perf_counter() - t0)
        stop_run = check_hacking(alarm, last, step + 1, acc)  # printed; ends the run after this update
        logger.log(last, step + 1)
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0 and acc.is_main_process:
            logger.log_text("samples", sample_table(roll, scores, gold), step + 1)
            write_samples(out, step + 1, roll, scores, gold)
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
            save_checkpoint(acc, out, step + 1, {"kl_ctl": kl_ctl.state_dict(),
                                                 "running_moments": running.state_dict()})
        if stop_run:
            break
    if truncated:
        acc.print(f"grpo: {truncated} prompt(s) were longer than max_prompt_length={cfg.max_prompt_length} "
                  "tokens and were left-truncated")
    logger.close()
    result = {"updates": n_updates, "last": last}
    if acc.is_main_process:
        save_model(unwrap(policy), tok, out / "final")
        eval_prompts = load_prompts(cfg.eval_prompts, "eval", limit=cfg.num_eval_prompts) if cfg.eval_prompts else []
        if judge is not None and eval_prompts:
            result["eval"] = evaluate_gold(policy, ref_fwd, tok, eval_prompts, judge, reward_fn, cfg, ref_ctx)
            acc.print("grpo: held-out evaluation " + ", ".join(f"{k}={v:.4g}" for k, v in result["eval"].items()))
        atomic_write_json(out / "final_metrics.json", result)
    acc.wait_for_everyone()
    return result
