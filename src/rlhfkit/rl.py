"""Pieces the on-policy recipes (PPO, GRPO, RLOO) share, as plain functions.

Each recipe reads top to bottom and calls these for: the config fields they have in common,
prompts, forward passes over (prompt + response) batches, scoring with the reward model
and the gold judge, mini-batching, metrics and sample tables.

One rule keeps the importance ratio honest: the log-probs used as "old" (at rollout) and
"new" (in training) come from the same function, :func:`response_logprobs`, with the same
temperature scaling and the same padded layout, so on the first mini-batch the ratio is 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlhfkit.config import require
from rlhfkit.errors import ConfigError, NonFiniteError
from rlhfkit.logprobs import entropy_from_logits, masked_mean, token_logprobs
from rlhfkit.rollout import Rollout

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


@dataclasses.dataclass
class OnPolicyArgs:
    reward_model: str = ""
    """Reward model folder (or ensemble) saved by `rlhfkit reward`; 'gold' scores with the gold panel itself."""
    prompts: str = "kindly"
    """Training prompts: 'kindly' (the bundled task) or a .jsonl/.json/.parquet file or dataset with a 'prompt' column."""
    eval_prompts: str = "kindly"
    """Held-out prompts for the final gold evaluation ('kindly' = the task's eval split; '' to skip)."""
    num_eval_prompts: int = 200
    """How many held-out prompts the final evaluation uses (0 = all)."""
    max_prompt_length: int = 64
    """Prompts longer than this many tokens are left-truncated (the count is printed)."""
    max_new_tokens: int = 24
    """Maximum response length in tokens."""
    temperature: float = 1.0
    """Sampling temperature; the same scaling is applied to training log-probs."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    prompts_per_step: int = 16
    """Prompts sampled per update, per process."""
    generation_batch_size: int = 64
    """Rows generated per forward pass (independent of the training micro-batch)."""
    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Optimiser steps per pass over a rollout batch (the batch is shuffled and split)."""
    clip_eps: float = 0.2
    """Clip range of the importance ratio."""
    kl_coef: float = 0.05
    """KL coefficient beta (initial value when target_kl is set)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator used in the reward: k1, k2, k3, abs or mse."""
    target_kl: float = 0.0
    """Adaptive KL controller target in nats per response (Ziegler et al. 2019); 0 = fixed beta."""
    kl_horizon: int = 10000
    """Horizon (in episodes) of the adaptive KL controller."""
    early_stop_kl: float = 0.0
    """Stop a step's remaining epochs once the mean approx-KL of a mini-batch exceeds this (0 = never)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of responses that hit max_new_tokens without EOS."""
    score_norm: str = "none"
    """Reward-model score normalisation: none, batch (whiten per batch) or running (running mean/std)."""
    score_clip: float = 0.0
    """Clip scores to [-score_clip, score_clip] after normalisation (0 = no clipping)."""
    gold_judge: str = "auto"
    """Gold judge for evaluation metrics: auto (the gold panel on the bundled task), gold, or none."""
    sample_every: int = 10
    """Log a table of sample responses every N updates (0 = never)."""
    hacking_window: int = 10
    """Reward-hacking alarm: updates per window over which proxy rising while gold falls fires it (0 = off; needs a gold judge)."""
    stop_on_hacking: bool = False
    """End training when the reward-hacking alarm fires (the final model and evaluation are still written)."""

    def _check_on_policy_args(self) -> None:
        from rlhfkit.advantages import KL_ESTIMATORS

        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0 (training log-probs divide by it)")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        require(self.generation_batch_size >= 1, "generation_batch_size", "must be >= 1")
        require(self.num_ppo_epochs >= 1, "num_ppo_epochs", "must be >= 1")
        require(self.num_mini_batches >= 1, "num_mini_batches", "must be >= 1")
        require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        require(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {sorted(KL_ESTIMATORS)}")
        require(self.score_norm in ("none", "batch", "running"), "score_norm", "must be none, batch or running")
        require(self.gold_judge in ("auto", "gold", "none"), "gold_judge", "must be auto, gold or none")
        require(bool(self.reward_model), "reward_model", "is required: a folder saved by `rlhfkit reward`, or 'gold'")


# ---------------------------------------------------------------------------------------------
# prompts


def prompts_for_step(prompts: Sequence[str], step: int, per_process: int, seed: int,
                     num_processes: int = 1, process_index: int = 0) -> list[str]:
    """This process's prompts for update `step`: a pure function of (seed, step), so resuming
    replays exactly the prompts an uninterrupted run would have used."""
    from rlhfkit.training import epoch_order

    global_n = per_process * num_processes
    if len(prompts) < global_n:
        raise ConfigError(f"{len(prompts)} prompts are fewer than prompts_per_step x processes = {global_n}")
    per_epoch = len(prompts) // global_n
    epoch, pos = divmod(step, per_epoch)
    order = epoch_order(len(prompts), seed, epoch)
    chunk = order[pos * global_n:(pos + 1) * global_n]
    return [prompts[i] for i in chunk[process_index * per_process:(process_index + 1) * per_process]]


def total_updates(num_prompts: int, cfg: Any, num_processes: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * num_prompts / (cfg.prompts_per_step * num_processes)))


# ---------------------------------------------------------------------------------------------
# forward passes


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # left-padded prompts: positions count real tokens only, exactly as during generation
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_len: int, temperature: float, with_entropy: bool = False,
                      entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, R) of the last `response_len` tokens under softmax(logits / temperature).

    Only the R positions that predict response tokens go through the LM head. Returns
    (logprobs, entropy or None); the entropy carries gradients only with `entropy_grad`
    (an entropy bonus), since back-propagating a full softmax for a logged metric is wasted work.
    """
    t = input_ids.shape[1]
    # only the R positions that predict response tokens go through the LM head
    keep = torch.arange(t - response_len - 1, t - 1, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                use_cache=False, logits_to_keep=keep)
    logits = out.logits
    labels = input_ids[:, -response_len:]
    logp = token_logprobs(logits, labels, temperature)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(logits, temperature)
    return logp, ent


class TokenValues(nn.Module):
    """forward(input_ids, attention_mask, response_len) -> (B, R) per-token values.

    Wraps a one-output sequence-classification model (the critic); the head is applied to
    the hidden state *before* each response token, i.e. V(s_t) for the state that emits
    token t. A wrapper module rather than a subclass, so DDP can wrap it and sync gradients.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, response_len: int) -> torch.Tensor:
        from rlhfkit.models.reward import _head, unwrap_hf

        hf = unwrap_hf(self.model)
        backbone = getattr(hf, hf.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=_positions(attention_mask), use_cache=False).last_hidden_state
        hidden = hidden[:, -response_len - 1:-1]
        return _head(hf)(hidden).squeeze(-1).float()


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
            attention_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Apply `fn(ids, mask)` in chunks of `batch_size` rows and concatenate (no gradients)."""
    return torch.cat([fn(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                      for i in range(0, input_ids.shape[0], batch_size)])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP, for forwards that need no gradient synchronisation."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# rewards and judges


def make_reward_fn(spec: str, device: Any = "cpu", batch_size: int = 64) -> RewardFn:
    """'gold' -> the gold panel as the reward; otherwise a saved reward model via RewardScorer
    (re-tokenises text with the reward model's own tokenizer, applies its stored normalisation)."""
    if spec == "gold":
        from rlhfkit.judges import GoldPanel

        return GoldPanel()
    from rlhfkit.models.reward import RewardScorer

    return RewardScorer(spec, device=device, batch_size=batch_size)


def make_gold_judge(cfg: Any) -> RewardFn | None:
    if cfg.gold_judge == "none" or (cfg.gold_judge == "auto" and cfg.prompts != "kindly"):
        return None
    from rlhfkit.judges import GoldPanel

    return GoldPanel()


def score_rollout(reward_fn: RewardFn, rollout: Rollout, name: str = "reward model scores") -> torch.Tensor:
    """Scores (N,) float32 of each (prompt, response); NaN/inf stops the step before any update."""
    raw = np.asarray(reward_fn(rollout.prompts, rollout.responses), dtype=np.float64).reshape(-1)
    if raw.shape[0] != len(rollout):
        raise ConfigError(f"{name}: got {raw.shape[0]} scores for {len(rollout)} responses")
    scores = torch.from_numpy(raw).float()
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise NonFiniteError(f"{name}: {bad} of {len(scores)} are NaN or infinite; the step was not applied "
                             "and the weights are unchanged. Check the reward model (or enable score_clip).")
    return scores


# ---------------------------------------------------------------------------------------------
# mini-batches, metrics, samples


def minibatches(n: int, num_mini_batches: int, seed: int, step: int, epoch: int) -> list[torch.Tensor]:
    """A shuffled split of range(n) into `num_mini_batches` near-equal index tensors."""
    g = torch.Generator().manual_seed(seed * 7919 + step * 131 + epoch)
    perm = torch.randperm(n, generator=g)
    return [c for c in torch.tensor_split(perm, num_mini_batches) if len(c)]


def micro_batches(index: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [index[i:i + size] for i in range(0, len(index), size)]


def rollout_stats(rollout: Rollout, scores: torch.Tensor, kl_per_token: torch.Tensor, logp: torch.Tensor,
                  gold: np.ndarray | None) -> dict[str, float]:
    """Per-update metrics of a rollout batch (before training on it)."""
    mask = rollout.response_mask
    out = {
        "proxy_reward": scores.mean().item(),
        "proxy_reward_std": scores.std(unbiased=False).item() if len(scores) > 1 else 0.0,
        "kl": (kl_per_token * mask).sum(-1).mean().item(),
        "response_length": rollout.response_lengths.float().mean().item(),
        "eos_rate": rollout.ended_with_eos.float().mean().item(),
        "rollout_neg_logp": -masked_mean(logp, mask).item(),
    }
    if gold is not None:
        out["gold_reward"] = float(np.mean(gold))
        out["gold_proxy_gap"] = out["proxy_reward"] - out["gold_reward"]
    return out


def sample_table(rollout: Rollout, scores: torch.Tensor, gold: np.ndarray | None, n: int = 8) -> str:
    """A markdown table of the first `n` samples (TensorBoard renders it)."""
    rows = ["| prompt | response | proxy | gold |", "|---|---|---|---|"]
    for i in range(min(n, len(rollout))):
        g = f"{gold[i]:.3f}" if gold is not None else ""
        resp = rollout.responses[i].replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {rollout.prompts[i]} | {resp} | {scores[i].item():.3f} | {g} |")
    return "\n".join(rows)


def write_samples(output_dir: str | Path, step: int, rollout: Rollout, scores: torch.Tensor,
                  gold: np.ndarray | None, n: int = 8) -> None:
    """Append the first `n` samples of this update to samples.jsonl."""
    with open(Path(output_dir) / "samples.jsonl", "a") as f:
        for i in range(min(n, len(rollout))):
            f.write(json.dumps({"step": step, "prompt": rollout.prompts[i], "response": rollout.responses[i],
                                "proxy": scores[i].item(), "gold": None if gold is None else float(gold[i])}) + "\n")


def ratio_stats(metrics: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Averages of per-mini-batch loss metrics over an update; min/max kept as extremes."""
    if not metrics:
        return {}
    out: dict[str, float] = {}
    for key in metrics[0]:
        vals = [float(m[key]) for m in metrics if key in m]
        out[key] = min(vals) if key.endswith("_min") else max(vals) if key.endswith("_max") else sum(vals) / len(vals)
    return out


# ---------------------------------------------------------------------------------------------
# evaluation against the starting policy


@torch.no_grad()
def evaluate_gold(policy: nn.Module, reference: nn.Module, tokenizer: Any, prompts: Sequence[str], judge: RewardFn,
                  reward_fn: RewardFn | None, cfg: Any, ref_ctx: Callable[[], Any] | None = None,
                  seed: int = 12345) -> dict[str, float]:
    """Win rate of the policy over the reference on held-out prompts (gold panel, ties half),
    with gold/proxy rewards and the mean summed per-response KL(policy || reference) in nats."""
    import contextlib

    from rlhfkit.rollout import generate

    ctx = ref_ctx or contextlib.nullcontext
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
              batch_size=cfg.generation_batch_size, seed=seed, max_prompt_length=cfg.max_prompt_length)
    pol = generate(unwrap(policy), tokenizer, prompts, **kw)
    with ctx():
        ref = generate(unwrap(reference), tokenizer, prompts, **kw)
    g_pol = np.asarray(judge(pol.prompts, pol.responses), dtype=np.float64)
    g_ref = np.asarray(judge(ref.prompts, ref.responses), dtype=np.float64)
    win = float(np.mean((g_pol > g_ref) + 0.5 * (g_pol == g_ref)))
    ids, mask = pol.sequences()
    r_len = pol.response_ids.shape[1]
    bs = cfg.generation_batch_size
    lp = batched(lambda i, m: response_logprobs(unwrap(policy), i, m, r_len, cfg.temperature)[0], ids, mask, bs)
    with ctx():
        lr = batched(lambda i, m: response_logprobs(unwrap(reference), i, m, r_len, cfg.temperature)[0], ids, mask, bs)
    kl = ((lp - lr) * pol.response_mask).sum(-1).mean().item()
    out = {"gold_win_rate": win, "kl": kl, "gold_reward": float(g_pol.mean()), "gold_reward_reference": float(g_ref.mean()),
           "response_length": pol.response_lengths.float().mean().item()}
    if reward_fn is not None:
        out["proxy_reward"] = float(np.mean(reward_fn(pol.prompts, pol.responses)))
        out["proxy_reward_reference"] = float(np.mean(reward_fn(ref.prompts, ref.responses)))
    return out


# ---------------------------------------------------------------------------------------------
# critic-free recipes (GRPO, RLOO): group rollout and the policy-only update


def group_rollout(policy: nn.Module, ref_model: nn.Module, ref_ctx: Callable[[], Any], tokenizer: Any,
                  reward_fn: RewardFn, prompts: Sequence[str], cfg: Any, step: int, device: Any,
                  process_index: int = 0, need_ref: bool = True, need_old: bool = True
                  ) -> tuple[Rollout, torch.Tensor, dict]:
    """K = cfg.num_generations samples per prompt (prompt-major rows), their reward-model
    scores, and old / reference log-probs from the training forward (no gradients).

    `need_old=False` leaves `old_logp` None for a caller that takes one optimiser step per
    batch: its training forward *is* the rollout policy's forward, so the separate pass
    would compute the same numbers again.
    """
    from rlhfkit.rollout import generate
    from rlhfkit.training import check_finite

    roll = generate(unwrap(policy), tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                    num_samples=cfg.num_generations, batch_size=cfg.generation_batch_size,
                    seed=cfg.seed * 1_000_003 + step * 7919 + process_index, max_prompt_length=cfg.max_prompt_length)
    scores = score_rollout(reward_fn, roll)
    ids, mask = (t.to(device) for t in roll.sequences())
    r_len, rmask = roll.response_ids.shape[1], roll.response_mask.to(device)
    bs = cfg.per_device_train_batch_size  # the training layout, so the first ratio is exactly 1
    old_logp = None
    if need_old:
        old_logp = batched(lambda i, m: response_logprobs(unwrap(policy), i, m, r_len, cfg.temperature)[0],
                           ids, mask, bs)
    ref_logp = None
    if need_ref:
        with ref_ctx():
            ref_logp = batched(lambda i, m: response_logprobs(ref_model, i, m, r_len, cfg.temperature)[0],
                               ids, mask, bs)
    check_finite("rollout log-probs", old_logp, ref_logp)
    batch = dict(ids=ids, mask=mask, rmask=rmask, r_len=r_len, old_logp=old_logp, ref_logp=ref_logp)
    return roll, scores, batch


def update_epochs(models: list[nn.Module], optimizers: list[torch.optim.Optimizer], n: int, cfg: Any, step: int,
                  accelerator: Any, micro_loss: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]],
                  name: str) -> dict[str, float]:
    """num_ppo_epochs x num_mini_batches optimiser steps over `n` rollout rows.

    `micro_loss(index, epoch) -> (loss, metrics)` is the recipe's loss on the rows in
    `index`. Gradients of a mini-batch's micro-batches are all-reduced once; non-finite
    losses or gradients raise before any optimiser step, so a bad batch never reaches the
    weights; the epoch ends early once approx-KL passes `cfg.early_stop_kl`.
    """
    import contextlib

    from rlhfkit.training import check_finite, check_finite_grads

    metrics, stopped_early = [], False
    for epoch in range(cfg.num_ppo_epochs):
        for mb in minibatches(n, cfg.num_mini_batches, cfg.seed, step, epoch):
            micro = micro_batches(mb, cfg.per_device_train_batch_size)
            mb_metrics = []
            for j, idx in enumerate(micro):
                with contextlib.ExitStack() as sync:
                    if j < len(micro) - 1:
                        for model in models:
                            sync.enter_context(accelerator.no_sync(model))
                    loss, m = micro_loss(idx, epoch)
                    check_finite(f"{name} loss", loss)
                    accelerator.backward(loss / len(micro))
                mb_metrics.append(m)
            grad_norm = None
            if cfg.max_grad_norm:  # a non-finite gradient shows in the norm: one check per model
                norms = [accelerator.clip_grad_norm_(m.parameters(), cfg.max_grad_norm) for m in models]
                check_finite(f"{name} gradient norm", *norms)
                grad_norm = norms[0]  # the policy's
            else:
                for model in models:
                    check_finite_grads(model)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step_metrics = ratio_stats(mb_metrics)
            if grad_norm is not None:
                step_metrics["grad_norm"] = float(grad_norm)
            metrics.append(step_metrics)
            if cfg.early_stop_kl and step_metrics["approx_kl"] > cfg.early_stop_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    out = ratio_stats(metrics)
    out.update(first_ratio_mean=metrics[0]["ratio_mean"], first_ratio_min=metrics[0]["ratio_min"],
               first_ratio_max=metrics[0]["ratio_max"], optimizer_steps=len(metrics),
               early_stopped=float(stopped_early))
    return out


def policy_update(policy: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, cfg: Any, step: int,
                  accelerator: Any, loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]],
                  name: str) -> dict[str, float]:
    """GRPO/RLOO update of the policy alone (no critic): see :func:`update_epochs`.

    `loss_fn(logp, index) -> (loss, metrics)` computes the recipe's loss for the rows in
    `index` from their fresh log-probs.
    """

    def micro_loss(idx: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict]:
        logp, ent = response_logprobs(policy, batch["ids"][idx], batch["mask"][idx], batch["r_len"],
                                      cfg.temperature, with_entropy=epoch == 0)  # a metric only
        loss, m = loss_fn(logp, idx)
        if ent is not None:
            m["entropy"] = masked_mean(ent, batch["rmask"][idx])
        return loss, m

    return update_epochs([policy], [optimizer], batch["ids"].shape[0], cfg, step, accelerator, micro_loss, name)


def make_hacking_alarm(cfg, output_dir, is_main: bool = True):
    """The reward-hacking alarm of `rlhfkit.eval.overopt` for an on-policy run (None when off).

    Events go to `alarms.jsonl` in the run folder, where `rlhfkit report` shows them.
    """
    if cfg.hacking_window <= 0:
        return None
    from rlhfkit.eval.overopt import HackingAlarm

    return HackingAlarm(window=cfg.hacking_window, stop=cfg.stop_on_hacking,
                        log_path=Path(output_dir) / "alarms.jsonl" if is_main else None)


def check_hacking(alarm, metrics: dict, step: int, accelerator) -> bool:
    """Feed one update's mean proxy and gold reward to the alarm; True when the run should stop.

    The alarm's slopes are added to `metrics` so they are logged with the update. Every
    process sees the same (process-averaged) metrics, so all stop together.
    """
    if alarm is None or "gold_reward" not in metrics:
        return False
    event = alarm.update(step, metrics["proxy_reward"], metrics["gold_reward"])
    metrics.update({f"hacking_{k}": v for k, v in alarm.last.items()})
    if event is not None:
        metrics["hacking_alarm"] = 1.0
        accelerator.print(f"warning: reward hacking at update {step}: proxy slope {event['proxy_slope']:+.4f} "
                          f"while gold slope {event['gold_slope']:+.4f} over the last {alarm.window} updates"
                          + (" - stopping" if alarm.should_stop else ""))
    return alarm.should_stop
