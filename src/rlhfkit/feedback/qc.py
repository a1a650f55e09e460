"""Quality control of a task's labels: agreement, per-annotator reliability, flags, aggregation.

Which agreement measure per question type (Krippendorff 2011 on levels of measurement):

- pairwise: one unit per item, nominal values a / b / tie / both_bad;
- ranking: one unit per (item, response), the rank given (ordinal);
- rating: one unit per (item, response, rubric dimension), the Likert point (ordinal);
- thumbs: one unit per (item, response), up/down (nominal);
- critique, edit: free text, no agreement statistic.

Reliability of an annotator is their accuracy on gold items when they answered at least
`min_gold` of them, else their agreement with the other annotators' majority on shared
items; both with a Beta(1, 1) prior, (correct + 1) / (n + 2).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.feedback import agreement as ag


@dataclass
class LabelRow:
    user: str
    item_id: int
    value: dict
    display_order: list
    duration_ms: int | None = None


@dataclass
class ItemRow:
    item_id: int
    num_responses: int
    is_gold: bool = False
    gold_value: dict | None = None


@dataclass
class QCSettings:
    min_seconds: float = 3.0
    """Flag annotators whose median time per item is below this."""
    min_items_for_flags: int = 10
    position_bias_p: float = 0.001
    """Flag when a two-sided binomial test of 'picked the left response' has p below this."""
    min_gold: int = 3
    low_reliability: float = 0.6
    kappa_min_shared: int = 5


@dataclass
class AnnotatorStats:
    user: str
    labels: int = 0
    median_seconds: float | None = None
    gold_answered: int = 0
    gold_correct: int = 0
    agree_n: int = 0
    agree_k: int = 0
    left_picks: int = 0
    decisive: int = 0
    position_p: float | None = None
    reliability: float = 0.5
    flags: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# per-type views of a label


def units_of(question_type: str, item_id: int, value: dict) -> dict[Any, Any]:
    """Agreement units of one label: unit key -> value."""
    if question_type == "pairwise":
        return {item_id: value["choice"]}
    if question_type == "ranking":
        return {(item_id, idx): rank for rank, idx in enumerate(value["ranking"])}
    if question_type == "rating":
        return {(item_id, i, dim): v for i, r in enumerate(value["ratings"]) for dim, v in r.items()}
    if question_type == "thumbs":
        return {(item_id, i): bool(t) for i, t in enumerate(value["thumbs"])}
    return {}


METRIC = {"pairwise": "nominal", "ranking": "ordinal", "rating": "ordinal", "thumbs": "nominal"}


def category_of(question_type: str, value: dict) -> Any:
    """One nominal category per label, for kappa and majority votes."""
    if question_type == "pairwise":
        return value["choice"]
    if question_type == "ranking":
        return tuple(value["ranking"])
    if question_type == "rating":
        return tuple(tuple(sorted(r.items())) for r in value["ratings"])
    if question_type == "thumbs":
        return tuple(value["thumbs"])
    return None


def matches_gold(question_type: str, value: dict, gold: dict) -> bool:
    """Gold agreement: same choice; same top response (ranking); ratings within 1 point; same thumbs."""
    if question_type == "ranking":
        return value["ranking"][0] == gold["ranking"][0]
    if question_type == "rating":
        return all(abs(v - g.get(dim, v)) <= 1 for r, g in zip(value["ratings"], gold["ratings"]) for dim, v in r.items())
    return category_of(question_type, value) == category_of(question_type, gold)


def picked_left(question_type: str, value: dict, order: Sequence[int]) -> bool | None:
    """For decisive pairwise / ranking answers: did the winner sit in the first position?"""
    if question_type == "pairwise" and value["choice"] in ("a", "b"):
        return order[0] == "ab".index(value["choice"])
    if question_type == "ranking":
        return order[0] == value["ranking"][0]
    return None


# --------------------------------------------------------------------------------------------
# the report


def agreement_report(question_type: str, labels: Sequence[LabelRow], settings: QCSettings) -> dict:
    if question_type not in METRIC:
        return {"metric": None, "krippendorff_alpha": None, "fleiss_kappa": None, "cohen_kappa_mean": None}
    units: dict[Any, list] = defaultdict(list)
    cats: dict[int, list] = defaultdict(list)
    by_rater: dict[str, dict] = defaultdict(dict)
    for lab in labels:
        for key, v in units_of(question_type, lab.item_id, lab.value).items():
            units[key].append(v)
        c = category_of(question_type, lab.value)
        cats[lab.item_id].append(c)
        by_rater[lab.user][lab.item_id] = c
    alpha = ag.krippendorff_alpha(units.values(), METRIC[question_type])
    counts, _ = ag.fleiss_counts(cats.values())
    fk = ag.fleiss_kappa(counts) if counts.size else float("nan")
    ck, pairs = ag.mean_pairwise_cohen(by_rater, settings.kappa_min_shared)
    out = {"metric": METRIC[question_type], "krippendorff_alpha": _num(alpha), "fleiss_kappa": _num(fk),
           "cohen_kappa_mean": _num(ck), "cohen_pairs": pairs,
           "items_with_overlap": sum(len(v) >= 2 for v in cats.values())}
    if question_type == "rating":
        dims = sorted({k[2] for k in units})
        out["krippendorff_alpha_by_dimension"] = {
            d: _num(ag.krippendorff_alpha([v for k, v in units.items() if k[2] == d], "ordinal")) for d in dims}
    return out


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def annotator_report(question_type: str, labels: Sequence[LabelRow], items: dict[int, ItemRow],
                     settings: QCSettings) -> dict[str, AnnotatorStats]:
    stats: dict[str, AnnotatorStats] = {}
    by_item: dict[int, list[LabelRow]] = defaultdict(list)
    for lab in labels:
        by_item[lab.item_id].append(lab)
    times: dict[str, list[float]] = defaultdict(list)
    for lab in labels:
        st = stats.setdefault(lab.user, AnnotatorStats(lab.user))
        st.labels += 1
        if lab.duration_ms is not None:
            times[lab.user].append(lab.duration_ms / 1000.0)
        item = items.get(lab.item_id)
        if question_type in METRIC and item is not None and item.is_gold and item.gold_value:
            st.gold_answered += 1
            st.gold_correct += matches_gold(question_type, lab.value, item.gold_value)
        left = picked_left(question_type, lab.value, lab.display_order)
        if left is not None:
            st.decisive += 1
            st.left_picks += left
        if question_type in METRIC:  # leave-one-out majority of the others on this item
            others = [category_of(question_type, o.value) for o in by_item[lab.item_id] if o.user != lab.user]
            maj = ag.majority_vote(others)
            if maj is not None:
                st.agree_n += 1
                st.agree_k += category_of(question_type, lab.value) == maj
    for user, st in stats.items():
        if times[user]:
            st.median_seconds = round(statistics.median(times[user]), 3)
        if st.gold_answered >= settings.min_gold:
            st.reliability = (st.gold_correct + 1) / (st.gold_answered + 2)
        elif st.agree_n:
            st.reliability = (st.agree_k + 1) / (st.agree_n + 2)
        _flag(st, settings)
    return stats


def _flag(st: AnnotatorStats, settings: QCSettings) -> None:
    enough = st.labels >= settings.min_items_for_flags
    if enough and st.median_seconds is not None and st.median_seconds < settings.min_seconds:
        st.flags.append("too_fast")
    if st.decisive >= settings.min_items_for_flags:
        st.position_p = ag.binomial_two_sided_p(st.left_picks, st.decisive)
        if st.position_p < settings.position_bias_p:
            st.flags.append("position_bias")
    if st.gold_answered >= settings.min_gold and st.gold_correct / st.gold_answered < settings.low_reliability:
        st.flags.append("low_gold_accuracy")


def aggregate(question_type: str, labels: Sequence[LabelRow], method: str = "majority",
              reliability: dict[str, float] | None = None) -> dict[int, dict | None]:
    """Consensus answer per item (canonical form), or None where the votes do not decide.

    majority: plurality of whole answers; weighted: votes weighted by reliability;
    bt: Bradley-Terry over the responses of the item (pairwise and ranking only).
    """
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {method!r}; choose from {sorted(AGGREGATORS)}")
    by_item: dict[int, list[LabelRow]] = defaultdict(list)
    for lab in labels:
        by_item[lab.item_id].append(lab)
    return {i: AGGREGATORS[method](question_type, labs, reliability or {}) for i, labs in by_item.items()}


def _agg_majority(qt: str, labs: list[LabelRow], _rel: dict) -> dict | None:
    cat = ag.majority_vote([category_of(qt, lab.value) for lab in labs])
    return None if cat is None else next(lab.value for lab in labs if category_of(qt, lab.value) == cat)


def _agg_weighted(qt: str, labs: list[LabelRow], rel: dict) -> dict | None:
    k = {"pairwise": 4}.get(qt, 2)
    votes = [(category_of(qt, lab.value), ag.reliability_weight(rel.get(lab.user, 0.5 + 1e-6), k)) for lab in labs]
    cat = ag.weighted_vote(votes)
    return None if cat is None else next(lab.value for lab in labs if category_of(qt, lab.value) == cat)


def _agg_bt(qt: str, labs: list[LabelRow], _rel: dict) -> dict | None:
    comps = []
    for lab in labs:
        if qt == "pairwise":
            s = {"a": 1.0, "b": 0.0, "tie": 0.5}.get(lab.value["choice"])
            if s is not None:
                comps.append((0, 1, s))
        elif qt == "ranking":
            comps += ag.ranking_to_pairs(lab.value["ranking"])
        else:
            raise ValueError(f"Bradley-Terry aggregation needs pairwise or ranking labels, not {qt}")
    if not comps:
        return None
    strengths = ag.bradley_terry(comps, prior=0.1)
    order = sorted(strengths, key=lambda r: -strengths[r])
    if qt == "pairwise":
        gap = strengths.get(0, 0.0) - strengths.get(1, 0.0)
        return {"choice": "tie" if abs(gap) < 1e-9 else ("a" if gap > 0 else "b"), "p_a": 1 / (1 + math.exp(-gap))}
    return {"ranking": order, "strengths": [strengths[r] for r in order]}


AGGREGATORS = {"majority": _agg_majority, "weighted": _agg_weighted, "bt": _agg_bt}


def task_report(question_type: str, labels: Sequence[LabelRow], items: dict[int, ItemRow],
                settings: QCSettings | None = None) -> dict:
    """Everything the admin dashboard shows for one task."""
    settings = settings or QCSettings()
    real = [lab for lab in labels if not (items.get(lab.item_id) and items[lab.item_id].is_gold)]
    annotators = annotator_report(question_type, labels, items, settings)
    return {
        "question_type": question_type,
        "labels": len(labels),
        "agreement": agreement_report(question_type, real, settings),
        "annotators": [vars(a) for a in sorted(annotators.values(), key=lambda a: a.user)],
        "settings": vars(settings),
    }
