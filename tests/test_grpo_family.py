"""GRPO-family options: CISPO, REINFORCE++-baseline, DAPO's overlong punishment and dynamic
sampling, each against a hand computation and a naive loop in float64, and a recipe run."""

import json
import math

import numpy as np
import pytest
import torch

from rl_helpers import save_tiny, tiny_policy, tiny_rm, tiny_tokenizer
from rlhfkit.advantages import (
    ADVANTAGE_ESTIMATORS,
    overlong_penalty,
    reinforce_pp_baseline_advantages,
)
from rlhfkit.errors import ConfigError
from rlhfkit.judges.rewards import RewardScores
from rlhfkit.losses.policy import POLICY_OBJECTIVES, grpo_loss
from rlhfkit.recipes.group_sampling import Round, dynamic_sampling
from rlhfkit.rollout import Rollout
from rlhfkit.train.runs import read_metrics

D = torch.float64
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# ---------------------------------------------------------------------------------------------
# CISPO (MiniMax-M1 eq. 4-5)


def test_cispo_hand_worked_value_and_gradient():
    old = torch.zeros(1, 3, dtype=D)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]], dtype=D)).requires_grad_()
    adv = torch.tensor([2.0], dtype=D)
    loss, m = grpo_loss(logp, old, None, adv, torch.ones(1, 3), clip_eps=0.2, beta=0.0, normalize="token",
                        objective="cispo")
    # weights sg(min(r, 1.2)): 1.2, 0.5, 1.1 (no lower bound); loss = -mean_t w_t A log pi_t
    w = [1.2, 0.5, 1.1]
    lp = [math.log(1.5), math.log(0.5), math.log(1.1)]
    assert loss.item() == pytest.approx(-sum(wi * 2.0 * li for wi, li in zip(w, lp)) / 3, rel=1e-12)
    loss.backward()
    # stop-gradient: d/dlogp_t = -w_t A / 3 on every token, the clipped one included (PPO gives it 0)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.2 * 2 / 3, -0.5 * 2 / 3, -1.1 * 2 / 3]], dtype=D),
                               rtol=1e-12, atol=0)
    assert m["clipfrac"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_cispo_matches_naive_loop(eps_high):
    logp, old, adv = rand((3, 4), 0) * 0.3 - 1, rand((3, 4), 1) * 0.3 - 1, rand((3,), 2)
    loss, _ = grpo_loss(logp, old, None, adv, MASK, clip_eps=0.2, beta=0.0, normalize="token",
                        clip_eps_high=eps_high, objective="cispo")
    high = 0.2 if eps_high is None else eps_high
    tot, n = 0.0, 0
    for b in range(3):
        for t in range(4):
            if MASK[b, t]:
                r = math.exp(logp[b, t].item() - old[b, t].item())
                tot += -min(r, 1 + high) * adv[b].item() * logp[b, t].item()
                n += 1
    assert loss.item() == pytest.approx(tot / n, rel=1e-12)


def test_cispo_is_a_loss_type_alias_and_objectives_are_a_dict():
    from rlhfkit.recipes import grpo

    cfg = grpo.Config(model="x", loss_type="cispo")
    assert cfg.objective == "cispo" and cfg.loss_type == "token"
    assert set(POLICY_OBJECTIVES) == {"clip", "cispo"}
    with pytest.raises(ConfigError, match="objective"):
        grpo.Config(model="x", objective="nope")


# ---------------------------------------------------------------------------------------------
# REINFORCE++-baseline (Hu et al. 2025)


def test_reinforce_pp_hand_worked():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0], dtype=D)
    # group-centred: (2/3, -1/3, -1/3), (-4/3, 5/3, -1/3); batch mean 0, population var
    c = [2 / 3, -1 / 3, -1 / 3, -4 / 3, 5 / 3, -1 / 3]
    var = sum(x * x for x in c) / 6
    want = torch.tensor([x / math.sqrt(var) for x in c], dtype=D)
    torch.testing.assert_close(reinforce_pp_baseline_advantages(r, 3), want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["reinforce_pp"](r, 3, False), torch.tensor(c, dtype=D),
                               rtol=1e-12, atol=1e-15)


def test_reinforce_pp_matches_naive_loop():
    r = rand((12,), 3)
    G = 4
    centred = []
    for g in range(3):
        grp = [r[g * G + i].item() for i in range(G)]
        centred += [x - sum(grp) / G for x in grp]
    mean = sum(centred) / len(centred)
    std = math.sqrt(sum((x - mean) ** 2 for x in centred) / len(centred))
    want = torch.tensor([(x - mean) / std for x in centred], dtype=D)
    torch.testing.assert_close(reinforce_pp_baseline_advantages(r, G), want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# DAPO: soft overlong punishment (eq. 13) and dynamic sampling (eq. 11)


def test_overlong_penalty_hand_worked():
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    # L_max 20, L_cache 4: free up to 16, then (16 - |y|) / 4, -1 at 20 and beyond
    want = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4), want, rtol=0, atol=0)
    torch.testing.assert_close(overlong_penalty(lengths.double(), 20, 4, factor=0.5), want.double() * 0.5)
    with pytest.raises(ConfigError, match="overlong buffer"):
        overlong_penalty(lengths, 20, 0)


