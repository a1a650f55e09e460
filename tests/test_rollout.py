import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rl_helpers import tiny_policy, tiny_tokenizer
from rlhfkit.errors import ConfigError
from rlhfkit.logprobs import response_logprobs
from rlhfkit.rollout import encode_prompts, generate, top_p_filter
from rlhfkit.rollout.forward import batched

PROMPTS = ["the cat sat on the", "she smiled", "a kind word makes the day"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sharp_model(tok):
    # large init so logits are well separated and greedy argmax is not decided by rounding
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, initializer_range=0.3,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def naive_greedy(model, ids, n, eos):
    """Reference: no cache, no padding, the whole sequence re-run at every step."""
    seq = list(ids)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        seq.append(t)
        if t == eos:
            break
    return out


def test_greedy_matches_uncached_unpadded_loop(tok, sharp_model):
    r = generate(sharp_model, tok, PROMPTS, max_new_tokens=12, temperature=0.0, batch_size=2)
    ids, _ = encode_prompts(tok, PROMPTS)
    for i, p in enumerate(ids):
        want = naive_greedy(sharp_model, p, 12, tok.eos_token_id)
        got = r.response_ids[i][r.response_mask[i].bool()].tolist()
        assert got == want
        # prompts are left-padded: the real tokens sit at the right end
        assert r.query_ids[i, -len(p):].tolist() == p
        assert r.query_mask[i].sum() == len(p)


def test_kv_cache_passed_by_the_keyword_the_model_takes(tok, sharp_model, monkeypatch):
    """No deprecation notice (transformers 5.x renamed `past_key_values` to `cache`), warning or log."""
    import inspect
    import warnings

    from transformers.utils import generic

    from rlhfkit.rollout.generate import cache_keyword

    takes = inspect.signature(type(sharp_model).forward).parameters
    assert cache_keyword(sharp_model) == ("cache" if "cache" in takes else "past_key_values")
    notices = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: notices.append(msg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = generate(sharp_model, tok, PROMPTS, max_new_tokens=4, temperature=0.0, batch_size=2)
    assert r.response_ids.shape[1] >= 1 and not [m for m in notices if "past_key_values" in str(m)]


def test_eos_stops_and_masks(tok, sharp_model):
    # force EOS by making it the stop token that greedy picks first at some step: use the
    # first greedy token of prompt 0 as an extra stop id
    first = naive_greedy(sharp_model, encode_prompts(tok, PROMPTS[:1])[0][0], 1, -1)[0]
    r = generate(sharp_model, tok, PROMPTS, 8, temperature=0.0, stop_token_ids=[first])
    assert r.ended_with_eos[0]
    assert r.response_mask[0].tolist()[:2] == [1, 0]
    assert (r.response_ids[0, 1:] == tok.pad_token_id).all()
    # rows without a stop token run to max length and are flagged
    for i in range(len(PROMPTS)):
        n = int(r.response_mask[i].sum())
        assert bool(r.ended_with_eos[i]) == (r.response_ids[i, n - 1].item() == first)
        if not r.ended_with_eos[i]:
            assert n == 8


def test_rollout_scored_in_chunks_matches_each_row_alone(tok, sharp_model):
    """The recipes' old log-probs: a rollout's (left-padded prompt, right-padded response) rows
    through response_logprobs in chunks, no gradients, equal each row scored unpadded."""
    first = naive_greedy(sharp_model, encode_prompts(tok, PROMPTS[:1])[0][0], 1, -1)[0]
    roll = generate(sharp_model, tok, PROMPTS, 6, temperature=0.0, stop_token_ids=[first])
    assert len(set(roll.response_lengths.tolist())) > 1 and len(set(roll.query_mask.sum(-1).tolist())) > 1
    ids, mask = roll.sequences()
    width = roll.response_ids.shape[1]
    with torch.enable_grad():
        lp = batched(lambda i, m: response_logprobs(sharp_model, input_ids=i, attention_mask=m,
                                                    response_width=width)[0], ids, mask, 2)
    assert lp.shape == roll.response_mask.shape and not lp.requires_grad
    with torch.no_grad():
        for row in range(len(roll)):
            q = roll.query_ids[row][roll.query_mask[row].bool()].tolist()
            r = roll.response_ids[row][roll.response_mask[row].bool()].tolist()
            logp = torch.log_softmax(sharp_model(torch.tensor([q + r])).logits[0, len(q) - 1:-1].double(), -1)
            want = torch.tensor([float(logp[j, t]) for j, t in enumerate(r)], dtype=torch.float64)
            torch.testing.assert_close(lp[row, :len(r)].double(), want, rtol=1e-5, atol=1e-5)
            assert torch.all(lp[row, len(r):] == 0)


def test_seeded_sampling_reproducible_and_grouped(tok):
    m = tiny_policy(tok)
    a = generate(m, tok, PROMPTS, 10, num_samples=3, seed=7, batch_size=4)
    torch.manual_seed(123)  # global RNG must not matter
    b = generate(m, tok, PROMPTS, 10, num_samples=3, seed=7, batch_size=4)
    assert torch.equal(a.response_ids, b.response_ids) and a.responses == b.responses
    assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert a.prompts[3] == PROMPTS[1]
    c = generate(m, tok, PROMPTS, 10, num_samples=3, seed=8, batch_size=4)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert len(a) == 9 and a.query_ids.shape[0] == 9


def test_top_p_filter_hand_worked():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    kept = torch.isfinite(top_p_filter(logits, 0.3))[0].tolist()
    assert kept == [True, False, False, False]  # top token always kept
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_sampling_only_uses_nucleus(tok):
    m = tiny_policy(tok)
    r = generate(m, tok, ["the cat"], 1, top_p=1e-6, num_samples=5, seed=0)
    # a vanishing nucleus degenerates to greedy
    g = generate(m, tok, ["the cat"], 1, temperature=0.0)
    assert (r.response_ids[:, 0] == g.response_ids[0, 0]).all()


def test_prompt_truncation_counted(tok):
    m = tiny_policy(tok)
    long = "the cat sat on the mat and was happy " * 4
    r = generate(m, tok, [long, "she"], 4, max_prompt_length=6, seed=0)
    assert r.num_truncated_prompts == 1
    assert r.query_ids.shape[1] == 6
    full = encode_prompts(tok, [long])[0][0]
    # BOS stays in front, then the last words (the ones being continued)
    assert full[0] == tok.bos_token_id
    assert r.query_ids[0].tolist() == [tok.bos_token_id] + full[-5:]


def test_bad_arguments(tok):
    m = tiny_policy(tok)
    with pytest.raises(ConfigError, match="top_p"):
        generate(m, tok, ["a"], 4, top_p=0.0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(m, tok, ["a"], 0)


def test_sampling_frequencies_match_probabilities():
    from rlhfkit.rollout import sample_next_token

    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20000, 4).clone()
    logits[:, 3] = float("-inf")
    g = torch.Generator().manual_seed(0)
    tok = sample_next_token(logits, 1.0, 1.0, g)
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert freq[3] == 0
    # 20000 draws: binomial std <= 0.0036, so 0.015 is over 4 standard deviations
    assert torch.allclose(freq[:3], probs[:3], atol=0.015)
    # temperature 2 flattens: p ~ sqrt(probs)
    flat = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    tok = sample_next_token(logits[:, :3], 2.0, 1.0, g)
    freq = torch.bincount(tok, minlength=3).float() / len(tok)
    assert torch.allclose(freq, flat / flat.sum(), atol=0.015)


def test_generation_through_a_reference_wrapper_uses_the_models_cache_keyword():
    """The held-out evaluation samples the reference of a LoRA policy through a wrapper whose forward
    takes **kwargs; the KV cache must still go by the wrapped model's keyword (no deprecation warning)."""
    import contextlib
    import warnings

    from rlhfkit.eval.monitor import _UnderContext
    from rlhfkit.models import load_tokenizer, tiny_llama
    from rlhfkit.rollout.generate import cache_keyword, generate

    tok = load_tokenizer("kindly:tokenizer")
    model = tiny_llama(len(tok), seed=0, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer=tok)
    wrapped = _UnderContext(model, contextlib.nullcontext)
    assert cache_keyword(wrapped) == cache_keyword(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = generate(wrapped, tok, ["hello there"], 6, seed=1)
    b = generate(model, tok, ["hello there"], 6, seed=1)
    assert torch.equal(a.response_ids, b.response_ids)
