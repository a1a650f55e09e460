"""ILQL: Implicit Language Q-Learning (Snell et al. 2022, "Offline RL for Natural Language Generation
with Implicit Language Q Learning"), as trlX implements it (trlx/models/modeling_ilql.py: ILQLConfig.loss
and the generate rule of AutoModelForCausalLMWithILQLHeads).

Per-token tensors over response tokens, (B, T), right-padded with `mask`. Token t of a response is
the action a_t taken in state s_t (the prompt and the response's tokens before t); after the last
real token the episode ends, and V of that terminal state is 0. Q-head outputs are (B, T, V) over the
vocabulary: Q(s_t, .) for every possible next token.

- Bellman target of Q (eq. 1 with IQL's implicit V): y_t = r_t + gamma * V(s_{t+1}), V(terminal) = 0;
  Q loss: sum over the Q heads of (Q_i(s_t, a_t) - y_t)^2 (trlX: two Q heads, `two_qs`).
- V loss: expectile regression of V(s_t) toward min_i Qhat_i(s_t, a_t) from the slowly updated target
  heads: L_tau(u) = |tau - 1(u < 0)| u^2 with u = Qhat - V (Kostrikov et al. 2021, IQL, eq. 5; Snell
  et al. eq. 2). tau > 0.5 pushes V toward the best actions seen in the data, not their average.
- Conservative (CQL) loss: the cross entropy of each head's Q values, read as logits, against the token
  in the data: logsumexp_a Q(s, a) - Q(s, a_t) (Kumar et al. 2020, eq. 4, as trlX applies it), which
  keeps Q of tokens the data never took from rising.
- AWAC term: the LM's own cross entropy on the data (trlX's `awac_scale` term): the behaviour policy
  pi_beta that the decoding rule starts from.
- Decoding (Snell et al. sec. 4, policy extraction): log pi_beta(a | s) + beta * (Qhat(s, a) - V(s)),
  then temperature and top-k / top-p as usual.

Each loss is a sum over real tokens divided by `num_tokens`, the optimiser step's token count
(rlhfkit.train.step's convention; trlX divides by the batch's count of non-terminal states).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def terminal_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) rewards: each response's scalar score on its last real token, 0 elsewhere (trlX's
    sparse reward on the final action)."""
    last = mask.sum(-1).long() - 1
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    keep = last >= 0
    out[rows[keep], last[keep]] = scores[keep]
    return out


def q_targets(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_t = r_t + gamma * V(s_{t+1}), with V = 0 after a response's last token; no gradient into V."""
    m = mask.to(values.dtype)
    next_v = torch.cat([values[:, 1:] * m[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    return rewards + gamma * next_v.detach()


def expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """|tau - 1(u < 0)| * u^2, elementwise (IQL, eq. 5)."""
    weight = torch.where(u < 0, 1.0 - tau, tau)
    return weight * u.pow(2)


def _taken(q: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def _token_cross_entropy(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), actions.reshape(-1), reduction="none").view(actions.shape)


def ilql_loss(q_heads: Sequence[torch.Tensor], target_q_heads: Sequence[torch.Tensor], values: torch.Tensor,
              lm_logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
              gamma: float = 0.99, tau: float = 0.7, cql_scale: float = 0.1, awac_scale: float = 1.0,
              num_tokens: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac (module docstring).

    q_heads, target_q_heads: (B, T, V) each; values (B, T); lm_logits (B, T, V) predicting `actions`
    (B, T, long); rewards, mask (B, T). Returns (loss, metrics of detached terms)."""
    m = mask.to(values.dtype)
    n = float(num_tokens) if num_tokens is not None else float(m.sum().clamp(min=1))
    y = q_targets(rewards, values, mask, gamma)
    qs = [_taken(q, actions) for q in q_heads]
    target_q = torch.stack([_taken(q, actions) for q in target_q_heads]).min(0).values.detach()
    loss_q = sum(((q - y).pow(2) * m).sum() for q in qs) / n
    loss_v = (expectile_loss(target_q - values, tau) * m).sum() / n
    loss_cql = sum((_token_cross_entropy(q, actions) * m).sum() for q in q_heads) / n
    loss_awac = (_token_cross_entropy(lm_logits, actions) * m).sum() / n
    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    tokens = m.sum().clamp(min=1)
    metrics = {"loss_q": loss_q.detach(), "loss_v": loss_v.detach(), "loss_cql": loss_cql.detach(),
               "loss_awac": loss_awac.detach(), "q_mean": (qs[0] * m).sum().detach() / tokens,
               "v_mean": (values * m).sum().detach() / tokens,
               "advantage_mean": ((target_q - values) * m).sum().detach() / tokens}
    return loss, metrics


def ilql_decoding_logits(lm_logits: torch.Tensor, target_q: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi_beta(. | s) + beta * (Qhat(s, .) - V(s)): (..., V) logits to sample from; `values` (...)."""
    return F.log_softmax(lm_logits.float(), dim=-1) + beta * (target_q.float() - values.float().unsqueeze(-1))
