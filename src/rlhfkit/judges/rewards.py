"""Rewards as code: reward functions, built-in verifiers, and the weighted set a recipe scores with.

A reward function has TRL's ``reward_funcs`` signature::

    def my_reward(prompts, completions, **kwargs) -> list[float | None]

The keywords are TRL's (``GRPOTrainer._calculate_rewards``):

- ``prompts``, ``completions``: lists of N strings (or, for conversational prompts, N message
  lists and N ``[{"role": "assistant", "content": ...}]`` lists);
- ``completion_ids``: N lists of the sampled token ids (up to and including the first EOS, no
  padding);
- ``trainer_state``: a ``transformers.TrainerState``; ``global_step`` is the number of completed
  updates, ``max_steps`` the run's;
- ``log_extra(column, values)``: one value per completion, written as a column of this update's
  samples (``samples.jsonl``);
- ``log_metric(name, value)``: a scalar logged with this update's metrics (averaged when logged
  several times);
- every other column of the prompt dataset as a keyword list of N values (e.g. ``answer``).

A function without ``**kwargs`` gets only the keywords it names. It returns one float per
completion, or None where it does not apply; it may be ``async``. rlhfkit calls each function
once per rollout batch (several async functions run concurrently), checks the result and stops
the run, naming the function, when it raises, returns the wrong number of values, or returns
NaN/inf -- before any update uses it.

The total reward of a completion is sum_i w_i r_i over the functions that did not return None
(TRL's nansum). A completion for which every function returned None is unscorable (a warning
names it, as TRL's does): the group recipes (GRPO, RLOO) give it the mean total of its group's
scorable completions, so it moves neither the group's baseline nor the policy (advantage 0);
PPO scores it 0. Each function is logged on its own under ``rewards/<name>/mean``, ``/std``
(over the values it returned) and ``/abstained`` (its share of None), and
``rewards/unscorable`` is the share of unscorable completions.

Built-in verifiers (by name in ``--reward``):

- ``math`` (alias ``exact_match``): 1.0 when the completion's answer equals the ``answer``
  column, else 0.0. The completion's answer is the content of its last ``\\boxed{...}`` or,
  without one, its last number; both sides are normalised (commas, spaces, ``$``, trailing
  ``.0``; numbers compared as exact fractions, so "0.5" equals "1/2").
- ``regex:PATTERN``: 1.0 when ``re.search(PATTERN, completion, re.DOTALL)`` matches, else 0.0
  (anchor with ``^...$`` for a whole-completion format check).
- ``length:MAX``: 0 up to MAX characters, then -(excess / MAX): a soft length penalty.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from rlhfkit.errors import ConfigError, NonFiniteError, RlhfkitError
from rlhfkit.rollout.episodes import episode_stats, transcript

logger = logging.getLogger(__name__)


class RewardFunctionError(RlhfkitError):
    """A reward function raised, returned the wrong number of values or a non-number."""


# ---------------------------------------------------------------------------------------------
# built-in verifiers

_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None when there is none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalise_answer(text: Any) -> str:
    """Canonical form of an answer: exact rational for numbers, else stripped lower-case text."""
    s = str(text).strip().strip("$").strip().rstrip(".").replace(",", "").replace(" ", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return s.lower()
    return str(value)  # "2.50" -> "5/2", "4.0" -> "4"


def extract_answer(completion: str) -> str | None:
    """The answer a completion gives: its last \\boxed{} content, else its last number."""
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def _text(c: Any) -> str:
    """A completion as text: TRL passes conversational completions as [{"role", "content"}]."""
    if isinstance(c, list):
        return "".join(str(m.get("content", "")) for m in c if isinstance(m, dict))
    return str(c)


def math_exact_match(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
                     **_: Any) -> list[float]:
    """1.0 where the completion's final answer equals `answer` after normalisation, else 0.0."""
    if answer is None:
        raise ConfigError("reward 'math' needs an 'answer' column in the prompt dataset")
    out = []
    for c, a in zip(completions, answer):
        got = extract_answer(_text(c))
        out.append(float(got is not None and normalise_answer(got) == normalise_answer(a)))
    return out


