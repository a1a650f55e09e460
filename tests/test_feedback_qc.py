"""Quality control: reliability, flags and aggregation on hand-built label sets."""

from __future__ import annotations

import math

import pytest

from rlhfkit.feedback import agreement as ag
from rlhfkit.feedback import qc
from rlhfkit.feedback.qc import ItemRow, LabelRow, QCSettings


def pair(user, item, choice, order=(0, 1), ms=5000):
    return LabelRow(user, item, {"choice": choice}, list(order), ms)


def test_position_bias_and_too_fast_flags():
    labels = []
    for i in range(20):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        # "lefty" always picks the left response: a when a is on the left, b otherwise
        labels.append(pair("lefty", i, "ab"[order[0]], order, ms=6000))
        # "speedy" answers correctly (a) in 0.4 s
        labels.append(pair("speedy", i, "a", order, ms=400))
        labels.append(pair("careful", i, "a", order, ms=9000))
    stats = qc.annotator_report("pairwise", labels, {}, QCSettings())
    assert stats["lefty"].flags == ["position_bias"]
    assert stats["lefty"].left_picks == 20 and stats["lefty"].decisive == 20
    assert stats["lefty"].position_p == pytest.approx(2 / 2**20, rel=1e-9)
    assert stats["speedy"].flags == ["too_fast"] and stats["speedy"].median_seconds == 0.4
    assert stats["careful"].flags == []
    # careful agrees with the majority of the others (speedy says a; lefty splits) on every
    # item where the others' vote is decided
    assert stats["careful"].agree_k == stats["careful"].agree_n


def test_gold_accuracy_drives_reliability_and_flags():
    items = {i: ItemRow(i, 2, is_gold=True, gold_value={"choice": "a"}) for i in range(6)}
    labels = [pair("good", i, "a") for i in range(6)] + [pair("bad", i, "a" if i == 0 else "b") for i in range(6)]
    stats = qc.annotator_report("pairwise", labels, items, QCSettings())
    assert stats["good"].gold_correct == 6 and stats["good"].reliability == pytest.approx(7 / 8)
    assert stats["bad"].gold_correct == 1 and stats["bad"].reliability == pytest.approx(2 / 8)
    assert "low_gold_accuracy" in stats["bad"].flags and not stats["good"].flags


def test_aggregation_methods():
    labels = [pair("u1", 1, "a"), pair("u2", 1, "a"), pair("u3", 1, "b"),
              pair("u1", 2, "a"), pair("u2", 2, "b"),
              pair("u1", 3, "tie"), pair("u2", 3, "tie")]
    maj = qc.aggregate("pairwise", labels, "majority")
    assert maj[1] == {"choice": "a"} and maj[2] is None and maj[3] == {"choice": "tie"}
    # weighted: u2 is very reliable, u1 not: item 2 goes to u2's answer
    w = qc.aggregate("pairwise", labels, "weighted", {"u1": 0.55, "u2": 0.95, "u3": 0.5})
    assert w[2] == {"choice": "b"}
    bt = qc.aggregate("pairwise", labels, "bt")
    # item 1: 2 wins vs 1, with a prior of 0.1 virtual ties: p_a = 2.05 / 3.1
    assert bt[1]["choice"] == "a" and bt[1]["p_a"] == pytest.approx(2.05 / 3.1, rel=1e-9)
    assert bt[3]["choice"] == "tie"
    with pytest.raises(ValueError, match="unknown aggregation"):
        qc.aggregate("pairwise", labels, "median")


def test_ranking_bt_aggregation_and_units():
    labels = [LabelRow("u1", 7, {"ranking": [2, 0, 1]}, [0, 1, 2]), LabelRow("u2", 7, {"ranking": [2, 1, 0]}, [1, 2, 0]),
              LabelRow("u3", 7, {"ranking": [0, 2, 1]}, [0, 1, 2])]
    bt = qc.aggregate("ranking", labels, "bt")[7]
    assert bt["ranking"][0] == 2 and len(bt["strengths"]) == 3
    assert qc.units_of("ranking", 7, {"ranking": [2, 0, 1]}) == {(7, 2): 0, (7, 0): 1, (7, 1): 2}
    # picked_left: u2 saw response 1 first and ranked 2 first -> not left
    assert qc.picked_left("ranking", labels[1].value, labels[1].display_order) is False
    assert qc.picked_left("ranking", labels[0].value, labels[0].display_order) is False
    assert qc.picked_left("ranking", labels[2].value, labels[2].display_order) is True


def test_agreement_report_uses_right_metric_per_type():
    ratings = [LabelRow(u, i, {"ratings": [{"helpful": v, "honest": v}]}, [0]) for u, i, v in
               [("a", 1, 5), ("b", 1, 4), ("a", 2, 1), ("b", 2, 2), ("a", 3, 3), ("b", 3, 3)]]
    rep = qc.agreement_report("rating", ratings, QCSettings(kappa_min_shared=2))
    units = [[5, 4], [1, 2], [3, 3]]
    assert rep["metric"] == "ordinal"
    assert rep["krippendorff_alpha_by_dimension"]["helpful"] == pytest.approx(ag.krippendorff_alpha(units, "ordinal"), abs=1e-6)
    assert rep["krippendorff_alpha"] == pytest.approx(ag.krippendorff_alpha(units + units, "ordinal"), abs=1e-6)
    pw = [pair("a", 1, "a"), pair("b", 1, "a"), pair("a", 2, "b"), pair("b", 2, "tie")]
    rep = qc.agreement_report("pairwise", pw, QCSettings(kappa_min_shared=2))
    assert rep["metric"] == "nominal"
    assert rep["krippendorff_alpha"] == pytest.approx(ag.krippendorff_alpha([["a", "a"], ["b", "tie"]]), abs=1e-6)
    assert rep["cohen_kappa_mean"] == pytest.approx(ag.cohen_kappa(["a", "b"], ["a", "tie"]), abs=1e-6)
    free = qc.agreement_report("critique", [LabelRow("a", 1, {"text": "x"}, [0])], QCSettings())
    assert free["krippendorff_alpha"] is None


def test_matches_gold_per_type():
    assert qc.matches_gold("ranking", {"ranking": [1, 0, 2]}, {"ranking": [1, 2, 0]})
    assert not qc.matches_gold("ranking", {"ranking": [0, 1, 2]}, {"ranking": [1, 2, 0]})
    assert qc.matches_gold("rating", {"ratings": [{"h": 4}]}, {"ratings": [{"h": 5}]})
    assert not qc.matches_gold("rating", {"ratings": [{"h": 2}]}, {"ratings": [{"h": 5}]})
    assert qc.matches_gold("thumbs", {"thumbs": [True]}, {"thumbs": [True]})
    assert not math.isnan(ag.reliability_weight(0.7))
