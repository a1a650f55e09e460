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
- CISPO: MiniMax 2025 ("MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
  Attention", sec. 3.1, eq. 4-5): REINFORCE on every token weighted by the clipped importance
  ratio, the weight a constant (stop-gradient), so no token's gradient is ever dropped.
- Off-policy weights (`is_weights`, rlhfkit.advantages.OFF_POLICY_CORRECTIONS): the sampler's
  behaviour policy differs from the proximal policy the ratio is measured against (decoupled
  PPO, Hilton et al. 2021, eq. 5); each token's policy-gradient term is multiplied by the
  constant pi_prox / pi_behaviour, truncated or masked (Yao et al. 2025, TIS).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from rlhfkit.advantages import kl_estimate
from rlhfkit.errors import ConfigError
from rlhfkit.losses.sft import sft_loss
from rlhfkit.masked import masked_mean

Metrics = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# reducing per-token losses to a scalar
#
# One optimiser step (a mini-batch) is split into micro-batches. Each normaliser divides by a
# total of the WHOLE step (`StepTotals`), so the micro-batch losses add up (accelerator.backward
# of each, no division) to exactly the loss of the step: DAPO's token mean is a mean over every
# token of the step, not a mean of per-micro-batch means (Yu et al. 2025, sec. 3.3).


@dataclasses.dataclass(frozen=True)
class StepTotals:
    """Totals of one optimiser step, per process (DDP averages gradients over processes)."""

    num_tokens: float
    """Response tokens in the step (mask sum), divided by the number of processes when global."""
    num_sequences: float
    """Responses in the step."""
    max_length: int
    """max_completion_length (Dr. GRPO's constant)."""

    @classmethod
    def of(cls, mask: torch.Tensor, max_length: int | None = None) -> StepTotals:
        """Totals of a step made of this one batch."""
        return cls(float(mask.sum()), float(mask.shape[0]), int(max_length or mask.shape[1]))


def _token_mean(x: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    return (x * mask.to(x.dtype)).sum() / max(totals.num_tokens, 1.0)


def _sequence_mean(x: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    m = mask.to(x.dtype)
    per_seq = (x * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return per_seq.sum() / totals.num_sequences


def _dr_grpo(x: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    # a constant denominator: no per-response length normalisation, so long wrong answers are
    # not penalised less per token than short ones (Liu et al. 2025, sec. 3.1)
    return (x * mask.to(x.dtype)).sum() / (totals.num_sequences * totals.max_length)


def _sequence_sum(x: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    return (x * mask.to(x.dtype)).sum() / totals.num_sequences


LOSS_NORMALISERS: dict[str, Callable[[torch.Tensor, torch.Tensor, StepTotals], torch.Tensor]] = {
    "token": _token_mean,        # DAPO: mean over all tokens of the step
    "sequence": _sequence_mean,  # GRPO eq. 3: mean over responses of each response's token mean
    "dr_grpo": _dr_grpo,         # Dr. GRPO: token sum / (responses x max_completion_length)
    "sequence_sum": _sequence_sum,  # REINFORCE: mean over responses of each response's token sum
}


def _normaliser(name: str):
    if name not in LOSS_NORMALISERS:
        raise ConfigError(f"unknown loss normalisation {name!r}; choose from {sorted(LOSS_NORMALISERS)}")
    return LOSS_NORMALISERS[name]


# ---------------------------------------------------------------------------------------------
# importance ratios: log r per token (B, T), or per sequence broadcast as (B, 1)


def _token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logp - old_logp  # PPO / GRPO: one ratio per token


def _sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # GSPO (Zheng et al. 2025, eq. 7): the length-normalised sequence ratio (pi/pi_old)^(1/|y|)
    m = mask.to(logp.dtype)
    return (((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]


def _sequence_sum_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # RLOO (Ahmadian et al. 2024) and TRL's RLOOTrainer: the ratio of whole-sequence probabilities;
    # pair it with loss_type "sequence" so each response's (constant) token loss counts once
    return ((logp - old_logp) * mask.to(logp.dtype)).sum(-1)[:, None]


IMPORTANCE_RATIOS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": _token_log_ratio,
    "sequence": _sequence_log_ratio,
    "sequence_sum": _sequence_sum_log_ratio,
}


# ---------------------------------------------------------------------------------------------
# losses


def _ratio(logp, old_logp, advantages, mask, level: str):
    """(ratio (B, T) or (B, 1), advantages (B, T)) for the importance-sampling level."""
    if level not in IMPORTANCE_RATIOS:
        raise ConfigError(f"unknown importance_sampling_level {level!r}; choose from {sorted(IMPORTANCE_RATIOS)}")
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    return torch.exp(IMPORTANCE_RATIOS[level](logp, old_logp, mask)), advantages


def _ratio_metrics(logp, old_logp, ratio, mask, clipped: torch.Tensor) -> Metrics:
    with torch.no_grad():
        m = mask.bool()
        token_log_ratio = logp - old_logp
        r = ratio.expand_as(logp)[m] if m.any() else torch.ones(1, dtype=ratio.dtype, device=ratio.device)
        return {
            "clipfrac": masked_mean(clipped.to(logp.dtype).expand_as(logp), mask),
            # k3 estimate of KL(old || new) (Schulman 2020): >= 0 and low variance
            "approx_kl": masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, mask),
            "ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(),
        }


def _surrogate(logp, old_logp, advantages, mask, clip_eps, clip_eps_high, level: str = "token"):
    """Per-token -min(r A, clip(r, 1-eps, 1+eps_high) A) and the ratio statistics (PPO eq. 7)."""
    ratio, advantages = _ratio(logp, old_logp, advantages, mask, level)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    return per_token, _ratio_metrics(logp, old_logp, ratio, mask, clipped < unclipped)


def _cispo(logp, old_logp, advantages, mask, clip_eps, clip_eps_high, level: str = "token"):
    """CISPO (MiniMax-M1, eq. 4-5): per-token -sg(min(r, 1 + eps_high)) A log pi(y_t).

    The clipped ratio is a constant weight, so every token keeps its REINFORCE gradient
    A grad log pi (scaled down when r is large) instead of PPO's zero gradient outside the
    clip, which drops exactly the rare tokens that open a reasoning path (sec. 3.1). As in the
    paper's runs there is no lower bound (eps_low^IS is set large); `clip_eps_high` None uses
    `clip_eps`. TRL's loss_type "cispo" instead caps r at epsilon_high itself (its default 5.0).
    """
    ratio, advantages = _ratio(logp, old_logp, advantages, mask, level)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    weight = ratio.clamp(max=1.0 + high).detach()
    per_token = -weight * advantages * logp
    return per_token, _ratio_metrics(logp, old_logp, ratio, mask, ratio > 1.0 + high)


POLICY_OBJECTIVES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "clip": _surrogate,  # PPO / GRPO clipped surrogate
    "cispo": _cispo,     # MiniMax-M1: clipped IS weight, stop-gradient, on every token
}


def _objective(name: str, logp, old_logp, advantages, mask, clip_eps, clip_eps_high, level, is_weights):
    """The per-token objective `name`, each token's term times the off-policy weight (constant) if given."""
    if name not in POLICY_OBJECTIVES:
        raise ConfigError(f"unknown policy objective {name!r}; choose from {sorted(POLICY_OBJECTIVES)}")
    per_token, metrics = POLICY_OBJECTIVES[name](logp, old_logp, advantages, mask, clip_eps, clip_eps_high, level)
    if is_weights is not None:  # decoupled PPO (Hilton et al. 2021, eq. 5): E_behav[pi_prox/pi_behav * L_clip]
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    return per_token, metrics


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None, normalize: str = "token",
                    totals: StepTotals | None = None, is_weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) over per-token advantages.

    `clip_eps_high` allows an asymmetric upper clip (DAPO's clip-higher); None = symmetric.
    `totals`: the optimiser step's totals (default: this batch is the whole step).
    `is_weights` (B, T) or (B, 1): off-policy weights pi_prox / pi_sampler (constants), or None.
    """
    per_token, metrics = _objective("clip", logp, old_logp, advantages, mask, clip_eps, clip_eps_high, "token",
                                    is_weights)
    loss = _normaliser(normalize)(per_token, mask, totals or StepTotals.of(mask))
    return loss, {"policy_loss": loss.detach(), **metrics}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None = 0.2, totals: StepTotals | None = None) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), token mean.

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
    loss = 0.5 * _token_mean(per_token, mask, totals or StepTotals.of(mask))
    return loss, {"value_loss": loss.detach(), "value_clipfrac": frac}


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float,
                  totals: StepTotals | None = None) -> tuple[torch.Tensor, Metrics]:
    """-coef * mean token entropy: added to the loss, it rewards keeping the policy spread (PPO eq. 9)."""
    mean_entropy = _token_mean(entropy, mask, totals or StepTotals.of(mask))
    return -coef * mean_entropy, {"entropy": masked_mean(entropy, mask).detach()}


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor, coef: float) -> tuple[torch.Tensor, Metrics]:
    """PPO-ptx (InstructGPT eq. 2): coef * next-token NLL on pretraining/SFT text, limiting the alignment tax."""
    nll, _ = sft_loss(logits, labels)
    return coef * nll, {"ptx_nll": nll.detach()}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04, normalize: str = "sequence",
              clip_eps_high: float | None = None, max_length: int | None = None,
              importance_sampling_level: str = "token", totals: StepTotals | None = None,
              objective: str = "clip", is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """GRPO (Shao et al. 2024, eq. 3): clipped surrogate with the group advantage of each
    response on all its tokens, plus beta * k3(pi || pi_ref) per token (eq. 4) in the loss
    rather than in the reward. `normalize`: "sequence" (GRPO), "token" (DAPO), "dr_grpo",
    "sequence_sum"; `importance_sampling_level`: "token", "sequence" (GSPO) or "sequence_sum";
    `objective`: "clip" (PPO's surrogate) or "cispo" (MiniMax-M1); `is_weights` (B, T) or (B, 1):
    off-policy weights on the policy-gradient term (not the KL term), or None."""
    per_token, metrics = _objective(objective, logp, old_logp, advantages, mask, clip_eps, clip_eps_high,
                                    importance_sampling_level, is_weights)
    if beta and ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask).detach()
    loss = _normaliser(normalize)(per_token, mask, totals or StepTotals.of(mask, max_length))
    return loss, {"policy_loss": loss.detach(), **metrics}


def rloo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, importance_sampling_level: str = "sequence_sum",
              totals: StepTotals | None = None) -> tuple[torch.Tensor, Metrics]:
    """RLOO / REINFORCE (Ahmadian et al. 2024, eq. 4), the sequence ratio clipped as in the paper and TRL.

    With the whole-sequence ratio r_i = pi(y_i)/pi_old(y_i) the loss is the mean over responses
    of -min(r_i A_i, clip(r_i) A_i); its gradient at r = 1 is -A_i grad sum_t log pi(y_t), the
    REINFORCE estimator of the whole response. `importance_sampling_level="token"` clips each
    token's ratio instead and sums over tokens (rlhfkit's earlier behaviour).
    """
    per_token, metrics = _surrogate(logp, old_logp, advantages, mask, clip_eps, None, importance_sampling_level)
    normalize = "sequence_sum" if importance_sampling_level == "token" else "sequence"
    loss = _normaliser(normalize)(per_token, mask, totals or StepTotals.of(mask))
    return loss, {"policy_loss": loss.detach(), **metrics}


POLICY_LOSSES = {
    "ppo": ppo_policy_loss,
    "grpo": grpo_loss,
    "rloo": rloo_loss,
}
