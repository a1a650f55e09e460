"""Log-prob helpers and masked reductions against hand-worked values and naive loops (float64)."""

from __future__ import annotations

import math

import torch

from rlhfkit.logprobs import (
    entropy_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    sequence_logprobs,
    shifted_logprobs,
    token_logprobs,
)

TOL = dict(rtol=1e-6, atol=1e-12)


def test_token_logprobs_hand_worked():
    # logits [0, ln 2, ln 3] -> softmax [1/6, 2/6, 3/6]
    logits = torch.tensor([[0.0, math.log(2), math.log(3)]], dtype=torch.float64)
    got = token_logprobs(logits, torch.tensor([2]))
    torch.testing.assert_close(got, torch.tensor([math.log(0.5)], dtype=torch.float64), **TOL)
    # temperature 2 halves the logits: softmax of [0, ln2/2, ln3/2] = [1, sqrt2, sqrt3]/sum
    z = 1 + math.sqrt(2) + math.sqrt(3)
    got_t = token_logprobs(logits, torch.tensor([1]), temperature=2.0)
    torch.testing.assert_close(got_t, torch.tensor([math.log(math.sqrt(2) / z)], dtype=torch.float64), **TOL)


def test_token_logprobs_matches_naive_loop_and_ignores_minus_100():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[1, 2] = -100
    got = token_logprobs(logits, labels, temperature=0.7)
    for b in range(3):
        for t in range(5):
            if labels[b, t] == -100:
                assert got[b, t] == 0
                continue
            row = logits[b, t] / 0.7
            expected = row[labels[b, t]] - math.log(sum(math.exp(v) for v in row.tolist()))
            assert abs(got[b, t].item() - expected) < 1e-12


def test_shifted_and_sequence_logprobs_align_next_token():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 6, (2, 4), generator=g)
    shifted = shifted_logprobs(logits, ids)
    assert shifted.shape == (2, 3)
    manual = torch.log_softmax(logits[0, 1], -1)[ids[0, 2]]
    torch.testing.assert_close(shifted[0, 1], manual, **TOL)
    labels = ids.clone()
    labels[:, :2] = -100  # prompt of two tokens
    seq = sequence_logprobs(logits, labels)
    torch.testing.assert_close(seq, shifted[:, 1:].sum(-1), **TOL)
    torch.testing.assert_close(sequence_logprobs(logits, labels, average=True), shifted[:, 1:].mean(-1), **TOL)


def test_entropy_uniform_and_peaked():
    uniform = torch.zeros(1, 8, dtype=torch.float64)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.tensor([math.log(8)], dtype=torch.float64), **TOL)
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    expected = -(p * p.log()).sum()
    torch.testing.assert_close(entropy_from_logits(p.log().unsqueeze(0))[0], expected, **TOL)


def test_masked_reductions_hand_worked():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(x, m).item() == 2.5
    # unbiased variance of [1,2,3,4] = 5/3
    assert abs(masked_var(x, m).item() - 5 / 3) < 1e-12
    assert abs(masked_var(x, m, unbiased=False).item() - 1.25) < 1e-12
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.5, 3.5], dtype=torch.float64), **TOL)
    w = masked_whiten(x, m)
    assert w[0, 2] == 0 and w[1, 2] == 0
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = (vals - 2.5) / math.sqrt(5 / 3 + 1e-8)
    torch.testing.assert_close(w[m.bool()], expected, **TOL)


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    x = torch.ones(2, 3)
    m = torch.zeros(2, 3)
    assert masked_mean(x, m).item() == 0.0
    assert masked_var(x, m).item() == 0.0
