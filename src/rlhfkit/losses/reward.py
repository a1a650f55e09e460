"""Reward-model losses: pairwise (Bradley-Terry, with margins), ties, K-way rankings, centering.

Every function is pure: scalar rewards in, ``(loss, metrics)`` out, where ``metrics`` holds
detached scalars for logging. Rewards may carry a trailing head dimension (``(B, H)`` for an
ensemble of H heads on one backbone); the losses are then averaged over heads as well.

Two registries choose the variant by name (``Config.loss`` / ``Config.ranking_loss`` of
``rlhfkit reward``):

* :data:`PAIR_LOSSES` -- ``f(chosen, rejected, *, margin=None, labels=None, weights=None)``
* :data:`RANKING_LOSSES` -- ``f(rewards, mask=None, *, weights=None)`` where ``rewards`` is
  ``(B, K)`` (or ``(B, K, H)``) with column 0 the best response, column K-1 the worst.

Their ``accuracy`` metric, `rlhfkit eval-rm`, the evaluator's ``rm_accuracy`` and the reward
recipe's held-out accuracy are all :func:`preference_accuracy`, with one tie rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values`, or sum(w * v) / sum(w) with per-example (broadcastable) weights."""
    if weights is None:
        return values.mean()
    w = torch.broadcast_to(weights.to(values.dtype), values.shape)
    return (w * values).sum() / w.sum().clamp(min=torch.finfo(values.dtype).tiny)


