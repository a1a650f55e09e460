"""Evaluation metrics against hand-worked values and naive reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhfkit.eval import metrics as M

# --------------------------------------------------------------------------- bootstrap / win rate


def test_bootstrap_matches_naive_loop():
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    out = M.bootstrap_ci(x, n_boot=500, seed=3)
    assert out["mean"] == pytest.approx(4.0, rel=1e-12)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 5, size=(500, 5))
    means = []
    for row in idx:  # naive loop over resamples
        s = 0.0
        for i in row:
            s += x[i]
        means.append(s / 5)
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert out["lo"] == pytest.approx(lo, rel=1e-12)
    assert out["hi"] == pytest.approx(hi, rel=1e-12)
    assert 1.0 <= out["lo"] < 4.0 < out["hi"] <= 10.0


def test_bootstrap_single_value_and_errors():
    assert M.bootstrap_ci([2.5]) == {"mean": 2.5, "lo": 2.5, "hi": 2.5, "n": 1}
    with pytest.raises(ValueError, match="at least one"):
        M.bootstrap_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        M.bootstrap_ci([1.0, float("nan")])


def test_win_rate_ties_half():
    labels = M.preference_labels([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.05, 4.0], tie_margin=0.1)
    assert labels.tolist() == [1.0, 0.0, 0.5, 1.0]
    out = M.win_rate(labels, n_boot=200)
    assert out["mean"] == pytest.approx(2.5 / 4)
    assert (out["wins"], out["ties"], out["losses"]) == (2, 1, 1)
    assert out["lo"] <= out["mean"] <= out["hi"]
    with pytest.raises(ValueError, match="0, 0.5 or 1"):
        M.win_rate([1.0, 0.3])


# --------------------------------------------------------------------------- length-controlled win rate


def _naive_logistic(X, y, l2, steps=20000, lr=0.5):
    """Plain gradient descent on the mean penalised NLL, float64, one loop per sample."""
    w = np.zeros(X.shape[1])
    n = len(y)
    for _ in range(steps):
        g = l2 * w / n
        for i in range(n):
            p = 1.0 / (1.0 + math.exp(-float(X[i] @ w)))
            g = g + (p - y[i]) * X[i] / n
        w = w - lr * g
    return w


def test_fit_logistic_matches_naive_gradient_descent():
    rng = np.random.default_rng(0)
    X = np.stack([np.ones(40), rng.normal(size=40)], axis=1)
    y = (rng.random(40) < 1 / (1 + np.exp(-(0.3 + 1.2 * X[:, 1])))).astype(float)
    y[:5] = 0.5  # soft labels (ties)
    w = M.fit_logistic(X, y, l2=0.1)
    ref = _naive_logistic(X, y, l2=0.1, steps=4000, lr=2.0)
    np.testing.assert_allclose(w, ref, rtol=1e-5)


def test_lc_win_rate_equal_lengths_is_plain_win_rate():
    # with delta_len = 0 everywhere the GLM reduces to theta alone: MLE sigmoid(theta) = mean label
    labels = [1.0, 1.0, 0.0, 0.5]
    out = M.length_controlled_win_rate(labels, [5, 7, 3, 4], [5, 7, 3, 4], l2=0.0, n_boot=50)
    assert out["mean"] == pytest.approx(0.625, rel=1e-8)
    assert out["theta"] == pytest.approx(math.log(0.625 / 0.375), rel=1e-8)


def test_lc_win_rate_matches_naive_fit():
    labels = np.array([1, 1, 0, 1, 0.5, 0, 1, 1, 0, 1], dtype=float)
    lp = np.array([10, 12, 4, 9, 6, 3, 15, 8, 5, 11], dtype=float)
    lr = np.array([6, 7, 6, 6, 6, 6, 6, 7, 6, 7], dtype=float)
    out = M.length_controlled_win_rate(labels, lp, lr, l2=0.01, n_boot=20)
    d = lp - lr
    X = np.stack([np.ones(10), np.tanh(d / d.std())], axis=1)
    w = _naive_logistic(X, labels, l2=0.01, steps=6000, lr=2.0)
    assert out["theta"] == pytest.approx(w[0], rel=1e-5)
    assert out["phi"] == pytest.approx(w[1], rel=1e-5)
    assert out["mean"] == pytest.approx(1 / (1 + math.exp(-w[0])), rel=1e-6)


def test_lc_win_rate_removes_pure_length_preference():
    # a judge that only likes length: raw win rate of a verbose policy is high, LC stays near 1/2
    rng = np.random.default_rng(1)
    n = 2000
    len_ref = rng.integers(5, 15, size=n).astype(float)
    len_pol = len_ref + rng.normal(4.0, 4.0, size=n)
    d = len_pol - len_ref
    p = 1 / (1 + np.exp(-3.0 * np.tanh(d / d.std())))
    labels = (rng.random(n) < p).astype(float)
    raw = M.win_rate(labels)["mean"]
    lc = M.length_controlled_win_rate(labels, len_pol, len_ref, n_boot=0)
    assert raw > 0.75
    assert abs(lc["mean"] - 0.5) < 0.06
    assert lc["phi"] == pytest.approx(3.0, abs=0.5)


def test_lc_win_rate_all_wins_stays_finite():
    out = M.length_controlled_win_rate([1.0] * 6, [3, 4, 5, 6, 7, 8], [4] * 6, n_boot=10)
    assert 0.5 < out["mean"] < 1.0 and math.isfinite(out["theta"])


# --------------------------------------------------------------------------- diversity


def test_distinct_n_hand_worked():
    texts = ["a b a", "b c"]
    assert M.distinct_n(texts, 1) == pytest.approx(3 / 5)
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 3)
    assert M.distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert M.distinct_n(["", "x"], 2) == 0.0


def test_ead_hand_worked():
    # C = 3 tokens, V = 2: expected distinct = 2 * (1 - (1/2)^3) = 1.75; observed 2
    assert M.expectation_adjusted_distinct(["a b a"], vocab_size=2) == pytest.approx(2 / 1.75, rel=1e-12)
    # bigrams: V = 3^2 = 9, C = 2: expected = 9 * (1 - (8/9)^2) = 17/9; observed 2
    assert M.expectation_adjusted_distinct(["a b a"], vocab_size=3, n=2) == pytest.approx(2 / (17 / 9), rel=1e-12)


def test_ead_does_not_penalise_length_like_distinct():
    rng = np.random.default_rng(0)
    V = 50
    short = [" ".join(f"w{i}" for i in rng.integers(0, V, 20))]
    long = [" ".join(f"w{i}" for i in rng.integers(0, V, 2000))]
    assert M.distinct_n(long) < 0.1 < M.distinct_n(short)
    assert abs(M.expectation_adjusted_distinct(long, V) - 1) < 0.05
    assert abs(M.expectation_adjusted_distinct(short, V) - 1) < 0.2


def test_bleu_hand_worked():
    assert M.bleu("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    # p1 = 3/4, p2 = 2/3, no brevity penalty
    assert M.bleu("a b c d", ["a b c e"], max_n=2) == pytest.approx(math.sqrt(0.75 * 2 / 3), rel=1e-12)
    # p3 = 1/2, p4 = 0 -> smoothed to 0.1/1
    assert M.bleu("a b c d", ["a b c e"]) == pytest.approx((0.75 * 2 / 3 * 0.5 * 0.1) ** 0.25, rel=1e-12)
    # brevity: c = 2, r = 4 -> exp(1 - 4/2)
    assert M.bleu("a b", ["a b c d"], max_n=1) == pytest.approx(math.exp(-1.0), rel=1e-12)
    # clipping: "the the the" vs "the cat": p1 = 1/3; closest ref length 2 < 3 so no penalty
    assert M.bleu("the the the", ["the cat"], max_n=1) == pytest.approx(1 / 3, rel=1e-12)
    # the closest reference length is used for the brevity penalty
    assert M.bleu("a b c", ["a b c d e f g", "a b c d"], max_n=1) == pytest.approx(math.exp(1 - 4 / 3), rel=1e-12)


def test_self_bleu():
    assert M.self_bleu(["a b c", "a b c", "a b c"], max_n=2) == pytest.approx(1.0)
    # each vs the other: p1 = 0.1/2, p2 = 0.1/1
    assert M.self_bleu(["a b", "c d"], max_n=2) == pytest.approx(math.sqrt(0.05 * 0.1), rel=1e-12)
    same = M.self_bleu(["the cat sat down"] * 5)
    varied = M.self_bleu(["the cat sat down", "a dog ran off", "birds sing at dawn", "rain fell all day", "he laughed"])
    assert varied < same


# --------------------------------------------------------------------------- KL and perplexity


def test_kl_from_logprobs_hand_worked():
    lp = [[-1.0, -2.0, -0.5], [-0.1, -0.2, -9.0]]
    lr = [[-1.5, -1.0, -0.5], [-0.3, -0.2, 0.0]]
    mask = [[1, 1, 0], [1, 1, 0]]
    out = M.kl_from_logprobs(lp, lr, mask)
    # response 1: 0.5 + -1.0 = -0.5 ; response 2: 0.2 + 0 = 0.2 ; mean -0.15
    np.testing.assert_allclose(out["per_response"], [-0.5, 0.2], rtol=1e-12)
    assert out["kl"] == pytest.approx(-0.15, rel=1e-12)


def _tiny_lm(vocab=40, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_perplexity_matches_per_line_loop():
    words = "the cat sat on mat a dog ran far away".split()
    tok = _word_tokenizer(words)
    model = _tiny_lm(vocab=len(tok))
    lines = ["the cat sat on the mat", "a dog ran", "far away the dog sat on a mat cat", "x"]
    out = M.perplexity(model, tok, lines, batch_size=3)
    nll, n = 0.0, 0
    with torch.no_grad():
        for line in lines:
            ids = [tok.bos_token_id] + tok(line)["input_ids"]
            if len(ids) < 2:
                continue
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                nll -= float(logp[t - 1, ids[t]])
                n += 1
    assert out["tokens"] == n == 6 + 3 + 9 + 1
    assert out["skipped"] == 0 and out["lines"] == 4
    assert out["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_query_response_logprobs_padding_invariant():
    model = _tiny_lm()
    queries = [[5, 6, 7], [8, 9]]
    responses = [[10, 11], [12, 13, 14]]
    q = torch.tensor([[5, 6, 7], [0, 8, 9]])  # left-padded
    r = torch.tensor([[10, 11, 0], [12, 13, 14]])  # right-padded
    rm = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = M.query_response_logprobs(model, q, r, rm, pad_token_id=0)
    with torch.no_grad():
        for i, (qq, rr) in enumerate(zip(queries, responses)):
            ids = torch.tensor([qq + rr])
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            for j, tokid in enumerate(rr):
                assert float(got[i, j]) == pytest.approx(float(logp[len(qq) - 1 + j, tokid]), rel=1e-4, abs=1e-5)
    assert float(got[0, 2]) == 0.0


def test_one_response_logprob_forward():
    """eval's batched response log-probs are rlhfkit.logprobs.response_logprobs, the forward the
    on-policy recipes and DPO call, bit for bit."""
    import rlhfkit.logprobs as L

    assert M.response_logprobs is L.response_logprobs
    model = _tiny_lm()
    q = torch.tensor([[5, 6, 7], [0, 8, 9]])
    r = torch.tensor([[10, 11, 0], [12, 13, 14]])
    rm = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ids, attn = torch.cat([q, r], 1), torch.cat([(q != 0).long(), rm], 1)
    with torch.no_grad():
        shared, _ = L.response_logprobs(model, input_ids=ids, attention_mask=attn, response_width=3,
                                        temperature=0.7)
    assert torch.equal(M.query_response_logprobs(model, q, r, rm, pad_token_id=0, temperature=0.7), shared)
    one_by_one = M.query_response_logprobs(model, q, r, rm, pad_token_id=0, batch_size=1, temperature=0.7)
    torch.testing.assert_close(one_by_one, shared, rtol=1e-5, atol=1e-6)  # float32 kernels may differ by batch
    # a naive float64 forward gives the same numbers
    with torch.no_grad():
        for i in range(2):
            keep = attn[i].bool()
            logits = model(ids[i:i + 1, keep]).logits[0].double() / 0.7
            lp = torch.log_softmax(logits, -1)
            n_q = int(keep[:3].sum())
            for j in range(int(rm[i].sum())):
                assert float(shared[i, j]) == pytest.approx(float(lp[n_q - 1 + j, r[i, j]]), rel=1e-5, abs=1e-6)


def test_gold_gain_split_hand_worked():
    """g = q (c + 1) - 1; one prompt: policy (c, q) = (0.5, 1.0), reference (-0.2, 0.5):
    g = 0.5, g' = 0.5 * 0.8 - 1 = -0.6, gain 1.1 = sentiment 0.75 * 0.7 = 0.525 + quality 1.15 * 0.5 = 0.575."""
    from rlhfkit.eval.metrics import gold_gain_split

    out = gold_gain_split(np.array([0.5]), np.array([-0.2]), np.array([1.0]), np.array([0.5]), n_boot=10)
    assert out["gain"]["mean"] == pytest.approx(1.1, abs=1e-12)
    assert out["sentiment_term"]["mean"] == pytest.approx(0.525, abs=1e-12)
    assert out["quality_term"]["mean"] == pytest.approx(0.575, abs=1e-12)
    assert out["sentiment_share"]["mean"] == pytest.approx(0.525 / 1.1, abs=1e-12)
    assert out["q1_share"]["policy"]["mean"] == 1.0 and out["q1_share"]["reference"]["mean"] == 0.0


