"""Agreement/aggregation math against hand-worked values and naive float64 reference loops."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from rlhfkit.feedback import agreement as ag

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
# 12 units, missing values; published alphas: nominal .743, ordinal .815, interval .849, ratio .797.
K2011 = [
    [1, 1, None, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
    [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [None, 5, 5, 5], [None, None, 1, 1], [None, 3, None, None],
]


def naive_alpha(units, metric):
    """Direct definition: D_o over within-unit pairs weighted 1/(m_u-1), D_e over all value pairs."""
    units = [[v for v in u if v is not None] for u in units]
    units = [u for u in units if len(u) >= 2]
    allv = [v for u in units for v in u]
    n = len(allv)
    counts = {v: allv.count(v) for v in set(allv)}
    order = sorted(counts)

    def d2(c, k):
        if metric == "nominal":
            return 0.0 if c == k else 1.0
        if metric == "interval":
            return float(c - k) ** 2
        if metric == "ratio":
            return 0.0 if c + k == 0 else ((c - k) / (c + k)) ** 2
        lo, hi = sorted((order.index(c), order.index(k)))
        s = sum(counts[order[g]] for g in range(lo, hi + 1))
        return (s - (counts[c] + counts[k]) / 2.0) ** 2

    do = 0.0
    for u in units:
        for i in range(len(u)):
            for j in range(len(u)):
                if i != j:
                    do += d2(u[i], u[j]) / (len(u) - 1)
    do /= n
    de = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                de += d2(allv[i], allv[j])
    de /= n * (n - 1)
    return 1.0 - do / de


@pytest.mark.parametrize("metric,published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)])
def test_krippendorff_published_example(metric, published):
    a = ag.krippendorff_alpha(K2011, metric)
    assert abs(a - published) < 5e-4
    assert a == pytest.approx(naive_alpha(K2011, metric), rel=1e-10)


def test_krippendorff_hand_worked_nominal():
    # units: (a,a), (a,b), (b,b). Coincidences: o_aa=2, o_ab=o_ba=1, o_bb=2; n_a=n_b=3, n=6.
    # D_o = 2/6, D_e = 2*3*3/(6*5) = 0.6  =>  alpha = 1 - (1/3)/0.6 = 4/9
    assert ag.krippendorff_alpha([["a", "a"], ["a", "b"], ["b", "b"]]) == pytest.approx(4 / 9, rel=1e-12)
    assert ag.krippendorff_alpha([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert math.isnan(ag.krippendorff_alpha([["a", "a"], ["a", "a"]]))
    assert math.isnan(ag.krippendorff_alpha([["a"], [None, "b"]]))


@pytest.mark.parametrize("metric", ag.METRICS)
def test_krippendorff_random_matches_naive(metric):
    rng = random.Random(3)
    units = [[rng.choice([None, 1, 2, 3, 4, 5]) for _ in range(rng.randint(1, 5))] for _ in range(30)]
    assert ag.krippendorff_alpha(units, metric) == pytest.approx(naive_alpha(units, metric), rel=1e-9)


def test_cohen_kappa_hand_worked():
    # 2x2 table [[20, 5], [10, 15]]: p_o = 35/50 = .7; p_e = (25*30 + 25*20)/50^2 = .5 => kappa = .4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert ag.cohen_kappa(a, b) == pytest.approx(0.4, rel=1e-12)
    assert ag.cohen_kappa(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must match"):
        ag.cohen_kappa(a, b[:-1])


def test_fleiss_kappa_wikipedia_example():
    # Fleiss (1971) style worked example (10 subjects, 14 raters, 5 categories): P_bar = 0.378,
    # P_e = 0.2128, kappa = 0.210.
    m = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
         [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    k = ag.fleiss_kappa(m)
    x = np.array(m, float)
    p_bar = ((x * (x - 1)).sum(1) / (14 * 13)).mean()
    p_e = ((x.sum(0) / 140) ** 2).sum()
    assert p_bar == pytest.approx(0.378, abs=5e-4) and p_e == pytest.approx(0.2128, abs=5e-4)
    assert k == pytest.approx((p_bar - p_e) / (1 - p_e), rel=1e-12)
    assert k == pytest.approx(0.210, abs=5e-4)


def test_fleiss_two_raters_close_to_cohen_with_equal_marginals():
    # With two raters and identical marginals, Fleiss' kappa equals Scott's pi = Cohen's kappa.
    a = ["x", "x", "y", "y", "x", "y"]
    b = ["x", "y", "x", "y", "x", "y"]
    counts, _ = ag.fleiss_counts(list(zip(a, b)))
    assert ag.fleiss_kappa(counts) == pytest.approx(ag.cohen_kappa(a, b), rel=1e-12)


def test_bradley_terry_hand_worked_and_naive():
    # a beats b 3 times, b beats a once: MLE p_a / p_b = 3.
    s = ag.bradley_terry([("a", "b", 1.0)] * 3 + [("a", "b", 0.0)])
    assert s["a"] - s["b"] == pytest.approx(math.log(3), rel=1e-9)
    # three players: compare with direct maximisation of the log-likelihood (float64 grid-free Newton)
    comps = [("a", "b", 1), ("a", "b", 1), ("b", "a", 1), ("b", "c", 1), ("b", "c", 1), ("c", "b", 1),
             ("a", "c", 1), ("c", "a", 1), ("a", "c", 0.5)]
    bt = ag.bradley_terry(comps)
    theta = np.zeros(3)
    names = ["a", "b", "c"]
    for _ in range(200):  # gradient ascent on sum s*log sig(ti-tj) + (1-s) log sig(tj-ti)
        g = np.zeros(3)
        for i, j, sc in comps:
            ii, jj = names.index(i), names.index(j)
            p = 1 / (1 + math.exp(-(theta[ii] - theta[jj])))
            g[ii] += sc - p
            g[jj] -= sc - p
        theta += 0.5 * g
        theta -= theta.mean()
    for k, name in enumerate(names):
        assert bt[name] == pytest.approx(theta[k], abs=1e-7)


def test_votes_and_weights():
    assert ag.majority_vote(["a", "b", "a"]) == "a"
    assert ag.majority_vote(["a", "b"]) is None
    assert ag.reliability_weight(0.5) == 0.0
    assert ag.reliability_weight(0.9) == pytest.approx(math.log(9))
    # one reliable voter (w=log 9) outweighs two coin-flippers (w=log 1.5 each)
    w_good, w_bad = ag.reliability_weight(0.9), ag.reliability_weight(0.6)
    assert ag.weighted_vote([("a", w_good), ("b", w_bad), ("b", w_bad)]) == "a"
    assert ag.ranking_to_pairs([2, 0, 1]) == [(2, 0, 1.0), (2, 1, 1.0), (0, 1, 1.0)]


def test_binomial_p():
    # n=10, k=9: P(X>=9)+P(X<=1) = 2*(10+1)/1024
    assert ag.binomial_two_sided_p(9, 10) == pytest.approx(22 / 1024, rel=1e-12)
    assert ag.binomial_two_sided_p(5, 10) == pytest.approx(1.0)
    total = sum(math.comb(10, i) for i in itertools.chain(range(0, 2), range(9, 11))) / 1024
    assert ag.binomial_two_sided_p(1, 10) == pytest.approx(total, rel=1e-12)
