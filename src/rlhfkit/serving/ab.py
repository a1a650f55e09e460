"""A/B analysis of an experiment's logged traffic and feedback, and its decision.

Users are the randomised units, so every metric is first reduced to one value per user (and
arm): the share of their thumbs that were up, their mean rating, the share of their responses
they edited, were flagged by the safety monitor or failed, their mean latency and length, and,
from side-by-side picks between two arms, the share they gave to the candidate. Per-arm
intervals are over users; latency percentiles are over responses (order-statistic intervals).
Pairwise win rates against the control come from a Bradley-Terry fit over all arms.

The decision (`analyse`) compares each candidate with the control on the experiment's decision
metric with the always-valid mSPRT of rlhfkit.serving.abstats (Bonferroni over candidates), in
users' arrival order, so the report can be read after every user without inflating errors:

- **promote** a candidate that the test finds better and whose guardrails all hold: the
  confidence sequence of its worsening against the control lies within the margin;
- **roll back** when every candidate is found worse, breaks a guardrail (its worsening is above
  the margin for certain), or `max_users` is reached without a promotable candidate;
- **keep running** otherwise (including before `min_users` users per arm).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from sqlalchemy import select

from rlhfkit.feedback.db import Database
from rlhfkit.serving.abstats import (
    SequentialResult,
    bradley_terry,
    mean_interval,
    quantile_interval,
    rate_interval,
    sequential_test,
)
from rlhfkit.serving.experiments import METRICS, Experiment
from rlhfkit.serving.tables import ServedResponse, UseFeedback

RATES = ("thumbs_up", "edit_rate", "safety_flag_rate", "error_rate", "win_rate")


@dataclasses.dataclass
class Unit:
    """One user in one arm: what they were served and what they said about it."""

    arm: str
    first_seen: float
    responses: int = 0
    errors: int = 0
    latency: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    scored: int = 0
    flagged: int = 0
    thumbs: dict = dataclasses.field(default_factory=dict)    # (response, choice) -> up (latest wins)
    ratings: dict = dataclasses.field(default_factory=dict)
    edited: set = dataclasses.field(default_factory=set)
    picks: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (winner arm, loser arm)

    def value(self, metric: str, pair: tuple[str, str] | None = None) -> float | None:
        """The user's value of `metric` (None when they gave nothing it is made of); for
        win_rate, the share of their picks between the arms `pair` won by the first."""
        if metric == "thumbs_up":
            return float(np.mean(list(self.thumbs.values()))) if self.thumbs else None
        if metric == "rating":
            return float(np.mean(list(self.ratings.values()))) if self.ratings else None
        if metric == "edit_rate":
            return len(self.edited) / self.responses if self.responses else None
        if metric == "safety_flag_rate":
            return self.flagged / self.scored if self.scored else None
        if metric == "error_rate":
            return self.errors / self.responses if self.responses else None
        if metric == "latency_ms":
            return float(np.mean(self.latency)) if self.latency else None
        if metric == "completion_tokens":
            return float(np.mean(self.tokens)) if self.tokens else None
        if metric == "win_rate":
            won = [w == pair[0] for w, lo in self.picks if {w, lo} == set(pair)]
            return float(np.mean(won)) if won else None
        raise KeyError(metric)


def load_units(db: Database, experiment: str) -> tuple[dict[tuple[str, str], Unit], list[dict]]:
    """Per-(user, arm) units of an experiment, and every response's latency and arm."""
    units: dict[tuple[str, str], Unit] = {}
    arm_of: dict[str, tuple[str, str]] = {}
    latencies = []
    with db.read_session() as s:
        q = select(ServedResponse).where(ServedResponse.experiment == experiment).order_by(ServedResponse.id)
        for r in s.scalars(q.execution_options(yield_per=2000)):
            key = (r.user_key or f"anonymous:{r.response_id}", r.arm or "")
            u = units.get(key) or units.setdefault(key, Unit(arm=key[1], first_seen=r.created_at.timestamp()))
            arm_of[r.response_id] = key
            u.responses += 1
            u.errors += r.status >= 400
            u.latency.append(r.latency_ms)
            u.tokens.append(r.completion_tokens)
            if r.safety_flag is not None:
                u.scored += 1
                u.flagged += bool(r.safety_flag)
            latencies.append({"arm": key[1], "latency_ms": r.latency_ms})
        fq = (select(UseFeedback).join(ServedResponse, ServedResponse.response_id == UseFeedback.response_id)
              .where(ServedResponse.experiment == experiment).order_by(UseFeedback.id))
        for f in s.scalars(fq.execution_options(yield_per=2000)):
            _add_feedback(units, arm_of, f)
    return units, latencies


