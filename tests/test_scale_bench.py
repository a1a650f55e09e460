"""The equal-work rule of the speed benchmarks and the GPU benchmarks' behaviour without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks.common import losses_agree, paired_comparison

ROOT = Path(__file__).resolve().parent.parent


def _runs(seconds, first, last=1.0):
    return [{"seconds": s, "loss_first": first, "loss_last": last} for s in seconds]


def test_ratio_is_the_median_of_paired_ratios():
    ours, peer = _runs([1.0, 2.0, 1.0], 3.0), _runs([2.0, 3.0, 4.0], 3.0 * (1 + 5e-5))
    out = paired_comparison(ours, peer, work=100)
    # pairs 2.0, 1.5, 4.0: median 2.0 (the ratio of medians would be 3.0 / 1.0 = 3.0)
    assert out["comparable"] and out["ratio"] == 2.0 and out["ratio_runs"] == [2.0, 1.5, 4.0]
    assert out["ratio_spread"] == [1.5, 4.0]
    assert out["loss_first"] == {"ours": 3.0, "peer": 3.0 * (1 + 5e-5)}
    assert out["ours_side"]["per_second"] == 100.0


def test_no_ratio_when_first_losses_differ():
    out = paired_comparison(_runs([1.0], 3.0), _runs([2.0], 3.0 * (1 + 2e-4)))
    assert out["ratio"] is None and not out["comparable"]
    assert "did not do the same computation" in out["not_compared_because"]
    assert losses_agree(1.0, None)[0] is False
    assert losses_agree(float("nan"), 1.0)[0] is False
    assert paired_comparison(_runs([1.0], 3.0), [])["not_compared_because"] == "the peer library is not installed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("name", ["gpu_rollout", "gpu_train", "gpu_memory"])
def test_gpu_benchmarks_say_no_cuda_and_exit_0(name, tmp_path):
    result = ROOT / "benchmarks" / "results" / f"{name}.json"
    existed = result.exists()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", name], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert result.exists() == existed  # no figure written
