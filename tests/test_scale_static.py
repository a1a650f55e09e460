"""The `static` rollout engine samples what the `hf` engine samples."""

from __future__ import annotations

import importlib

import pytest
import torch

from rlhfkit.models import load_tokenizer, tiny_llama
from rlhfkit.rollout import static

# the module, not the function rlhfkit.rollout re-exports under the same name
hf_engine = importlib.import_module("rlhfkit.rollout.generate")

torch.set_num_threads(1)
PROMPTS = ["the kind dog", "a warm smile made", "she thanked", "they shared bread with the tired",
           "the garden", "he spoke softly to the"]


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer("kindly:tokenizer")
    model = tiny_llama(len(tok), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=7,
                       tokenizer=tok).eval()
    ids, _ = hf_engine.encode_prompts(tok, PROMPTS)
    return tok, model, ids


def _both(model, tok, ids, temperature, top_p, seed, max_new=12, stop=None):
    stop = torch.tensor([tok.eos_token_id] if stop is None else stop)
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    hf = hf_engine._generate_chunk(model, ids, max_new, temperature, top_p, stop, tok.pad_token_id, g1)
    st = static.generate_chunk(model, ids, max_new, temperature, top_p, stop, tok.pad_token_id, g2)
    return hf, st


def test_greedy_tokens_identical(setup):
    tok, model, ids = setup
    hf, st = _both(model, tok, ids, 0.0, 1.0, seed=0)
    for a, b in zip(hf, st):
        assert torch.equal(a, b)
    assert hf[2].shape == (len(PROMPTS), 12)


def test_stop_token_ends_rows_like_the_hf_loop(setup):
    tok, model, ids = setup
    # stop on tokens the greedy continuation actually produces, so some rows end early
    greedy, _ = _both(model, tok, ids, 0.0, 1.0, seed=0)
    stop = sorted({int(greedy[2][0, 3]), int(greedy[2][2, 1])})
    hf, st = _both(model, tok, ids, 0.0, 1.0, seed=0, stop=stop)
    assert hf[4].any()  # some rows did stop
    for a, b in zip(hf, st):
        assert torch.equal(a, b)


def test_sampled_tokens_identical_for_the_same_seed(setup):
    tok, model, ids = setup
    for seed in range(3):
        hf, st = _both(model, tok, ids, 0.9, 0.95, seed=seed, max_new=10)
        # same logits up to float rounding and the same uniform per row per step: same draws
        assert torch.equal(hf[2], st[2]) and torch.equal(hf[3], st[3])


def test_sampled_distribution_matches_the_model(setup):
    """Over many rows of one prompt, the first token's frequencies follow softmax(logits / T)."""
    tok, model, ids = setup
    n, temperature = 4000, 0.3
    prompt = ids[1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    probs = (logits / temperature).softmax(-1)
    g = torch.Generator().manual_seed(11)
    q = torch.tensor([prompt] * n)
    first, _, _ = static.generate(model, q, torch.ones_like(q), 1, temperature, 1.0, [tok.eos_token_id],
                                  tok.pad_token_id, g)
    freq = torch.bincount(first[:, 0], minlength=probs.numel()).double() / n
    top = probs.topk(5).indices
    # binomial standard error sqrt(p(1-p)/n) <= 0.008 at n=4000; 4 sigma
    for i in top.tolist():
        assert abs(freq[i] - probs[i]) < 4 * (probs[i] * (1 - probs[i]) / n).sqrt() + 1e-3, i
    # total variation over 6 buckets (the top 5 tokens and the rest): about 0.01 expected by chance
    rest = [t for t in range(probs.numel()) if t not in set(top.tolist())]
    f6 = torch.cat([freq[top], freq[rest].sum()[None]])
    p6 = torch.cat([probs[top], probs[rest].sum()[None]])
    assert 0.5 * (f6 - p6).abs().sum() < 0.04


def test_engine_signature_gives_the_hf_rollout(setup):
    tok, model, _ = setup
    ref = hf_engine.generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0.8, top_p=0.9, num_samples=2,
                             batch_size=5, seed=4)
    out = static.generate_rollout(model, tok, PROMPTS, max_new_tokens=8, temperature=0.8, top_p=0.9, num_samples=2,
                                  batch_size=5, seed=4)
    assert hf_engine._generate_chunk is not static.generate_chunk  # the hf engine is left as it was
    assert out.responses == ref.responses and len(out) == 2 * len(PROMPTS)
    assert torch.equal(out.response_ids, ref.response_ids) and torch.equal(out.query_ids, ref.query_ids)


def test_engines_registered_for_the_on_policy_recipes(setup):
    from rlhfkit.errors import ConfigError
    from rlhfkit.rollout import get_engine

    tok, model, _ = setup
    assert get_engine("static") is static.generate_rollout
    a = get_engine("hf")(model, tok, PROMPTS[:3], max_new_tokens=5, temperature=0.0)
    b = get_engine("static")(model, tok, PROMPTS[:3], max_new_tokens=5, temperature=0.0)
    assert torch.equal(a.response_ids, b.response_ids) and a.responses == b.responses
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="pip install vllm"):
            get_engine("vllm")(model, tok, PROMPTS[:1], max_new_tokens=2)


def test_grpo_runs_on_the_static_engine(tmp_path):
    """`--engine static` through a GRPO run: the same first rollout (seeded) as `--engine hf`."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from rl_helpers import save_tiny, tiny_policy, tiny_rm, tiny_tokenizer
    from rlhfkit.recipes import grpo
    from rlhfkit.train.runs import read_metrics

    tok = tiny_tokenizer()
    save_tiny(tmp_path / "policy", tiny_policy(tok), tok)
    save_tiny(tmp_path / "rm", tiny_rm(tok), tok)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS))
    rows = {}
    for engine in ("hf", "static"):
        cfg = grpo.Config(model=str(tmp_path / "policy"), reward_model=str(tmp_path / "rm"), prompts=str(prompts),
                          eval_prompts="", output_dir=str(tmp_path / engine), max_steps=1, prompts_per_step=2,
                          num_generations=2, max_completion_length=5, per_device_train_batch_size=4,
                          num_ppo_epochs=1, num_mini_batches=1, report_to="jsonl", engine=engine)
        grpo.main(cfg)
        rows[engine] = read_metrics(tmp_path / engine)[0]
    for key in ("response_length", "reward", "rollout_neg_logp", "policy_loss"):
        assert rows["static"][key] == pytest.approx(rows["hf"][key], rel=1e-5), key
