"""Rewards as code: reward functions, built-in verifiers, and the weighted set a recipe scores with.

A reward function has TRL's ``reward_funcs`` signature::

    def my_reward(prompts, completions, **kwargs) -> list[float | None]

``prompts`` and ``completions`` are lists of N strings (or, for conversational prompts, N
message lists and N ``[{"role": "assistant", "content": ...}]`` lists, as TRL passes them);
every other column of the prompt dataset arrives as a keyword list of N values (e.g.
``answer``). A function returns one float per completion, or None to abstain; it may be
``async``. rlhfkit calls each function once per rollout batch (several async functions run
concurrently), checks the result and stops the run, naming the function, when it raises,
returns the wrong number of values, or returns NaN/inf -- before any update uses it.

The total reward of a completion is sum_i w_i r_i over the functions that did not abstain
(an abstention contributes 0, as in TRL's nansum); each function is logged on its own under
``rewards/<name>/mean``, ``/std`` and ``/abstained``.

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
import math
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from rlhfkit.errors import ConfigError, NonFiniteError, RlhfkitError


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
    return Reward(name=nm, fn=target, weight=weight, keyword_call=takes_trl_signature(target))


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

    def stats(self) -> dict[str, float]:
        """rewards/<name>/mean, /std (over non-abstained values) and /abstained (share)."""
        out: dict[str, float] = {}
        for name in self.names:
            vals = [v for v in self.values[name] if v is not None]
            n = len(self.values[name])
            out[f"rewards/{name}/mean"] = float(np.mean(vals)) if vals else float("nan")
            out[f"rewards/{name}/std"] = float(np.std(vals)) if vals else float("nan")
            out[f"rewards/{name}/abstained"] = 1.0 - len(vals) / n if n else 0.0
        return out


class RewardSet:
    """Several weighted rewards scored together: ``score(prompts, completions, **columns)``."""

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

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def _start(self, r: Reward, prompts: list, completions: list, columns: dict) -> Any:
        try:
            if r.keyword_call:
                return r.fn(prompts=prompts, completions=completions, **columns)
            return r.fn(prompts, completions)
        except RlhfkitError:
            raise
        except Exception as e:
            raise RewardFunctionError(f"reward '{r.name}' raised {type(e).__name__}: {e}") from e

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Sequence[Any]) -> RewardScores:
        prompts, completions, n = list(prompts), list(completions), len(completions)
        results: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        for r in self.rewards:
            res = self._start(r, prompts, completions, columns)
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
        return RewardScores(self.names, values, total)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Sequence[Any]) -> np.ndarray:
        return self.score(prompts, completions, **columns).total
