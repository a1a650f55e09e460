"""One scored round of group sampling, and DAPO's dynamic sampling over several rounds.

Dynamic sampling (Yu et al. 2025, DAPO, arXiv:2503.14476, sec. 3.2, eq. 11): a group whose
responses all got the same reward has advantage 0 for every response (GRPO, RLOO and
REINFORCE++ all centre on the group mean), so it carries no policy gradient and only shrinks the
effective batch as accuracy rises. Such groups are dropped and further prompts sampled until the
batch holds `prompts_per_step` groups whose rewards vary, with at most `max_rounds` extra rounds
(DAPO samples until full; the cap bounds the cost of an update when nearly every group is solved
or failed). If the cap is reached, the batch is filled up with dropped groups (advantage 0) so its
size stays fixed; how many is counted in the metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from rlhfkit.judges.rewards import RewardScores
from rlhfkit.rollout import Rollout
from rlhfkit.rollout.record import concat_rollouts


@dataclasses.dataclass
class Round:
    """A rollout of G responses per prompt and what scoring it gave, row by row (prompt-major)."""

    rollout: Rollout
    row_prompts: list[Any]
    """(N) each row's prompt (as given, before the chat template)."""
    columns: dict[str, list]
    """Extra prompt columns, one value per row."""
    completions: list[Any]
    scored: RewardScores
    eval_scores: np.ndarray | None


def select_scores(scored: RewardScores, rows: list[int]) -> RewardScores:
    """The rows `rows` of a batch's reward scores (per-batch `log_metric` scalars kept)."""
    return RewardScores(list(scored.names), {k: [v[i] for i in rows] for k, v in scored.values.items()},
                        scored.total[rows], {k: [v[i] for i in rows] for k, v in scored.extra.items()},
                        dict(scored.metrics))


def merge_rounds(parts: list[tuple[Round, list[int]]], pad_id: int) -> Round:
    """The chosen rows of several rounds as one Round, in order."""
    rolls = [r.rollout.select(rows) for r, rows in parts]
    scores = [select_scores(r.scored, rows) for r, rows in parts]
    names = scores[0].names
    merged = RewardScores(list(names), {k: [x for s in scores for x in s.values[k]] for k in names},
                          np.concatenate([s.total for s in scores]),
                          {k: [x for s in scores for x in s.extra.get(k, [])] for k in scores[0].extra},
                          {k: [x for s in scores for x in s.metrics.get(k, [])] for k in scores[0].metrics})
    evals = [r.eval_scores for r, _ in parts]
    return Round(concat_rollouts(rolls, pad_id),
                 [r.row_prompts[i] for r, rows in parts for i in rows],
                 {k: [r.columns[k][i] for r, rows in parts for i in rows] for k in parts[0][0].columns},
                 [r.completions[i] for r, rows in parts for i in rows], merged,
                 None if any(e is None for e in evals) else np.concatenate([np.asarray(e)[rows] for e, (_, rows) in zip(evals, parts)]))


def varying_groups(scored: RewardScores, group_size: int) -> np.ndarray:
    """(groups,) bool: the groups whose (unscorable-filled) rewards are not all equal."""
    totals = scored.total_for_groups(group_size).reshape(-1, group_size)
    return totals.max(-1) > totals.min(-1)


def dynamic_sampling(first: Round, another: Callable[[int], Round], group_size: int, max_rounds: int,
                     pad_id: int) -> tuple[Round, dict[str, float]]:
    """DAPO's dynamic sampling: keep the groups of `first` whose rewards vary and draw rounds
    `another(1)`, `another(2)`, ... (at most `max_rounds`) until as many groups as `first` had
    are kept. Returns the batch and metrics dynamic_sampling/{rounds, dropped_groups, filled_groups}."""
    want = len(first.rollout) // group_size
    keep: list[tuple[Round, int]] = []
    spare: list[tuple[Round, int]] = []
    current, extra, dropped = first, 0, 0
    while True:
        varies = varying_groups(current.scored, group_size)
        for g, v in enumerate(varies):
            (keep if v else spare).append((current, g))
        dropped += int((~varies).sum())
        if len(keep) >= want or extra >= max_rounds:
            break
        extra += 1
        current = another(extra)
    filled = max(0, want - len(keep))
    chosen = keep[:want] + spare[:filled]
    parts: list[tuple[Round, list[int]]] = []
    for r, g in chosen:  # consecutive groups of one round become one part
        rows = list(range(g * group_size, (g + 1) * group_size))
        if parts and parts[-1][0] is r:
            parts[-1][1].extend(rows)
        else:
            parts.append((r, rows))
    stats = {"dynamic_sampling/rounds": float(extra + 1), "dynamic_sampling/dropped_groups": float(dropped),
             "dynamic_sampling/filled_groups": float(filled)}
    return merge_rounds(parts, pad_id), stats
