"""Preference optimisation without RL: the DPO family, as pure functions.

Every loss takes per-sequence log-probabilities (summed over the response tokens, prompt
excluded) and returns ``(loss, metrics)``: a scalar to minimise and a dict of detached
scalars (implicit rewards, margins, reward accuracy). Nothing here touches a model, so each
formula can be checked against a hand calculation.

Notation shared by the docstrings: for a prompt x with chosen response y_w and rejected y_l,

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

is the difference of log-ratios; the *implicit reward* of a response is
beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, Eq. 5). Reward accuracy is
:func:`rlhfkit.losses.reward.preference_accuracy` of the implicit rewards: the share of pairs
whose chosen implicit reward is strictly above the rejected one (ties count as misses, so an
untrained policy scores 0, not 0.5).

Variants are chosen by name from :data:`PREFERENCE_LOSSES`. The paired losses differ in the
arguments they need (SimPO and ORPO have no reference term, SimPO and ORPO need response
lengths); :func:`compute_preference_loss` passes each function exactly the arguments its
signature names, and :func:`needs_reference` reads the same signature, so the recipe never
branches on the variant.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from rlhfkit.losses.reward import preference_accuracy

Metrics = dict[str, torch.Tensor]


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    margins = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": margins.mean(),
        "rewards/accuracy": preference_accuracy(margins)[0],
    }


def _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    return chosen_ratio, rejected_ratio, chosen_ratio - rejected_ratio


def _check_fraction(name: str, value: float, upper: float) -> None:
    if not 0.0 <= value < upper:
        raise ValueError(f"{name} must be in [0, {upper}), got {value}")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimisation, sigmoid loss.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model", Eq. 7:  L = -log sigma(beta * h), averaged over pairs.

    The gradient with respect to log pi(y_w|x) is -beta * sigma(-beta*h) / B (Eq. 8): pairs
    the implicit reward already orders correctly are weighted down.
    """
    chosen_ratio, rejected_ratio, h = _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -F.logsigmoid(beta * h).mean()
    return loss, _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)


def cdpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
              beta: float = 0.1, label_smoothing: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Conservative DPO: DPO with label smoothing eps for labels flipped with probability eps.

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO): the
    target preference probability is 1 - eps instead of 1, so the loss is the cross-entropy

        L = -(1 - eps) log sigma(beta*h) - eps log sigma(-beta*h).

    Unlike DPO its minimum is finite: h* = log((1 - eps)/eps) / beta.
    """
    _check_fraction("label_smoothing", label_smoothing, 0.5)
    chosen_ratio, rejected_ratio, h = _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean()
    return loss, _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)


def robust_dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                    beta: float = 0.1, label_smoothing: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Robust DPO (rDPO) for labels flipped with known probability eps < 1/2.

    Chowdhury, Kini and Natarajan 2024, "Provably Robust DPO: Aligning Language Models with
    Noisy Feedback", the de-biased loss of Section 3:

        L = [(1 - eps) * l(h) - eps * l(-h)] / (1 - 2 eps),   l(h) = -log sigma(beta*h).

    Its expectation over the label noise equals the clean DPO loss (an unbiased estimate),
    whereas cDPO's label smoothing changes the optimum. Note the minus sign: the flipped
    term is subtracted, so the loss can go below zero.
    """
    _check_fraction("label_smoothing", label_smoothing, 0.5)
    chosen_ratio, rejected_ratio, h = _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    per_pair = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return per_pair.mean(), _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Identity Preference Optimisation.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17 (the empirical IPO loss, with tau = beta):

        L = (h - 1/(2 beta))^2.

    The square regresses the log-ratio gap onto a finite target, so IPO does not push h to
    infinity on deterministic preferences as DPO can.
    """
    chosen_ratio, rejected_ratio, h = _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)


def hinge_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Hinge (SLiC) loss on the log-ratio gap.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Eq. 2
    (rank calibration loss max(0, delta - log P(y_w|x) + log P(y_l|x))), written on the
    reference-normalised gap h with margin delta = 1/beta and scaled by beta:

        L = max(0, 1 - beta*h).

    Pairs already separated by the margin contribute no gradient.
    """
    chosen_ratio, rejected_ratio, h = _logratio_diff(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = torch.relu(1.0 - beta * h).mean()
    return loss, _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
               beta: float = 2.0, gamma: float = 0.5) -> tuple[torch.Tensor, Metrics]:
    """Simple Preference Optimisation: reference-free, length-normalised, with a margin.

    Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Eq. 6:

        L = -log sigma( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma ).

    The implicit reward is the average token log-prob scaled by beta (Eq. 4); there is no
    reference model at all. `*_lengths` are response token counts (>= 1).
    """
    if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
        raise ValueError("simpo_loss: response lengths must be >= 1 token")
    chosen_rewards = beta * chosen_logps / chosen_lengths
    rejected_rewards = beta * rejected_logps / rejected_lengths
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, _pair_metrics(chosen_rewards, rejected_rewards)


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
              beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Odds Ratio Preference Optimisation: SFT on the chosen response plus an odds-ratio term.

    Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", Eqs. 2-7. With P(y|x) = exp(mean token log-prob) (the length-normalised
    likelihood of Eq. 2) and odds(y|x) = P / (1 - P):

        L_SFT = -mean_tokens log pi(y_w|x)                          (per pair, Eq. 6)
        L_OR  = -log sigma( log odds(y_w|x) - log odds(y_l|x) )     (Eq. 7)
        L     = mean over pairs of  L_SFT + beta * L_OR             (Eq. 6, lambda = beta)

    log odds = a - log(1 - exp(a)) for a = mean log-prob < 0, computed with log1p(-exp(a))
    (stable as a -> 0). No reference model. Implicit rewards reported as beta * a (as TRL).
    """
    if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
        raise ValueError("orpo_loss: response lengths must be >= 1 token")
    chosen_avg = chosen_logps / chosen_lengths
    rejected_avg = rejected_logps / rejected_lengths
    # a = 0 exactly (probability 1) would make the odds infinite; clamp just below.
    tiny = torch.finfo(chosen_avg.dtype).eps
    chosen_avg_c, rejected_avg_c = chosen_avg.clamp(max=-tiny), rejected_avg.clamp(max=-tiny)
    log_odds = (chosen_avg_c - torch.log1p(-torch.exp(chosen_avg_c))) - (
        rejected_avg_c - torch.log1p(-torch.exp(rejected_avg_c)))
    or_term = -F.logsigmoid(log_odds)
    sft_term = -chosen_avg
    loss = (sft_term + beta * or_term).mean()
    metrics = _pair_metrics(beta * chosen_avg, beta * rejected_avg)
    metrics.update({"orpo/nll": sft_term.detach().mean(), "orpo/log_odds_ratio": log_odds.detach().mean(),
                    "orpo/or_loss": or_term.detach().mean()})
    return loss, metrics


def kto_kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
                    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The KTO reference point z_0: a batch estimate of KL(pi || pi_ref), clamped at 0, no gradient.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Sec. 4.1:
    z_0 is estimated from *mismatched* pairs (x_i, y_j) whose completion y_j was written for a
    different prompt (see :func:`rlhfkit.data.preference.kto_mismatched_index`), as the mean of
    log pi(y_j|x_i) - log pi_ref(y_j|x_i), clamped at zero because a KL is non-negative, and
    detached so that it does not itself get optimised. Under several processes pass
    `all_reduce_sum` (e.g. ``lambda t: accelerator.reduce(t, "sum")``): the mean is taken over
    every process's rows first and clamped after, as in TRL (clamping each process's mean
    first would bias z_0 upwards).
    """
    diff = (kl_logps - ref_kl_logps).detach()
    stats = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=diff.dtype, device=diff.device)])
    if all_reduce_sum is not None:
        stats = all_reduce_sum(stats)
    return (stats[0] / stats[1].clamp(min=1)).clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl_logps: torch.Tensor | None = None, ref_kl_logps: torch.Tensor | None = None,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, Metrics]:
    """Kahneman-Tversky Optimisation on unpaired desirable / undesirable responses.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8:
    with r = log pi(y|x) - log pi_ref(y|x) and reference point z_0 (see
    :func:`kto_kl_estimate`; 0 when `kl_logps` is not given),

        v(x, y) = lambda_D sigma(beta (r - z_0))   if y is desirable
                  lambda_U sigma(beta (z_0 - r))   if y is undesirable
        L       = mean over examples of  lambda_y - v(x, y).

    `labels` is True (1) for desirable. The mean is over all examples of the batch, so a
    batch with only desirable examples is valid (the undesirable term is simply absent).
    `all_reduce_sum` (several processes) makes z_0 the clamped mean over every process's
    mismatched rows, see :func:`kto_kl_estimate`.
    """
    labels = labels.bool()
    if kl_logps is not None:
        if ref_kl_logps is None:
            raise ValueError("kto_loss: ref_kl_logps is required when kl_logps is given")
        z0 = kto_kl_estimate(kl_logps, ref_kl_logps, all_reduce_sum)
    else:
        z0 = torch.zeros((), dtype=logps.dtype, device=logps.device)
    r = logps - ref_logps
    weight = torch.where(labels, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    value = torch.where(labels, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))
    loss = (weight * (1.0 - value)).mean()
    rewards = (beta * r).detach()
    desirable, undesirable = labels, ~labels
    nan = torch.tensor(float("nan"), dtype=r.dtype, device=r.device)
    metrics = {
        "kto/kl": z0,
        "rewards/chosen": rewards[desirable].mean() if desirable.any() else nan,
        "rewards/rejected": rewards[undesirable].mean() if undesirable.any() else nan,
        "kto/desirable_frac": desirable.to(r.dtype).mean(),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


PREFERENCE_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "sigmoid": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "cdpo": cdpo_loss,
    "robust": robust_dpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "kto": kto_loss,
}
"""Name -> loss function. `rlhfkit dpo --loss NAME` picks from here."""

UNPAIRED_LOSSES = frozenset({"kto"})
"""Losses that take single responses with a desirable/undesirable label rather than pairs."""


def loss_parameters(name: str) -> set[str]:
    """Names of the arguments the loss `name` accepts."""
    if name not in PREFERENCE_LOSSES:
        raise KeyError(f"unknown preference loss {name!r}; choose from {', '.join(PREFERENCE_LOSSES)}")
    return set(inspect.signature(PREFERENCE_LOSSES[name]).parameters)


def needs_reference(name: str) -> bool:
    """True when the loss uses reference-model log-probs (read from its signature)."""
    params = loss_parameters(name)
    return "ref_chosen_logps" in params or "ref_logps" in params


def compute_preference_loss(name: str, **available: Any) -> tuple[torch.Tensor, Metrics]:
    """Call loss `name` with the subset of `available` its signature names.

    The caller offers everything it has (log-probs, lengths, hyper-parameters); a loss gets
    only what it declares. A required argument that is missing raises a TypeError naming it.
    """
    params = inspect.signature(PREFERENCE_LOSSES[name]).parameters if name in PREFERENCE_LOSSES else loss_parameters(name)
    kwargs = {k: v for k, v in available.items() if k in params and v is not None}
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise TypeError(f"preference loss {name!r} needs {', '.join(missing)}")
    return PREFERENCE_LOSSES[name](**kwargs)