def _round(totals, tag: str, G: int = 2) -> Round:
    n = len(totals)
    roll = Rollout(prompts=[f"{tag}{i // G}" for i in range(n)], responses=[f"{tag}r{i}" for i in range(n)],
                   query_ids=torch.ones(n, 2, dtype=torch.long), query_mask=torch.ones(n, 2, dtype=torch.long),
                   response_ids=torch.full((n, 3), 5), response_mask=torch.ones(n, 3, dtype=torch.long),
                   ended_with_eos=torch.ones(n, dtype=torch.bool), prompt_index=torch.arange(n) // G,
                   sampler_logp=torch.full((n, 3), -1.0))
    scored = RewardScores(["r"], {"r": list(totals)}, np.asarray(totals, dtype=np.float64))
    return Round(roll, list(roll.prompts), {"answer": [f"{tag}a{i}" for i in range(n)]}, list(roll.responses), scored,
                 np.asarray(totals, dtype=np.float64))


def test_dynamic_sampling_drops_flat_groups_and_fills_the_batch():
    first = _round([1, 1, 0, 1, 0, 0], "a")  # groups: flat, varies, flat
    more = {1: _round([1, 1, 1, 0, 0, 1], "b"), 2: _round([0, 1, 0, 0, 1, 1], "c")}
    batch, stats = dynamic_sampling(first, more.__getitem__, 2, max_rounds=3, pad_id=0)
    # kept: a/g1, b/g1, b/g2 -> full after one extra round
    assert batch.rollout.responses == ["ar2", "ar3", "br2", "br3", "br4", "br5"]
    assert batch.scored.total.tolist() == [0, 1, 1, 0, 0, 1] and batch.eval_scores.tolist() == [0, 1, 1, 0, 0, 1]
    assert batch.columns["answer"] == ["aa2", "aa3", "ba2", "ba3", "ba4", "ba5"]
    assert stats == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/dropped_groups": 3.0,
                     "dynamic_sampling/filled_groups": 0.0}


def test_dynamic_sampling_cap_fills_with_dropped_groups():
    first = _round([1, 1, 0, 1, 0, 0], "a")
    batch, stats = dynamic_sampling(first, lambda r: _round([1, 1, 0, 0, 1, 1], "z"), 2, max_rounds=1, pad_id=0)
    assert batch.rollout.responses == ["ar2", "ar3", "ar0", "ar1", "ar4", "ar5"]
    assert stats["dynamic_sampling/rounds"] == 2.0 and stats["dynamic_sampling/filled_groups"] == 2.0
    assert batch.rollout.sampler_logp.shape == (6, 3)


# ---------------------------------------------------------------------------------------------
# the recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_family")
    tok = tiny_tokenizer()
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["the cat sat", "a kind word", "the rain fell", "she smiled and", "bad news"]))
    return {"policy": save_tiny(root / "policy", tiny_policy(tok), tok), "rm": save_tiny(root / "rm", tiny_rm(tok), tok),
            "prompts": str(prompts)}


def test_grpo_with_every_dapo_option_cispo_and_reinforce_pp(assets, tmp_path):
    from rlhfkit.recipes import grpo

    cfg = grpo.Config(model=assets["policy"], reward_model=assets["rm"], prompts=assets["prompts"], eval_prompts="",
                      output_dir=str(tmp_path), max_steps=2, prompts_per_step=2, num_generations=2,
                      max_completion_length=5, per_device_train_batch_size=4, report_to="jsonl",
                      loss_type="cispo", epsilon_high=0.28, advantage_estimator="reinforce_pp", dynamic_sampling=True,
                      overlong_buffer_len=2, top_k=20)
    grpo.main(cfg)
    rows = read_metrics(tmp_path)
    assert len(rows) == 2
    for key in ("dynamic_sampling/rounds", "dynamic_sampling/filled_groups", "overlong_penalty_mean",
                "sampler/kl", "sampler/max_abs_diff"):
        assert key in rows[0], key
    # a reward model's scores differ between responses: every group varies, one round suffices
    assert rows[0]["dynamic_sampling/rounds"] == 1.0 and rows[0]["overlong_penalty_mean"] <= 0
