"""Evaluation metrics: pure functions on arrays and strings, plus two model-based ones.

Everything a report needs to say whether a policy got better *for the humans* (gold
reward, win rate against the reference, held-out perplexity) or only for the reward
model (proxy reward, KL spent), and whether it collapsed (diversity).

Conventions: intervals are percentile bootstrap intervals (Efron & Tibshirani 1993,
ch. 13) from a seeded NumPy generator, so the same inputs always give the same interval.
Text metrics split on whitespace; callers who want subword n-grams pass token strings.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rlhfkit.logprobs import response_logprobs, token_logprobs

# ---------------------------------------------------------------------------------------------
# bootstrap


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, confidence: float = 0.95,
                 seed: int = 0, statistic: Callable[[np.ndarray], np.ndarray] | None = None,
                 clusters: Sequence[int] | np.ndarray | None = None) -> dict:
    """Mean of `values` with a percentile bootstrap confidence interval.

    Returns ``{"mean", "lo", "hi", "n"}``. `statistic` maps a (n_boot, n) array of resamples
    to n_boot statistics (default: the row mean). With one value the interval is that value.
    With `clusters` (e.g. the prompt of each of several samples) whole clusters are resampled
    (:func:`cluster_bootstrap_ci`; the mean only).
    """
    if clusters is not None:
        if statistic is not None:
            raise ValueError("bootstrap_ci: a custom statistic cannot be combined with clusters")
        return cluster_bootstrap_ci(values, clusters, n_boot=n_boot, confidence=confidence, seed=seed)
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"bootstrap_ci got {int((~np.isfinite(x)).sum())} non-finite value(s)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    stat = statistic or (lambda a: a.mean(axis=-1))
    point = float(stat(x[None, :])[0])
    if x.size == 1:
        return {"mean": point, "lo": point, "hi": point, "n": 1}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    stats = stat(x[idx])
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return {"mean": point, "lo": float(lo), "hi": float(hi), "n": int(x.size)}


# ---------------------------------------------------------------------------------------------
# win rates


def preference_labels(scores_a: Sequence[float], scores_b: Sequence[float], tie_margin: float = 0.0) -> np.ndarray:
    """Per-item label: 1.0 when a scores higher than b by more than `tie_margin`, 0.0 when
    lower by more than it, 0.5 otherwise (a tie)."""
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"scores differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    return np.where(d > tie_margin, 1.0, np.where(d < -tie_margin, 0.0, 0.5))


def cluster_bootstrap_ci(values: Sequence[float] | np.ndarray, clusters: Sequence[int] | np.ndarray,
                         n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of `values` with a bootstrap interval that resamples whole clusters (e.g. the several
    samples of one prompt, which are not independent of each other). Returns ``{"mean", "lo",
    "hi", "n", "clusters"}``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    _, ids = np.unique(np.asarray(clusters).ravel(), return_inverse=True)
    if ids.size != x.size:
        raise ValueError(f"{x.size} values but {ids.size} cluster ids")
    sums, counts = np.bincount(ids, weights=x), np.bincount(ids).astype(np.float64)
    k = sums.size
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, k, size=(n_boot, k))
    stats = sums[pick].sum(1) / counts[pick].sum(1)
    alpha = (1 - confidence) / 2
    return {"mean": float(x.mean()), "lo": float(np.quantile(stats, alpha)), "hi": float(np.quantile(stats, 1 - alpha)),
            "n": int(x.size), "clusters": int(k)}


def win_rate(labels: Sequence[float], n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
             clusters: Sequence[int] | None = None) -> dict:
    """Share of comparisons won, ties counting half, with a bootstrap interval.

    `labels` are 1 (win), 0 (loss) or 0.5 (tie) per comparison. With `clusters` (the prompt of each
    comparison, when a prompt has several samples) the interval resamples prompts, not comparisons.
    Returns ``{"mean", "lo", "hi", "n", "wins", "ties", "losses"}``.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    bad = ~np.isin(y, (0.0, 0.5, 1.0))
    if bad.any():
        raise ValueError(f"win_rate labels must be 0, 0.5 or 1; item {int(np.argmax(bad))} is {y[bad][0]}")
    out = bootstrap_ci(y, n_boot=n_boot, confidence=confidence, seed=seed, clusters=clusters)
    out.update(wins=int((y == 1).sum()), ties=int((y == 0.5).sum()), losses=int((y == 0).sum()))
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 0.0, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Maximum-likelihood logistic regression by Newton's method (IRLS), float64.

    `y` may hold soft labels in [0, 1] (a tie is 0.5: the Bernoulli log-likelihood with
    fractional targets). `l2` adds (l2/2)·||w||² to the negative log-likelihood, which keeps
    the fit finite when the data are separable (e.g. every comparison won). Steps are halved
    until the objective decreases, so the iteration never diverges.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.zeros(X.shape[1])

    def objective(w: np.ndarray) -> float:
        z = X @ w
        # -sum[y log s(z) + (1-y) log(1-s(z))] = sum[log(1+e^z) - y z]
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w @ w)

    f = objective(w)
    for _ in range(max_iter):
        p = _sigmoid(X @ w)
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(X.shape[1])
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        t = 1.0
        while t > 1e-8:
            w_new = w - t * step
            f_new = objective(w_new)
            if f_new <= f + 1e-12:
                break
            t *= 0.5
        converged = abs(f - f_new) < tol * max(1.0, abs(f))
        w, f = w_new, f_new
        if converged:
            break
    return w


