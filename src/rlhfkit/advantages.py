"""Advantages, returns, KL estimators, reward shaping and KL controllers.

Pure tensor functions; shapes are (B, T) over response tokens with a right-padded mask
(1 on tokens that count) unless said otherwise. Papers:

- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation", eq. 11-16.
- KL estimators k1/k2/k3: Schulman 2020, "Approximating KL Divergence" (blog note).
- Adaptive KL coefficient: Ziegler et al. 2019, "Fine-Tuning Language Models from Human
  Preferences", sec. 2.2.
- Group-normalised advantages: Shao et al. 2024 (DeepSeekMath, GRPO) eq. 3 and sec. 4.1.2;
  without the std division: Liu et al. 2025 ("Understanding R1-Zero-Like Training", Dr. GRPO).
- Leave-one-out baseline: Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for
  free"), Ahmadian et al. 2024 ("Back to Basics", RLOO) eq. 4.
- REINFORCE++-baseline: Hu et al. 2025 ("REINFORCE++: An Efficient RLHF Algorithm with
  Robustness to Both Prompt and Reward Models", arXiv:2501.03262, sec. 3): the group mean as
  baseline, then the batch's (global) std instead of each group's.
- Overlong reward shaping: Yu et al. 2025 (DAPO, arXiv:2503.14476) eq. 13, soft overlong punishment.
- Off-policy corrections: decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy
  optimization", eq. 5) with the behaviour weight truncated (Yao et al. 2025, "Your efficient RL
  framework secretly brings you off-policy RL training", TIS) or masked (MIS).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.masked import masked_var

__all__ = [
    "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "RunningMoments", "explained_variance",
    "ADVANTAGE_ESTIMATORS", "gae", "group_advantages", "zero_variance_share", "kl_estimate", "leave_one_out_advantages", "make_kl_controller",
    "shape_rewards", "process_scores", "last_token_index", "reinforce_pp_baseline_advantages", "overlong_penalty",
    "OFF_POLICY_CORRECTIONS", "off_policy_weights", "sampler_agreement",
]

# ---------------------------------------------------------------------------------------------
# KL estimators. With log r = log pi_ref(y) - log pi(y) for y ~ pi, each estimates
# KL(pi || pi_ref) per token (Schulman 2020): k1 = -log r (unbiased, high variance),
# k2 = (log r)^2 / 2 (biased, low variance), k3 = (r - 1) - log r (unbiased, always >= 0).

_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps exp() in k3 finite when the reference is far above the policy


def _k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def _k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def _k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    # only the overflow side is guarded: for log r < -20 (the policy far above the reference) k3 is
    # about -log r and its gradient 1 - r, which a clamp there would zero (issue 12)
    log_r = (ref_logp - logp).clamp(max=_MAX_LOG_RATIO)
    return torch.expm1(log_r) - log_r


def _abs(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return (logp - ref_logp).abs()


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
    "abs": _abs,
    "mse": _k2,  # TRL's name for the same (log r)^2 / 2 estimator
}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi."""
    if estimator not in KL_ESTIMATORS:
        raise ConfigError(f"unknown KL estimator {estimator!r}; choose from {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)


# ---------------------------------------------------------------------------------------------
# scores -> per-token rewards


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded mask (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


class RunningMoments:
    """Running mean and standard deviation of reward-model scores (Chan et al. parallel merge).

    Ziegler et al. 2019 normalise the reward model's output to mean 0, std 1 under the
    policy's samples; tracking the moments online lets that hold while the policy moves.
    """

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.var, self.count = float(d["mean"]), float(d["var"]), int(d["count"])


def process_scores(scores: torch.Tensor, ended_with_eos: torch.Tensor, missing_eos_penalty: float | None = None,
                   normalize: str = "none", running: RunningMoments | None = None,
                   clip: float | None = None) -> torch.Tensor:
    """Reward-model scores -> the scalar reward added at each response's last token.

    Order: normalise ("none", "batch" = whiten over this batch, "running" = by running
    moments updated with this batch), then subtract `missing_eos_penalty` from responses
    that hit the length limit without EOS, then clip to [-clip, clip].
    """
    scores = scores.float()
    if normalize == "batch":
        scores = (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-8) if scores.numel() > 1 else scores * 0
    elif normalize == "running":
        if running is None:
            raise ConfigError("score normalisation 'running' needs a RunningMoments")
        running.update(scores)
        scores = (scores - running.mean) / running.std
    elif normalize != "none":
        raise ConfigError(f"unknown score normalisation {normalize!r}; use none, batch or running")
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~ended_with_eos.bool()).to(scores.dtype)
    if clip:
        scores = scores.clamp(-clip, clip)
    return scores


def shape_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * KL_t, plus the sequence score at the last token.

    Ziegler et al. 2019 eq. 2 (R(x, y) = r(x, y) - beta log pi/rho), spread per token as in
    Stiennon et al. 2020 and InstructGPT. Returns (rewards, per-token KL), both zero on padding.
    """
    m = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, estimator) * m
    rewards = -kl_coef * kl
    idx = last_token_index(mask)
    rewards = rewards.scatter_add(1, idx[:, None], scores.to(rewards.dtype)[:, None])
    return rewards * m, kl


# ---------------------------------------------------------------------------------------------
# advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over right-padded rows.

    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last token (the episode ends
    there), A_t = delta_t + gamma lambda A_{t+1}. Returns (advantages, returns = A + V),
    zero on padding. Not whitened: see :func:`rlhfkit.masked.masked_whiten`.

    Masked positions inside a row (a multi-turn episode's tool and environment tokens) are not
    steps of the policy: t+1 is the next unmasked token, so the recursion runs over the policy's
    tokens alone (as veRL's multi-turn GAE); for a contiguous mask this is the plain recursion.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    b, t_len = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(last)
    for t in reversed(range(t_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = m[:, t] > 0
        last = torch.where(step, delta + gamma * lam * last, last)
        adv[:, t] = last * m[:, t]
        next_value = torch.where(step, values[:, t], next_value)
    return adv, (adv + values) * m


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ConfigError(f"group baselines need at least 2 samples per prompt, got {group_size}")
    if scores.numel() % group_size:
        raise ConfigError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.reshape(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, sec. 4.1.2): (r_i - mean_g) / (std_g + eps).

    Rows are prompt-major (group g = rows g*K .. g*K+K-1). `std` is the unbiased sample std
    of the group. `scale=False` is Dr. GRPO (Liu et al. 2025): centre only, since dividing
    by the std up-weights prompts that are too easy or too hard.
    """
    g = _grouped(scores, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return adv.reshape(scores.shape)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, eq. 4): A_i = r_i - mean_{j != i} r_j within a group."""
    g = _grouped(scores, group_size)
    baseline = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(scores.shape)


def _grpo_estimator(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True) -> torch.Tensor:
    return group_advantages(rewards, group_size, scale=scale_rewards)


def _rloo_estimator(rewards: torch.Tensor, group_size: int, scale_rewards: bool = False) -> torch.Tensor:
    adv = leave_one_out_advantages(rewards, group_size)
    if scale_rewards:  # optional whitening over the batch (TRL RLOO's normalize_advantages)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8) if adv.numel() > 1 else adv * 0
    return adv


def reinforce_pp_baseline_advantages(scores: torch.Tensor, group_size: int, scale: bool = True,
                                     eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, sec. 3): A_i = r_i - mean_g, then whitened over the batch,
    (A - mean(A)) / sqrt(max(var(A), eps)) with the population variance of the whole batch.

    The group mean removes each prompt's difficulty; one global std (not GRPO's per-group std)
    keeps a prompt whose responses differ a little from being blown up to unit scale.
    OpenRLHF normalises over response tokens (longer responses weigh more in the statistics);
    here each response counts once. `scale=False` keeps the group-centred rewards.
    """
    g = _grouped(scores, group_size)
    adv = (g - g.mean(-1, keepdim=True)).reshape(scores.shape)
    if scale:
        centred = adv - adv.mean()
        adv = centred / centred.pow(2).mean().clamp(min=eps).sqrt()
    return adv


def _reinforce_pp_estimator(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True) -> torch.Tensor:
    return reinforce_pp_baseline_advantages(rewards, group_size, scale=scale_rewards)


# critic-free estimators of the group recipe: (rewards (N,), group size, scale_rewards) -> (N,)
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": _grpo_estimator,
    "rloo": _rloo_estimator,
    "reinforce_pp": _reinforce_pp_estimator,  # REINFORCE++-baseline (Hu et al. 2025)
}


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to each response's reward.

    With L_max = `max_length` and L_cache = `buffer_len`: 0 for |y| <= L_max - L_cache, then
    ((L_max - L_cache) - |y|) / L_cache, falling linearly to -1 at |y| = L_max, and -1 beyond;
    times `factor`. Responses cut at the limit are punished by degrees rather than all alike,
    so a correct but long answer is not scored as a wrong one (sec. 3.4).
    """
    if buffer_len < 1 or buffer_len > max_length:
        raise ConfigError(f"overlong buffer must be in [1, max_length={max_length}], got {buffer_len}")
    n = lengths.to(torch.float64)
    start = max_length - buffer_len
    pen = ((start - n) / buffer_len).clamp(min=-1.0, max=0.0)
    return (factor * pen).to(lengths.dtype if lengths.is_floating_point() else torch.float32)


# ---------------------------------------------------------------------------------------------
# off-policy corrections: the sampler's behaviour policy vs the proximal policy of the update


def _log_weights(prox_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    m = mask.to(prox_logp.dtype)
    log_w = (prox_logp - sampler_logp) * m  # 0 on padding: weight 1 there (masked out by the loss anyway)
    if level == "token":
        return log_w
    if level == "sequence":
        return log_w.sum(-1, keepdim=True)  # pi_prox(y) / pi_behav(y) of the whole response, (B, 1)
    raise ConfigError(f"off-policy correction level must be token or sequence, got {level!r}")


def _truncated(log_w: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    # TIS (Yao et al. 2025): min(w, C); the clamp in log space also keeps exp() finite
    return torch.exp(log_w.clamp(max=math.log(cap))), log_w > math.log(cap)


def _masked(log_w: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    # MIS: w where w <= C, else 0 (the token or response gives no gradient)
    over = log_w > math.log(cap)
    return torch.where(over, torch.zeros_like(log_w), torch.exp(log_w.clamp(max=math.log(cap)))), over


OFF_POLICY_CORRECTIONS: dict[str, Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]] = {
    "tis": _truncated,
    "mis": _masked,
}


def off_policy_weights(prox_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       correction: str = "tis", level: str = "token", cap: float = 2.0
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Behaviour weights w = pi_prox(y) / pi_sampler(y), truncated ("tis") or masked ("mis") at `cap`.

    `prox_logp`: the trainer's log-probs of the sampled tokens at the start of the update (the
    proximal policy the clipped ratio is measured against); `sampler_logp`: the sampler's own
    log-probs of the distribution it sampled from. `level` "token" gives (B, T) weights,
    "sequence" one per response (B, 1) from the summed log-ratio. Returns (weights, no gradient;
    metrics offpolicy/weight_mean and offpolicy/capped_frac, the share truncated or masked).
    """
    if correction not in OFF_POLICY_CORRECTIONS:
        raise ConfigError(f"unknown off-policy correction {correction!r}; choose from {sorted(OFF_POLICY_CORRECTIONS)}")
    if cap <= 0:
        raise ConfigError(f"off-policy correction cap must be > 0, got {cap}")
    with torch.no_grad():
        log_w = _log_weights(prox_logp.detach(), sampler_logp.to(prox_logp.dtype), mask, level)
        w, over = OFF_POLICY_CORRECTIONS[correction](log_w, cap)
        rows = mask.bool() if level == "token" else mask.bool().any(-1, keepdim=True)
        n = max(int(rows.sum()), 1)
        metrics = {"offpolicy/weight_mean": float((w * rows).sum()) / n,
                   "offpolicy/capped_frac": float((over & rows).sum()) / n}
    return w, metrics


