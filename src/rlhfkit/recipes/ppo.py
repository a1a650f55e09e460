"""PPO with a KL penalty against a reward model: the classic RLHF loop.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"), Stiennon et al.
2020 and Ouyang et al. 2022 (InstructGPT): sample responses from the policy, score them with
the reward model, subtract beta * KL(policy || reference) per token, estimate advantages with
a learned critic (GAE) and take several epochs of clipped-surrogate steps on the batch.

    rlhfkit ppo --model runs/sft/final --reward_model runs/rm/final --output_dir runs/ppo

One update:
  1. rollout: `prompts_per_step` prompts, one response each (KV-cache sampling);
  2. score: reward model on the text (its own tokenizer), gold panel for monitoring;
  3. old/reference log-probs and values: same forward as training, no gradients;
  4. rewards: score at the last token, -beta * KL at every token; GAE; whitened advantages;
  5. `num_ppo_epochs` x `num_mini_batches` optimiser steps on policy and critic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from rlhfkit.advantages import (
    RunningMoments,
    explained_variance,
    gae,
    make_kl_controller,
    masked_whiten,
    process_scores,
    shape_rewards,
)
from rlhfkit.config import ModelArgs, TrainArgs, require
from rlhfkit.data.prompts import load_prompts
from rlhfkit.losses.policy import entropy_bonus, ppo_policy_loss, ptx_loss, value_loss
from rlhfkit.models import (
    load_policy,
    load_reward_model,
    load_tokenizer,
    reference_context,
    reference_model,
    resolve_path,
    save_model,
)
from rlhfkit.rl import (
    OnPolicyArgs,
    TokenValues,
    batched,
    check_hacking,
    evaluate_gold,
    make_gold_judge,
    make_hacking_alarm,
    make_reward_fn,
    prompts_for_step,
    response_logprobs,
    rollout_stats,
    sample_table,
    score_rollout,
    total_updates,
    unwrap,
    update_epochs,
    write_samples,
)
from rlhfkit.rollout import generate
from rlhfkit.runs import MetricsLogger, atomic_write_json, prepare_run_dir
from rlhfkit.training import (
    check_finite,
    latest_checkpoint,
    load_checkpoint,
    make_accelerator,
    make_optimizer,
    mean_across_processes,
    save_checkpoint,
)


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs, OnPolicyArgs):
    value_model: str = ""
    """Critic initialisation: a folder, or '' for the reward model (when it shares the policy's tokenizer) else the policy."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_clip: float = 0.2
    """Clip range of the value prediction around its rollout-time value (0 disables)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    whiten_advantages: bool = True
    """Whiten advantages over each rollout batch."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of an SFT loss on `ptx_data` mixed into each step (0 = off)."""
    ptx_data: str = "kindly"
    """prompt/completion data for PPO-ptx ('kindly' = the bundled SFT records)."""

    def __post_init__(self) -> None:
        self._check_train_args()
        self._check_on_policy_args()
        require(self.model != "", "model", "give the SFT policy to start from (a folder or 'kindly')")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma and lam must be in [0, 1]")
        require(self.vf_coef >= 0 and self.entropy_coef >= 0 and self.ptx_coef >= 0, "vf_coef",
                "vf_coef, entropy_coef and ptx_coef must be >= 0")


def load_value_model(cfg: Config, tokenizer) -> torch.nn.Module:
    """The critic: a one-output sequence classifier from the RM (same tokenizer) or the policy."""
    src = cfg.value_model
    if not src:
        src = cfg.model
        rm = Path(resolve_path(cfg.reward_model)) if cfg.reward_model != "gold" else None
        if rm is not None and (rm / "ensemble.json").is_file():
            from rlhfkit.models.reward import member_paths

            rm = member_paths(rm)[0]
        if rm is not None and (rm / "config.json").is_file():
            same_vocab = load_tokenizer(str(rm)).get_vocab() == tokenizer.get_vocab()
            src = str(rm) if same_vocab else src
            if not same_vocab:
                print("ppo: the reward model's tokenizer differs from the policy's; the critic starts from the policy")
    critic = load_reward_model(src, cfg.dtype)
    critic.config.pad_token_id = tokenizer.pad_token_id
    return TokenValues(critic)


def collect(policy, ref_model, ref_ctx, critic, tok, reward_fn, judge, prompts, cfg, step, kl_ctl, running, device):
    """Rollout, scores, old/ref log-probs, values, shaped rewards and GAE for one update."""
    roll = generate(unwrap(policy), tok, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, num_samples=1,
                    batch_size=cfg.generation_batch_size, seed=cfg.seed * 1_000_003 + step * 7919 + device[1],
                    max_prompt_length=cfg.max_prompt_length)
    scores = score_rollout(reward_fn, roll)
    ids, mask = (t.to(device[0]) for t in roll.sequences())
    r_len, rmask = roll.response_ids.shape[1], roll.response_mask.to(device[0])
    bs = cfg.per_device_train_batch_size  # same batch layout as training, for a ratio of exactly 1
    old_logp = batched(lambda i, m: response_logprobs(unwrap(policy), i, m, r_len, cfg.temperature)[0], ids, mask, bs)
    with ref_ctx():
        ref_logp = batched(lambda i, m: response_logprobs(ref_model, i, m, r_len, cfg.temperature)[0], ids, mask, bs)
    old_values = batched(lambda i, m: unwrap(critic)(i, m, r_len), ids, mask, bs)
    check_finite("rollout log-probs / values", old_logp, ref_logp, old_values)
    shaped = process_scores(scores, roll.ended_with_eos, cfg.missing_eos_penalty, cfg.score_norm, running,
                            cfg.score_clip or None).to(device[0])
    rewards, kl = shape_rewards(shaped, old_logp, ref_logp, rmask, kl_ctl.value, cfg.kl_estimator)
    adv, returns = gae(rewards, old_values * rmask, rmask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, rmask)
    gold = np.asarray(judge(roll.prompts, roll.responses)) if judge is not None else None
    stats = rollout_stats(roll, scores, kl, old_logp, gold)
    stats["value_explained_variance"] = explained_variance(old_values, returns, rmask)
    stats["num_truncated_prompts"] = roll.num_truncated_prompts
    batch = dict(ids=ids, mask=mask, rmask=rmask, r_len=r_len, old_logp=old_logp, old_values=old_values,
                 adv=adv, returns=returns)
    return roll, scores, gold, batch, stats


def ptx_batches(cfg: Config, tok):
    """An endless stream of SFT micro-batches for PPO-ptx."""
    from rlhfkit.data.collate import PadCollator, tokenize_prompt_completion

    if cfg.ptx_data == "kindly":
        from rlhfkit.tasks import kindly

        records = kindly.sft_records("train")
    else:
        from rlhfkit.data import load_records

        records = load_records(cfg.ptx_data, required=["prompt", "completion"])
    collate = PadCollator(tok.pad_token_id)
    g = torch.Generator().manual_seed(cfg.seed)
    while True:
        for i in torch.randperm(len(records), generator=g).tolist()[: len(records) - cfg.per_device_train_batch_size + 1:
                                                                    cfg.per_device_train_batch_size]:
            rows = records[i:i + cfg.per_device_train_batch_size]
            yield collate([tokenize_prompt_completion(tok, r["prompt"], r["completion"], 128) for r in rows])


def train_on_batch(policy, critic, optimizers, batch, cfg, step, acc, ptx_iter):
    """num_ppo_epochs x num_mini_batches optimiser steps on policy and critic; averaged metrics."""
    r_len = batch["r_len"]

    def micro_loss(idx, epoch):
        ids, mask, rmask = batch["ids"][idx], batch["mask"][idx], batch["rmask"][idx]
        # entropy: in the loss when it has a weight, else measured on the first epoch only
        bonus = cfg.entropy_coef > 0
        logp, ent = response_logprobs(policy, ids, mask, r_len, cfg.temperature,
                                      with_entropy=bonus or epoch == 0, entropy_grad=bonus)
        pl, pm = ppo_policy_loss(logp, batch["old_logp"][idx], batch["adv"][idx], rmask, cfg.clip_eps)
        el, em = entropy_bonus(ent, rmask, cfg.entropy_coef) if ent is not None else (0.0, {})
        values = critic(ids, mask, r_len)
        vl, vm = value_loss(values, batch["old_values"][idx], batch["returns"][idx], rmask, cfg.value_clip or None)
        loss = pl + el + cfg.vf_coef * vl
        if ptx_iter is not None:
            b = {k: v.to(acc.device) for k, v in next(ptx_iter).items()}
            xl, xm = ptx_loss(policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              b["labels"], cfg.ptx_coef)
            loss, pm = loss + xl, {**pm, **xm}
        return loss, {**pm, **em, **vm, "loss": loss.detach()}

    return update_epochs([policy, critic], list(optimizers), batch["ids"].shape[0], cfg, step, acc, micro_loss, "PPO")


def main(cfg: Config, reward_fn=None) -> dict:
    """Train; returns the final evaluation (gold win rate, KL, rewards) or the last update's metrics.

    `reward_fn(prompts, responses) -> scores` replaces `cfg.reward_model` when given (Python use).
    """
    acc = make_accelerator(cfg)
    out = prepare_run_dir(cfg.output_dir, cfg, acc.is_main_process)
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    policy = load_policy(cfg.model, cfg.dtype, lora=cfg)
    ref_model = reference_model(policy, cfg.use_lora)  # with LoRA: the policy itself, adapters off
    if not cfg.use_lora:
        ref_model.to(acc.device)
    reward_fn = reward_fn or make_reward_fn(cfg.reward_model, acc.device, cfg.generation_batch_size)
    critic = load_value_model(cfg, tok)
    judge = make_gold_judge(cfg)
    prompts = load_prompts(cfg.prompts, "train")
    n_updates = total_updates(len(prompts), cfg, acc.num_processes)
    opt_p, opt_v = make_optimizer(policy, cfg), make_optimizer(critic, cfg)
    policy, critic, opt_p, opt_v = acc.prepare(policy, critic, opt_p, opt_v)
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
        acc.print(f"ppo: resumed from {ckpt} at update {start}")
    ptx_iter = ptx_batches(cfg, tok) if cfg.ptx_coef > 0 else None
    logger = MetricsLogger(out, cfg.report_to, enabled=acc.is_main_process)
    alarm = make_hacking_alarm(cfg, out, acc.is_main_process)
    truncated, last = 0, {}
    for step in range(start, n_updates):
        t0 = time.perf_counter()
        step_prompts = prompts_for_step(prompts, step, cfg.prompts_per_step, cfg.seed, acc.num_processes,
                                        acc.process_index)
        roll, scores, gold, batch, stats = collect(policy, ref_fwd, ref_ctx, critic, tok, reward_fn, judge,
                                                   step_prompts, cfg, step, kl_ctl, running,
                                                   (acc.device, acc.process_index))
        t_roll = time.perf_counter() - t0
        train_stats = train_on_batch(policy, critic, (opt_p, opt_v), batch, cfg, step, acc, ptx_iter)
        truncated += roll.num_truncated_prompts
        keys = sorted({**stats, **train_stats})
        vals = mean_across_processes(acc, [float({**stats, **train_stats}[k]) for k in keys])
        last = dict(zip(keys, vals))
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
        acc.print(f"ppo: {truncated} prompt(s) were longer than max_prompt_length={cfg.max_prompt_length} "
                  "tokens and were left-truncated")
    logger.close()
    result = {"updates": n_updates, "last": last}
    if acc.is_main_process:
        save_model(unwrap(policy), tok, out / "final")
        save_model(unwrap(critic).model, tok, out / "value")
        eval_prompts = load_prompts(cfg.eval_prompts, "eval", limit=cfg.num_eval_prompts) if cfg.eval_prompts else []
        if judge is not None and eval_prompts:
            result["eval"] = evaluate_gold(policy, ref_fwd, tok, eval_prompts, judge, reward_fn, cfg, ref_ctx)
            acc.print("ppo: held-out evaluation " + ", ".join(f"{k}={v:.4g}" for k, v in result["eval"].items()))
        atomic_write_json(out / "final_metrics.json", result)
    acc.wait_for_everyone()
    return result