def length_controlled_win_rate(labels: Sequence[float], len_policy: Sequence[float], len_reference: Sequence[float],
                               n_boot: int = 200, confidence: float = 0.95, seed: int = 0, l2: float = 1e-3) -> dict:
    """Length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval", eq. 2-3).

    The preference is modelled with a logistic GLM

        logit P(policy preferred) = theta + phi * tanh(delta_len / std(delta_len)),

    delta_len = len(policy response) - len(reference response), fitted by maximum likelihood;
    the length-controlled win rate is the GLM's prediction at delta_len = 0, sigmoid(theta).
    (AlpacaEval 2's instruction-difficulty term drops out with a single policy and baseline.)
    A judge that merely likes longer answers moves phi, not theta. The interval resamples
    prompts and refits. A small ridge `l2` keeps theta finite when every comparison is won.
    Returns ``{"mean", "lo", "hi", "n", "theta", "phi"}``.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    d = np.asarray(len_policy, dtype=np.float64).ravel() - np.asarray(len_reference, dtype=np.float64).ravel()
    if y.shape != d.shape:
        raise ValueError(f"labels ({y.size}) and lengths ({d.size}) differ in number")
    if y.size == 0:
        raise ValueError("length_controlled_win_rate needs at least one comparison")

    def fit(yy: np.ndarray, dd: np.ndarray) -> np.ndarray:
        sd = dd.std()
        feat = np.tanh(dd / sd) if sd > 0 else np.zeros_like(dd)
        X = np.stack([np.ones_like(dd), feat], axis=1)
        return fit_logistic(X, yy, l2=l2)

    theta, phi = fit(y, d)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if y.size > 1 else 0):
        i = rng.integers(0, y.size, size=y.size)
        boots.append(_sigmoid(fit(y[i], d[i])[0]))
    point = float(_sigmoid(theta))
    if boots:
        tail = (1.0 - confidence) / 2.0
        lo, hi = (float(v) for v in np.quantile(boots, [tail, 1.0 - tail]))
    else:
        lo = hi = point
    return {"mean": point, "lo": lo, "hi": hi, "n": int(y.size), "theta": float(theta), "phi": float(phi)}


# ---------------------------------------------------------------------------------------------
# diversity


def _tokens(text: str | Sequence[str]) -> list[str]:
    return text.split() if isinstance(text, str) else list(text)


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str | Sequence[str]], n: int = 1) -> float:
    """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective"): unique n-grams over
    all n-grams, pooled over `texts`. 0 when there is no n-gram at all."""
    grams = [g for t in texts for g in _ngrams(_tokens(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def expectation_adjusted_distinct(texts: Sequence[str | Sequence[str]], vocab_size: int, n: int = 1) -> float:
    """EAD (Liu et al. 2022, "Rethinking and Refining the Distinct Metric", eq. 6).

    Distinct counts are divided by their expectation when C n-grams are drawn uniformly
    from a space of size V = vocab_size**n, V·(1 - ((V-1)/V)^C), instead of by C; plain
    distinct-n falls as texts get longer even for a perfectly diverse source, EAD does not.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    grams = [g for t in texts for g in _ngrams(_tokens(t), n)]
    if not grams:
        return 0.0
    space = float(vocab_size) ** n
    c = len(grams)
    # 1 - (1 - 1/V)^C computed as -expm1(C·log1p(-1/V)) for precision when V is large
    expected = space * -math.expm1(c * math.log1p(-1.0 / space))
    return len(set(grams)) / expected


def _counts(tokens: Sequence[str], max_n: int) -> list[Counter]:
    return [Counter(_ngrams(tokens, n)) for n in range(1, max_n + 1)]


