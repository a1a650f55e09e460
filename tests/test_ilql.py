"""ILQL: the losses by hand in float64, the decoding rule, the heads, and a 2-step run of the recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rl_helpers import save_tiny, tiny_policy, tiny_tokenizer
from rlhfkit.errors import DataError
from rlhfkit.losses.ilql import (
    expectile_loss,
    ilql_decoding_logits,
    ilql_loss,
    q_targets,
    terminal_rewards,
)
from rlhfkit.models.ilql import ILQLHeads, ILQLPolicy, load_ilql_policy
from rlhfkit.rollout import generate
from rlhfkit.train.runs import read_metrics

D = torch.float64


def _case():
    q1 = torch.tensor([[[0.5, -0.5], [0.1, 0.3]]], dtype=D)
    q2 = torch.tensor([[[0.3, 0.0], [0.2, 0.6]]], dtype=D)
    lm = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=D)
    return dict(q_heads=[q1, q2], target_q_heads=[q1, q2], values=torch.tensor([[0.2, 0.4]], dtype=D), lm_logits=lm,
                actions=torch.tensor([[0, 1]]), rewards=torch.tensor([[0.0, 1.0]], dtype=D),
                mask=torch.ones(1, 2, dtype=D))


def test_ilql_loss_by_hand():
    loss, m = ilql_loss(**_case(), gamma=0.5, tau=0.7, cql_scale=0.1, awac_scale=1.0)
    # Q of the taken tokens: head 1 (0.5, 0.3), head 2 (0.3, 0.6); targets y = (0 + 0.5 * 0.4, 1 + 0)
    loss_q = ((0.5 - 0.2) ** 2 + (0.3 - 1.0) ** 2 + (0.3 - 0.2) ** 2 + (0.6 - 1.0) ** 2) / 2
    # target Q = min over heads = (0.3, 0.3); u = (0.1, -0.1): 0.7 * 0.01 + 0.3 * 0.01
    loss_v = (0.7 * 0.01 + 0.3 * 0.01) / 2
    # CQL: logsumexp(Q) - Q(taken) per token and head
    cql = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(-0.3))
           + math.log(1 + math.exp(-0.4))) / 2
    awac = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-2.0))) / 2
    assert m["loss_q"].item() == pytest.approx(loss_q, rel=1e-12)
    assert m["loss_v"].item() == pytest.approx(loss_v, rel=1e-12)
    assert m["loss_cql"].item() == pytest.approx(cql, rel=1e-12)
    assert m["loss_awac"].item() == pytest.approx(awac, rel=1e-12)
    assert loss.item() == pytest.approx(loss_q + loss_v + 0.1 * cql + awac, rel=1e-12)
    assert m["advantage_mean"].item() == pytest.approx(((0.3 - 0.2) + (0.3 - 0.4)) / 2, abs=1e-15)


def test_padding_and_the_step_token_count():
    case = _case()
    loss, _ = ilql_loss(**case, gamma=0.5)
    padded = {k: (torch.cat([v, v.new_full((*v.shape[:1], 1, *v.shape[2:]), 7)], dim=1) if torch.is_tensor(v)
                  else [torch.cat([x, torch.full_like(x[:, :1], 7.0)], dim=1) for x in v]) for k, v in case.items()}
    padded["mask"][:, -1] = 0
    padded["actions"][:, -1] = 0
    assert ilql_loss(**padded, gamma=0.5)[0].item() == pytest.approx(loss.item(), rel=1e-12)
    # two micro-batches normalised by the step's 4 tokens add up to the loss of the step
    half = ilql_loss(**case, gamma=0.5, num_tokens=4)[0]
    assert (2 * half).item() == pytest.approx(loss.item(), rel=1e-12)


def test_targets_rewards_expectile_and_decoding():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    r = terminal_rewards(torch.tensor([2.0, -1.0], dtype=D), mask)
    assert r.tolist() == [[0.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    v = torch.tensor([[0.5, 0.25, 9.0], [0.1, 9.0, 9.0]], dtype=D)
    # V after a response's last token is 0: the 9s (padding) never enter a target
    want = torch.tensor([[0.9 * 0.25, 2.0, 0.0], [-1.0, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(q_targets(r, v, mask, 0.9), want, rtol=1e-12, atol=1e-15)
    assert expectile_loss(torch.tensor([0.1, -0.1, 0.0], dtype=D), 0.7).tolist() == pytest.approx([0.007, 0.003, 0.0])
    logits, q, value = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -0.5]), torch.tensor(0.1)
    lse = math.log(math.e + math.e ** 2)
    got = ilql_decoding_logits(logits, q, value, beta=2.0)
    assert got.tolist() == pytest.approx([1 - lse + 2 * 0.4, 2 - lse - 2 * 0.6], rel=1e-6)


def test_heads_sync_and_the_decoding_policy():
    torch.manual_seed(0)
    heads = ILQLHeads(hidden=4, vocab=5)
    before = [p.clone() for p in heads.target_q_heads.parameters()]
    with torch.no_grad():
        for p in heads.q_heads.parameters():
            p.add_(1.0)
    heads.sync_targets(0.25)
    for t, b, q in zip(heads.target_q_heads.parameters(), before, heads.q_heads.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * q)
        assert not t.requires_grad
    tok = tiny_tokenizer()
    lm = tiny_policy(tok)
    heads = ILQLHeads(lm.config.hidden_size, len(tok))
    ids = torch.tensor([tok("the cat sat")["input_ids"]])
    plain = lm(input_ids=ids).logits.log_softmax(-1)
    torch.testing.assert_close(ILQLPolicy(lm, heads, beta=0.0)(input_ids=ids).logits, plain)
    shifted = ILQLPolicy(lm, heads, beta=3.0)(input_ids=ids).logits
    hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    q = torch.minimum(*(h(hidden) for h in heads.target_q_heads))
    torch.testing.assert_close(shifted, plain + 3.0 * (q - heads.v_head(hidden)), rtol=1e-5, atol=1e-5)


RECORDS = [("the cat sat", " on the mat", 1.0), ("a kind word", " makes the day", 2.0), ("the rain fell", " on me", -1.0),
           ("she smiled", " and thanked him", 0.5), ("bad news", " travels fast", -2.0), ("good news", " lasts", 1.5)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilql")
    tok = tiny_tokenizer()
    data = root / "rated.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c, "reward": r}) + "\n" for p, c, r in RECORDS))
    return {"policy": save_tiny(root / "policy", tiny_policy(tok), tok), "data": str(data), "root": root}


def _cfg(assets, out, **kw):
    from rlhfkit.recipes.ilql import Config

    base = dict(model=assets["policy"], dataset=assets["data"], output_dir=str(out), max_steps=2,
                per_device_train_batch_size=4, learning_rate=1e-3, report_to="jsonl", target_sync_steps=1, alpha=0.5,
                progress=False, beta=2.0, logging_steps=1)
    base.update(kw)
    return Config(**base)


def test_ilql_recipe_two_steps_and_decoding(assets, tmp_path):
    from rlhfkit.recipes import ilql

    res = ilql.main(_cfg(assets, tmp_path / "run"))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "loss_q", "loss_v", "loss_cql", "loss_awac", "q_mean", "v_mean", "advantage_mean"):
        assert math.isfinite(rows[0][key]), key
    assert res["steps"] == 2 and res["responses"] == 6
    final = tmp_path / "run" / "final"
    heads = load_file(str(final / "ilql_heads.safetensors"))
    # two syncs at alpha 0.5 moved the targets off their starting copy of the Q heads
    assert not torch.equal(heads["target_q_heads.0.0.weight"], heads["q_heads.0.0.weight"])
    policy = load_ilql_policy(final)
    assert policy.beta == 2.0
    tok = tiny_tokenizer()
    out = generate(policy, tok, ["the cat", "a kind"], 4, temperature=1.0, seed=0)
    assert len(out.responses) == 2


def test_two_micro_batches_equal_one_batch(assets, tmp_path):
    from rlhfkit.recipes import ilql

    ilql.main(_cfg(assets, tmp_path / "one", max_steps=1))
    ilql.main(_cfg(assets, tmp_path / "two", max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    a, b = (load_file(str(tmp_path / x / "final" / "model.safetensors")) for x in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_bad_records_name_the_line(assets, tmp_path):
    from rlhfkit.recipes import ilql

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": " b", "reward": 1}) + "\n"
                   + json.dumps({"prompt": "a", "completion": " c", "score": 1}) + "\n")
    with pytest.raises(DataError, match="line 2.*reward"):
        ilql.main(_cfg(assets, tmp_path / "x", dataset=str(bad)))
