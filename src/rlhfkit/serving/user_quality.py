"""Quality of real users' feedback: agreement, flags for noise and adversaries, and weights.

Each user's labels are reduced to verdicts on items: a thumbs or a rating past the thresholds is
a verdict on one response (desirable or not), an edit or a pick a verdict on a pair. Then:

- **agreement with the majority**: on items (same prompt, same response or pair) that at least
  ``min_overlap`` *other* users labelled, the share of the user's verdicts that match the
  others' majority (leave-one-out; a tied majority is skipped);
- **agreement with the reward model**: a pair verdict agrees when the RM scores the chosen
  response higher; a single verdict when the response scores above (desirable) or below (not)
  the median RM score of all the round's labelled responses (at the median: not judged).

Flags (one-sided exact binomial tests at level ``alpha``, only for users with at least
``min_labels`` verdicts, so a few unlucky labels flag nobody):

- ``always_down`` / ``always_up``: the user's share of desirable verdicts is at most 5% / at least
  95% and below / above what the other users' pooled share makes plausible (the "always thumbs
  down" user; a test alone would flag honest users whose own scale is harsher or kinder than the
  crowd's once they give many labels);
- ``adversarial`` / ``random``: their agreement (with the RM where there is one, else with the
  majority) is below the median user's; ``adversarial`` when it is also below chance (1/2, the
  same test: they invert the labels), else ``random``; skipped while the reference agrees with the median user at most 55% of the time
  (it knows too little to judge anyone);
- ``coordinated``: a group of at least ``min_group`` users whose (prompt, verdict) sets overlap
  in at least ``min_shared`` items with Jaccard similarity >= ``jaccard`` (the same prompts and
  the same verdicts: a scripted campaign; users of a large prompt pool rarely share many).

The rule (`assess_users`): a flagged user's weight is 0 (excluded). Otherwise the weight is
their agreement's excess over chance relative to the median user's,
``clip((a - 1/2) / (a_median - 1/2), 0, 1)``, shrunk toward 1 by ``min_labels`` pseudo-labels
(``(n w + m) / (n + m)``), so a user is down-weighted only as far as their record shows; users
with nothing to judge, or judged by a reference that agrees with the median user at most 55% of
the time, keep weight 1.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

from rlhfkit.serving.online_data import Feedback, Rules, binary_label, pair_sides

FLAGS = ("always_down", "always_up", "adversarial", "random", "coordinated")
INFORMATIVE = 0.55  # a reference the median user agrees with less often judges nobody
CONSTANT = 0.05  # "always": at most this share of the other label


@dataclasses.dataclass(frozen=True)
class QualityRules:
    min_labels: int = 8
    alpha: float = 0.01
    min_overlap: int = 2
    min_shared: int = 5
    jaccard: float = 0.6
    min_group: int = 3


@dataclasses.dataclass
class Verdict:
    user: str
    item: tuple            # ("single", prompt, text) or ("pair", prompt, (text_a, text_b)) sorted
    good: bool             # single: desirable; pair: the first of the sorted texts was chosen
    prompt: Any
    texts: tuple[str, ...]  # single: (text,); pair: (chosen, rejected)


def _prompt_text(prompt: Any) -> str:
    """What the RM reads as the prompt: a chat request's last user message."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt)


def verdicts(events: Sequence[Feedback], rules: Rules = Rules()) -> list[Verdict]:
    out = []
    for e in events:
        if e.user is None:
            continue
        key = json.dumps(e.prompt, sort_keys=True)
        sides = pair_sides(e)
        if sides is not None:
            pair = tuple(sorted(sides))
            out.append(Verdict(e.user, ("pair", key, pair), sides[0] == pair[0], e.prompt, sides))
            continue
        label = binary_label(e, rules)
        if label is not None and e.text.strip():
            out.append(Verdict(e.user, ("single", key, e.text), label, e.prompt, (e.text,)))
    return out


def rm_agreement(vs: Sequence[Verdict], score: Callable[[list[str], list[str]], Sequence[float]]) -> list[bool | None]:
    """Whether each verdict agrees with the reward model (module docstring)."""
    prompts, texts = [], []
    for v in vs:
        for t in v.texts:
            prompts.append(_prompt_text(v.prompt))
            texts.append(t)
    scores = list(map(float, score(prompts, texts))) if texts else []
    singles = [scores[i] for i, v in zip(np.cumsum([0] + [len(v.texts) for v in vs])[:-1], vs) if len(v.texts) == 1]
    median = float(np.median(singles)) if singles else 0.0
    out, i = [], 0
    for v in vs:
        if len(v.texts) == 2:
            out.append(scores[i] > scores[i + 1])
        else:  # a response scored exactly at the median says nothing
            out.append(None if scores[i] == median else (scores[i] > median) == v.good)
        i += len(v.texts)
    return out


