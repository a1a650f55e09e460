"""Agreement and aggregation math for human labels (pure functions, no database).

- Krippendorff's alpha (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"):
  alpha = 1 - D_o / D_e from the coincidence matrix, with the difference function chosen by
  the level of measurement: nominal (categories), ordinal (ranks, Likert points), interval,
  ratio. Missing values and units with fewer than two values are allowed.
- Cohen's kappa (Cohen 1960): kappa = (p_o - p_e) / (1 - p_e) for two raters.
- Fleiss' kappa (Fleiss 1971), with the per-subject agreement generalised to a varying
  number of raters per subject: P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)).
- Bradley-Terry strengths by the MM algorithm (Hunter 2004, "MM algorithms for generalized
  Bradley-Terry models", eq. 3), ties counted as half a win for each side.
- Majority and reliability-weighted votes; the weight of a voter with accuracy r over K
  classes is log((K - 1) r / (1 - r)) (Nitzan & Paroush 1982, optimal weighted majority).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

METRICS = ("nominal", "ordinal", "interval", "ratio")


# --------------------------------------------------------------------------------------------
# Krippendorff's alpha


def _coincidences(units: Iterable[Sequence]) -> tuple[list, np.ndarray]:
    """Coincidence matrix o_ck: each ordered pair of values within a unit adds 1 / (m_u - 1)."""
    pairable = [[v for v in unit if v is not None] for unit in units]
    pairable = [u for u in pairable if len(u) >= 2]
    values = sorted({v for u in pairable for v in u})
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)), dtype=np.float64)
    for u in pairable:
        counts = Counter(index[v] for v in u)
        m = len(u)
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nc - 1) if c == k else nc * nk
                o[c, k] += pairs / (m - 1)
    return values, o


def _delta2(values: list, marginals: np.ndarray, metric: str) -> np.ndarray:
    """Squared difference function delta^2(c, k) for the given level of measurement."""
    m = len(values)
    if metric == "nominal":
        return 1.0 - np.eye(m)
    v = np.asarray(values, dtype=np.float64)
    if metric == "interval":
        return (v[:, None] - v[None, :]) ** 2
    if metric == "ratio":
        s = v[:, None] + v[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.where(s == 0, 0.0, ((v[:, None] - v[None, :]) / s) ** 2)
        return d
    if metric == "ordinal":
        # delta_ck = sum_{g=c..k} n_g - (n_c + n_k) / 2, values in rank order
        cum = np.concatenate([[0.0], np.cumsum(marginals)])
        d = np.zeros((m, m))
        for c in range(m):
            for k in range(m):
                lo, hi = min(c, k), max(c, k)
                d[c, k] = (cum[hi + 1] - cum[lo] - (marginals[c] + marginals[k]) / 2) ** 2
        return d
    raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")


def krippendorff_alpha(units: Iterable[Sequence], metric: str = "nominal") -> float:
    """Krippendorff's alpha for reliability data given as one sequence of values per unit.

    `units[u]` holds the values the coders gave unit u (None = missing). Values must be
    numbers for ordinal/interval/ratio (ordinal uses only their order). Returns nan when
    there is no pairable value or no variation at all (D_e = 0).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    values, o = _coincidences(units)
    if not values:
        return float("nan")
    n_c = o.sum(axis=1)
    n = n_c.sum()
    d2 = _delta2(values, n_c, metric)
    d_o = (o * d2).sum() / n
    d_e = (np.outer(n_c, n_c) * d2).sum() / (n * (n - 1))
    if d_e == 0:
        return float("nan")
    return float(1.0 - d_o / d_e)


