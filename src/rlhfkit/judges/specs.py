"""`load_reward(spec)`: one reward from a command-line spec string.

    rm:PATH                   a reward model (or ensemble) saved by `rlhfkit reward`; it reads the
                              conversation with its own tokenizer and chat template
    gold                      the bundled task's gold panel (an evaluation judge; as a training
                              reward it is an oracle)
    py:my_module:fn           a function (TRL reward_funcs signature) from an importable module
    py:path/to/file.py:fn     ... or from a Python file
    judge:SPEC                an AI judge from `rlhfkit.judges.load_judge(SPEC)`
    math | exact_match        built-in verifiers (see rlhfkit.judges.rewards)
    regex:PATTERN, length:MAX
    metric:NAME[?column=COL]  a text metric against a reference column: rouge*, bleu, chrf, ter,
                              distinct-N, perplexity (rlhfkit.judges.metric_rewards)

Several specs with `--reward_weights` make a :class:`~rlhfkit.judges.rewards.RewardSet`
(:func:`load_rewards`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhfkit.data.chat import conversation_split
from rlhfkit.errors import ConfigError
from rlhfkit.judges.load import load_judge, parse_spec
from rlhfkit.judges.metric_rewards import metric_reward
from rlhfkit.judges.panel import GoldPanel
from rlhfkit.judges.rewards import BUILTIN_REWARDS, Reward, RewardSet, as_reward
from rlhfkit.models.reward import RewardScorer
from rlhfkit.pyspec import load_object


def _is_conversation(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) for m in x)


def _plain(x: Any) -> str:
    return "\n".join(str(m.get("content", "")) for m in x) if _is_conversation(x) else str(x)


class RewardModelReward:
    """A saved reward model as a reward function; conversations rendered with the RM's own template."""

    def __init__(self, path: str, device: Any = "cpu", batch_size: int = 64):
        self.scorer = RewardScorer(path, device=device, batch_size=batch_size)
        self.tokenizer = self.scorer.tokenizers[0]
        self.__name__ = "rm"

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[list[str], list[str]]:
        """(prompt text, response text) pairs exactly as the reward model was trained on them."""
        p_out, r_out = [], []
        for p, c in zip(prompts, completions):
            if _is_conversation(p):
                reply = c if _is_conversation(c) else [{"role": "assistant", "content": str(c)}]
                p_text, (r_text,) = conversation_split(self.tokenizer, p, [reply])
            else:
                p_text, r_text = str(p), _plain(c)
            p_out.append(p_text)
            r_out.append(r_text)
        return p_out, r_out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> np.ndarray:
        return self.scorer.score(*self.texts(prompts, completions))


class JudgeReward:
    """A judge's `score(prompts, responses)` (text) as a reward function."""

    def __init__(self, judge: Any, name: str):
        self.judge, self.__name__ = judge, name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> Any:
        return self.judge.score([_plain(p) for p in prompts], [_plain(c) for c in completions])


def _python_function(target: str) -> Any:
    return load_object(target, f"reward 'py:{target}'", kind="function", callable_only=True)


def load_reward(spec: str, weight: float = 1.0, device: Any = "cpu", batch_size: int = 64) -> Reward:
    """The Reward a spec string names (module docstring)."""
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    build = REWARD_BUILDERS.get(kind + sep)
    if build is not None:
        return build(arg, weight, device, batch_size)
    if Path(spec).is_dir():
        raise ConfigError(f"reward {spec!r}: a folder; write rm:{spec} for a reward model")
    raise ConfigError(f"reward {spec!r}: unknown; use rm:PATH, gold, py:module:fn, py:file.py:fn, judge:SPEC, metric:NAME "
                      f"or a built-in ({', '.join(sorted(BUILTIN_REWARDS))})")


# -- one builder per kind: (arg, weight, device, batch_size) -> Reward ------------------------------

def _gold(arg: str, weight: float, device: Any, batch_size: int) -> Reward:
    return as_reward(JudgeReward(GoldPanel(), "gold"), "gold", weight)


def _reward_model(arg: str, weight: float, device: Any, batch_size: int) -> Reward:
    return as_reward(RewardModelReward(arg, device, batch_size), "rm", weight)


def _python(arg: str, weight: float, device: Any, batch_size: int) -> Reward:
    fn = _python_function(arg)
    return as_reward(fn, getattr(fn, "__name__", arg.rpartition(":")[2]), weight)


def _judge(arg: str, weight: float, device: Any, batch_size: int) -> Reward:
    return as_reward(JudgeReward(load_judge(arg), "judge"), "judge", weight)


def _metric(arg: str, weight: float, device: Any, batch_size: int) -> Reward:
    _, name, opts = parse_spec("metric:" + arg)  # 'NAME?column=COL' -> NAME, {column: COL}
    fn = metric_reward(name, {k: str(v) for k, v in opts.items()}, device, batch_size)
    return as_reward(fn, fn.__name__, weight)


def _builtin(kind: str) -> Callable[..., Reward]:
    def build(arg: str, weight: float, device: Any, batch_size: int) -> Reward:
        return as_reward(BUILTIN_REWARDS[kind](arg), kind, weight)

    return build


# keyed by the spec's kind with its ':' where the kind takes an argument: 'gold' takes none;
# 'rm:', 'py:' and 'judge:' need one; a built-in takes one or none ('math', 'length:20')
REWARD_BUILDERS: dict[str, Callable[..., Reward]] = {
    "gold": _gold, "rm:": _reward_model, "py:": _python, "judge:": _judge, "metric:": _metric,
    **{name + colon: _builtin(name) for name in BUILTIN_REWARDS for colon in ("", ":")},
}


def load_rewards(specs: Sequence[str], weights: Sequence[float] = (), device: Any = "cpu",
                 batch_size: int = 64, functions: Any = None) -> RewardSet:
    """A RewardSet of `specs` followed by `functions` (Python callables, or one callable: TRL's
    reward_funcs); `weights` (one per reward, default 1) weight them in the total."""
    if functions is None:
        functions = []
    elif isinstance(functions, RewardSet):
        functions = functions.rewards
    elif callable(functions) or isinstance(functions, Reward):
        functions = [functions]
    n = len(specs) + len(functions)
    if n == 0:
        raise ConfigError("config field 'reward': give at least one reward: --reward rm:PATH, --reward py:module:fn, "
                          "--reward math, ... (see --help)")
    if weights and len(weights) != n:
        raise ConfigError(f"config field 'reward_weights': {len(weights)} weights for {n} rewards")
    ws = list(weights) or [1.0] * n
    rewards = [load_reward(s, w, device, batch_size) for s, w in zip(specs, ws)]
    rewards += [as_reward(f, weight=w) for f, w in zip(functions, ws[len(specs):])]
    return RewardSet(rewards)


def is_bundled_kindly(prompts: Any) -> bool:
    """True when `prompts` names the bundled 'say it kindly' task (where the gold panel applies)."""
    return isinstance(prompts, str) and prompts.split(":")[0] == "kindly"


def rewards_or_default(specs: Sequence[str], prompts: Any, field: str = "reward") -> list[str]:
    """`specs`, or ['gold'] on the bundled task; a user's prompts without a reward are a config error
    (never a silent fallback to the bundled task's panel)."""
    if specs:
        return list(specs)
    if is_bundled_kindly(prompts):
        return ["gold"]
    raise ConfigError(f"config field '{field}': name the reward for these prompts, e.g. --{field} rm:PATH, "
                      f"--{field} py:file.py:fn or --{field} math (the gold panel is the default only on the "
                      "bundled kindly task)")
