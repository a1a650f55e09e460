"""The base_quality benchmark's statistics, against hand-worked values."""

import numpy as np
import pytest
from benchmarks.base_quality import clear_pairs_ordered_by, q1_share


def test_clear_pairs_ordered_by_hand_worked():
    # two prompts, three samples each -> pairs (0,1), (0,2), (1,2) per prompt
    gold = [0.5, 0.1, 0.45,   -0.2, -0.2, 0.3]
    sentiment = [0.6, 0.2, 0.7,   0.0, 0.1, 0.2]
    quality = [1.0, 1.0, 0.5,   1.0, 0.5, 1.0]
    out = clear_pairs_ordered_by(gold, sentiment, quality, groups=2)
    # clear pairs (|gold diff| >= 0.1): p0 (0,1) +0.4, p0 (1,2) -0.35, p1 (0,2) -0.5, p1 (1,2) -0.5;
    # p0 (0,2) differs by 0.05 and p1 (0,1) by 0: not clear
    # sentiment signs: +0.4 ok, -0.5 ok, -0.2 ok, -0.1 ok -> 4/4
    # quality signs: 0 (no order), +0.5 against gold -0.35 (wrong), 0, -0.5 ok -> 1/4; q differs in 2/4
    assert out == {"clear_pairs": 4, "gold_gap": 0.1, "sentiment": 1.0, "quality": 0.25, "quality_differs": 0.5}
    assert clear_pairs_ordered_by([0.0, 0.05], [0, 0], [1, 1], groups=1) == {"clear_pairs": 0}


def test_q1_share_counts_prompts_and_refuses_ragged_input():
    out = q1_share(np.array([1.0, 0.5, 1.0, 1.0]), groups=2, n_boot=200)
    assert out["share"] == 0.75 and out["samples_per_prompt"] == 2 and out["lo"] <= 0.75 <= out["hi"]
    with pytest.raises(ValueError, match="do not split"):
        q1_share(np.ones(5), groups=2)
