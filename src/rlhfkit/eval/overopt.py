"""Reward-model over-optimisation: Gao et al. 2022 fits, best-of-N sweeps, a hacking alarm.

Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization", eq. 1-2:
with d = sqrt(KL(pi || pi_init)) and the gold reward measured relative to the initial
policy,

    best-of-N:  R_bon(d) = d (alpha_bon - beta_bon d)
    RL:         R_rl(d)  = d (alpha_rl  - beta_rl log d)

Both are linear in (alpha, beta), so ordinary least squares fits them exactly. The proxy
keeps rising with d while the gold turns over: that turn is reward hacking, and
:class:`HackingAlarm` watches for it during training. A policy can also win on the reward by
collapsing onto a few phrasings (mode collapse) or by losing what it could do (capability
degradation): :class:`CollapseAlarm` watches the diversity of the samples and the held-out
perplexity during training, and :func:`collapse_events` checks a finished policy against its
starting point with the same rules.

Alarm API (usable from any training loop)::

    alarm = HackingAlarm(window=10, threshold=2.5, patience=2, stop=True,
                         log_path=output_dir / "alarms.jsonl")
    for step in ...:
        ...
        event = alarm.update(step, proxy=mean_rm_reward, gold=mean_gold_or_judge_score)
        if event:                       # a dict, also appended to alarms.jsonl
            logger.log({"alarm/reward_hacking": 1}, step)
        if alarm.should_stop:           # only when stop=True
            break
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# functional forms and fits


def bon_gold(d, alpha: float, beta: float):
    """Gao et al. 2022 eq. 1: R_bon(d) = d (alpha - beta d)."""
    d = np.asarray(d, dtype=np.float64)
    return d * (alpha - beta * d)


def _d_log_d(d: np.ndarray) -> np.ndarray:
    # d log d -> 0 as d -> 0, so the RL form passes through the origin like the BoN one
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, d * np.log(safe), 0.0)


def rl_gold(d, alpha: float, beta: float):
    """Gao et al. 2022 eq. 2: R_rl(d) = d (alpha - beta log d)."""
    d = np.asarray(d, dtype=np.float64)
    return alpha * d - beta * _d_log_d(d)


def _least_squares(features: np.ndarray, y: np.ndarray) -> dict:
    if features.shape[0] < 2:
        raise ValueError(f"a fit of two coefficients needs at least 2 points, got {features.shape[0]}")
    coef, *_ = np.linalg.lstsq(features, y, rcond=None)
    pred = features @ coef
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {"alpha": float(coef[0]), "beta": float(coef[1]), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "n": int(y.size)}


def _prepare(kl: Sequence[float], gold: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    kl = np.asarray(kl, dtype=np.float64).ravel()
    gold = np.asarray(gold, dtype=np.float64).ravel()
    if kl.shape != gold.shape:
        raise ValueError(f"kl ({kl.size}) and gold ({gold.size}) differ in length")
    if np.any(kl < -1e-9):
        raise ValueError(f"KL must be >= 0 for d = sqrt(KL); got min {kl.min():.4g}")
    return np.sqrt(np.clip(kl, 0.0, None)), gold


def fit_bon(kl: Sequence[float], gold: Sequence[float]) -> dict:
    """Least-squares fit of R = d (alpha - beta d) to gold rewards (relative to the initial
    policy) at KL values `kl`. Returns ``{"alpha", "beta", "r2", "n", "form": "bon"}``."""
    d, y = _prepare(kl, gold)
    out = _least_squares(np.stack([d, -d * d], axis=1), y)
    out["form"] = "bon"
    return out


def fit_rl(kl: Sequence[float], gold: Sequence[float]) -> dict:
    """Least-squares fit of R = d (alpha - beta log d). Returns ``{"alpha", "beta", "r2", "n", "form": "rl"}``."""
    d, y = _prepare(kl, gold)
    out = _least_squares(np.stack([d, -_d_log_d(d)], axis=1), y)
    out["form"] = "rl"
    return out


FITS = {"bon": (fit_bon, bon_gold), "rl": (fit_rl, rl_gold)}


def bon_kl(n: int | np.ndarray):
    """Analytic KL of best-of-n to its base policy: log n - (n - 1)/n (Stiennon et al. 2020,
    appendix G.3; used as the x-axis of Gao et al. 2022's best-of-N curves)."""
    n = np.asarray(n, dtype=np.float64)
    return np.log(n) - (n - 1.0) / n


def bon_expected(select: np.ndarray, value: np.ndarray, n: int) -> np.ndarray:
    """Expected `value` of the sample a best-of-n picks by `select`, for each prompt, when the
    n candidates are a uniformly random subset of the N samples available (Nakano et al. 2021,
    WebGPT appendix; Gao et al. 2022 sec. 3.1). Unbiased and without resampling noise: with the
    samples sorted by `select` ascending, the i-th (1-based) is the best of the subset with
    probability C(i-1, n-1) / C(N, n).

    `select` and `value` are (P, N); returns (P,).
    """
    select = np.asarray(select, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    if select.shape != value.shape or select.ndim != 2:
        raise ValueError(f"select and value must be equal (P, N) arrays, got {select.shape} and {value.shape}")
    N = select.shape[1]
    if not 1 <= n <= N:
        raise ValueError(f"n must be in [1, {N}], got {n}")
    order = np.argsort(select, axis=1, kind="stable")
    sorted_value = np.take_along_axis(value, order, axis=1)
    i = np.arange(1, N + 1)
    weights = np.array([math.comb(k - 1, n - 1) for k in i], dtype=np.float64) / math.comb(N, n)
    return sorted_value @ weights


def bon_sweep(proxy: np.ndarray, gold: np.ndarray, ns: Sequence[int] | None = None) -> list[dict]:
    """Gold and proxy of best-of-n (selected by the proxy) for each n in `ns`.

    `proxy`, `gold`: (P, N) scores of N samples for each of P prompts. Gold and proxy are
    reported both raw and relative to n = 1 (the base policy), the quantity Gao et al. fit.
    """
    proxy = np.asarray(proxy, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    N = proxy.shape[1]
    ns = list(ns) if ns is not None else [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= N]
    base_gold, base_proxy = float(gold.mean()), float(proxy.mean())
    rows = []
    for n in ns:
        g = float(bon_expected(proxy, gold, n).mean())
        p = float(bon_expected(proxy, proxy, n).mean())
        kl = float(bon_kl(n))
        rows.append({"n": int(n), "kl": kl, "d": math.sqrt(max(kl, 0.0)), "gold": g, "proxy": p,
                     "gold_delta": g - base_gold, "proxy_delta": p - base_proxy})
    return rows


# ---------------------------------------------------------------------------------------------
# the reward-hacking alarm


def slope_and_se(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Ordinary least-squares slope of y on x and its standard error (inf with < 3 points)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if sxx == 0:
        return 0.0, math.inf
    slope = float(xc @ (y - y.mean())) / sxx
    if x.size < 3:
        return slope, math.inf
    resid = y - y.mean() - slope * xc
    se = math.sqrt(float(resid @ resid) / (x.size - 2) / sxx)
    return slope, se


class HackingAlarm:
    """Fires when the proxy reward rises while the gold reward (or a held-out judge) falls.

    Over the last `window` updates, both series are regressed on the step by least squares.
    The alarm fires when the proxy slope is significantly positive and the gold slope
    significantly negative: slope / standard error beyond `threshold` (a t statistic, so noisy
    but flat series do not trip it), for `patience` consecutive updates. A zero standard error
    (a perfectly straight line) counts as significant when the slope is not zero.
    `min_gold_drop` additionally requires the fitted gold decline over the window to be at
    least that large in reward units.

    Each firing returns an event dict (and appends it to `log_path` as JSON lines); with
    `stop=True`, :attr:`should_stop` becomes True so the loop can end the run.
    """

    def __init__(self, window: int = 10, threshold: float = 2.5, patience: int = 2, min_gold_drop: float = 0.0,
                 stop: bool = False, log_path: str | Path | None = None):
        if window < 3:
            raise ValueError(f"HackingAlarm window must be >= 3 (a slope and its error), got {window}")
        if patience < 1:
            raise ValueError(f"HackingAlarm patience must be >= 1, got {patience}")
        self.window, self.threshold, self.patience = window, threshold, patience
        self.min_gold_drop, self.stop = min_gold_drop, stop
        self.log_path = Path(log_path) if log_path else None
        self._steps: deque = deque(maxlen=window)
        self._proxy: deque = deque(maxlen=window)
        self._gold: deque = deque(maxlen=window)
        self._streak = 0
        self.events: list[dict] = []
        self.should_stop = False
        self.last: dict = {}

    def _t(self, slope: float, se: float) -> float:
        if se == 0:
            return math.copysign(math.inf, slope) if slope != 0 else 0.0
        return slope / se

    def update(self, step: int, proxy: float, gold: float) -> dict | None:
        """Add one (step, proxy, gold) observation; return an event dict if the alarm fires."""
        if not (math.isfinite(proxy) and math.isfinite(gold)):
            raise ValueError(f"HackingAlarm.update at step {step}: proxy={proxy}, gold={gold} must be finite")
        self._steps.append(float(step))
        self._proxy.append(float(proxy))
        self._gold.append(float(gold))
        if len(self._steps) < self.window:
            self.last = {}
            return None
        ps, pse = slope_and_se(self._steps, self._proxy)
        gs, gse = slope_and_se(self._steps, self._gold)
        span = self._steps[-1] - self._steps[0]
        pt, gt = self._t(ps, pse), self._t(gs, gse)
        self.last = {"proxy_slope": ps, "gold_slope": gs, "proxy_t": pt, "gold_t": gt}
        hacking = pt > self.threshold and gt < -self.threshold and -gs * span >= self.min_gold_drop
        self._streak = self._streak + 1 if hacking else 0
        if self._streak < self.patience:
            return None
        event = {"event": "reward_hacking", "step": int(step), "window_start": int(self._steps[0]),
                 "proxy_slope": ps, "gold_slope": gs, "proxy_t": pt, "gold_t": gt,
                 "proxy": float(proxy), "gold": float(gold), "stopped": bool(self.stop)}
        self.events.append(event)
        if self.stop:
            self.should_stop = True
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:  # append-only event log, one line per event
                f.write(json.dumps(event) + "\n")
        return event

    def metrics(self) -> dict:
        """Latest slopes for a metrics logger (empty until the window is full)."""
        out = {f"alarm/{k}": v for k, v in self.last.items() if math.isfinite(v)}
        out["alarm/fired"] = len(self.events)
        return out


# Diversity falls (distinct-n) and perplexity rises when a policy collapses; the thresholds are the
# project's own budget for a healthy run: distinct-1 and distinct-2 within 20% of the starting
# policy's, held-out perplexity at most 1.5 times the starting policy's.
MAX_DIVERSITY_DROP = 0.2
MAX_PERPLEXITY_RATIO = 1.5
DIVERSITY_KEYS = ("distinct_1", "distinct_2")


def _collapse_rule(key: str, value: float, baseline: float, max_diversity_drop: float,
                   max_perplexity_ratio: float) -> dict | None:
    """The event for one metric against its baseline, or None when it is within the budget."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline <= 0:
        return None
    ratio = value / baseline
    if key in DIVERSITY_KEYS and ratio < 1 - max_diversity_drop:
        return {"event": "diversity_collapse", "metric": key, "value": value, "baseline": baseline, "ratio": ratio,
                "limit": 1 - max_diversity_drop}
    if key == "perplexity" and ratio > max_perplexity_ratio:
        return {"event": "perplexity_blowup", "metric": key, "value": value, "baseline": baseline, "ratio": ratio,
                "limit": max_perplexity_ratio}
    return None


def collapse_events(policy: dict, reference: dict, max_diversity_drop: float = MAX_DIVERSITY_DROP,
                    max_perplexity_ratio: float = MAX_PERPLEXITY_RATIO) -> list[dict]:
    """Mode collapse and capability loss of a finished policy: its distinct-1/2 and held-out
    perplexity (plain numbers, or `rlhfkit eval`'s {"mean": ...} dicts) against the starting
    policy's. One event per metric outside the budget; empty when the policy is healthy."""
    def value(d: dict, key: str) -> float:
        v = d.get(key)
        v = v.get("mean") if isinstance(v, dict) else v
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan

    events = []
    for key in (*DIVERSITY_KEYS, "perplexity"):
        event = _collapse_rule(key, value(policy, key), value(reference, key), max_diversity_drop, max_perplexity_ratio)
        if event is not None:
            events.append(event)
    return events


class CollapseAlarm:
    """Fires on mode collapse or capability degradation during training.

    Diversity (distinct-1 and distinct-2 of every rollout batch, noisy from batch to batch) is
    averaged over its last `window` observations and compared with the average of its first
    `window` observations, the starting policy's. Held-out perplexity (measured on fixed text,
    so without sampling noise) is compared as it comes with its first observation, which a
    training loop takes before its first update. Diversity down by more
    than `max_diversity_drop` (relative) or perplexity up by more than `max_perplexity_ratio`,
    for `patience` consecutive observations, fires an event (appended to `log_path` as a JSON
    line, once per metric) and, with `stop=True`, sets :attr:`should_stop`.
    """

    def __init__(self, window: int = 5, patience: int = 2, max_diversity_drop: float = MAX_DIVERSITY_DROP,
                 max_perplexity_ratio: float = MAX_PERPLEXITY_RATIO, stop: bool = False,
                 log_path: str | Path | None = None):
        if window < 1 or patience < 1:
            raise ValueError(f"CollapseAlarm window and patience must be >= 1, got {window} and {patience}")
        self.window, self.patience, self.stop = window, patience, stop
        self.max_diversity_drop, self.max_perplexity_ratio = max_diversity_drop, max_perplexity_ratio
        self.log_path = Path(log_path) if log_path else None
        self._first: dict[str, list[float]] = {}
        self._recent: dict[str, deque] = {}
        self._streak: dict[str, int] = {}
        self.fired: set[str] = set()
        self.events: list[dict] = []
        self.should_stop = False
        self.last: dict[str, float] = {}

    def update(self, step: int, **values: float) -> list[dict]:
        """Add this step's observations (any of distinct_1, distinct_2, perplexity); returns new events."""
        new = []
        for key, v in values.items():
            if v is None or not math.isfinite(v):
                continue
            window = 1 if key == "perplexity" else self.window
            first = self._first.setdefault(key, [])
            recent = self._recent.setdefault(key, deque(maxlen=window))
            recent.append(float(v))
            if len(first) < window:
                first.append(float(v))
                continue
            baseline, current = float(np.mean(first)), float(np.mean(recent))
            self.last[f"{key}_ratio"] = current / baseline if baseline > 0 else math.nan
            event = _collapse_rule(key, current, baseline, self.max_diversity_drop, self.max_perplexity_ratio)
            self._streak[key] = self._streak.get(key, 0) + 1 if event else 0
            if event is None or self._streak[key] < self.patience or key in self.fired:
                continue
            self.fired.add(key)
            event.update(step=int(step), stopped=bool(self.stop))
            new.append(event)
        for event in new:
            self.events.append(event)
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a") as f:  # append-only event log, one line per event
                    f.write(json.dumps(event) + "\n")
        if new and self.stop:
            self.should_stop = True
        return new


def describe(event: dict) -> str:
    """One line for a person: what an alarm event saw."""
    if event["event"] == "reward_hacking":
        return (f"reward hacking at update {event['step']}: training reward slope {event['proxy_slope']:+.4f} while "
                f"the eval reward's is {event['gold_slope']:+.4f}")
    where = f" at update {event['step']}" if "step" in event else ""
    if event["event"] == "diversity_collapse":
        return (f"diversity collapse{where}: {event['metric']} {event['value']:.3f} is {event['ratio']:.2f} of the "
                f"starting policy's {event['baseline']:.3f} (limit {event['limit']:.2f})")
    return (f"perplexity blow-up{where}: held-out perplexity {event['value']:.1f} is {event['ratio']:.2f}x the "
            f"starting policy's {event['baseline']:.1f} (limit {event['limit']:.2f}x)")


def read_alarms(path: str | Path) -> list[dict]:
    """Read an alarms.jsonl written by HackingAlarm (empty list if absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# from logged training metrics


def _series(rows: Sequence[dict], keys: Sequence[str]) -> list[tuple[int, ...]]:
    out = []
    for i, r in enumerate(rows):
        vals = [r.get(k) for k in keys]
        if all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
            out.append((int(r.get("step", i)), *vals))
    return out


def rl_sweep_from_metrics(rows: Sequence[dict], kl_key: str = "kl", gold_key: str = "gold_reward",
                          proxy_key: str = "proxy_reward", bins: int = 8) -> list[dict]:
    """RL points for the Gao et al. plot from a training run's metrics.jsonl rows.

    Consecutive logged updates are averaged in `bins` groups (per-update batches are small
    and noisy); gold and proxy are reported relative to the first group, KL clipped at 0
    (a sampled KL estimate can dip below it). Empty when the keys were not logged.
    """
    pts = _series(rows, (kl_key, gold_key, proxy_key))
    if len(pts) < 2:
        return []
    groups = np.array_split(np.arange(len(pts)), min(bins, len(pts)))
    arr = np.array(pts, dtype=np.float64)
    out = []
    for g in groups:
        step, kl, gold, proxy = arr[g].mean(axis=0)
        out.append({"step": float(step), "kl": max(float(kl), 0.0), "gold": float(gold), "proxy": float(proxy)})
    for r in out:
        r["gold_delta"] = r["gold"] - out[0]["gold"]
        r["proxy_delta"] = r["proxy"] - out[0]["proxy"]
    return out


def replay_alarm(rows: Sequence[dict], gold_key: str = "gold_reward", proxy_key: str = "proxy_reward",
                 log_path: str | Path | None = None, **alarm_kwargs) -> list[dict]:
    """Run a HackingAlarm over logged metrics after the fact; returns the events."""
    alarm = HackingAlarm(log_path=log_path, **alarm_kwargs)
    for step, proxy, gold in _series(rows, (proxy_key, gold_key)):
        alarm.update(step, proxy, gold)
    return alarm.events