def regex_reward(pattern: str) -> Callable[..., list[float]]:
    """A format check: 1.0 where `pattern` is found (re.DOTALL), else 0.0."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"reward 'regex:{pattern}': not a valid regular expression ({e})") from e

    def regex(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        return [float(rx.search(_text(c)) is not None) for c in completions]

    return regex


def length_penalty(max_chars: int) -> Callable[..., list[float]]:
    """0 up to `max_chars` characters, then -(excess / max_chars)."""

    def length(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        return [-max(0, len(_text(c)) - max_chars) / max_chars for c in completions]

    return length


def _length_from_spec(arg: str) -> Callable[..., list[float]]:
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if n <= 0:
        raise ConfigError(f"reward 'length:{arg}': give a positive maximum length in characters, e.g. length:200")
    return length_penalty(n)


# name -> factory(argument after the colon, or "") returning a reward function
BUILTIN_REWARDS: dict[str, Callable[[str], Callable[..., list[float]]]] = {
    "math": lambda arg: math_exact_match,
    "exact_match": lambda arg: math_exact_match,
    "regex": regex_reward,
    "length": _length_from_spec,
}


# ---------------------------------------------------------------------------------------------
# calling reward functions


@dataclasses.dataclass
class Reward:
    """One named reward: `fn(prompts, completions, **columns)` and its weight in the total."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    keyword_call: bool = True
    """Call as fn(prompts=..., completions=..., **columns) (TRL); False: fn(prompts, completions)."""
    accepts: frozenset[str] | None = None
    """The keywords a function without **kwargs names (it gets only those); None: all of them."""


