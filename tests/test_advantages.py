import math

import pytest
import torch

from rlhfkit.advantages import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    leave_one_out_advantages,
    make_kl_controller,
    process_scores,
    shape_rewards,
)
from rlhfkit.errors import ConfigError

D = torch.float64


def naive_gae(rewards, values, lengths, gamma, lam):
    """Per-sequence reference: A_t = sum_l (gamma lam)^l delta_{t+l}, V = 0 after the end."""
    out_a, out_r = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist() + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            a = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            out_a[b, t] = a
            out_r[b, t] = a + v[t]
    return out_a, out_r


def test_gae_hand_worked():
    # one sequence, 2 tokens, gamma=1, lam=0.5: V=(1,2), r=(0,3)
    # delta1 = 3 + 0 - 2 = 1; delta0 = 0 + 2 - 1 = 1; A1 = 1; A0 = 1 + 0.5*1 = 1.5
    a, ret = gae(torch.tensor([[0.0, 3.0]], dtype=D), torch.tensor([[1.0, 2.0]], dtype=D),
                 torch.ones(1, 2), gamma=1.0, lam=0.5)
    torch.testing.assert_close(a, torch.tensor([[1.5, 1.0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[2.5, 3.0]], dtype=D))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_naive_loop_with_padding(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    rewards = torch.randn(4, 7, generator=g, dtype=D)
    values = torch.randn(4, 7, generator=g, dtype=D)
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).long()
    a, ret = gae(rewards, values, mask, gamma, lam)
    want_a, want_r = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(a, want_a, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(ret, want_r, rtol=1e-5, atol=1e-12)
    # padding carries nothing, whatever garbage sat there
    assert (a[mask == 0] == 0).all()


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    v = torch.tensor([[0.5, 0.1, 0.2]], dtype=D)
    a, ret = gae(r, v, torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]], dtype=D))
    torch.testing.assert_close(a, ret - v)


def test_kl_estimators_hand_worked_and_unbiasedness():
    logp = torch.tensor([math.log(0.5)], dtype=D)
    ref = torch.tensor([math.log(0.25)], dtype=D)
    log_ratio = math.log(2.0)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([log_ratio], dtype=D))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.5 * log_ratio**2], dtype=D))
    torch.testing.assert_close(kl_estimate(logp, ref, "mse"), torch.tensor([0.5 * log_ratio**2], dtype=D))
    torch.testing.assert_close(kl_estimate(logp, ref, "abs"), torch.tensor([log_ratio], dtype=D))
    # k3 = (r - 1) - log r with r = p_ref / p = 0.5
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([-0.5 + log_ratio], dtype=D))
    # k1 and k3 are unbiased: their expectation under p equals the exact KL(p || q)
    p = torch.tensor([0.6, 0.3, 0.1], dtype=D)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=D)
    exact = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):
        expect = (p * kl_estimate(p.log(), q.log(), est)).sum()
        torch.testing.assert_close(expect, exact, rtol=1e-10, atol=0)
    with pytest.raises(ConfigError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k9")


def test_shape_rewards_places_score_at_last_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], dtype=D)
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -7.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0], dtype=D)
    rewards, kl = shape_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k1")
    want_kl = torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=D)
    torch.testing.assert_close(kl, want_kl)
    want = -0.1 * want_kl
    want[0, 2] += 2.0
    want[1, 1] += -1.0
    torch.testing.assert_close(rewards, want)


def test_process_scores_order_penalty_clip_and_norms():
    s = torch.tensor([1.0, 3.0, 5.0])
    eos = torch.tensor([True, False, True])
    out = process_scores(s, eos, missing_eos_penalty=10.0, clip=4.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 4.0]))
    b = process_scores(s, eos, normalize="batch")
    torch.testing.assert_close(b.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.std(unbiased=False), torch.tensor(1.0), atol=1e-5, rtol=0)
    rm = RunningMoments()
    process_scores(torch.tensor([0.0, 2.0]), eos[:2], normalize="running", running=rm)
    process_scores(torch.tensor([4.0]), eos[:1], normalize="running", running=rm)
    # running moments equal the moments of all values seen: mean 2, population var 8/3
    assert rm.count == 3 and abs(rm.mean - 2.0) < 1e-12 and abs(rm.var - 8 / 3) < 1e-12
    with pytest.raises(ConfigError, match="normalisation"):
        process_scores(s, eos, normalize="zscore")


def test_group_advantages_grpo_and_dr_grpo():
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=D)
    a = group_advantages(s, 3, eps=0.0 + 1e-12)
    torch.testing.assert_close(a[:3], torch.tensor([-1.0, 0.0, 1.0], dtype=D))  # std of (1,2,3) is 1
    assert (a[3:] == 0).all()  # identical rewards: no signal, no NaN
    dr = group_advantages(s, 3, scale=False)
    torch.testing.assert_close(dr, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=D))
    # naive loop with the eps actually used
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, generator=g, dtype=D)
    got = group_advantages(x, 4)
    for i in range(3):
        grp = x[i * 4:(i + 1) * 4].tolist()
        mu = sum(grp) / 4
        sd = math.sqrt(sum((v - mu) ** 2 for v in grp) / 3)
        for j in range(4):
            assert abs(got[i * 4 + j].item() - (grp[j] - mu) / (sd + 1e-4)) < 1e-12
    with pytest.raises(ConfigError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_leave_one_out_matches_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, generator=g, dtype=D)
    got = leave_one_out_advantages(x, 4)
    for i in range(8):
        grp = i // 4
        others = [x[j].item() for j in range(grp * 4, grp * 4 + 4) if j != i]
        assert abs(got[i].item() - (x[i].item() - sum(others) / 3)) < 1e-12
    torch.testing.assert_close(leave_one_out_advantages(torch.tensor([1.0, 3.0]), 2), torch.tensor([-2.0, 2.0]))
    with pytest.raises(ConfigError, match="at least 2"):
        leave_one_out_advantages(x, 1)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D)
    m = torch.ones(1, 4)
    assert explained_variance(ret, ret, m) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, m) == pytest.approx(0.0)
    # V = R - (1, -1, 1, -1): var of residual 4/3, var of R 5/3 -> 1 - 0.8 = 0.2
    v = ret - torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=D)
    assert explained_variance(v, ret, m) == pytest.approx(0.2, rel=1e-9)


def test_adaptive_kl_controller_ziegler():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 9: error = clip(9/6 - 1, -.2, .2) = 0.2; beta *= 1 + 0.2 * 256/10000
    assert c.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 0.0256))
    before = c.value
    # KL 5.4: error = -0.1
    assert c.update(5.4, 1000) == pytest.approx(before * (1 - 0.1 * 0.1))
    c2 = AdaptiveKLController(1.0, 6.0, 10000)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value
    f = FixedKLController(0.05)
    assert f.update(100.0, 10) == 0.05
    assert isinstance(make_kl_controller(0.1, None), FixedKLController)
    assert isinstance(make_kl_controller(0.1, 6.0), AdaptiveKLController)
    with pytest.raises(ConfigError):
        AdaptiveKLController(0.1, 0.0, 10)