def test_gold_gain_split_adds_up_to_the_panels_gold_difference():
    """On real panel scores the two terms add up exactly to the per-prompt gold difference."""
    from rlhfkit.eval.metrics import gold_gain_split
    from rlhfkit.judges import GoldPanel

    panel = GoldPanel()
    prompts = ["the day was", "she said that", "he looked at the", "we found a"]
    pol = [" lovely and warm", " she loved the gift", " kind old dog", " good friend"]
    ref = [" grim grim grim", " xqzv blorf", " sad and cold", ""]
    c, c0 = panel.sentiment(prompts, pol).mean(1), panel.sentiment(prompts, ref).mean(1)
    q, q0 = panel.quality(pol), panel.quality(ref)
    out = gold_gain_split(c, c0, q, q0, n_boot=200)
    gain = panel.score(prompts, pol) - panel.score(prompts, ref)
    assert out["gain"]["mean"] == pytest.approx(gain.mean(), abs=1e-12)
    assert out["sentiment_term"]["mean"] + out["quality_term"]["mean"] == pytest.approx(gain.mean(), abs=1e-12)
    assert out["quality_term"]["mean"] > 0  # the references are degenerate: quality carries part of this gain
    assert out["sentiment_term"]["lo"] <= out["sentiment_term"]["mean"] <= out["sentiment_term"]["hi"]


def test_cluster_bootstrap_resamples_prompts_not_samples():
    """Two identical samples per prompt carry no more information than one: the cluster interval
    equals the one-sample interval (same resampling), and the row bootstrap would be narrower."""
    from rlhfkit.eval.metrics import bootstrap_ci, cluster_bootstrap_ci

    per_prompt = np.array([1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0])
    doubled, clusters = np.repeat(per_prompt, 2), np.repeat(np.arange(8), 2)
    c = cluster_bootstrap_ci(doubled, clusters, n_boot=2000, seed=3)
    one = cluster_bootstrap_ci(per_prompt, np.arange(8), n_boot=2000, seed=3)
    assert c["mean"] == pytest.approx(per_prompt.mean()) and c["clusters"] == 8 and c["n"] == 16
    assert (c["lo"], c["hi"]) == pytest.approx((one["lo"], one["hi"]))
    rows = bootstrap_ci(doubled, n_boot=2000, seed=3)
    assert rows["hi"] - rows["lo"] < c["hi"] - c["lo"]
    with pytest.raises(ValueError):
        cluster_bootstrap_ci(doubled, clusters[:-1])