def _add_feedback(units: dict, arm_of: dict, f: UseFeedback) -> None:
    u = units[arm_of[f.response_id]]
    v = f.value
    if f.kind == "thumbs":
        u.thumbs[(f.response_id, v["choice"])] = 1.0 if v["up"] else 0.0
    elif f.kind == "rating":
        u.ratings[(f.response_id, v["choice"])] = float(v["rating"])
    elif f.kind == "edit":
        u.edited.add(f.response_id)
    elif f.kind == "pairwise" and f.other_response_id in arm_of:
        arms = (arm_of[f.response_id][1], arm_of[f.other_response_id][1])
        if arms[0] != arms[1]:  # a pick within one arm (regenerate and choose) says nothing about arms
            winner = arms[0] if v["chosen"] == f.response_id else arms[1]
            u.picks.append((winner, arms[1] if winner == arms[0] else arms[0]))


# ---------------------------------------------------------------------------------------------
# per-arm summaries


def _interval(metric: str, values: list[float], alpha: float) -> dict:
    fn = rate_interval if metric in RATES else mean_interval
    m, lo, hi = fn(values, alpha)
    return {"mean": _num(m), "low": _num(lo), "high": _num(hi), "users": len(values)}


def _num(x: float) -> float | None:
    return None if x is None or x != x else float(x)


def arm_summaries(exp: Experiment, units: dict, latencies: list[dict], alpha: float = 0.05) -> dict[str, dict]:
    out = {}
    for arm in exp.arm_names:
        mine = [u for u in units.values() if u.arm == arm]
        row: dict[str, Any] = {"users": len(mine), "responses": sum(u.responses for u in mine),
                               "thumbs": sum(len(u.thumbs) for u in mine), "ratings": sum(len(u.ratings) for u in mine),
                               "edits": sum(len(u.edited) for u in mine)}
        for metric in METRICS:
            if metric == "win_rate":
                continue
            row[metric] = _interval(metric, [v for u in mine if (v := u.value(metric)) is not None], alpha)
        lat = [r["latency_ms"] for r in latencies if r["arm"] == arm]
        for q in (0.5, 0.95):
            m, lo, hi = quantile_interval(lat, q, alpha)
            row[f"latency_p{int(q * 100)}_ms"] = {"mean": _num(m), "low": _num(lo), "high": _num(hi)}
        out[arm] = row
    _win_rates(exp, units, out, alpha)
    return out


def _win_rates(exp: Experiment, units: dict, out: dict, alpha: float) -> None:
    """Bradley-Terry win probability of each arm against the control, from side-by-side picks."""
    names = exp.arm_names
    wins = np.zeros((len(names), len(names)))
    for u in units.values():
        for w, lo in u.picks:
            if w in names and lo in names:
                wins[names.index(w), names.index(lo)] += 1
    for arm in names:
        out[arm]["pairwise"] = int(wins[names.index(arm)].sum() + wins[:, names.index(arm)].sum())
    if not wins.any():
        for arm in names:
            out[arm]["win_rate"] = {"mean": None, "low": None, "high": None, "users": 0}
        return
    bt = bradley_terry(wins, reference=names.index(exp.control))
    for i, arm in enumerate(names):
        if not out[arm]["pairwise"]:  # never compared: no strength to report
            out[arm]["win_rate"] = {"mean": None, "low": None, "high": None, "users": 0}
            continue
        m, lo, hi = bt.win_interval(i, alpha)
        out[arm]["win_rate"] = {"mean": m, "low": lo, "high": hi, "strength": float(bt.theta[i]),
                                "smoothed": bt.smoothed}


# ---------------------------------------------------------------------------------------------
# candidate against control, guardrails, decision


def compare(exp: Experiment, units: dict, candidate: str, metric: str, alpha: float,
            every: int = 1) -> SequentialResult | None:
    """The sequential test of `candidate` against the control on `metric`, users in arrival order.
    win_rate is one-sample (the candidate's share of side-by-side picks against 1/2)."""
    ordered = sorted(units.values(), key=lambda u: u.first_seen)
    if metric == "win_rate":
        rows = [(v, 1) for u in ordered if (v := u.value(metric, (candidate, exp.control))) is not None]
        null = 0.5
    else:
        rows = [(v, int(u.arm == candidate)) for u in ordered
                if u.arm in (candidate, exp.control) and (v := u.value(metric)) is not None]
        null = 0.0
    if not rows:
        return None
    values, groups = zip(*rows)
    return sequential_test(values, groups, alpha=alpha, mixture_sd=exp.decision.mixture_sd, every=every, null=null,
                           bounded=metric in RATES)


