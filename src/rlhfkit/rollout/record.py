"""Typed records of on-policy training, every tensor's shape documented (cf. torchtune's Trajectory).

N = rows (prompts x samples per prompt, the samples of one prompt adjacent: prompt-major),
P = prompt width, R = response width (the longest response of the batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class Rollout:
    """What a generation engine returns.

    query_ids      (N, P) long  prompt tokens, LEFT-padded with the pad id
    query_mask     (N, P) long  1 on real prompt tokens
    response_ids   (N, R) long  sampled tokens, RIGHT-padded with the pad id
    response_mask  (N, R) long  1 on sampled tokens up to and including the first EOS
    ended_with_eos (N,)   bool  True where the response stopped at an EOS token
    prompt_index   (N,)   long  index of each row's prompt in the list passed to the engine
    sampler_logp   (N, R) float32  the sampler's own log-prob of each sampled token under the
                                distribution it sampled from (after temperature, top-k, top-p;
                                0 for greedy), 0 on padding; None from an engine that gives none
    policy_version int   weights version (optimiser updates applied) the sampler used; -1 = unknown
    """

    prompts: list[str]
    """(N) prompt text as the policy saw it (chat template applied)."""
    responses: list[str]
    """(N) decoded responses, special tokens skipped."""
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended_with_eos: torch.Tensor
    prompt_index: torch.Tensor
    """(N,) index of each row's prompt in the list passed to `generate`."""
    num_truncated_prompts: int = 0
    """Prompts that were longer than `max_prompt_length` and lost their first tokens."""
    sampler_logp: torch.Tensor | None = None
    """(N, R) float32 behaviour log-probs of the sampled tokens (see the class docstring)."""
    policy_version: int = -1
    """Optimiser updates the sampling weights had seen (async rollouts); -1 = not tracked."""

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of prompt + response, ready for one forward pass."""
        ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        return ids, mask

    def select(self, index: Sequence[int] | torch.Tensor) -> Rollout:
        """The rows in `index`, in that order (tensors indexed, lists picked)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        return Rollout(
            prompts=[self.prompts[i] for i in rows], responses=[self.responses[i] for i in rows],
            query_ids=self.query_ids[idx], query_mask=self.query_mask[idx],
            response_ids=self.response_ids[idx], response_mask=self.response_mask[idx],
            ended_with_eos=self.ended_with_eos[idx], prompt_index=self.prompt_index[idx],
            num_truncated_prompts=self.num_truncated_prompts,
            sampler_logp=None if self.sampler_logp is None else self.sampler_logp[idx],
            policy_version=self.policy_version,
        )


def _pad(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    pad = x.new_full((x.shape[0], width - x.shape[1]), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_rollouts(rollouts: Sequence[Rollout], pad_id: int) -> Rollout:
    """Rows of several rollouts in order, prompts re-left-padded and responses re-right-padded to
    the widest; `prompt_index` is kept as each part had it (index into that part's prompt list)."""
    p = max(r.query_ids.shape[1] for r in rollouts)
    w = max(r.response_ids.shape[1] for r in rollouts)
    logps = [r.sampler_logp for r in rollouts]
    return Rollout(
        prompts=[x for r in rollouts for x in r.prompts], responses=[x for r in rollouts for x in r.responses],
        query_ids=torch.cat([_pad(r.query_ids, p, pad_id, True) for r in rollouts]),
        query_mask=torch.cat([_pad(r.query_mask, p, 0, True) for r in rollouts]),
        response_ids=torch.cat([_pad(r.response_ids, w, pad_id, False) for r in rollouts]),
        response_mask=torch.cat([_pad(r.response_mask, w, 0, False) for r in rollouts]),
        ended_with_eos=torch.cat([r.ended_with_eos for r in rollouts]),
        prompt_index=torch.cat([r.prompt_index for r in rollouts]),
        num_truncated_prompts=sum(r.num_truncated_prompts for r in rollouts),
        sampler_logp=None if any(x is None for x in logps) else torch.cat([_pad(x, w, 0.0, False) for x in logps]),
        policy_version=min(r.policy_version for r in rollouts),
    )




@dataclasses.dataclass
class Trajectory:
    """One update's training batch: a scored rollout and what was computed from it before training.

    input_ids      (N, P+R) long   prompt + response, as `Rollout.sequences()`
    attention_mask (N, P+R) long
    response_mask  (N, R)   float  1 on response tokens (loss mask)
    old_logp       (N, R)   float  log pi_old(y_t) at rollout (the training forward, no grad)
    ref_logp       (N, R)   float  log pi_ref(y_t), or None when nothing needs it
    scores         (N,)     float  total reward of each response (weighted sum of the rewards)
    advantages     (N,) or (N, R)  per response (GRPO/RLOO) or per token (PPO, GAE)
    values         (N, R)   float  critic's V(s_t) at rollout (PPO), else None
    returns        (N, R)   float  GAE returns, the critic's targets (PPO), else None
    first_forward  the rollout's training forward kept with its autograd graph, when the first
                   training micro-batch is the whole batch (:class:`FirstForward`), else None
    sampler_logp   (N, R)   float  the sampler's log pi_behaviour(y_t) (`Rollout.sampler_logp`), or None
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    scores: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    first_forward: FirstForward | None = None
    sampler_logp: torch.Tensor | None = None

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclasses.dataclass
class FirstForward:
    """The old log-probs' forward, run with gradients so that the first optimiser step reuses it.

    Before the first step the policy and critic are the ones the rollout was scored with, so
    when that step's one micro-batch is the whole batch its forward would repeat this one to
    the last bit; it is run on the rows in that micro-batch's order and used instead.

    index   (N,)    long   the rows, in the order they were forwarded
    logp    (N, R)  policy log-probs, with their graph
    entropy (N, R)  per-token entropy (a graph only when the loss has an entropy bonus)
    values  (N, R)  critic values, with their graph (not masked)
    """

    index: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None


def minibatches(n: int, num_mini_batches: int, seed: int, step: int, epoch: int) -> list[torch.Tensor]:
    """A shuffled split of range(n) into `num_mini_batches` near-equal index tensors (one optimiser step each)."""
    g = torch.Generator().manual_seed(seed * 7919 + step * 131 + epoch)
    perm = torch.randperm(n, generator=g)
    return [c for c in torch.tensor_split(perm, num_mini_batches) if len(c)]


def micro_batches(index: torch.Tensor, size: int) -> list[torch.Tensor]:
    """`index` in chunks of at most `size` rows (one forward/backward each)."""
    return [index[i:i + size] for i in range(0, len(index), size)]