def majority_agreement(vs: Sequence[Verdict], min_overlap: int) -> list[bool | None]:
    """Per verdict: agrees with the other users' majority on its item (None: too few others or a tie)."""
    by_item: dict[tuple, Counter] = defaultdict(Counter)
    for v in vs:
        by_item[v.item][v.good] += 1
    out = []
    for v in vs:
        c = by_item[v.item].copy()
        c[v.good] -= 1
        if c[True] + c[False] < min_overlap or c[True] == c[False]:
            out.append(None)
        else:
            out.append(v.good == (c[True] > c[False]))
    return out


def _coordinated(vs: Sequence[Verdict], q: QualityRules) -> set[str]:
    sets: dict[str, set] = defaultdict(set)
    for v in vs:
        sets[v.user].add((v.item[1], v.good if v.item[0] == "single" else v.texts[0]))
    users = [u for u, s in sets.items() if len(s) >= q.min_shared]
    parent = {u: u for u in users}

    def find(u: str) -> str:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for i, a in enumerate(users):
        for b in users[i + 1:]:
            shared = len(sets[a] & sets[b])
            if shared >= q.min_shared and shared / len(sets[a] | sets[b]) >= q.jaccard:
                parent[find(a)] = find(b)
    groups = Counter(find(u) for u in users)
    return {u for u in users if groups[find(u)] >= q.min_group}


def _rate(flags: Sequence[bool | None]) -> tuple[int, int]:
    judged = [f for f in flags if f is not None]
    return int(sum(judged)), len(judged)


def assess_users(events: Sequence[Feedback], score: Callable | None = None, rules: Rules = Rules(),
                 q: QualityRules = QualityRules()) -> dict:
    """Per-user agreement, flags and weights, with a summary (see the module docstring)."""
    vs = verdicts(events, rules)
    maj = majority_agreement(vs, q.min_overlap)
    rm = rm_agreement(vs, score) if score is not None and vs else [None] * len(vs)
    per: dict[str, dict] = defaultdict(lambda: {"good": 0, "singles": 0, "maj": [], "rm": []})
    for v, m, a in zip(vs, maj, rm):
        p = per[v.user]
        if len(v.texts) == 1:
            p["singles"] += 1
            p["good"] += v.good
        p["maj"].append(m)
        p["rm"].append(a)
    reference = "reward model" if score is not None else "majority"
    rates = {u: _rate(p["rm"] if score is not None else p["maj"]) for u, p in per.items()}
    judged = [k / n for k, n in rates.values() if n >= q.min_labels]
    median = float(np.median(judged)) if judged else None
    coordinated = _coordinated(vs, q)
    users = {}
    for u, p in per.items():
        flags = _label_flags(u, p, per, q)
        k, n = rates[u]
        if median is not None and median > INFORMATIVE and n >= q.min_labels and stats.binom.cdf(k, n, median) < q.alpha:
            flags.append("adversarial" if stats.binom.cdf(k, n, 0.5) < q.alpha else "random")
        if u in coordinated:
            flags.append("coordinated")
        w = 0.0 if flags else _weight(k, n, median, q.min_labels)
        mk, mn = _rate(p["maj"])
        rk, rn = _rate(p["rm"])
        users[u] = {"verdicts": len(p["maj"]), "desirable_share": p["good"] / p["singles"] if p["singles"] else None,
                    "agreement_majority": mk / mn if mn else None, "majority_items": mn,
                    "agreement_rm": rk / rn if rn else None, "rm_items": rn, "flags": flags, "weight": round(w, 4)}
    flagged = Counter(f for x in users.values() for f in x["flags"])
    return {"users": users, "reference": reference, "median_agreement": median,
            "summary": {"users": len(users), "flagged_users": sum(bool(x["flags"]) for x in users.values()),
                        "by_flag": {f: flagged.get(f, 0) for f in FLAGS},
                        "down_weighted_users": sum(0 < x["weight"] < 1 for x in users.values())},
            "weights": {u: x["weight"] for u, x in users.items()}}


def _label_flags(user: str, p: dict, per: dict, q: QualityRules) -> list[str]:
    """always_down / always_up against the other users' pooled share of desirable verdicts."""
    n, k = p["singles"], p["good"]
    others_n = sum(x["singles"] for u, x in per.items() if u != user)
    if n < q.min_labels or others_n == 0:
        return []
    p0 = sum(x["good"] for u, x in per.items() if u != user) / others_n
    if k <= CONSTANT * n and 0 < p0 and stats.binom.cdf(k, n, p0) < q.alpha:
        return ["always_down"]
    if n - k <= CONSTANT * n and p0 < 1 and stats.binom.sf(k - 1, n, p0) < q.alpha:
        return ["always_up"]
    return []


def _weight(k: int, n: int, median: float | None, m: int) -> float:
    if n == 0 or median is None or median <= INFORMATIVE:
        return 1.0
    raw = float(np.clip((k / n - 0.5) / (median - 0.5), 0.0, 1.0))
    return (n * raw + m) / (n + m)
