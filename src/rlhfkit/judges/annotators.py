"""Simulated annotators: noisy pairwise labels and K-way rankings from one rater of a panel.

Each label is given by one annotator drawn uniformly from a pool of ``n_annotators``; annotator
``j`` judges with rater ``j % n_raters`` of the panel (its gold score, degeneracy penalty
included). For a pair (a, b) with that rater's scores s_a, s_b and d = s_a - s_b:

* ``|d| < tie_margin``  -> a tie (label 0.5): the annotator sees no difference;
* otherwise a prefers-a label with the Bradley-Terry probability (Bradley & Terry 1952;
  Christiano et al. 2017, eq. 1)  ``P(a > b) = sigmoid(beta * d)``.

A ranking of K responses is a Plackett-Luce sample (Plackett 1975) with weights exp(beta * s):
the best is drawn with probability softmax(beta * s), then the next among the rest, and so on
(sampled exactly with the Gumbel-max trick). For K = 2 this is the Bradley-Terry probability
above; rankings have no ties.

A seeded subset of ``round(unreliable_frac * n_annotators)`` annotators is unreliable:
``mode="random"`` answers with a fair coin (a uniform permutation for rankings),
``mode="adversarial"`` flips its honest label (1 <-> 0, ties stay ties; rankings reversed).
Every label records ``annotator_id`` and ``reliable``. Results depend only on the seed and the
sequence of calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhfkit.judges.base import RaterPanel, check_lengths
from rlhfkit.judges.panel import GoldPanel

MODES = ("random", "adversarial")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


class SimulatedAnnotators:
    """Noisy labellers drawn from a panel of raters (see the module docstring for the model)."""

    def __init__(self, panel: RaterPanel | None = None, beta: float = 10.0, tie_margin: float = 0.02,
                 unreliable_frac: float = 0.0, mode: str = "random", seed: int = 0,
                 n_annotators: int | None = None):
        if panel is None:
            panel = GoldPanel()
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
        if not 0.0 <= unreliable_frac <= 1.0:
            raise ValueError(f"unreliable_frac must be in [0, 1], got {unreliable_frac}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.panel = panel
        self.beta, self.tie_margin, self.mode, self.seed = float(beta), float(tie_margin), mode, seed
        self.n_annotators = int(n_annotators or panel.n_raters)
        if self.n_annotators < 1:
            raise ValueError(f"n_annotators must be >= 1, got {n_annotators}")
        self.rng = np.random.default_rng(seed)
        n_bad = int(round(unreliable_frac * self.n_annotators))
        self.unreliable = np.zeros(self.n_annotators, dtype=bool)
        self.unreliable[self.rng.permutation(self.n_annotators)[:n_bad]] = True

    def rater_of(self, annotator_id: int) -> int:
        return annotator_id % self.panel.n_raters

    # -- pairs ----------------------------------------------------------------------------------

    def compare(self, prompts: Sequence[str] | None, a: Sequence[str], b: Sequence[str]) -> list[dict]:
        """Label each pair (a[i], b[i]): label 1.0 = a better, 0.0 = b better, 0.5 = tie."""
        prompts = check_lengths(prompts, a)
        if len(a) != len(b):
            raise ValueError(f"got {len(a)} responses in a but {len(b)} in b")
        n = len(a)
        if n == 0:
            return []
        ids = self.rng.integers(0, self.n_annotators, size=n)
        rows = np.arange(n)
        raters = ids % self.panel.n_raters
        sa = self.panel.rater_scores(prompts, list(a))[rows, raters]
        sb = self.panel.rater_scores(prompts, list(b))[rows, raters]
        labels, p_a = self.labels_from_scores(sa, sb, ids)
        return [{"label": float(labels[i]), "annotator_id": int(ids[i]),
                 "reliable": bool(not self.unreliable[ids[i]]), "p_a": float(p_a[i]),
                 "score_a": float(sa[i]), "score_b": float(sb[i])} for i in range(n)]

    def labels_from_scores(self, sa: np.ndarray, sb: np.ndarray,
                           ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels for given rater scores and annotator ids; also returns P(a > b) of an honest rater."""
        d = np.asarray(sa, dtype=np.float64) - np.asarray(sb, dtype=np.float64)
        p_a = _sigmoid(self.beta * d)
        u = self.rng.random(len(d))
        coin = self.rng.random(len(d))  # drawn always, so reliability does not shift the stream
        labels = (u < p_a).astype(np.float64)
        labels[np.abs(d) < self.tie_margin] = 0.5
        bad = self.unreliable[ids]
        if self.mode == "random":
            labels[bad] = (coin[bad] < 0.5).astype(np.float64)
        else:
            labels[bad] = 1.0 - labels[bad]  # 0.5 stays 0.5
        return labels, p_a

    # -- rankings -------------------------------------------------------------------------------

    def rank(self, prompt: str | None, responses: Sequence[str]) -> dict:
        """One Plackett-Luce ranking of `responses`: indices best first, plus annotator_id."""
        return self.rank_many([prompt], [responses])[0]

    def rank_many(self, prompts: Sequence[str | None], responses: Sequence[Sequence[str]]) -> list[dict]:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} response lists")
        flat_p = [p for p, rs in zip(prompts, responses) for _ in rs]
        flat_r = [r for rs in responses for r in rs]
        scores = self.panel.rater_scores(flat_p, flat_r) if flat_r else np.zeros((0, 1))
        out, start = [], 0
        for rs in responses:
            k = len(rs)
            if k < 2:
                raise ValueError(f"a ranking needs at least 2 responses, got {k}")
            j = int(self.rng.integers(0, self.n_annotators))
            s = scores[start:start + k, self.rater_of(j)]
            start += k
            gumbel = self.rng.gumbel(size=k)
            shuffle = self.rng.permutation(k)
            honest = np.argsort(-(self.beta * s + gumbel), kind="stable")
            if not self.unreliable[j]:
                ranking = honest
            elif self.mode == "random":
                ranking = shuffle
            else:
                ranking = honest[::-1]
            out.append({"ranking": [int(i) for i in ranking], "annotator_id": j,
                        "reliable": bool(not self.unreliable[j])})
        return out