def preference_verdicts(delta: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per comparison: (correct, decisive) boolean tensors shaped like `delta`, by the tie rule of
    :func:`preference_accuracy`."""
    delta = delta.detach()
    if labels is None:
        return delta > 0, torch.ones_like(delta, dtype=torch.bool)
    y = torch.broadcast_to(_expand(labels.to(delta.dtype), delta), delta.shape)
    signed = torch.where(y < 0.5, -delta, delta)  # labelled 0: `rejected` won, so right means delta < 0
    return signed > 0, y != 0.5


def preference_accuracy(delta: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """THE reward-model accuracy: the share of decisive comparisons whose preferred response gets
    the strictly higher reward. Returns (accuracy, number of decisive verdicts).

    `delta` = r(chosen) - r(rejected), shaped (B,) or (B, H) for H reward heads (every head's
    verdict then counts once); `labels` (B,) = P(chosen preferred), None meaning all 1.
    Tie rule (RewardBench's, Lambert et al. 2024, sec. 3): a comparison labelled 0.5 has no
    preferred side and is left out; a reward tie (delta == 0) counts as wrong, so a constant
    reward model scores 0, not 0.5. A label below 0.5 means the rejected side was preferred.
    With no decisive comparison the accuracy is NaN (not a score of 0 or 1).
    """
    correct, decisive = preference_verdicts(delta, labels)
    n = decisive.sum()
    dtype = delta.dtype if delta.is_floating_point() else torch.float32
    hits = (correct & decisive).sum().to(dtype)
    return torch.where(n > 0, hits / n.clamp(min=1), torch.full_like(hits, float("nan"))), n


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor | None = None) -> Metrics:
    return {
        "accuracy": preference_accuracy(chosen - rejected, labels)[0],
        "reward_chosen": chosen.detach().mean(),
        "reward_rejected": rejected.detach().mean(),
        "reward_margin": (chosen - rejected).detach().mean(),
    }


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry pairwise loss  -log sigmoid(r_chosen - r_rejected - margin).

    Bradley & Terry (1952); the reward-model objective of Stiennon et al. 2020 (eq. 1) and
    Ouyang et al. 2022 (eq. 1). The optional per-example `margin` is Llama 2's (Touvron et al.
    2023, eq. 2): the chosen reward must beat the rejected one by at least that much before
    the loss flattens. `labels` must be None or all 1 (chosen preferred); ties need
    :func:`davidson_tie_loss` or :func:`soft_label_loss`.
    """
    if labels is not None and bool((labels != 1).any()):
        raise ValueError("bradley_terry_loss takes strict preferences only (labels all 1); "
                         "use the 'davidson' or 'soft_label' loss for ties and soft labels")
    delta = chosen - rejected
    if margin is not None:
        delta = delta - _expand(margin.to(delta.dtype), delta)
    loss = _weighted_mean(-F.logsigmoid(delta), _expand(weights, delta))
    return loss, _pair_metrics(chosen, rejected)


def _expand(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Give a per-example (B,) tensor trailing singleton dims so it broadcasts over heads."""
    if t is None:
        return None
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


def soft_label_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry cross-entropy against soft labels y = P(chosen preferred).

    loss = -[y log sigmoid(d) + (1 - y) log sigmoid(-d)],  d = r_chosen - r_rejected.
    A tie is y = 0.5 and pulls d towards 0; y = 1 recovers :func:`bradley_terry_loss`.
    Labels averaged over several annotators (e.g. 0.75) are used as they are.
    """
    if margin is not None:
        raise ValueError("soft_label_loss does not take margins; use bradley_terry_loss")
    delta = chosen - rejected
    y = torch.ones_like(delta) if labels is None else _expand(labels.to(delta.dtype), delta)
    if bool(((y < 0) | (y > 1)).any()):
        raise ValueError("soft labels must lie in [0, 1]")
    per = -(y * F.logsigmoid(delta) + (1 - y) * F.logsigmoid(-delta))
    loss = _weighted_mean(per, _expand(weights, delta))
    return loss, _pair_metrics(chosen, rejected, labels)


def davidson_log_probs(delta: torch.Tensor, log_nu: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log P(win), log P(tie), log P(lose) of the Davidson (1970) tie model.

    With strengths pi = exp(r):  P(i > j) = pi_i / (pi_i + pi_j + nu sqrt(pi_i pi_j)) and
    P(tie) = nu sqrt(pi_i pi_j) / (same). Dividing by sqrt(pi_i pi_j) gives, for d = r_i - r_j,
    Z = exp(d/2) + exp(-d/2) + nu, so each log-probability is one logsumexp away.
    """
    half = delta / 2
    log_nu_t = torch.full_like(delta, float(log_nu))
    log_z = torch.logsumexp(torch.stack([half, -half, log_nu_t]), dim=0)
    return half - log_z, log_nu_t - log_z, -half - log_z


def davidson_tie_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                      log_nu: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood of the Davidson (1970) model, a Bradley-Terry extension with ties.

    labels: 1 = chosen preferred, 0 = rejected preferred, 0.5 = tie (default all 1).
    Other values in [0, 1] interpolate: weight on "win" max(2y-1, 0), on "lose" max(1-2y, 0),
    on "tie" 1 - |2y - 1|. `log_nu` sets how likely ties are (nu = 1: a pair with equal
    rewards is a tie with probability 1/3).
    """
    if margin is not None:
        raise ValueError("davidson_tie_loss does not take margins; use bradley_terry_loss")
    delta = chosen - rejected
    y = torch.ones_like(delta) if labels is None else _expand(labels.to(delta.dtype), delta)
    if bool(((y < 0) | (y > 1)).any()):
        raise ValueError("labels must lie in [0, 1] (1 chosen, 0 rejected, 0.5 tie)")
    lp_win, lp_tie, lp_lose = davidson_log_probs(delta, log_nu)
    w_win, w_lose = (2 * y - 1).clamp(min=0), (1 - 2 * y).clamp(min=0)
    w_tie = 1 - (2 * y - 1).abs()
    per = -(w_win * lp_win + w_tie * lp_tie + w_lose * lp_lose)
    loss = _weighted_mean(per, _expand(weights, delta))
    metrics = _pair_metrics(chosen, rejected, labels)
    metrics["p_tie"] = lp_tie.detach().exp().mean()
    return loss, metrics


def reward_centering_penalty(rewards: torch.Tensor, mask: torch.Tensor | None = None,
                             coef: float = 0.01) -> torch.Tensor:
    """coef * mean over groups of (2 * mean_k r_k)^2, which for a pair is coef * mean((r_c + r_r)^2).

    The auxiliary loss of Eisenstein et al. 2023 ("Helping or herding?", sec. 3) that keeps
    rewards centred on zero, so they are identifiable and comparable across models.
    `rewards` is (B, K[, H]); `mask` (B, K) marks real responses in padded rankings.
    """
    if mask is None:
        group_mean = rewards.mean(dim=1)
    else:
        m = _expand(mask.to(rewards.dtype), rewards)
        group_mean = (rewards * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
    return coef * ((2 * group_mean) ** 2).mean()


def _ranking_mask(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(rewards.shape[:2], dtype=torch.bool, device=rewards.device)
    mask = mask.bool()
    # padding must come after the real responses, or "best first" would be ambiguous
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("ranking mask must be contiguous from column 0 (padding at the end)")
    return mask


def _ranking_accuracy(rewards: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    """:func:`preference_accuracy` over the C(K, 2) pairs of each ranking (position i preferred to j > i)."""
    diff = rewards.detach().unsqueeze(2) - rewards.detach().unsqueeze(1)  # (B, K, K[, H])
    return preference_accuracy(diff[pair_mask])[0]


def instructgpt_ranking_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None, *,
                             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Mean over all C(K, 2) ordered pairs of one prompt of -log sigmoid(r_better - r_worse).

    Ouyang et al. 2022 (InstructGPT), eq. 1: loss = -1/C(K,2) E[log sigmoid(r(x, y_w) - r(x, y_l))],
    with all K responses of a prompt scored in one forward pass and the C(K, 2) comparisons
    formed from those K rewards (so each prompt counts once, whatever K is). `rewards` is
    (B, K[, H]) in ranking order, best first; `mask` (B, K) marks real responses when prompts
    have different K. The result is the mean over prompts (weighted by `weights` if given).
    """
    mask = _ranking_mask(rewards, mask)
    k = rewards.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=rewards.device), diagonal=1)
    pair_mask = upper & mask.unsqueeze(2) & mask.unsqueeze(1)  # (B, K, K): i better than j
    diff = rewards.unsqueeze(2) - rewards.unsqueeze(1)
    pm = _expand(pair_mask, diff).to(rewards.dtype)
    per_pair = -F.logsigmoid(diff) * pm
    per_prompt = per_pair.sum(dim=(1, 2)) / pm.sum(dim=(1, 2)).clamp(min=1)  # (B[, H])
    loss = _weighted_mean(per_prompt, _expand(weights, per_prompt))
    return loss, {"accuracy": _ranking_accuracy(rewards, pair_mask),
                  "reward_best": rewards.detach()[:, 0].mean(),
                  "num_pairs": pair_mask.sum().to(rewards.dtype) / max(rewards.shape[0], 1)}


def plackett_luce_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None, *,
                       weights: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Negative Plackett-Luce log-likelihood of the observed ranking, per choice.

    Plackett 1975, Luce 1959 (as used for rankings in Zhu et al. 2023, "Principled RLHF", eq. 4):
    P(ranking) = prod_{i=1}^{K-1} exp(r_i) / sum_{j >= i} exp(r_j), best first. The negative
    log-likelihood of a prompt is divided by its K - 1 choices, so K = 2 equals the
    Bradley-Terry loss. `rewards` (B, K[, H]) in ranking order; `mask` as in
    :func:`instructgpt_ranking_loss`.
    """
    mask = _ranking_mask(rewards, mask)
    m = _expand(mask, rewards)
    masked = rewards.masked_fill(~torch.broadcast_to(m, rewards.shape), -math.inf)
    # log sum_{j >= i} exp(r_j): a reversed cumulative logsumexp along the K dimension
    tail_lse = torch.logcumsumexp(masked.flip(1), dim=1).flip(1)
    terms = torch.where(torch.broadcast_to(m, rewards.shape), rewards - tail_lse, torch.zeros_like(rewards))
    n_choices = (mask.sum(dim=1) - 1).clamp(min=1).to(rewards.dtype)  # the last pick is forced
    per_prompt = -terms.sum(dim=1) / _expand(n_choices, terms.sum(dim=1))
    loss = _weighted_mean(per_prompt, _expand(weights, per_prompt))
    k = rewards.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=rewards.device), diagonal=1)
    pair_mask = upper & mask.unsqueeze(2) & mask.unsqueeze(1)
    return loss, {"accuracy": _ranking_accuracy(rewards, pair_mask),
                  "reward_best": rewards.detach()[:, 0].mean()}


PAIR_LOSSES = {
    "bradley_terry": bradley_terry_loss,
    "soft_label": soft_label_loss,
    "davidson": davidson_tie_loss,
}

RANKING_LOSSES = {
    "instructgpt": instructgpt_ranking_loss,
    "plackett_luce": plackett_luce_loss,
}

__all__ = [
    "PAIR_LOSSES",
    "RANKING_LOSSES",
    "bradley_terry_loss",
    "davidson_log_probs",
    "davidson_tie_loss",
    "instructgpt_ranking_loss",
    "plackett_luce_loss",
    "preference_accuracy",
    "preference_verdicts",
    "reward_centering_penalty",
    "soft_label_loss",
]