# --------------------------------------------------------------------------------------------
# kappas


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa between two raters' labels of the same subjects (nan if p_e == 1)."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: the raters labelled {len(a)} and {len(b)} subjects; they must match")
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in set(ca) | set(cb)) / (n * n)
    if p_e == 1.0:
        return float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(counts: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Fleiss' kappa from a subjects x categories matrix of rating counts.

    Subjects with fewer than two ratings are ignored; with a constant number of raters this is
    exactly Fleiss (1971).
    """
    x = np.asarray(counts, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("fleiss_kappa: counts must be a 2-D subjects x categories matrix")
    n_i = x.sum(axis=1)
    x, n_i = x[n_i >= 2], n_i[n_i >= 2]
    if len(x) == 0:
        return float("nan")
    p_i = (x * (x - 1)).sum(axis=1) / (n_i * (n_i - 1))
    p_bar = p_i.mean()
    p_j = x.sum(axis=0) / n_i.sum()
    p_e = (p_j**2).sum()
    if p_e == 1.0:
        return float("nan")
    return float((p_bar - p_e) / (1.0 - p_e))


def fleiss_counts(units: Iterable[Sequence[Hashable]]) -> tuple[np.ndarray, list]:
    """Turn per-unit label lists into the subjects x categories count matrix for Fleiss."""
    units = [[v for v in u if v is not None] for u in units]
    cats = sorted({v for u in units for v in u}, key=repr)
    idx = {c: i for i, c in enumerate(cats)}
    m = np.zeros((len(units), len(cats)))
    for r, u in enumerate(units):
        for v in u:
            m[r, idx[v]] += 1
    return m, cats


# --------------------------------------------------------------------------------------------
# aggregation


def bradley_terry(comparisons: Iterable[tuple[Hashable, Hashable, float]], prior: float = 0.0,
                  iters: int = 1000, tol: float = 1e-12) -> dict[Hashable, float]:
    """Bradley-Terry log-strengths (mean zero) from (i, j, s) comparisons, s = score of i vs j.

    s is 1 (i won), 0 (j won) or 0.5 (tie). `prior` adds that many virtual ties between every
    pair that was compared, which keeps strengths finite when a response never loses.
    Solved by Hunter's MM update p_i <- W_i / sum_j n_ij / (p_i + p_j).
    """
    wins: dict[Hashable, float] = defaultdict(float)
    n: dict[tuple, float] = defaultdict(float)
    for i, j, s in comparisons:
        if i == j:
            continue
        wins[i] += s
        wins[j] += 1.0 - s
        key = (i, j) if repr(i) <= repr(j) else (j, i)
        n[key] += 1.0
    if prior > 0:
        for i, j in list(n):
            wins[i] += prior / 2
            wins[j] += prior / 2
            n[(i, j)] += prior
    players = sorted(wins, key=repr)
    if not players:
        return {}
    idx = {p: k for k, p in enumerate(players)}
    nmat = np.zeros((len(players), len(players)))
    for (i, j), c in n.items():
        nmat[idx[i], idx[j]] += c
        nmat[idx[j], idx[i]] += c
    w = np.array([wins[p] for p in players])
    p = np.ones(len(players))
    for _ in range(iters):
        denom = (nmat / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, w / np.where(denom > 0, denom, 1.0), p)
        new = np.maximum(new, 1e-300)
        new /= np.exp(np.mean(np.log(new)))
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            p = new
            break
        p = new
    logp = np.log(p)
    logp -= logp.mean()
    return {pl: float(logp[idx[pl]]) for pl in players}


def majority_vote(votes: Sequence[Hashable]) -> Hashable | None:
    """The most frequent value; None when there is no vote or the top count is tied."""
    if not votes:
        return None
    top = Counter(votes).most_common()
    if len(top) > 1 and top[0][1] == top[1][1]:
        return None
    return top[0][0]


def reliability_weight(accuracy: float, num_classes: int = 2) -> float:
    """log((K-1) r / (1-r)), clipped at 0 for voters no better than chance."""
    r = min(max(accuracy, 1e-3), 1 - 1e-3)
    return max(0.0, math.log((num_classes - 1) * r / (1 - r)))


def weighted_vote(votes: Sequence[tuple[Hashable, float]]) -> Hashable | None:
    """Value with the largest summed weight; None when tied or all weights are zero."""
    totals: dict[Hashable, float] = defaultdict(float)
    for v, w in votes:
        totals[v] += w
    if not totals:
        return None
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    if ranked[0][1] <= 0 or (len(ranked) > 1 and math.isclose(ranked[0][1], ranked[1][1])):
        return None
    return ranked[0][0]


def ranking_to_pairs(ranking: Sequence[Hashable]) -> list[tuple[Hashable, Hashable, float]]:
    """Expand a best-first ranking into (winner, loser, 1.0) comparisons: K(K-1)/2 pairs."""
    return [(ranking[a], ranking[b], 1.0) for a in range(len(ranking)) for b in range(a + 1, len(ranking))]


def binomial_two_sided_p(k: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test p-value (sum of outcomes no more likely than k)."""
    if n == 0:
        return 1.0
    probs = [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]
    pk = probs[k]
    return float(min(1.0, sum(q for q in probs if q <= pk * (1 + 1e-9))))


def mean_pairwise_cohen(labels_by_rater: Mapping[Hashable, Mapping[Hashable, Hashable]],
                        min_shared: int = 5) -> tuple[float, int]:
    """Mean Cohen's kappa over rater pairs sharing at least `min_shared` subjects."""
    raters = sorted(labels_by_rater, key=repr)
    kappas = []
    for x in range(len(raters)):
        for y in range(x + 1, len(raters)):
            la, lb = labels_by_rater[raters[x]], labels_by_rater[raters[y]]
            shared = sorted(set(la) & set(lb), key=repr)
            if len(shared) >= min_shared:
                k = cohen_kappa([la[s] for s in shared], [lb[s] for s in shared])
                if not math.isnan(k):
                    kappas.append(k)
    return (float(np.mean(kappas)) if kappas else float("nan")), len(kappas)
