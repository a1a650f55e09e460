"""Log-prob helpers, position ids and the response forward against hand-worked values and naive loops."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhfkit.logprobs import (
    entropy_from_logits,
    position_ids_from_mask,
    response_logprobs,
    sequence_logprobs,
    shifted_logprobs,
    split_head,
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


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    want = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2]])
    assert torch.equal(position_ids_from_mask(mask), want)
    assert torch.equal(position_ids_from_mask(mask.bool()), want)  # any mask dtype


# ---------------------------------------------------------------------------------------------
# the response forward: a left-padded prompt + right-padded response batch against each row
# run alone and unpadded, in float64


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":  # learned absolute positions: wrong position ids would show at once
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                                bos_token_id=1, eos_token_id=2))
    else:  # rotary positions, grouped-query attention
        model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    return model.double().eval()


PROMPTS = [[5, 6, 7], [8, 9], [10]]
RESPONSES = [[11, 12], [13, 14, 15], [16]]


def _batch():
    """Prompts left-padded to 3 columns, responses right-padded to 3 (pad id 0)."""
    rows, masks, rmask = [], [], []
    for p, r in zip(PROMPTS, RESPONSES):
        rows.append([0] * (3 - len(p)) + p + r + [0] * (3 - len(r)))
        masks.append([0] * (3 - len(p)) + [1] * (len(p) + len(r)) + [0] * (3 - len(r)))
        rmask.append([1] * len(r) + [0] * (3 - len(r)))
    return torch.tensor(rows), torch.tensor(masks), torch.tensor(rmask)


def _naive(model, temperature: float):
    """log p and entropy of each response token from the row alone, unpadded, by log_softmax."""
    lps, ents = [], []
    with torch.no_grad():
        for p, r in zip(PROMPTS, RESPONSES):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1] / temperature
            logp = torch.log_softmax(logits, -1)
            lps.append([float(logp[j, t]) for j, t in enumerate(r)])
            ents.append([float(-(logp[j].exp() * logp[j]).sum()) for j in range(len(r))])
    return lps, ents


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("fast_head", [False, True])
def test_response_logprobs_match_each_row_alone(kind, fast_head):
    model = _tiny(kind)
    assert split_head(model) is not None  # so fast_head=True really takes the split path
    ids, attn, rmask = _batch()
    want_lp, want_ent = _naive(model, 0.7)
    with torch.no_grad():
        lp, ent = response_logprobs(model, input_ids=ids, attention_mask=attn, response_width=3,
                                    temperature=0.7, fast_head=fast_head, with_entropy=True)
    assert lp.shape == ent.shape == (3, 3)
    for i, r in enumerate(RESPONSES):
        torch.testing.assert_close(lp[i, :len(r)], torch.tensor(want_lp[i], dtype=torch.float64), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ent[i, :len(r)], torch.tensor(want_ent[i], dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert torch.all(lp[rmask == 0] == 0)


def test_response_mask_selects_tokens_and_defaults_to_the_attention_columns():
    model = _tiny("llama")
    ids, attn, rmask = _batch()
    with torch.no_grad():
        default, none = response_logprobs(model, input_ids=ids, attention_mask=attn, response_width=3)
        given, _ = response_logprobs(model, input_ids=ids, attention_mask=attn, response_width=3, response_mask=rmask)
        first_only = torch.zeros_like(rmask)
        first_only[:, 0] = 1
        first, _ = response_logprobs(model, input_ids=ids, attention_mask=attn, response_width=3,
                                     response_mask=first_only)
    assert none is None  # no entropy unless asked
    assert torch.equal(default, given)
    assert torch.equal(first[:, 0], given[:, 0]) and torch.all(first[:, 1:] == 0)


def test_entropy_carries_gradients_only_when_asked():
    model = _tiny("gpt2")
    ids, attn, _ = _batch()
    for fast_head in (False, True):
        lp, ent = response_logprobs(model, input_ids=ids, attention_mask=attn, response_width=3,
                                    fast_head=fast_head, with_entropy=True)
        assert lp.requires_grad and not ent.requires_grad
        _, ent = response_logprobs(model, input_ids=ids, attention_mask=attn, response_width=3,
                                   fast_head=fast_head, with_entropy=True, entropy_grad=True)
        assert ent.requires_grad


def test_response_logprobs_takes_keywords_and_needs_a_prompt_column():
    model = _tiny("llama")
    ids, attn, _ = _batch()
    with pytest.raises(TypeError):
        response_logprobs(model, ids, attn, 3)  # everything after the model is a keyword
    with pytest.raises(ValueError, match="at least one prompt column"):
        response_logprobs(model, input_ids=ids, attention_mask=attn, response_width=ids.shape[1])
