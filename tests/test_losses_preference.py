"""DPO-family losses: hand-worked values, a naive float64 loop, and the properties each paper states."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.losses.preference import (
    PREFERENCE_LOSSES,
    cdpo_loss,
    compute_preference_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    needs_reference,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)

RTOL = 1e-6


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def softplus_neg(x):  # -log sigma(x)
    return math.log1p(math.exp(-x))


# one pair: chosen ratio +0.5, rejected ratio -0.5, so h = 1; beta = 0.5 -> beta*h = 0.5
ONE = dict(chosen_logps=t(-1.0), rejected_logps=t(-2.0), ref_chosen_logps=t(-1.5), ref_rejected_logps=t(-1.5))


def test_dpo_hand_value():
    loss, m = dpo_loss(**ONE, beta=0.5)
    # -log sigma(0.5) = log(1 + e^-0.5) = log(1.6065306597126334)
    assert loss.item() == pytest.approx(0.4740769841801067, rel=RTOL)
    assert m["rewards/chosen"].item() == pytest.approx(0.25, rel=RTOL)
    assert m["rewards/rejected"].item() == pytest.approx(-0.25, rel=RTOL)
    assert m["rewards/margins"].item() == pytest.approx(0.5, rel=RTOL)
    assert m["rewards/accuracy"].item() == 1.0


def test_ipo_hand_value_and_minimum():
    assert ipo_loss(**ONE, beta=0.5)[0].item() == pytest.approx(0.0, abs=1e-12)  # h = 1 = 1/(2*0.5)
    # h = 3, beta = 0.5: (3 - 1)^2 = 4
    loss = ipo_loss(t(0.0), t(-3.0), t(0.0), t(0.0), beta=0.5)[0]
    assert loss.item() == pytest.approx(4.0, rel=RTOL)
    # the minimum sits at h = 1/(2 beta): zero gradient there, opposite signs either side
    beta = 0.2
    for h, sign in ((1 / (2 * beta), 0), (1 / (2 * beta) - 0.3, -1), (1 / (2 * beta) + 0.3, 1)):
        pc = torch.tensor([h], dtype=torch.float64, requires_grad=True)
        ipo_loss(pc, t(0.0), t(0.0), t(0.0), beta=beta)[0].backward()
        g = pc.grad.item()
        assert (g == pytest.approx(0.0, abs=1e-12)) if sign == 0 else (math.copysign(1, g) == sign)


def test_hinge_hand_value():
    assert hinge_loss(**ONE, beta=0.5)[0].item() == pytest.approx(0.5, rel=RTOL)  # max(0, 1 - 0.5)
    # beyond the margin: beta*h = 1.5 -> 0 and no gradient
    pc = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    loss = hinge_loss(pc, t(0.0), t(0.0), t(0.0), beta=0.5)[0]
    loss.backward()
    assert loss.item() == 0.0 and pc.grad.item() == 0.0


def test_cdpo_and_rdpo_are_different_formulas():
    eps = 0.1
    cdpo = cdpo_loss(**ONE, beta=0.5, label_smoothing=eps)[0].item()
    rdpo = robust_dpo_loss(**ONE, beta=0.5, label_smoothing=eps)[0].item()
    # cDPO: 0.9 * (-log s(0.5)) + 0.1 * (-log s(-0.5)) with -log s(-0.5) = 0.5 + 0.4740769841801067
    assert cdpo == pytest.approx(0.9 * 0.4740769841801067 + 0.1 * 0.9740769841801067, rel=RTOL)
    # rDPO: (0.9 * 0.47407698 - 0.1 * 0.97407698) / 0.8; since l(-z) - l(z) = z this is
    # l(0.5) - eps/(1-2eps) * 0.5 = 0.4740769841801067 - 0.0625
    assert rdpo == pytest.approx(0.4115769841801067, rel=RTOL)
    assert abs(cdpo - rdpo) > 0.1
    # eps = 0 gives plain DPO for both
    dpo = dpo_loss(**ONE, beta=0.5)[0].item()
    assert cdpo_loss(**ONE, beta=0.5, label_smoothing=0.0)[0].item() == pytest.approx(dpo, rel=RTOL)
    assert robust_dpo_loss(**ONE, beta=0.5, label_smoothing=0.0)[0].item() == pytest.approx(dpo, rel=RTOL)


def test_rdpo_is_unbiased_under_label_flips():
    """Chowdhury et al. 2024: E_noise[rDPO(observed label)] = clean DPO loss."""
    eps, beta = 0.2, 0.7
    pc, pr, rc, rr = t(-1.3, -2.0, -0.1), t(-1.9, -1.1, -0.9), t(-1.0, -1.5, -0.5), t(-1.2, -1.4, -0.8)
    kept = robust_dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0]
    flipped = robust_dpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps)[0]
    clean = dpo_loss(pc, pr, rc, rr, beta=beta)[0]
    assert ((1 - eps) * kept + eps * flipped).item() == pytest.approx(clean.item(), rel=1e-10)
    # cDPO is not unbiased: since l(-z) = l(z) + z its expectation is l(h) + 2 eps (1 - eps) beta mean(h)
    kept_c = cdpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0]
    flipped_c = cdpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps)[0]
    mean_h = (0.4 - 0.8 + 0.5) / 3
    biased = clean.item() + 2 * eps * (1 - eps) * beta * mean_h
    assert ((1 - eps) * kept_c + eps * flipped_c).item() == pytest.approx(biased, rel=1e-10)
    assert abs(biased - clean.item()) > 1e-3


def test_cdpo_has_finite_minimum():
    eps, beta = 0.1, 0.5
    h_star = math.log((1 - eps) / eps) / beta
    pc = torch.tensor([h_star], dtype=torch.float64, requires_grad=True)
    cdpo_loss(pc, t(0.0), t(0.0), t(0.0), beta=beta, label_smoothing=eps)[0].backward()
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fn", [cdpo_loss, robust_dpo_loss])
def test_label_noise_out_of_range(fn):
    with pytest.raises(ValueError, match="label_smoothing"):
        fn(**ONE, label_smoothing=0.5)


def test_simpo_hand_value_and_no_reference():
    # rewards: 2 * -4/2 = -4 and 2 * -9/3 = -6; -log sigma(2 - 0.5)
    loss, m = simpo_loss(t(-4.0), t(-9.0), t(2.0), t(3.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(0.20141327798275246, rel=RTOL)
    assert m["rewards/chosen"].item() == pytest.approx(-4.0) and m["rewards/margins"].item() == pytest.approx(2.0)
    assert not needs_reference("simpo") and not needs_reference("orpo")
    assert needs_reference("sigmoid") and needs_reference("kto")
    # reference log-probs offered by the caller are ignored: same value whatever they are
    base = dict(chosen_logps=t(-4.0), rejected_logps=t(-9.0), chosen_lengths=t(2.0), rejected_lengths=t(3.0),
                beta=2.0, gamma=0.5)
    a = compute_preference_loss("simpo", **base, ref_chosen_logps=t(-100.0), ref_rejected_logps=t(5.0))[0]
    assert a.item() == pytest.approx(loss.item(), rel=1e-12)
    # length normalisation: doubling a response's length and its summed log-prob changes nothing
    b = simpo_loss(t(-8.0), t(-9.0), t(4.0), t(3.0), beta=2.0, gamma=0.5)[0]
    assert b.item() == pytest.approx(loss.item(), rel=1e-12)


def test_orpo_hand_value():
    # chosen mean log-prob -0.5, rejected -1.0
    loss, m = orpo_loss(t(-2.0), t(-3.0), t(4.0), t(3.0), beta=0.1)
    log_odds_c = -0.5 - math.log(1 - math.exp(-0.5))
    log_odds_r = -1.0 - math.log(1 - math.exp(-1.0))
    expected = 0.5 + 0.1 * softplus_neg(log_odds_c - log_odds_r)
    assert loss.item() == pytest.approx(expected, rel=RTOL)
    assert m["orpo/log_odds_ratio"].item() == pytest.approx(log_odds_c - log_odds_r, rel=RTOL)
    assert m["orpo/nll"].item() == pytest.approx(0.5, rel=RTOL)


def test_kto_hand_values():
    logps, ref, labels = t(-1.0, -2.0), t(-1.5, -1.5), torch.tensor([True, False])
    # r = [0.5, -0.5], beta 0.5, z0 = 0: both values sigma(0.25)
    loss, m = kto_loss(logps, ref, labels, beta=0.5)
    assert loss.item() == pytest.approx(1 - sig(0.25), rel=RTOL)
    assert m["rewards/chosen"].item() == pytest.approx(0.25) and m["rewards/rejected"].item() == pytest.approx(-0.25)
    # KL reference point from mismatched pairs: mean(0.4, 0.2) = 0.3
    loss, m = kto_loss(logps, ref, labels, kl_logps=t(-1.0, -1.0), ref_kl_logps=t(-1.4, -1.2), beta=0.5)
    assert m["kto/kl"].item() == pytest.approx(0.3, rel=RTOL)
    assert loss.item() == pytest.approx(((1 - sig(0.1)) + (1 - sig(0.4))) / 2, rel=RTOL)
    # the estimate is clamped at 0 and carries no gradient
    kl = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    z = kto_kl_estimate(kl, t(0.0))
    assert z.item() == 0.0 and not z.requires_grad
    # weights
    loss_w = kto_loss(logps, ref, labels, beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)[0]
    assert loss_w.item() == pytest.approx((2 * (1 - sig(0.25)) + (1 - sig(0.25))) / 2, rel=RTOL)


def test_kto_only_desirable():
    logps = torch.tensor([-1.0, -3.0], dtype=torch.float64, requires_grad=True)
    loss, m = kto_loss(logps, t(-1.2, -2.0), torch.tensor([True, True]), beta=0.3)
    assert loss.item() == pytest.approx(((1 - sig(0.3 * 0.2)) + (1 - sig(0.3 * -1.0))) / 2, rel=RTOL)
    assert math.isnan(m["rewards/rejected"].item())
    loss.backward()
    assert (logps.grad < 0).all()  # descent raises every desirable log-prob


def test_dpo_gradient_direction_and_weight():
    """Rafailov et al. Eq. 8: dL/dlog pi(y_w) = -beta sigma(-beta h) / B; rejected gets the opposite."""
    for beta in (0.01, 0.1, 1.0, 5.0):
        pc = torch.tensor([-1.0, -4.0], dtype=torch.float64, requires_grad=True)
        pr = torch.tensor([-2.0, -1.0], dtype=torch.float64, requires_grad=True)
        rc, rr = t(-1.5, -3.0), t(-1.5, -1.5)
        dpo_loss(pc, pr, rc, rr, beta=beta)[0].backward()
        h = ((pc - rc) - (pr - rr)).detach()
        expected = -beta * torch.sigmoid(-beta * h) / 2
        torch.testing.assert_close(pc.grad, expected, rtol=1e-10, atol=0)
        torch.testing.assert_close(pr.grad, -expected, rtol=1e-10, atol=0)
        assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # small beta: the loss tends to log 2 whatever the log-probs
    assert dpo_loss(t(-1.0, -9.0), t(-7.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=1e-9)[0].item() == pytest.approx(math.log(2), rel=1e-6)


# --------------------------------------------------------------------------------------------
# naive float64 loops, one element at a time with the math module


def naive_pairs(name, pc, pr, rc, rr, lc, lr, beta, eps=0.1, gamma=0.5):
    out = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if name == "sigmoid":
            out.append(softplus_neg(beta * h))
        elif name == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        elif name == "hinge":
            out.append(max(0.0, 1 - beta * h))
        elif name == "cdpo":
            out.append((1 - eps) * softplus_neg(beta * h) + eps * softplus_neg(-beta * h))
        elif name == "robust":
            out.append(((1 - eps) * softplus_neg(beta * h) - eps * softplus_neg(-beta * h)) / (1 - 2 * eps))
        elif name == "simpo":
            out.append(softplus_neg(beta * pc[i] / lc[i] - beta * pr[i] / lr[i] - gamma))
        elif name == "orpo":
            a, b = pc[i] / lc[i], pr[i] / lr[i]
            lo = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
            out.append(-a + beta * softplus_neg(lo))
    return sum(out) / len(out)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "cdpo", "robust", "simpo", "orpo"])
def test_paired_losses_match_naive_loop(name):
    g = torch.Generator().manual_seed(7)
    n = 33
    lc = torch.randint(1, 40, (n,), generator=g).double()
    lr = torch.randint(1, 40, (n,), generator=g).double()
    pc = -torch.rand(n, generator=g, dtype=torch.float64) * 3 * lc
    pr = -torch.rand(n, generator=g, dtype=torch.float64) * 3 * lr
    rc = pc + torch.randn(n, generator=g, dtype=torch.float64)
    rr = pr + torch.randn(n, generator=g, dtype=torch.float64)
    beta = 0.3
    inputs = dict(chosen_logps=pc, rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
                  chosen_lengths=lc, rejected_lengths=lr, beta=beta, label_smoothing=0.1, gamma=0.5)
    loss, metrics = compute_preference_loss(name, **inputs)
    expected = naive_pairs(name, pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), lc.tolist(), lr.tolist(), beta)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert 0.0 <= metrics["rewards/accuracy"].item() <= 1.0


def test_kto_matches_naive_loop():
    g = torch.Generator().manual_seed(3)
    n = 17
    logps = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    ref = logps + torch.randn(n, generator=g, dtype=torch.float64)
    klp = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    klr = klp - torch.rand(n, generator=g, dtype=torch.float64)  # policy above ref: positive KL
    labels = torch.rand(n, generator=g) > 0.4
    beta, wd, wu = 0.2, 1.0, 1.33
    loss = kto_loss(logps, ref, labels, kl_logps=klp, ref_kl_logps=klr, beta=beta,
                    desirable_weight=wd, undesirable_weight=wu)[0]
    z0 = max(0.0, sum(a - b for a, b in zip(klp.tolist(), klr.tolist())) / n)
    total = 0.0
    for lp, rf, lab in zip(logps.tolist(), ref.tolist(), labels.tolist()):
        r = lp - rf
        total += wd * (1 - sig(beta * (r - z0))) if lab else wu * (1 - sig(beta * (z0 - r)))
    assert loss.item() == pytest.approx(total / n, rel=1e-9)


def test_registry_and_dispatch_errors():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "hinge", "cdpo", "robust", "simpo", "orpo", "kto"}
    with pytest.raises(KeyError, match="unknown preference loss"):
        compute_preference_loss("nope", chosen_logps=t(0.0))
    with pytest.raises(TypeError, match="ref_chosen_logps"):
        compute_preference_loss("sigmoid", chosen_logps=t(0.0), rejected_logps=t(0.0), ref_rejected_logps=t(0.0))
    with pytest.raises(ValueError, match="lengths"):
        simpo_loss(t(-1.0), t(-1.0), t(0.0), t(1.0))


def test_float32_close_to_float64():
    inputs64 = dict(chosen_logps=t(-12.5, -30.0), rejected_logps=t(-14.0, -29.0),
                    ref_chosen_logps=t(-13.0, -31.0), ref_rejected_logps=t(-13.5, -28.0))
    inputs32 = {k: v.float() for k, v in inputs64.items()}
    for name in ("sigmoid", "ipo", "hinge", "robust"):
        a = PREFERENCE_LOSSES[name](**inputs64)[0].item()
        b = PREFERENCE_LOSSES[name](**inputs32)[0].item()
        assert b == pytest.approx(a, rel=1e-5)