def sampler_agreement(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the trainer's recomputed log-probs are from the sampler's own, over response tokens:
    sampler/kl, the mean per-token k3 estimate of KL(sampler || trainer) (tokens are the sampler's
    draws; Schulman 2020), and sampler/max_abs_diff, max |log p_sampler - log p_trainer|."""
    m = mask.bool()
    if not m.any():
        return {"sampler/kl": 0.0, "sampler/max_abs_diff": 0.0}
    s, t = sampler_logp.detach().double()[m], trainer_logp.detach().double()[m]
    return {"sampler/kl": float(kl_estimate(s, t, "k3").mean()), "sampler/max_abs_diff": float((s - t).abs().max())}


def zero_variance_share(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose responses all got the same reward: no learning signal (all advantages 0)."""
    g = _grouped(rewards, group_size)
    return (g.max(-1).values == g.min(-1).values).float().mean().item()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over masked tokens (1 = perfect critic)."""
    var_ret = masked_var(returns, mask)
    if var_ret.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_ret).item()


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: steer the measured KL towards a target.

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2);  beta_{t+1} = beta_t (1 + K_beta e_t),
    with K_beta = n_steps / horizon (n_steps = episodes in the batch just used; the paper
    uses K_beta = 0.1 per 10^4-episode horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ConfigError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


def make_kl_controller(kl_coef: float, target_kl: float | None = None, horizon: int = 10000):
    """Adaptive when `target_kl` is set, fixed otherwise."""
    if target_kl:
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    return FixedKLController(kl_coef)
