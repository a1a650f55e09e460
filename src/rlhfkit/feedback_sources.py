"""One interface for every source of preference labels: `PreferenceSource`.

Iterative RLHF (`rlhfkit loop`) and the demo ask a source to compare response pairs and get
back one label per pair. Simulated annotators answer now; an AI judge (any object with
``score(prompts, responses)``, e.g. a reward model or an LLM-as-judge wrapper) answers through
:class:`JudgeSource`; the human-feedback service plugs in by implementing ``compare`` (post the
pairs as tasks, return the collected labels).

A label is 1.0 (a better), 0.0 (b better) or 0.5 (a tie), with the annotator who gave it.
:func:`to_preference_records` turns labelled pairs into TRL preference records
(`prompt`/`chosen`/`rejected`) for the reward-model and DPO recipes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class PreferenceSource(Protocol):
    """Anything that labels response pairs."""

    name: str

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[dict]:
        """One dict per pair with at least ``label`` (1.0 a better, 0.0 b better, 0.5 tie) and
        ``annotator_id``; extra keys (reliability, scores) are kept in the records."""
        ...


class SimulatedSource:
    """Simulated human annotators over the gold panel (Bradley-Terry noise, ties, unreliable raters)."""

    def __init__(self, beta: float = 10.0, tie_margin: float = 0.02, unreliable_frac: float = 0.0,
                 mode: str = "random", seed: int = 0, annotators=None):
        from rlhfkit.judges import SimulatedAnnotators

        self.annotators = annotators or SimulatedAnnotators(beta=beta, tie_margin=tie_margin,
                                                            unreliable_frac=unreliable_frac, mode=mode, seed=seed)
        self.name = "simulated"

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[dict]:
        return self.annotators.compare(list(prompts), list(a), list(b))


class JudgeSource:
    """An AI labeller: the pair goes to whichever response `judge` scores higher (RLAIF)."""

    def __init__(self, judge, tie_margin: float = 0.0, name: str = "judge"):
        self.judge, self.tie_margin, self.name = judge, float(tie_margin), name

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[dict]:
        if len(a) != len(b):
            raise ValueError(f"got {len(a)} responses in a but {len(b)} in b")
        sa = np.asarray(self.judge.score(list(prompts), list(a)), dtype=np.float64)
        sb = np.asarray(self.judge.score(list(prompts), list(b)), dtype=np.float64)
        d = sa - sb
        labels = np.where(d > self.tie_margin, 1.0, np.where(d < -self.tie_margin, 0.0, 0.5))
        return [{"label": float(lab), "annotator_id": self.name, "score_a": float(x), "score_b": float(y)}
                for lab, x, y in zip(labels, sa, sb)]


SOURCES = {"simulated": SimulatedSource}


def to_preference_records(prompts: Sequence[str], a: Sequence[str], b: Sequence[str], labels: Sequence[dict],
                          keep_ties: bool = False, round: int | None = None) -> tuple[list[dict], dict]:
    """Labelled pairs -> TRL preference records; returns (records, counts).

    Ties are left out unless `keep_ties` (then written with ``tie: true`` and ``label: 0.5``,
    chosen/rejected in input order); identical responses are never a comparison, and pairs
    with an empty (whitespace-only) response are left out because preference data must not hold
    empty responses (rlhfkit.data validates that). All are counted, so nothing is dropped silently.
    """
    if not len(prompts) == len(a) == len(b) == len(labels):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(a)} a, {len(b)} b, {len(labels)} labels")
    records = []
    counts = {"pairs": len(labels), "ties_skipped": 0, "identical_skipped": 0, "empty_skipped": 0, "kept": 0}
    for p, x, y, lab in zip(prompts, a, b, labels):
        if not x.strip() or not y.strip():
            counts["empty_skipped"] += 1
            continue
        if x == y:
            counts["identical_skipped"] += 1
            continue
        label = float(lab["label"])
        if label == 0.5 and not keep_ties:
            counts["ties_skipped"] += 1
            continue
        chosen, rejected = (x, y) if label >= 0.5 else (y, x)
        rec = {"prompt": p, "chosen": chosen, "rejected": rejected, "label": 1.0 if label != 0.5 else 0.5,
               "tie": label == 0.5, "annotator_id": lab.get("annotator_id")}
        if "reliable" in lab:
            rec["reliable"] = bool(lab["reliable"])
        if round is not None:
            rec["round"] = round
        records.append(rec)
    counts["kept"] = len(records)
    return records, counts
