"""Item 4 of issue 12: the loss conventions, each against a hand-worked float64 value."""

import math

import pytest
import torch

from rlhfkit.advantages import kl_estimate, zero_variance_share
from rlhfkit.data.preference import kto_mismatched_index
from rlhfkit.errors import ConfigError
from rlhfkit.losses.policy import StepTotals, grpo_loss, ppo_policy_loss, rloo_loss
from rlhfkit.losses.preference import kto_kl_estimate

D = torch.float64


def test_k3_keeps_its_gradient_when_the_policy_is_far_above_the_reference():
    # log r = ref - logp = -25: k3 = e^-25 - 1 + 25, dk3/dlogp = 1 - e^-25 (a two-sided clamp zeroed it)
    logp = torch.tensor([0.0], dtype=D, requires_grad=True)
    ref = torch.tensor([-25.0], dtype=D)
    k3 = kl_estimate(logp, ref, "k3")
    k3.sum().backward()
    assert k3.item() == pytest.approx(math.exp(-25) - 1 + 25, rel=1e-12)
    assert logp.grad.item() == pytest.approx(1 - math.exp(-25), rel=1e-12)
    # the overflow guard stays: log r = +30 is evaluated at 20 and stays finite
    big = kl_estimate(torch.tensor([0.0], dtype=D), torch.tensor([30.0], dtype=D), "k3")
    assert big.item() == pytest.approx(math.expm1(20) - 20, rel=1e-12)


def test_token_loss_is_the_mean_over_every_token_of_the_step():
    # ratio 1, so each token's loss is -A. Micro-batch 1: one token with A = 3; micro-batch 2: three tokens
    # with A = 1. DAPO's token mean over the step: (-3 - 1 - 1 - 1) / 4 = -1.5 (a mean of micro-batch
    # means would give (-3 + -1) / 2 = -2).
    m1, m2 = torch.tensor([[1, 0, 0]]), torch.tensor([[1, 1, 1]])
    a1, a2 = torch.full((1, 3), 3.0, dtype=D), torch.ones(1, 3, dtype=D)
    z = torch.zeros(1, 3, dtype=D)
    totals = StepTotals(num_tokens=4, num_sequences=2, max_length=3)
    l1, _ = ppo_policy_loss(z, z, a1, m1, totals=totals)
    l2, _ = ppo_policy_loss(z, z, a2, m2, totals=totals)
    assert (l1 + l2).item() == pytest.approx(-1.5, rel=1e-12)
    g1, _ = grpo_loss(z, z, None, torch.tensor([3.0], dtype=D), m1, beta=0, normalize="token", totals=totals)
    g2, _ = grpo_loss(z, z, None, torch.tensor([1.0], dtype=D), m2, beta=0, normalize="token", totals=totals)
    assert (g1 + g2).item() == pytest.approx(-1.5, rel=1e-12)
    # sequence: (-3 + -1) / 2 = -2; dr_grpo: (-3 - 3) / (2 * 3) = -1
    s1, _ = grpo_loss(z, z, None, torch.tensor([3.0], dtype=D), m1, beta=0, normalize="sequence", totals=totals)
    s2, _ = grpo_loss(z, z, None, torch.tensor([1.0], dtype=D), m2, beta=0, normalize="sequence", totals=totals)
    assert (s1 + s2).item() == pytest.approx(-2.0, rel=1e-12)
    d1, _ = grpo_loss(z, z, None, torch.tensor([3.0], dtype=D), m1, beta=0, normalize="dr_grpo", totals=totals)
    d2, _ = grpo_loss(z, z, None, torch.tensor([1.0], dtype=D), m2, beta=0, normalize="dr_grpo", totals=totals)
    assert (d1 + d2).item() == pytest.approx(-1.0, rel=1e-12)


def test_sequence_level_ratios_hand_worked():
    # one response of 2 tokens, log-ratios 0.1 and 0.3, eps 0.2
    old = torch.zeros(1, 2, dtype=D)
    logp = torch.tensor([[0.1, 0.3]], dtype=D)
    mask = torch.ones(1, 2)
    pos, neg = torch.tensor([1.0], dtype=D), torch.tensor([-1.0], dtype=D)
    # token: ratios e^0.1 = 1.10517 (unclipped) and e^0.3 -> 1.2; sequence mean of -min(rA, clip(r)A)
    tok, _ = grpo_loss(logp, old, None, pos, mask, 0.2, 0.0, "sequence", importance_sampling_level="token")
    assert tok.item() == pytest.approx(-(math.exp(0.1) + 1.2) / 2, rel=1e-12)
    # GSPO: one ratio exp(mean log-ratio) = e^0.2 = 1.2214 -> clipped to 1.2 for A > 0
    gspo, m = grpo_loss(logp, old, None, pos, mask, 0.2, 0.0, "sequence", importance_sampling_level="sequence")
    assert gspo.item() == pytest.approx(-1.2, rel=1e-12) and m["clipfrac"].item() == 1.0
    # RLOO: whole-sequence ratio e^0.4; A < 0 is not clipped from above: -min(-e^0.4, -1.2) = e^0.4
    rl, _ = rloo_loss(logp, old, neg, mask, 0.2)
    assert rl.item() == pytest.approx(math.exp(0.4), rel=1e-12)
    rl_pos, _ = rloo_loss(logp, old, pos, mask, 0.2)
    assert rl_pos.item() == pytest.approx(-1.2, rel=1e-12)


def test_sequence_ratio_gradient_at_one_is_reinforce():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0], dtype=D)
    loss, _ = rloo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    torch.testing.assert_close(logp.grad, -(adv[:, None] * mask) / 2)


def test_kto_mismatched_pairs_come_from_another_prompt():
    # rankings expanded to pairs: neighbours share a prompt; row i+1 would pair a prompt with its own completion
    assert kto_mismatched_index(["a", "a", "b", "b", "c"]) == [2, 2, 4, 4, 0]
    assert kto_mismatched_index(["a", "b"]) == [1, 0]
    with pytest.raises(ValueError, match="two different prompts"):
        kto_mismatched_index(["a", "a"])


def test_kto_reference_point_clamps_after_the_cross_process_mean():
    # this process: log-ratios -1, 0 (sum -1); the other process: 1, 2 (sum 3). Global mean 0.5.
    # Clamping per process first would give (max(-0.5, 0) + 1.5) / 2 = 0.75.
    other = torch.tensor([3.0, 2.0], dtype=D)
    z0 = kto_kl_estimate(torch.tensor([-1.0, 0.0], dtype=D), torch.zeros(2, dtype=D),
                         all_reduce_sum=lambda t: t + other)
    assert z0.item() == pytest.approx(0.5, rel=1e-12)
    assert kto_kl_estimate(torch.tensor([-1.0, 0.0], dtype=D), torch.zeros(2, dtype=D)).item() == 0.0


def test_group_of_one_is_a_config_error_and_zero_variance_share():
    from rlhfkit.recipes import grpo

    with pytest.raises(ConfigError, match="num_generations.*at least 2"):
        grpo.Config(model="m", reward=["math"], num_generations=1)
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5], dtype=D)
    assert zero_variance_share(r, 2) == pytest.approx(2 / 3)
