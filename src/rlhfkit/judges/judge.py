"""One interface for AI judges: pointwise scores and pairwise preferences, with abstentions.

A judge has a ``name`` and two batched methods:

* ``score(prompts, responses) -> list[float | None]``: higher is better; ``None`` means the judge
  abstained on that item (it timed out, or its answer could not be read after the retries).
* ``compare(prompts, a, b) -> list[Preference]``: which of two responses is better, with the
  probability ``p_a`` that a is, a ``confidence`` in [0, 1], or an abstention.

The same object serves as a reward (``judge:SPEC`` in the on-policy recipes' reward specs), as an
RLAIF labeller (``rlhfkit label --judge SPEC``) and as the judge of an evaluation. TRL's judges
return -1 for a failed comparison; here the failure is an explicit abstention that is counted
in ``judge.stats["abstained"]`` and never turned into a coin flip.

:class:`ScoreJudge` derives ``compare`` from ``score`` (the higher score wins; a difference
below ``tie_margin`` is a tie), which is how lexicon labellers and reward models compare.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from rlhfkit.errors import RlhfkitError


@dataclasses.dataclass
class Preference:
    """One pairwise verdict.

    ``label``: 1.0 (a better), 0.0 (b better), 0.5 (a tie) or None (abstained).
    ``p_a``: the judge's probability that a is better (None when abstained).
    ``confidence``: |2 p_a - 1| in [0, 1]; 0 for ties and abstentions.
    ``consistent``: for judges that ask both orders, whether the two orders agreed (else None).
    ``reason``: why it abstained or tied where that was not the judge's own verdict.
    ``rationale``: the judge's own text where it reasoned (chain of thought), one entry per order
    asked: [a shown first, b shown first] ("" where that order gave no text).
    """

    label: float | None
    p_a: float | None = None
    confidence: float = 0.0
    consistent: bool | None = None
    reason: str = ""
    rationale: list[str] = dataclasses.field(default_factory=list)

    @property
    def abstained(self) -> bool:
        return self.label is None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def preference_from_p(p_a: float | None, tie_margin: float = 0.0, consistent: bool | None = None,
                      reason: str = "") -> Preference:
    """A verdict from P(a better): a tie when |p_a - 0.5| <= tie_margin / 2, None -> abstain."""
    if p_a is None or not math.isfinite(p_a):
        return Preference(label=None, reason=reason or "no verdict")
    conf = abs(2.0 * p_a - 1.0)
    if conf <= tie_margin:
        return Preference(label=0.5, p_a=float(p_a), confidence=0.0, consistent=consistent, reason=reason)
    return Preference(label=1.0 if p_a > 0.5 else 0.0, p_a=float(p_a), confidence=conf,
                      consistent=consistent, reason=reason)



# The default tie band of the LLM and HTTP judges: |2 p_a - 1| <= 0.1, i.e. 0.45 <= p_a <= 0.55.
# Log-prob verdicts of a judge with no real preference sit a rounding error away from 0.5
# (p_a = 0.5000003 from a model that always answers "A"); a zero margin turns that noise into a
# decided label with a confidence that looks like a preference.
DEFAULT_TIE_MARGIN = 0.1
INCONSISTENT = ("tie", "abstain", "average")


def combine_orders(p_ab: Sequence[float | None], p_ba: Sequence[float | None] | None, both_orders: bool,
                   tie_margin: float, stats: dict, reason: str, inconsistent: str = "tie") -> list[Preference]:
    """Verdicts from a pairwise judge asked in both orders, to cancel position bias.

    `p_ab[i]`: P(a better) with a shown first; `p_ba[i]`: P(b better) with b shown first
    (None for a judge asked once: then 1 - p_ab). The verdict averages P(a better) over the two
    orders; when only one order answered it stands alone (consistency unknown), and when
    neither did the item abstains with `reason`. Updates the order-agreement counters.

    Orders that disagree (the judge chose the response in the same position both times) show a
    position bias, not a preference (Wang et al. 2023, "Large Language Models are not Fair
    Evaluators"): `inconsistent` makes them a tie (default; the pair still counts as compared),
    an abstention, or "average" keeps the averaged verdict.
    """
    if inconsistent not in INCONSISTENT:
        raise ValueError(f"inconsistent must be one of {', '.join(INCONSISTENT)}, got {inconsistent!r}")
    if p_ba is None:
        p_ba = [None if x is None else 1.0 - x for x in p_ab]
    out = []
    for x, y in zip(p_ab, p_ba):
        if x is None and y is None:
            out.append(Preference(label=None, reason=reason))
            continue
        if x is None or y is None:
            out.append(preference_from_p(x if x is not None else 1.0 - y, tie_margin))
            continue
        consistent = ((x > 0.5) == (1.0 - y > 0.5)) if both_orders else None
        p_a = 0.5 * (x + (1.0 - y))
        if both_orders:
            stats["order_pairs"] += 1
            stats["order_consistent"] += bool(consistent)
        if consistent is False and inconsistent == "tie":
            out.append(Preference(label=0.5, p_a=p_a, consistent=False, reason="the two orders disagree"))
        elif consistent is False and inconsistent == "abstain":
            out.append(Preference(label=None, consistent=False, reason="the two orders disagree"))
        else:
            out.append(preference_from_p(p_a, tie_margin, consistent=consistent))
    stats["compared"] += len(out)
    stats["abstained"] += sum(p.abstained for p in out)
    pairs = stats["order_pairs"]
    stats["order_agreement"] = stats["order_consistent"] / pairs if pairs else float("nan")
    return out


def attach_rationales(verdicts: list[Preference], first: Sequence[str], second: Sequence[str] | None) -> None:
    """Keep the judge's reasoning text with each verdict (see Preference.rationale)."""
    for i, v in enumerate(verdicts):
        v.rationale = [first[i] or ""] + ([second[i] or ""] if second is not None else [])


def rubric_compare(judge, prompts, a, b) -> list[Preference]:
    """A rubric judge's `compare`: mode=pairwise asks its pairwise rubric (both orders);
    mode=pointwise compares the two responses' expected pointwise scores."""
    if judge.mode == "pointwise":
        prompts = aligned(prompts, a, b)
        sa, sb = judge.score(prompts, a), judge.score(prompts, b)
        return [compare_scores(x, y, 0.25, judge.tie_margin) for x, y in zip(sa, sb)]
    return judge.compare_with_question(prompts, a, b, judge.question)

@runtime_checkable
class AIJudge(Protocol):
    """What `load_judge` returns: a named, batched scorer and comparer with abstentions."""

    name: str
    stats: dict

    def score(self, prompts: Sequence[str] | None, responses: Sequence[str]) -> list[float | None]: ...

    def compare(self, prompts: Sequence[str] | None, a: Sequence[str], b: Sequence[str]) -> list[Preference]: ...


def aligned(prompts: Sequence[str] | None, *columns: Sequence[str]) -> list[str | None]:
    """prompts as a list aligned with the columns (all of one length), checked."""
    for col in columns:
        if isinstance(col, str):
            raise TypeError("responses must be a sequence of strings, not one string")
    n = len(columns[0])
    for col in columns[1:]:
        if len(col) != n:
            raise ValueError(f"got {n} responses in one column but {len(col)} in another")
    if prompts is None:
        return [None] * n
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts but {n} responses")
    return list(prompts)


def new_stats() -> dict:
    return {"scored": 0, "compared": 0, "abstained": 0}


class ScoreJudge:
    """Base for pointwise judges: ``compare`` from the difference of two scores.

    ``p_a = sigmoid((s_a - s_b) / scale)`` gives the confidence; the label is a tie when
    |s_a - s_b| <= tie_margin, and an abstention when either score is None.
    Subclasses implement ``_score(prompts, responses) -> list[float | None]``.
    """

    name = "score"
    scale = 1.0
    tie_margin = 0.0

    def __init__(self) -> None:
        self.stats = new_stats()

    def _score(self, prompts: list[str | None], responses: list[str]) -> list[float | None]:
        raise NotImplementedError

    def score(self, prompts: Sequence[str] | None, responses: Sequence[str]) -> list[float | None]:
        prompts = aligned(prompts, responses)
        out = self._score(prompts, list(responses)) if responses else []
        self.stats["scored"] += len(out)
        self.stats["abstained"] += sum(s is None for s in out)
        return out

    def compare(self, prompts: Sequence[str] | None, a: Sequence[str], b: Sequence[str]) -> list[Preference]:
        prompts = aligned(prompts, a, b)
        sa, sb = self.score(prompts, a), self.score(prompts, b)
        self.stats["compared"] += len(sa)
        return [compare_scores(x, y, self.scale, self.tie_margin) for x, y in zip(sa, sb)]


def compare_scores(sa: float | None, sb: float | None, scale: float = 1.0, tie_margin: float = 0.0) -> Preference:
    """The verdict of two pointwise scores (see :class:`ScoreJudge`)."""
    if sa is None or sb is None:
        return Preference(label=None, reason="a score abstained")
    d = float(sa) - float(sb)
    p_a = 0.5 * (1.0 + math.tanh(0.5 * d / scale))
    if abs(d) <= tie_margin:
        return Preference(label=0.5, p_a=p_a, confidence=0.0)
    return Preference(label=1.0 if d > 0 else 0.0, p_a=p_a, confidence=abs(2.0 * p_a - 1.0))


class PanelJudge(ScoreJudge):
    """The gold human panel (or any array-returning scorer such as a reward model) as a judge."""

    def __init__(self, scorer, name: str, scale: float = 0.1, tie_margin: float = 0.0):
        super().__init__()
        self.scorer, self.name, self.scale, self.tie_margin = scorer, name, float(scale), float(tie_margin)

    def _score(self, prompts, responses):
        return [float(x) for x in self.scorer.score(prompts, responses)]


class EnsembleJudge:
    """Several judges voting: the mean of the members' P(a better) over those that did not
    abstain (abstains only when all do); scores are the mean of the members' z-scores in the batch."""

    def __init__(self, members: Sequence, name: str = "", tie_margin: float = 0.0):
        if not members:
            raise ValueError("an ensemble needs at least one judge")
        self.members = list(members)
        self.name = name or "ensemble(" + ",".join(m.name for m in self.members) + ")"
        self.tie_margin = float(tie_margin)
        self.stats = new_stats()

    def score(self, prompts, responses):
        prompts = aligned(prompts, responses)
        cols = []
        for m in self.members:
            s = m.score(prompts, responses)
            vals = [x for x in s if x is not None]
            mu = sum(vals) / len(vals) if vals else 0.0
            sd = math.sqrt(sum((x - mu) ** 2 for x in vals) / len(vals)) if vals else 0.0
            cols.append([None if x is None else (x - mu) / (sd or 1.0) for x in s])
        out = []
        for row in zip(*cols):
            vals = [x for x in row if x is not None]
            out.append(sum(vals) / len(vals) if vals else None)
        self.stats["scored"] += len(out)
        self.stats["abstained"] += sum(x is None for x in out)
        return out

    def compare(self, prompts, a, b):
        prompts = aligned(prompts, a, b)
        verdicts = [m.compare(prompts, a, b) for m in self.members]
        out = []
        for row in zip(*verdicts):
            ps = [v.p_a if v.label != 0.5 else 0.5 for v in row if v.label is not None]
            out.append(preference_from_p(sum(ps) / len(ps) if ps else None, self.tie_margin,
                                         reason="" if ps else "every member abstained"))
        self.stats["compared"] += len(out)
        self.stats["abstained"] += sum(p.abstained for p in out)
        return out


class ArrayScores:
    """A judge behind the array interface of the evaluator and reward specs: ``score`` returns a
    float array and stops with a clear error when the judge abstained on any response (an
    evaluation's mean must not quietly drop or invent items); the judge's verdict cache, where it
    has one, keeps the answered items for the rerun."""

    def __init__(self, judge):
        self.judge = judge
        self.name = judge.name

    def score(self, prompts, responses):
        out = self.judge.score(prompts, responses)
        missing = sum(x is None for x in out)
        if missing:
            raise RlhfkitError(f"judge {self.name!r} abstained on {missing} of {len(out)} responses "
                               f"(counters: {self.judge.stats}); rerun, or raise its retries or timeout")
        return np.asarray(out, dtype=np.float64)


class TRLPairwiseJudge:
    """Any rlhfkit judge with TRL's pairwise-judge call, ``judge(prompts, completions, shuffle_order)``
    -> the index (0 or 1) of the better of each pair of completions, -1 where there is no verdict
    (TRL's value for a failed judgement: here abstentions and ties), so it can be passed where TRL
    expects a pairwise judge (e.g. OnlineDPOTrainer(judge=...)). Order shuffling is left to the
    wrapped judge (the LLM and HTTP judges ask both orders), so ``shuffle_order`` is accepted and
    ignored."""

    def __init__(self, judge):
        self.inner = judge

    def judge(self, prompts, completions, shuffle_order: bool = True) -> list[int]:
        for pair in completions:
            if len(pair) != 2:
                raise ValueError(f"a pairwise judge compares two completions, got {len(pair)}")
        verdicts = self.inner.compare(list(prompts), [c[0] for c in completions], [c[1] for c in completions])
        return [-1 if v.label is None or v.label == 0.5 else (0 if v.label == 1.0 else 1) for v in verdicts]
