"""Reward-model losses against hand-worked values and naive float64 loops (rtol 1e-6)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhfkit.losses import reward as R

RTOL = 1e-6
f64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=f64)


def close(a, b):
    assert float(a) == pytest.approx(float(b), rel=RTOL, abs=1e-12)


def log1pexp(x: float) -> float:  # -log sigmoid(-x) without torch
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


# ---------------------------------------------------------------- hand-worked values


def test_bradley_terry_hand_values():
    loss, m = R.bradley_terry_loss(t([1.0]), t([0.0]))
    close(loss, math.log(1 + math.exp(-1)))  # 0.313261687518...
    close(loss, 0.31326168751822286)
    loss, _ = R.bradley_terry_loss(t([1.0]), t([0.0]), margin=t([0.5]))
    close(loss, 0.47407698418010663)  # log(1 + e^-0.5)
    loss, _ = R.bradley_terry_loss(t([0.0]), t([0.0]))
    close(loss, math.log(2))
    close(m["accuracy"], 1.0)


def test_davidson_hand_values():
    # d = 0, nu = 1: win, tie, lose each 1/3
    for y in (1.0, 0.5, 0.0):
        loss, _ = R.davidson_tie_loss(t([0.0]), t([0.0]), labels=t([y]))
        close(loss, math.log(3))
    # d = 2 ln 2: e^{d/2} = 2, e^{-d/2} = 1/2, Z = 3.5 -> P = 4/7, 2/7, 1/7
    d = 2 * math.log(2)
    for y, want in ((1.0, math.log(7 / 4)), (0.5, math.log(7 / 2)), (0.0, math.log(7))):
        loss, _ = R.davidson_tie_loss(t([d]), t([0.0]), labels=t([y]))
        close(loss, want)
    lw, lt, ll = R.davidson_log_probs(t([d]), 0.0)
    close(lw.exp() + lt.exp() + ll.exp(), 1.0)


def test_soft_label_hand_values():
    loss, _ = R.soft_label_loss(t([math.log(3)]), t([0.0]), labels=t([0.5]))
    close(loss, 0.5 * math.log(16 / 3))  # sigmoid(ln 3) = 3/4
    loss, _ = R.soft_label_loss(t([math.log(3)]), t([0.0]))
    close(loss, math.log(4 / 3))
    loss, m = R.soft_label_loss(t([math.log(3)]), t([0.0]), labels=t([0.0]))
    close(loss, math.log(4))
    close(m["accuracy"], 0.0)  # rejected won but chosen scored higher


def test_instructgpt_hand_values():
    # K = 3, rewards 2 > 1 > 0: pairs with gaps 1, 2, 1
    loss, m = R.instructgpt_ranking_loss(t([[2.0, 1.0, 0.0]]))
    want = (2 * math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 3
    close(loss, want)
    close(loss, 0.2511504620264728)
    close(m["accuracy"], 1.0)


def test_plackett_luce_hand_values():
    # strengths 3, 2, 1: P = 3/6 * 2/3 = 1/3; NLL / (K-1) = ln 3 / 2
    r = t([[math.log(3), math.log(2), 0.0]])
    loss, _ = R.plackett_luce_loss(r)
    close(loss, math.log(3) / 2)


def test_centering_hand_value():
    pen = R.reward_centering_penalty(t([[1.0, 2.0]]), coef=0.1)
    close(pen, 0.9)  # 0.1 * (1 + 2)^2


# ---------------------------------------------------------------- naive loops


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def test_pair_losses_match_naive_loop(rng):
    b = 13
    c, r = torch.randn(b, generator=rng, dtype=f64) * 3, torch.randn(b, generator=rng, dtype=f64) * 3
    margin = torch.rand(b, generator=rng, dtype=f64)
    labels = t([1.0, 0.0, 0.5] * 4 + [1.0])
    weights = torch.rand(b, generator=rng, dtype=f64) + 0.1
    log_nu = -0.7

    bt = [log1pexp(-(c[i] - r[i] - margin[i]).item()) for i in range(b)]
    close(R.bradley_terry_loss(c, r, margin=margin)[0], sum(bt) / b)
    close(R.bradley_terry_loss(c, r, margin=margin, weights=weights)[0],
          sum(w * x for w, x in zip(weights.tolist(), bt)) / weights.sum().item())

    soft = []
    dav = []
    for i in range(b):
        d, y = (c[i] - r[i]).item(), labels[i].item()
        s = 1 / (1 + math.exp(-d))
        soft.append(-(y * math.log(s) + (1 - y) * math.log(1 - s)))
        pw, pl, nu = math.exp(c[i].item()), math.exp(r[i].item()), math.exp(log_nu)
        z = pw + pl + nu * math.sqrt(pw * pl)
        probs = {1.0: pw / z, 0.5: nu * math.sqrt(pw * pl) / z, 0.0: pl / z}
        dav.append(-math.log(probs[y]))
    close(R.soft_label_loss(c, r, labels=labels)[0], sum(soft) / b)
    close(R.davidson_tie_loss(c, r, labels=labels, log_nu=log_nu)[0], sum(dav) / b)


def _naive_rankings(rewards, lengths):
    ig, pl = [], []
    for row, k in zip(rewards.tolist(), lengths):
        row = row[:k]
        pairs = list(itertools.combinations(range(k), 2))
        ig.append(sum(log1pexp(-(row[i] - row[j])) for i, j in pairs) / len(pairs))
        nll = 0.0
        for i in range(k - 1):
            nll -= row[i] - math.log(sum(math.exp(x) for x in row[i:]))
        pl.append(nll / (k - 1))
    return ig, pl


def test_ranking_losses_match_naive_loop(rng):
    lengths = [4, 2, 3, 4, 5]
    rewards = torch.randn(len(lengths), 5, generator=rng, dtype=f64) * 2
    mask = torch.tensor([[j < k for j in range(5)] for k in lengths])
    ig, pl = _naive_rankings(rewards, lengths)
    close(R.instructgpt_ranking_loss(rewards, mask)[0], sum(ig) / len(ig))
    close(R.plackett_luce_loss(rewards, mask)[0], sum(pl) / len(pl))
    # padded entries must not matter, however large
    noisy = rewards.clone()
    noisy[~mask] = 1e6
    close(R.instructgpt_ranking_loss(noisy, mask)[0], sum(ig) / len(ig))
    close(R.plackett_luce_loss(noisy, mask)[0], sum(pl) / len(pl))


def test_k2_rankings_equal_bradley_terry(rng):
    c, r = torch.randn(7, generator=rng, dtype=f64), torch.randn(7, generator=rng, dtype=f64)
    bt = R.bradley_terry_loss(c, r)[0]
    close(R.instructgpt_ranking_loss(torch.stack([c, r], 1))[0], bt)
    close(R.plackett_luce_loss(torch.stack([c, r], 1))[0], bt)


def test_centering_matches_naive_loop(rng):
    rewards = torch.randn(6, 3, generator=rng, dtype=f64)
    mask = torch.tensor([[True, True, False]] * 3 + [[True, True, True]] * 3)
    naive = []
    for row, mrow in zip(rewards.tolist(), mask.tolist()):
        vals = [x for x, keep in zip(row, mrow) if keep]
        naive.append((2 * sum(vals) / len(vals)) ** 2)
    close(R.reward_centering_penalty(rewards, mask, coef=0.3), 0.3 * sum(naive) / len(naive))


def test_heads_dimension_averages_over_heads(rng):
    c, r = torch.randn(5, 3, generator=rng, dtype=f64), torch.randn(5, 3, generator=rng, dtype=f64)
    per_head = [R.bradley_terry_loss(c[:, h], r[:, h])[0] for h in range(3)]
    close(R.bradley_terry_loss(c, r)[0], sum(per_head) / 3)
    rk = torch.randn(4, 3, 2, generator=rng, dtype=f64)
    per_head = [R.plackett_luce_loss(rk[..., h])[0] for h in range(2)]
    close(R.plackett_luce_loss(rk)[0], sum(per_head) / 2)


# ---------------------------------------------------------------- gradients and errors


def test_gradients_match_autograd_of_naive_formula():
    c, r = t([0.3, -1.2]).requires_grad_(), t([0.1, 0.4]).requires_grad_()
    R.bradley_terry_loss(c, r)[0].backward()
    for i in range(2):
        d = (c[i] - r[i]).item()
        close(c.grad[i], -(1 - 1 / (1 + math.exp(-d))) / 2)
        close(r.grad[i], (1 - 1 / (1 + math.exp(-d))) / 2)


def test_extreme_rewards_stay_finite():
    big = t([1e4, -1e4])
    for fn in R.PAIR_LOSSES.values():
        loss, _ = fn(big, -big)
        assert torch.isfinite(loss)
    for fn in R.RANKING_LOSSES.values():
        loss, _ = fn(t([[1e4, -1e4, 0.0]]))
        assert torch.isfinite(loss)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="ties"):
        R.bradley_terry_loss(t([1.0]), t([0.0]), labels=t([0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        R.soft_label_loss(t([1.0]), t([0.0]), labels=t([1.5]))
    with pytest.raises(ValueError, match="contiguous"):
        R.instructgpt_ranking_loss(t([[1.0, 2.0, 3.0]]), torch.tensor([[True, False, True]]))


def test_registries_and_reexports():
    import rlhfkit.losses as L

    assert set(R.PAIR_LOSSES) == {"bradley_terry", "soft_label", "davidson"}
    assert set(R.RANKING_LOSSES) == {"instructgpt", "plackett_luce"}
    assert L.PAIR_LOSSES is R.PAIR_LOSSES and L.RANKING_LOSSES is R.RANKING_LOSSES


# ------------------------------------------------------------------ THE reward-model accuracy


def test_preference_accuracy_hand_values_with_ties():
    delta = torch.tensor([2.0, 0.0, -1.0, -3.0, 0.5, -0.5], dtype=torch.float64)
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 0.25], dtype=torch.float64)
    # right: 2 > 0 (label 1); -3 < 0 (label 0); -0.5 < 0 (label 0.25: rejected preferred)
    # wrong: the reward tie 0.0 and -1 (label 1); left out: the labelled tie 0.5
    acc, n = R.preference_accuracy(delta, labels)
    assert int(n) == 5 and float(acc) == pytest.approx(3 / 5, rel=1e-12)
    correct, decisive = R.preference_verdicts(delta, labels)
    assert correct.tolist() == [True, False, False, True, True, True]  # the tie's verdict is not counted
    assert decisive.tolist() == [True, True, True, True, False, True]
    acc, n = R.preference_accuracy(torch.zeros(4))  # a constant reward model gets nothing right
    assert float(acc) == 0.0 and int(n) == 4
    acc, n = R.preference_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.5]))
    assert math.isnan(float(acc)) and int(n) == 0  # nothing decisive: no score, not 0 or 1


def test_preference_accuracy_counts_every_head_and_every_ranking_pair():
    # two heads: head 0 right on both pairs, head 1 only on the second
    delta = torch.tensor([[1.0, -1.0], [2.0, 2.0]])
    acc, n = R.preference_accuracy(delta, torch.tensor([1.0, 1.0]))
    assert int(n) == 4 and float(acc) == pytest.approx(3 / 4)
    acc, n = R.preference_accuracy(delta, torch.tensor([1.0, 0.5]))
    assert int(n) == 2 and float(acc) == pytest.approx(1 / 2)
    # a ranking of 3 (best first) with rewards 3, 1, 1: pairs (0,1) right, (0,2) right, (1,2) a reward tie
    _, m = R.instructgpt_ranking_loss(torch.tensor([[3.0, 1.0, 1.0]]))
    close(m["accuracy"], 2 / 3)
    # padded rankings: only real responses form pairs (K = 2 right; K = 3 with one inversion)
    rewards = torch.tensor([[1.0, 0.0, 9.0], [0.0, 1.0, -1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    _, m = R.plackett_luce_loss(rewards, mask)
    close(m["accuracy"], 3 / 4)  # pairs: (1>0) right; (0<1) wrong, (0>-1) right, (1>-1) right
    # the pair losses report the same number
    _, m = R.soft_label_loss(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]),
                             labels=torch.tensor([1.0, 1.0, 0.5]))
    close(m["accuracy"], 1 / 2)