def _bleu_from_counts(hyp: list[Counter], c: int, refs: Sequence[list[Counter]], ref_lens: Sequence[int],
                      smoothing_eps: float) -> float:
    if c == 0 or not refs:
        return 0.0
    log_p = 0.0
    max_n = len(hyp)
    for n in range(max_n):
        total = sum(hyp[n].values())
        if total == 0:
            return 0.0  # hypothesis shorter than n: BLEU-max_n is undefined, count it as no overlap
        clipped = sum(min(k, max(r[n].get(g, 0) for r in refs)) for g, k in hyp[n].items())
        log_p += math.log((clipped if clipped > 0 else smoothing_eps) / total) / max_n
    r = min((abs(x - c), x) for x in ref_lens)[1]
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p)


def bleu(hypothesis: str | Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4,
         smoothing_eps: float = 0.1) -> float:
    """Sentence BLEU (Papineni et al. 2002): geometric mean of clipped n-gram precisions for
    n = 1..max_n with uniform weights, times the brevity penalty exp(min(0, 1 - r/c)), r the
    reference length closest to c (the shorter on a tie). A zero n-gram match count is replaced
    by `smoothing_eps` (Chen & Cherry 2014, smoothing 1) so one missing 4-gram does not zero
    the score.
    """
    hyp = _tokens(hypothesis)
    refs = [_tokens(r) for r in references]
    return _bleu_from_counts(_counts(hyp, max_n), len(hyp), [_counts(r, max_n) for r in refs],
                             [len(r) for r in refs], smoothing_eps)


def self_bleu(texts: Sequence[str | Sequence[str]], max_n: int = 4, max_texts: int | None = 200, seed: int = 0) -> float:
    """Self-BLEU (Zhu et al. 2018, "Texygen"): mean BLEU of each text against all the
    others as references. Higher means less diverse. Above `max_texts` a seeded subsample is
    scored (the cost is quadratic)."""
    items = list(texts)
    if max_texts is not None and len(items) > max_texts:
        keep = np.random.default_rng(seed).choice(len(items), size=max_texts, replace=False)
        items = [items[i] for i in sorted(keep)]
    if len(items) < 2:
        return 0.0
    toks = [_tokens(t) for t in items]
    counts = [_counts(t, max_n) for t in toks]  # each text's n-grams counted once, not once per pair
    lens = [len(t) for t in toks]
    scores = [_bleu_from_counts(counts[i], lens[i], counts[:i] + counts[i + 1:], lens[:i] + lens[i + 1:], 0.1)
              for i in range(len(items))]
    return float(np.mean(scores))


def diversity(texts: Sequence[str], vocab_size: int | None = None) -> dict:
    """distinct-1, distinct-2, self-BLEU and (with a vocabulary size) EAD in one dict."""
    out = {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "self_bleu": self_bleu(texts)}
    if vocab_size:
        out["ead"] = expectation_adjusted_distinct(texts, vocab_size, 1)
    return out


# ---------------------------------------------------------------------------------------------
# KL to the reference and perplexity (model-based)


def kl_from_logprobs(policy_logprobs, ref_logprobs, mask) -> dict:
    """KL estimate from sampled responses (DESIGN glossary): per response the summed log-ratio
    sum_t [log pi(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t)] over response tokens, averaged over
    responses. Unbiased for KL(pi || pi_ref) when the responses are sampled from pi at the
    policy's own temperature. Returns ``{"kl", "per_response"}`` (a NumPy array)."""

    lp = torch.as_tensor(policy_logprobs, dtype=torch.float64)
    lr = torch.as_tensor(ref_logprobs, dtype=torch.float64)
    m = torch.as_tensor(mask).to(torch.float64)
    per = ((lp - lr) * m).sum(-1)
    return {"kl": float(per.mean()), "per_response": per.numpy()}


