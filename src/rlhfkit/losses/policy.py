"""Policy-gradient losses for PPO, GRPO and RLOO, and the critic's value loss.

Each is a pure function returning (loss, metrics). Inputs are per-token tensors of shape
(B, T) over response tokens with a right-padded mask; sequence-level advantages (GRPO,
RLOO) have shape (B,) and are broadcast over the tokens of their response.

- Clipped surrogate: Schulman et al. 2017 (PPO), eq. 7; value clipping as in OpenAI
  baselines' ppo2 and Ziegler et al. 2019; entropy bonus eq. 9.
- PPO-ptx: Ouyang et al. 2022 (InstructGPT), eq. 2 (gamma * E_pretrain[log pi]).
- GRPO: Shao et al. 2024 (DeepSeekMath), eq. 3, with the k3 KL (eq. 4) in the loss.
  Normalisations: "sequence" (eq. 3's 1/|o_i| per response, then mean over responses),
  "token" (sum over all tokens / token count; Yu et al. 2025, DAPO), "dr_grpo" (sum over all
  tokens / (B * max_length), Liu et al. 2025).
- RLOO: Ahmadian et al. 2024, eq. 4: REINFORCE on the whole response with a leave-one-out
  baseline; clipping keeps later epochs of the same batch on a leash.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhfkit.advantages import kl_estimate
from rlhfkit.errors import ConfigError
from rlhfkit.logprobs import masked_mean
from rlhfkit.losses.sft import sft_loss

Metrics = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# reducing per-token losses to a scalar


def _token_mean(x: torch.Tensor, mask: torch.Tensor, max_length: int | None) -> torch.Tensor:
    return masked_mean(x, mask)


def _sequence_mean(x: torch.Tensor, mask: torch.Tensor, max_length: int | None) -> torch.Tensor:
    return masked_mean(x, mask, dim=-1).mean()


def _dr_grpo(x: torch.Tensor, mask: torch.Tensor, max_length: int | None) -> torch.Tensor:
    # a constant denominator: no per-response length normalisation, so long wrong answers are
    # not penalised less per token than short ones (Liu et al. 2025, sec. 3.1)
    return (x * mask.to(x.dtype)).sum() / (x.shape[0] * (max_length or x.shape[1]))


def _sequence_sum(x: torch.Tensor, mask: torch.Tensor, max_length: int | None) -> torch.Tensor:
    return (x * mask.to(x.dtype)).sum(-1).mean()


LOSS_NORMALISERS: dict[str, Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]] = {
    "token": _token_mean,
    "sequence": _sequence_mean,
    "dr_grpo": _dr_grpo,
    "sequence_sum": _sequence_sum,
}


def _normaliser(name: str):
    if name not in LOSS_NORMALISERS:
        raise ConfigError(f"unknown loss normalisation {name!r}; choose from {sorted(LOSS_NORMALISERS)}")
    return LOSS_NORMALISERS[name]


# ---------------------------------------------------------------------------------------------
# losses


def _surrogate(logp, old_logp, advantages, mask, clip_eps, clip_eps_high):
    """Per-token -min(r A, clip(r, 1-eps, 1+eps_high) A) and the ratio statistics."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        m = mask.bool()
        r = ratio[m] if m.any() else torch.ones(1, dtype=ratio.dtype, device=ratio.device)
        metrics = {
            "clipfrac": masked_mean((clipped < unclipped).to(ratio.dtype), mask),
            # k3 estimate of KL(old || new) (Schulman 2020): >= 0 and low variance
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(),
        }
    return per_token, metrics


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None,
                    normalize: str = "token") -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) over per-token advantages.

    `clip_eps_high` allows an asymmetric upper clip (DAPO's clip-higher); None = symmetric.
    """
    per_token, metrics = _surrogate(logp, old_logp, advantages, mask, clip_eps, clip_eps_high)
    loss = _normaliser(normalize)(per_token, mask, None)
    return loss, {"policy_loss": loss.detach(), **metrics}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None = 0.2) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    The critic may not move further than `clip_range` from its rollout-time prediction per
    update, mirroring the policy clip (OpenAI baselines ppo2). `clip_range=None` disables it.
    """
    err = (values - returns) ** 2
    if clip_range is None:
        per_token, frac = err, torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        clipped_v = old_values + (values - old_values).clamp(-clip_range, clip_range)
        err_clipped = (clipped_v - returns) ** 2
        per_token = torch.maximum(err, err_clipped)
        frac = masked_mean((err_clipped > err).to(values.dtype), mask).detach()
    loss = 0.5 * masked_mean(per_token, mask)
    return loss, {"value_loss": loss.detach(), "value_clipfrac": frac}


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float) -> tuple[torch.Tensor, Metrics]:
    """-coef * mean token entropy: added to the loss, it rewards keeping the policy spread (PPO eq. 9)."""
    mean_entropy = masked_mean(entropy, mask)
    return -coef * mean_entropy, {"entropy": mean_entropy.detach()}


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor, coef: float) -> tuple[torch.Tensor, Metrics]:
    """PPO-ptx (InstructGPT eq. 2): coef * next-token NLL on pretraining/SFT text, limiting the alignment tax."""
    nll, _ = sft_loss(logits, labels)
    return coef * nll, {"ptx_nll": nll.detach()}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04, normalize: str = "sequence",
              clip_eps_high: float | None = None, max_length: int | None = None) -> tuple[torch.Tensor, Metrics]:
    """GRPO (Shao et al. 2024, eq. 3): clipped surrogate with the group advantage of each
    response on all its tokens, plus beta * k3(pi || pi_ref) per token (eq. 4) in the loss
    rather than in the reward. `normalize`: "sequence" (GRPO), "token" (DAPO), "dr_grpo"."""
    per_token, metrics = _surrogate(logp, old_logp, advantages, mask, clip_eps, clip_eps_high)
    if beta and ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask).detach()
    loss = _normaliser(normalize)(per_token, mask, max_length)
    return loss, {"policy_loss": loss.detach(), **metrics}


def rloo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, normalize: str = "sequence_sum") -> tuple[torch.Tensor, Metrics]:
    """RLOO / REINFORCE (Ahmadian et al. 2024, eq. 4) with per-token clipping.

    With "sequence_sum" the gradient at ratio 1 is exactly -A_i * grad sum_t log pi(y_t), the
    REINFORCE estimator of the whole response; later epochs over the same batch are clipped
    like PPO.
    """
    per_token, metrics = _surrogate(logp, old_logp, advantages, mask, clip_eps, None)
    loss = _normaliser(normalize)(per_token, mask, None)
    return loss, {"policy_loss": loss.detach(), **metrics}


POLICY_LOSSES = {
    "ppo": ppo_policy_loss,
    "grpo": grpo_loss,
    "rloo": rloo_loss,
}