def _summary(res: SequentialResult | None, points: int = 200) -> dict:
    if res is None:
        return {"users": 0, "estimate": None, "low": None, "high": None, "p_value": 1.0, "direction": 0,
                "first_rejection": None, "path": {"n": [], "estimate": [], "low": [], "high": []}}
    keep = np.unique(np.linspace(0, res.n.size - 1, min(points, res.n.size)).astype(int))
    finite = lambda a: [_num(x) if np.isfinite(x) else None for x in a[keep]]  # noqa: E731
    return {"users": int(res.n[-1]), "estimate": _num(res.estimate[-1]), "low": _fin(res.low[-1]),
            "high": _fin(res.high[-1]), "p_value": float(res.p_value[-1]), "direction": res.direction,
            "first_rejection": res.first_rejection,
            "path": {"n": res.n[keep].tolist(), "estimate": finite(res.estimate), "low": finite(res.low),
                     "high": finite(res.high)}}


def _fin(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def guardrail_status(res: SequentialResult | None, metric: str, margin: float) -> tuple[str, float | None]:
    """'ok' (worsening surely within `margin`), 'breached' (surely beyond), or 'unproven'; and the
    largest worsening the confidence sequence allows."""
    if res is None:
        return "unproven", None
    lo, hi = res.low[-1], res.high[-1]
    if metric == "win_rate":
        lo, hi = lo - 0.5, hi - 0.5
    worst, best = (-lo, -hi) if METRICS[metric] else (hi, lo)
    if best > margin:
        return "breached", _fin(worst)
    return ("ok" if worst <= margin else "unproven"), _fin(worst)


def _verdict(res: dict, metric: str) -> str:
    sign = res["direction"] * (1 if METRICS[metric] else -1)
    return {1: "better", -1: "worse", 0: "undecided"}[sign]


def analyse(exp: Experiment, db: Database, every: int = 1) -> dict:
    """The whole report as a JSON-ready dict: arms, comparisons, guardrails and the decision."""
    units, latencies = load_units(db, exp.name)
    d = exp.decision
    arms = arm_summaries(exp, units, latencies, d.alpha)
    alpha = d.alpha / max(1, len(exp.candidates))  # Bonferroni over candidates
    comparisons = {}
    for cand in exp.candidates:
        res = _summary(compare(exp, units, cand.name, d.metric, alpha, every))
        res["verdict"] = _verdict(res, d.metric)
        rails = {}
        for metric, margin in exp.guardrails.items():
            status, worst = guardrail_status(compare(exp, units, cand.name, metric, d.alpha, every), metric, margin)
            rails[metric] = {"margin": margin, "status": status, "worst": worst}
        res["guardrails"] = rails
        comparisons[cand.name] = res
    users = sum(a["users"] for a in arms.values())
    return {"experiment": exp.name, "control": exp.control, "metric": d.metric, "alpha": d.alpha,
            "mixture_sd": d.mixture_sd, "users": users,
            "arms": {a.name: {"model": a.model, "weight": a.weight, **arms[a.name]} for a in exp.arms},
            "comparisons": comparisons, **decide(exp, arms, comparisons, users)}


def decide(exp: Experiment, arms: dict, comparisons: dict, users: int) -> dict:
    d = exp.decision
    short = [a for a, row in arms.items() if row["users"] < d.min_users]
    if short:
        return {"decision": "keep running", "arm": None,
                "reasons": [f"arm {a}: {arms[a]['users']} users, fewer than min_users {d.min_users}" for a in short]}
    reasons, promotable, failed = [], [], []
    for arm, c in comparisons.items():
        broken = [m for m, g in c["guardrails"].items() if g["status"] == "breached"]
        unproven = [m for m, g in c["guardrails"].items() if g["status"] == "unproven"]
        if broken or c["verdict"] == "worse":
            failed.append(arm)
            why = f"guardrail {', '.join(broken)} breached" if broken else f"{d.metric} worse than {exp.control}"
            reasons.append(f"arm {arm}: {why}")
        elif c["verdict"] == "better" and not unproven:
            promotable.append(arm)
            reasons.append(f"arm {arm}: {d.metric} better than {exp.control} and every guardrail holds")
        elif c["verdict"] == "better":
            reasons.append(f"arm {arm}: {d.metric} better, but guardrail {', '.join(unproven)} not yet shown "
                           "within its margin")
        else:
            reasons.append(f"arm {arm}: no decision on {d.metric} yet (p = {c['p_value']:.3g})")
    if promotable:
        sign = 1 if METRICS[d.metric] else -1
        best = max(promotable, key=lambda a: sign * (comparisons[a]["estimate"] or 0.0))
        return {"decision": "promote", "arm": best, "reasons": reasons}
    if len(failed) == len(comparisons):
        return {"decision": "roll back", "arm": exp.control, "reasons": reasons}
    if d.max_users is not None and users >= d.max_users:
        return {"decision": "roll back", "arm": exp.control,
                "reasons": reasons + [f"{users} users reached max_users {d.max_users} without a promotable arm"]}
    return {"decision": "keep running", "arm": None, "reasons": reasons}