def query_response_logprobs(model, query_ids, response_ids, response_mask, *, pad_token_id: int,
                            batch_size: int = 32, temperature: float = 1.0,
                            attention: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log pi(response | query) of a rollout's left-padded queries and right-padded
    responses: :func:`rlhfkit.logprobs.response_logprobs` in batches of `batch_size` rows, no
    gradients. Query tokens equal to `pad_token_id` are padding. Returns (N, R) float32 on the CPU,
    zero where `response_mask` is 0. `attention` (N, R) marks the real response tokens when they
    are more than the scored ones (an episode's environment tokens are attended to, not scored).
    """
    device = next(model.parameters()).device
    attention = response_mask if attention is None else attention
    out = []
    with torch.no_grad():
        for s in range(0, query_ids.shape[0], batch_size):
            q = query_ids[s:s + batch_size].to(device)
            r = response_ids[s:s + batch_size].to(device)
            rm = response_mask[s:s + batch_size].to(device).long()
            attn = torch.cat([(q != pad_token_id).long(), attention[s:s + batch_size].to(device).long()], dim=1)
            lp, _ = response_logprobs(model, input_ids=torch.cat([q, r], dim=1), attention_mask=attn,
                                      response_width=r.shape[1], response_mask=rm, temperature=temperature)
            out.append(lp.float().cpu())
    return torch.cat(out, dim=0)


def perplexity(model, tokenizer, lines: Sequence[str], batch_size: int = 16, max_length: int = 256) -> dict:
    """Held-out perplexity exp(total NLL / predicted tokens) of a causal LM on text lines.

    Each line is scored on its own (BOS prepended when the tokenizer has one and did not add
    it, so the first word is predicted too). Lines longer than `max_length` tokens are
    truncated and counted; lines with fewer than two tokens are skipped and counted.
    Returns ``{"perplexity", "nll", "tokens", "lines", "truncated", "skipped"}``.
    """


    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded, truncated, skipped = [], 0, 0
    for line in lines:
        ids = tokenizer(line, add_special_tokens=True)["input_ids"]
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        if len(ids) >= 2:
            encoded.append(ids)
        else:
            skipped += 1
    if not encoded:
        raise ValueError("perplexity: no line has two or more tokens")
    total_nll, total_tok = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(encoded), batch_size):
            chunk = encoded[s:s + batch_size]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, c in enumerate(chunk):
                ids[i, :len(c)] = torch.tensor(c)
                attn[i, :len(c)] = 1
            ids, attn = ids.to(device), attn.to(device)
            logits = model(input_ids=ids, attention_mask=attn).logits
            labels = torch.where(attn[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))
            lp = token_logprobs(logits[:, :-1].double(), labels)
            total_nll -= float(lp.sum())
            total_tok += int(attn[:, 1:].sum())
    model.train(was_training)
    nll = total_nll / total_tok
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tok, "lines": len(encoded), "truncated": truncated,
            "skipped": skipped}


def gold_gain_split(sentiment: np.ndarray, sentiment_ref: np.ndarray, quality: np.ndarray, quality_ref: np.ndarray,
                    n_boot: int = 1000, seed: int = 0, clusters: Sequence[int] | None = None) -> dict:
    """Split the gold panel's gain of a policy over its reference into a sentiment and a quality part.

    The panel's score of one response is g = q c - (1 - q) = q (c + 1) - 1 with c the mean over
    raters of their compound sentiment c_r and q the quality factor (rlhfkit.judges.panel). For
    one prompt, with the policy's (c, q) against the reference's (c', q'), the gain splits exactly
    (the midpoint rule for a product):

        g - g' = (q + q')/2 * (c - c')            sentiment term
               + ((c + 1) + (c' + 1))/2 * (q - q')  quality term

    Both terms are averaged over prompts, with paired bootstrap intervals (prompts resampled;
    with `clusters`, the prompt of each row when prompts have several samples, whole prompts),
    and `sentiment_share` is the sentiment term's share of the summed gain. Also returned: the
    mean sentiment c and quality q of each side and the share of responses with q = 1.
    """
    c, c0 = np.asarray(sentiment, np.float64), np.asarray(sentiment_ref, np.float64)
    q, q0 = np.asarray(quality, np.float64), np.asarray(quality_ref, np.float64)
    if not c.shape == c0.shape == q.shape == q0.shape or c.ndim != 1:
        raise ValueError("gold_gain_split needs four equal-length 1-D arrays (one value per prompt)")
    d_sent = (q + q0) / 2 * (c - c0)
    d_qual = ((c + 1) + (c0 + 1)) / 2 * (q - q0)
    total = d_sent + d_qual

    ids = np.arange(c.size) if clusters is None else np.unique(np.asarray(clusters).ravel(), return_inverse=True)[1]
    sent_sums, total_sums = np.bincount(ids, weights=d_sent), np.bincount(ids, weights=total)
    pick = np.random.default_rng(seed).integers(0, sent_sums.size, size=(n_boot, sent_sums.size))
    num, den = sent_sums[pick].sum(1), total_sums[pick].sum(1)
    shares = num[den != 0] / den[den != 0]  # the sentiment term's share of each resample's gain
    point = float(d_sent.sum() / total.sum()) if total.sum() != 0 else float("nan")

    def ci(x: np.ndarray) -> dict:
        return cluster_bootstrap_ci(x, ids, n_boot=n_boot, seed=seed)

    return {
        "gain": ci(total), "sentiment_term": ci(d_sent), "quality_term": ci(d_qual),
        "sentiment_share": {"mean": point, "lo": float(np.percentile(shares, 2.5)) if shares.size else float("nan"),
                            "hi": float(np.percentile(shares, 97.5)) if shares.size else float("nan")},
        "sentiment": {"policy": ci(c), "reference": ci(c0)},
        "quality": {"policy": ci(q), "reference": ci(q0)},
        "q1_share": {"policy": ci((q >= 1.0).astype(np.float64)), "reference": ci((q0 >= 1.0).astype(np.float64))},
    }
