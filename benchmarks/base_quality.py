"""Does the bundled base write English? The SFT policy's panel quality q on the eval prompts.

policy_0 of the bundled task (`benchmarks.common.sft_policy()`: the shipped base after
configs/sft_kindly.yaml) samples SAMPLES responses for each of the task's 554 eval prompts at
temperature 1 (MAX_NEW_TOKENS new tokens, fixed seed). The gold panel's quality factor q
(`GoldPanel.quality`, docs/task.md) is 1 for a response with at least two words, no non-words
and no repetition beyond the allowances. Reported:

* `q1_share`: share of responses with q = 1, with a 95% percentile bootstrap interval that
  resamples prompts (a prompt's samples stay together, so the interval is not narrowed by
  treating a prompt's samples as independent); `q1_share_first_sample` is the same on one sample
  per prompt;
* `failures`: share of responses with each defect (a non-word, repetition over the allowance,
  fewer than two words), which may overlap;
* `unknown_token_share`: share of sampled tokens that are the tokenizer's `<|unk|>` (decoded to
  nothing, so a word missing from the text);
* `mean_q` and `mean_sentiment` (mean over raters of c_r, the panel's sentiment term);
* `clear_pairs_ordered_by`: over pairs of one prompt's samples with a clear gold gap (>= 0.1),
  the share ordered like gold by the sentiment term alone and by q alone: what a reward model
  trained on such pairs has to learn;
* held-out perplexity of the base on the eval corpus split, per token of its own tokenizer and
  per word (total NLL over whitespace-separated words), so tokenizers of different granularity
  can be compared on one scale.

Target (docs/task.md): q1_share >= 0.85.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import base_model, sft_policy

SEED, SAMPLES, MAX_NEW_TOKENS, N_BOOT = 0, 4, 24, 2000


def q1_share(quality: np.ndarray, groups: int, n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """Share of q == 1 in `quality` (prompt-major rows, `groups` prompts with equal sample counts)
    with a 95% percentile bootstrap interval over prompts (Efron & Tibshirani 1993)."""
    q = np.asarray(quality, dtype=np.float64)
    if q.size == 0 or q.size % groups:
        raise ValueError(f"{q.size} quality values do not split into {groups} prompts of equal size")
    per_prompt = (q >= 1.0 - 1e-12).reshape(groups, -1).mean(axis=1)
    rng = np.random.default_rng(seed)
    boot = per_prompt[rng.integers(0, groups, size=(n_boot, groups))].mean(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"share": round(float(per_prompt.mean()), 4), "lo": round(float(lo), 4), "hi": round(float(hi), 4),
            "prompts": groups, "samples_per_prompt": q.size // groups}


def word_perplexity(model, tok, lines: list[str]) -> dict:
    """Held-out perplexity of a base on `lines`, per token of its tokenizer and per word.

    Per word is exp(total NLL / whitespace-separated words): the same denominator whatever the
    tokenizer. On all lines a word-level base predicts each out-of-vocabulary word as one
    `<|unk|>` (a token it is never trained to predict) instead of spelling it, so the two bases
    do not predict the same text there; `in_vocabulary` scores only the lines whose every word
    is in the bundled tokenizer's vocabulary, where any two bases predict exactly the same text
    (the comparable figure)."""
    import math

    from rlhfkit.eval.metrics import perplexity
    from rlhfkit.models import load_tokenizer

    def score(subset: list[str]) -> dict:
        ppl = perplexity(model, tok, subset, batch_size=64)
        words = sum(len(line.split()) for line in subset)
        total = ppl["nll"] * ppl["tokens"]
        return {"per_token": round(ppl["perplexity"], 2), "per_word": round(math.exp(total / words), 2),
                "lines": len(subset), "tokens": ppl["tokens"], "words": words,
                "tokens_per_word": round(ppl["tokens"] / words, 3)}

    bundled = load_tokenizer("kindly:tokenizer")
    unk = bundled.unk_token_id
    ids = bundled(lines, add_special_tokens=False)["input_ids"]
    known = [line for line, x in zip(lines, ids) if unk is None or unk not in x]
    return {**score(lines), "in_vocabulary": score(known)}


def clear_pairs_ordered_by(gold: np.ndarray, sentiment: np.ndarray, quality: np.ndarray, groups: int,
                           gap: float = 0.1) -> dict:
    """What separates a prompt's samples: over every pair of one prompt's samples whose gold
    scores differ by at least `gap` (rm_quality's clear pairs), the share that the sentiment term
    alone orders the same way as gold, and the share that the quality factor q alone does (a pair
    with equal q is not ordered by q). A reward model learns what separates its pairs."""
    g, s, q = (np.asarray(x, dtype=np.float64).reshape(groups, -1) for x in (gold, sentiment, quality))
    i, j = np.triu_indices(g.shape[1], k=1)
    dg, ds, dq = g[:, i] - g[:, j], s[:, i] - s[:, j], q[:, i] - q[:, j]
    clear = np.abs(dg) >= gap
    if not clear.any():
        return {"clear_pairs": 0}
    sign = np.sign(dg[clear])
    return {"clear_pairs": int(clear.sum()), "gold_gap": gap,
            "sentiment": round(float((np.sign(ds[clear]) == sign).mean()), 4),
            "quality": round(float((np.sign(dq[clear]) == sign).mean()), 4),
            "quality_differs": round(float((dq[clear] != 0).mean()), 4)}


def sample_quality(policy_path, prompts: list[str], samples: int = SAMPLES, seed: int = SEED) -> dict:
    """Sample the policy on `prompts` and score every response's q with the gold panel."""
    import torch

    from rlhfkit.judges import GoldPanel
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout import generate

    tok = load_tokenizer(str(policy_path))
    model = load_policy(str(policy_path), trainable=False).eval()
    with torch.no_grad():
        roll = generate(model, tok, prompts, MAX_NEW_TOKENS, temperature=1.0, num_samples=samples,
                        batch_size=256, seed=seed)
    panel = GoldPanel()
    parts = [panel.degeneracy(r) for r in roll.responses]
    q = np.array([p["quality"] for p in parts])
    sentiment = panel.sentiment(roll.prompts, roll.responses).mean(axis=1)
    n = len(prompts)
    first = q.reshape(n, samples)[:, 0]
    gold = panel.score(roll.prompts, roll.responses)
    return {
        "q1_share": q1_share(q, n),
        "q1_share_first_sample": q1_share(first, n),
        "mean_q": round(float(q.mean()), 4),
        "mean_sentiment": round(float(sentiment.mean()), 4),
        "failures": {"nonword": round(float(np.mean([p["nonword"] > 0 for p in parts])), 4),
                     "repetition": round(float(np.mean([p["repetition"] > 0 for p in parts])), 4),
                     "under_two_words": round(float(np.mean([p["length"] < 1 for p in parts])), 4)},
        "ended_with_eos": round(float(roll.ended_with_eos.float().mean()), 4),
        # <|unk|> decodes to nothing: a response token that is unknown is a missing word
        "unknown_token_share": (None if tok.unk_token_id is None else round(float(
            ((roll.response_ids == tok.unk_token_id) & roll.response_mask.bool()).sum() / roll.response_mask.sum()), 4)),
        "clear_pairs_ordered_by": clear_pairs_ordered_by(gold, sentiment, q, n) if samples > 1 else None,
        "mean_response_words": round(float(np.mean([len(r.split()) for r in roll.responses])), 2),
        "examples": [{"prompt": p, "response": r, "q": round(float(x), 3)}
                     for p, r, x in list(zip(roll.prompts, roll.responses, q))[: 8 * samples: samples]],
    }


def run(quick: bool = False) -> dict:
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.tasks import kindly

    prompts = kindly.prompts("eval")
    lines = kindly.corpus_lines("eval")
    if quick:
        prompts, lines = prompts[:64], lines[:200]
    base = base_model()
    tok = load_tokenizer(str(base))
    ppl = word_perplexity(load_policy(str(base), trainable=False).eval(), tok, lines)
    out = sample_quality(sft_policy(), prompts, samples=1 if quick else SAMPLES)
    return {"target_q1_share": 0.85, **out, "base_perplexity": ppl, "vocab_size": len(tok),
            "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "seed": SEED}