def _named_keywords(fn: Callable[..., Any]) -> frozenset[str] | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def takes_trl_signature(fn: Callable[..., Any]) -> bool:
    """True when `fn` accepts TRL's keyword call (a `completions` parameter or **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "completions" for p in params)


def as_reward(fn: Any, name: str | None = None, weight: float = 1.0) -> Reward:
    """Wrap a callable (TRL signature, or a plain `score(prompts, responses)`) as a Reward."""
    if isinstance(fn, Reward):
        return fn
    target = getattr(fn, "score", None) if not callable(fn) else fn
    if target is None:
        raise ConfigError(f"reward {fn!r} is neither callable nor has a score() method")
    nm = name or getattr(fn, "__name__", None) or type(fn).__name__
    keyword = takes_trl_signature(target)
    return Reward(name=nm, fn=target, weight=weight, keyword_call=keyword,
                  accepts=_named_keywords(target) if keyword else None)


def _run_coroutines(coros: list[Any]) -> list[Any]:
    """Run coroutines concurrently; in a thread when an event loop already runs (notebooks)."""

    async def gather():
        return await asyncio.gather(*coros, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(asyncio.run(gather())))
    t.start()
    t.join()
    return box[0]


def _check(name: str, values: Any, n: int) -> list[float | None]:
    if isinstance(values, np.ndarray):
        values = values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardFunctionError(f"reward '{name}' returned {type(values).__name__}; "
                                  "it must return a list of floats (or None to abstain), one per completion")
    if len(values) != n:
        raise RewardFunctionError(f"reward '{name}' returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardFunctionError(f"reward '{name}' returned {v!r} for completion {i}; "
                                      "expected a float or None") from None
        if not math.isfinite(f):
            raise NonFiniteError(f"reward '{name}' returned {f} for completion {i} (NaN or infinite); the step was "
                                 "not applied and the weights are unchanged. Return None to abstain instead.")
        out.append(f)
    return out


@dataclasses.dataclass
class RewardScores:
    """Scores of one batch: per reward (None = abstained) and the weighted total."""

    names: list[str]
    values: dict[str, list[float | None]]
    total: np.ndarray
    """(N,) float64: sum of weight x value over the rewards that did not abstain."""
    extra: dict[str, list] = dataclasses.field(default_factory=dict)
    """Columns reward functions gave to `log_extra`, one value per completion."""
    metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """Scalars reward functions gave to `log_metric`."""

    @property
    def unscorable(self) -> np.ndarray:
        """(N,) bool: completions every reward abstained on."""
        n = len(self.total)
        return np.array([all(self.values[k][i] is None for k in self.names) for i in range(n)], dtype=bool)

    def total_for_groups(self, group_size: int) -> np.ndarray:
        """`total` with each unscorable completion given the mean total of its group's scorable ones
        (rows prompt-major, `group_size` per prompt): it shifts no baseline and its own advantage is 0,
        TRL's treatment (NaN reward, excluded from the group mean, advantage 0). A group with no
        scorable completion keeps 0 everywhere."""
        total, bad = self.total.copy(), self.unscorable
        for start in range(0, len(total), group_size):
            rows = slice(start, start + group_size)
            good = ~bad[rows]
            if good.any() and not good.all():
                total[rows][~good] = total[rows][good].mean()
        return total

    def stats(self) -> dict[str, float]:
        """rewards/<name>/mean, /std (over non-abstained values), /abstained (share), rewards/unscorable
        (share of completions no reward scored) and the `log_metric` scalars (their means)."""
        out: dict[str, float] = {}
        for name in self.names:
            vals = [v for v in self.values[name] if v is not None]
            n = len(self.values[name])
            out[f"rewards/{name}/mean"] = float(np.mean(vals)) if vals else float("nan")
            out[f"rewards/{name}/std"] = float(np.std(vals)) if vals else float("nan")
            out[f"rewards/{name}/abstained"] = 1.0 - len(vals) / n if n else 0.0
        out["rewards/unscorable"] = float(self.unscorable.mean()) if len(self.total) else 0.0
        out.update({k: float(np.mean(v)) for k, v in self.metrics.items() if v})
        return out


def completion_id_lists(rollout: Any) -> list[list[int]]:
    """TRL's `completion_ids`: each row's sampled ids under its response mask (EOS kept, no padding)."""
    return [row[mask.bool()].tolist() for row, mask in zip(rollout.response_ids, rollout.response_mask)]


def add_extra_columns(rows: list[dict], extra: dict[str, list]) -> list[dict]:
    """Sample rows (the first len(rows) completions of a batch) with the `log_extra` columns added."""
    for i, row in enumerate(rows):
        row.update({k: v[i] for k, v in extra.items() if i < len(v)})
    return rows


class RewardSet:
    """Several weighted rewards scored together: ``score(prompts, completions, **columns)``.

    ``last_extra`` holds the `log_extra` columns of the last scored batch (for its samples).
    """

    def __init__(self, rewards: Sequence[Reward]):
        if not rewards:
            raise ConfigError("config field 'reward': give at least one reward (e.g. --reward rm:PATH or --reward math)")
        names, self.rewards = set(), []
        for r in rewards:
            name, k = r.name, 2
            while name in names:  # two reward models, or the same function twice with other weights
                name, k = f"{r.name}_{k}", k + 1
            names.add(name)
            self.rewards.append(dataclasses.replace(r, name=name))
        self.last_extra: dict[str, list] = {}

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def _start(self, r: Reward, prompts: list, completions: list, kwargs: dict) -> Any:
        try:
            if r.keyword_call:
                if r.accepts is not None:
                    kwargs = {k: v for k, v in kwargs.items() if k in r.accepts}
                return r.fn(prompts=prompts, completions=completions, **kwargs)
            return r.fn(prompts, completions)
        except RlhfkitError:
            raise
        except Exception as e:
            raise RewardFunctionError(f"reward '{r.name}' raised {type(e).__name__}: {e}") from e

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
              trainer_state: Any = None, **columns: Sequence[Any]) -> RewardScores:
        """Score a batch; `completion_ids` and `trainer_state` are passed on as TRL passes them."""
        prompts, completions, n = list(prompts), list(completions), len(completions)
        extra: dict[str, list] = {}
        metrics: dict[str, list[float]] = {}
        kwargs = {**columns, "completion_ids": None if completion_ids is None else [list(c) for c in completion_ids],
                  "trainer_state": trainer_state,
                  "log_extra": lambda column, values: extra.setdefault(column, []).extend(values),
                  "log_metric": lambda name, value: metrics.setdefault(name, []).append(float(value))}
        results: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        for r in self.rewards:
            res = self._start(r, prompts, completions, kwargs)
            (pending if inspect.isawaitable(res) else results)[r.name] = res
        if pending:
            for name, res in zip(pending, _run_coroutines(list(pending.values()))):
                if isinstance(res, BaseException):
                    if isinstance(res, RlhfkitError):
                        raise res
                    raise RewardFunctionError(f"reward '{name}' raised {type(res).__name__}: {res}") from res
                results[name] = res
        values = {r.name: _check(r.name, results[r.name], n) for r in self.rewards}
        total = np.zeros(n, dtype=np.float64)
        for r in self.rewards:
            total += r.weight * np.asarray([0.0 if v is None else v for v in values[r.name]])
        scores = RewardScores(self.names, values, total, extra, metrics)
        bad = np.flatnonzero(scores.unscorable)
        if len(bad):
            logger.warning("every reward returned None for %d of %d completions (first: prompt %r, completion %r); "
                           "make sure at least one reward applies to each", len(bad), n, prompts[bad[0]],
                           completions[bad[0]])
        self.last_extra = extra
        return scores

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Sequence[Any]) -> np.ndarray:
        return self.score(prompts, completions, **columns).total


def with_environment_reward(scored: RewardScores, roll: Any) -> RewardScores:
    """`scored` plus the episodes' environment rewards as the reward 'environment' (weight 1), the
    episode counts as `log_metric` scalars and each transcript as a `log_extra` column."""
    env = [e.reward for e in roll.episodes]
    values = {**scored.values, "environment": env}
    metrics = {**scored.metrics, **{k: [v] for k, v in episode_stats(roll.episodes).items()}}
    extra = {**scored.extra, "transcript": [transcript(e) for e in roll.episodes]}
    return RewardScores([*scored.names, "environment"], values, scored.total + np.asarray(env), extra, metrics)
