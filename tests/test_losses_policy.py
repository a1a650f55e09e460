import math

import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.losses.policy import (
    POLICY_LOSSES,
    entropy_bonus,
    grpo_loss,
    ppo_policy_loss,
    ptx_loss,
    rloo_loss,
    value_loss,
)

D = torch.float64


def rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def naive_surrogate(logp, old, adv, mask, eps, eps_high=None):
    """Per-token -min(rA, clip(r)A) in plain Python floats."""
    eps_high = eps if eps_high is None else eps_high
    out = [[0.0] * logp.shape[1] for _ in range(logp.shape[0])]
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t]:
                a = adv[b, t].item() if adv.dim() == 2 else adv[b].item()
                r = math.exp(logp[b, t].item() - old[b, t].item())
                out[b][t] = -min(r * a, min(max(r, 1 - eps), 1 + eps_high) * a)
    return out


def token_mean(per, mask):
    tot = sum(per[b][t] for b in range(len(per)) for t in range(len(per[0])) if mask[b, t])
    return tot / int(mask.sum())


def test_ppo_hand_worked_clipping():
    old = torch.zeros(1, 3, dtype=D)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.3]], dtype=D))
    adv = torch.tensor([[1.0, 1.0, -2.0]], dtype=D)
    loss, m = ppo_policy_loss(logp, old, adv, torch.ones(1, 3), clip_eps=0.2)
    # token 0: min(1.5, 1.2) = 1.2 (clipped); token 1: min(0.5, 0.8) = 0.5;
    # token 2: min(-2.6, -2.4) = -2.6 (a negative advantage is not clipped from below)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.6) / 3, rel=1e-12)
    assert m["clipfrac"].item() == pytest.approx(1 / 3)
    assert m["ratio_max"].item() == pytest.approx(1.5) and m["ratio_min"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_ppo_matches_naive_loop(eps_high):
    logp, old, adv = rand((3, 4), 0) * 0.3, rand((3, 4), 1) * 0.3, rand((3, 4), 2)
    loss, m = ppo_policy_loss(logp, old, adv, MASK, clip_eps=0.2, clip_eps_high=eps_high)
    want = token_mean(naive_surrogate(logp, old, adv, MASK, 0.2, eps_high), MASK)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    log_r = (logp - old)[MASK.bool()]
    assert m["approx_kl"].item() == pytest.approx((log_r.exp() - 1 - log_r).mean().item(), rel=1e-10)


def test_ratio_one_gives_plain_policy_gradient_and_no_clipping():
    logp = rand((3, 4), 3).requires_grad_()
    adv = rand((3, 4), 4)
    loss, m = ppo_policy_loss(logp, logp.detach(), adv, MASK)
    assert m["clipfrac"].item() == 0 and m["approx_kl"].item() == 0
    assert m["ratio_mean"].item() == 1.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * MASK / MASK.sum())


def test_value_loss_clipped_hand_worked():
    old = torch.tensor([[1.0, 1.0]], dtype=D)
    v = torch.tensor([[2.0, 1.1]], dtype=D)
    ret = torch.tensor([[3.0, 0.0]], dtype=D)
    loss, m = value_loss(v, old, ret, torch.ones(1, 2), clip_range=0.5)
    # token 0: max((2-3)^2, (1.5-3)^2) = 2.25; token 1: max(1.21, 1.21) = 1.21
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.21) / 2, rel=1e-12)
    assert m["value_clipfrac"].item() == pytest.approx(0.5)
    loss_nc, _ = value_loss(v, old, ret, torch.ones(1, 2), clip_range=None)
    assert loss_nc.item() == pytest.approx(0.5 * (1.0 + 1.21) / 2, rel=1e-12)


def test_entropy_bonus_and_ptx():
    ent = torch.tensor([[1.0, 3.0, 100.0]], dtype=D)
    loss, m = entropy_bonus(ent, torch.tensor([[1, 1, 0]]), coef=0.01)
    assert loss.item() == pytest.approx(-0.02) and m["entropy"].item() == pytest.approx(2.0)
    logits = torch.zeros(1, 3, 4, dtype=D)  # uniform over 4 tokens
    labels = torch.tensor([[-100, 2, 1]])
    loss, m = ptx_loss(logits, labels, coef=0.5)
    assert m["ptx_nll"].item() == pytest.approx(math.log(4)) and loss.item() == pytest.approx(0.5 * math.log(4))


@pytest.mark.parametrize("normalize", ["sequence", "token", "dr_grpo"])
def test_grpo_matches_naive_loop(normalize):
    logp, old, ref = rand((3, 4), 5) * 0.3 - 1, rand((3, 4), 6) * 0.3 - 1, rand((3, 4), 7) * 0.3 - 1
    adv = rand((3,), 8)
    beta = 0.04
    loss, m = grpo_loss(logp, old, ref, adv, MASK, clip_eps=0.2, beta=beta, normalize=normalize, max_length=6)
    per = naive_surrogate(logp, old, adv, MASK, 0.2)
    for b in range(3):
        for t in range(4):
            if MASK[b, t]:
                x = ref[b, t].item() - logp[b, t].item()
                per[b][t] += beta * (math.exp(x) - x - 1)
    if normalize == "sequence":
        want = sum(sum(per[b][t] for t in range(4) if MASK[b, t]) / int(MASK[b].sum()) for b in range(3)) / 3
    elif normalize == "token":
        want = token_mean(per, MASK)
    else:
        want = sum(sum(row) for row in per) / (3 * 6)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert m["kl"].item() > 0


def test_rloo_gradient_is_reinforce_on_policy():
    logp = rand((3, 4), 9).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    loss, _ = rloo_loss(logp, logp.detach(), adv, MASK)
    loss.backward()
    # d/dlogp of -(1/B) sum_i A_i sum_t logp_it
    torch.testing.assert_close(logp.grad, -(adv[:, None] * MASK) / 3)


def test_registry_and_bad_normalisation():
    assert set(POLICY_LOSSES) == {"ppo", "grpo", "rloo"}
    with pytest.raises(ConfigError, match="normalisation"):
        ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), normalize="x")
