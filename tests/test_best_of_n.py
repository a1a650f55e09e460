"""best-of-n and rejection sampling: selection, the KL bound vs the measured KL, end-to-end runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlhfkit.models import load_tokenizer, save_model, tiny_llama, tiny_reward_model
from rlhfkit.recipes import best_of_n as bon
from rlhfkit.recipes import rejection_sampling as rs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tok = load_tokenizer("kindly:tokenizer")
    root = tmp_path_factory.mktemp("bon")
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok, seed=2),
               tok, root / "policy")
    save_model(tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer=tok, seed=3),
               tok, root / "rm")
    return root


def test_kl_bound_values():
    assert bon.bon_kl_bound(1) == 0.0
    assert bon.bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5, rel=1e-12)
    assert bon.bon_kl_bound(16) == pytest.approx(math.log(16) - 15 / 16, rel=1e-12)


def test_empirical_kl_hand_value_and_limits():
    # two levels of equal mass, n = 2: p = (1/4, 3/4), q = (1/2, 1/2)
    kl = bon.bon_kl_empirical(np.array([[0.0, 1.0, 0.0, 1.0]]), 2)
    assert kl[0] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)
    # all samples identical: best-of-n is pi itself
    assert bon.bon_kl_empirical(np.zeros((3, 10)), 8) == pytest.approx(np.zeros(3), abs=1e-12)
    # distinct continuous scores and a large pool: the analytic value (it is exact there)
    scores = np.random.default_rng(0).normal(size=(20, 2048))
    for n in (2, 8, 32):
        assert bon.bon_kl_empirical(scores, n).mean() == pytest.approx(bon.bon_kl_bound(n), rel=2e-3)
    # ties only lower it: the bound is an upper bound
    tied = np.round(scores, 0)
    for n in (2, 8, 32):
        assert bon.bon_kl_empirical(tied, n).mean() < 0.95 * bon.bon_kl_bound(n)


def test_naive_loop_matches_empirical_kl():
    """Enumerate every ordered n-tuple of a 4-sample pool and count which sample wins (first on ties within a level)."""
    import itertools

    pool = np.array([0.3, 0.1, 0.3, 0.7])
    n = 3
    M = len(pool)
    wins = np.zeros(M)
    for tup in itertools.product(range(M), repeat=n):
        best = max(pool[i] for i in tup)
        winners = [i for i in tup if pool[i] == best]
        for w in winners:  # within a level every drawn copy is equally likely
            wins[w] += 1 / len(winners)
    p_sample = wins / M ** n
    kl = sum(p * math.log(p / (1 / M)) for p in p_sample if p > 0)
    # the level formula merges equal scores; merging cannot change the value here because
    # within a level best-of-n picks in proportion to pi
    assert bon.bon_kl_empirical(pool[None, :], n)[0] == pytest.approx(kl, rel=1e-10)


def test_select_best_ties_and_nan():
    assert bon.select_best(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="NaN"):
        bon.select_best(np.array([[1.0, float("nan")]]))


def test_best_of_n_end_to_end_with_reward_model(tmp_path, base):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The food was\nMy neighbour is\nToday I\n")
    cfg = bon.Config(model=str(base / "policy"), judge=f"rm:{base / 'rm'}", prompts=str(prompts), n=4, kl_pool=8,
                     max_new_tokens=6, output_dir=str(tmp_path / "out"))
    res = bon.main(cfg)
    rows = [json.loads(x) for x in (tmp_path / "out" / "selected.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["n"] == 4 and 0 <= r["index"] < 4 for r in rows)
    assert res["score_selected"] >= res["score_mean_all"]
    assert res["kl_bound"] == pytest.approx(math.log(4) - 0.75)
    assert 0 <= res["kl_measured"] <= res["kl_bound"] + 0.05
    # the selected response really is the judge's best: re-score it
    from rlhfkit.models.reward import RewardScorer

    again = RewardScorer(str(base / "rm")).score([r["prompt"] for r in rows], [r["response"] for r in rows])
    np.testing.assert_allclose(again, [r["score"] for r in rows], rtol=1e-4, atol=1e-5)
    assert all(r["score"] >= r["mean_score"] - 1e-9 for r in rows)
    assert "gold_selected" not in res  # a user's prompts: the bundled gold panel is not brought in unasked


def test_select_top_and_examples():
    scores = np.array([[0.1, 0.9, 0.5], [0.2, 0.2, -1.0]])
    assert rs.select_top(scores, 2) == [(0, 1), (0, 2), (1, 0), (1, 1)]
    assert rs.select_top(scores, 1, min_score=0.3) == [(0, 1)]
    with pytest.raises(ValueError, match="NaN"):
        rs.select_top(np.array([[float("nan")]]), 1)
    parts = rs.round_prompts([str(i) for i in range(10)], 0, 4, 0) + rs.round_prompts([str(i) for i in range(10)], 1, 4, 0)
    assert len(set(parts)) == 8  # consecutive rounds take different prompts


def test_rejection_sampling_rounds_and_resume(tmp_path, base):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Prompt number {i} says\n" for i in range(8)))
    args = dict(model=str(base / "policy"), judge="gold", prompts=str(prompts), rounds=2, k=3, prompts_per_round=8,
                max_new_tokens=6, per_device_train_batch_size=4, output_dir=str(tmp_path / "rs"), progress=False,
                report_to="jsonl", learning_rate=1e-3)
    res = rs.main(rs.Config(**args))
    assert [r["round"] for r in res["rounds"]] == [0, 1]
    for r in res["rounds"]:
        assert r["kept"] == 8 and r["score_kept"] >= r["score_mean"] and r["sft_steps"] == 2
    kept = [json.loads(x) for x in (tmp_path / "rs" / "round-0" / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 8
    # resume: finished rounds are not redone
    res2 = rs.main(rs.Config(**{**args, "rounds": 3, "resume": True}))
    assert res2["rounds"][:2] == res["rounds"] and res2["rounds"][2]["round"] == 2
