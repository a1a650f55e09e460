"""Masked statistics against hand-worked values (float64)."""

from __future__ import annotations

import math

import torch

from rlhfkit.masked import masked_mean, masked_sum, masked_var, masked_whiten

TOL = dict(rtol=1e-6, atol=1e-12)
D = torch.float64


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


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=D)
    m = torch.tensor([[1, 1, 1, 0]])
    w = masked_whiten(x, m)
    # mean 2, unbiased var 1 -> (-1, 0, 1), padding 0
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=D), rtol=1e-6, atol=1e-7)


def test_masked_sum_and_whiten_keeping_the_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [5.0, 7.0, 99.0, 99.0]], dtype=D)
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # a float mask counts like an int one
    assert masked_sum(x, m).item() == 18.0
    torch.testing.assert_close(masked_sum(x, m, dim=1), torch.tensor([6.0, 12.0], dtype=D), **TOL)
    # entries 1, 2, 3, 5, 7: mean 3.6, unbiased var (6.76 + 2.56 + 0.36 + 1.96 + 11.56) / 4 = 5.8
    mean, var = 3.6, 5.8
    assert abs(masked_var(x, m).item() - var) < 1e-12
    w = masked_whiten(x, m, shift_mean=False)
    keep = m.bool()
    expected = (torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0], dtype=D) - mean) / math.sqrt(var + 1e-8) + mean
    torch.testing.assert_close(w[keep], expected, **TOL)
    assert torch.all(w[~keep] == 0)


def test_masked_var_of_one_entry_is_zero_unbiased():
    x = torch.tensor([4.0, 9.0], dtype=D)
    m = torch.tensor([1, 0])
    assert masked_var(x, m).item() == 0.0  # Bessel's n - 1 = 0: no spread to estimate
    assert masked_var(x, m, unbiased=False).item() == 0.0
