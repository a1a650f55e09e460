"""The options and loaders of multi-turn episodes, shared by the recipes that run them (GRPO,
RLOO, PPO, `sample`) and by `eval`: `EpisodeArgs` (--environment, --tools, turn and token
limits), the environment factory a run's options name, and the episode limits.

A spec names a Python object as py:module:name or py:path/to/file.py:name; a bundled task name
('calc') reads that task module's `environment` (a factory) or `tools` (a list). docs/agents.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import typing
from typing import Any

import tyro

from rlhfkit import pyspec
from rlhfkit.envs import make_factory, sandbox
from rlhfkit.envs.parsing import PARSERS
from rlhfkit.errors import ConfigError
from rlhfkit.rollout.episodes import Limits


def require(cond: bool, field: str, message: str) -> None:
    """Raise a ConfigError naming `field` unless `cond` holds (rlhfkit.config's rule, one layer down)."""
    if not cond:
        raise ConfigError(f"config field '{field}': {message}")


BUILTIN_TOOLS = {"python": sandbox.python}
ENVIRONMENT_ONLY = "py:rlhfkit.rollout.episode_args:reward_from_environment"


def reward_from_environment(prompts, completions, **kwargs) -> list[None]:
    """Abstains on every episode: with `--environment` and no `--reward`, the environment's reward is the only one."""
    return [None] * len(completions)


@dataclasses.dataclass
class EpisodeArgs:
    environment: str = ""
    """Multi-turn episodes against an environment: a bundled task ('calc'), py:module:Factory or py:file.py:Factory (rlhfkit's reset/step protocol, or a TRL environment_factory class, unchanged); docs/agents.md."""
    tools: typing.Annotated[list[str], tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """Tools the policy may call, repeatable: py:module:function, py:file.py:function, or python (the sandboxed code tool)."""
    max_turns: int = 4
    """Policy turns per episode at most (environment answers in between)."""
    max_turn_tokens: int = 0
    """Tokens one policy turn may sample (0 = max_completion_length, which bounds the whole episode after the prompt)."""
    tool_timeout: float = 10.0
    """Seconds a tool call may take; a timeout is answered to the model as an error."""
    tool_format: str = "auto"
    """Tool-call format: auto (read from the chat template), hermes, llama3 or mistral."""

    @property
    def multi_turn(self) -> bool:
        return bool(self.environment or self.tools)

    def _check_episode_args(self) -> None:
        require(self.max_turns >= 1, "max_turns", "must be >= 1")
        require(self.max_turn_tokens >= 0, "max_turn_tokens", "must be >= 0 (0 = max_completion_length)")
        require(self.tool_timeout > 0, "tool_timeout", "must be > 0 seconds")
        require(self.tool_format == "auto" or self.tool_format in PARSERS, "tool_format",
                f"must be auto or one of {sorted(PARSERS)}")
        if self.environment and not getattr(self, "reward", True) and not getattr(self, "reward_model", ""):
            # the environment owns the reward (TRL's get_reward): the specs' place is held by one that abstains
            self.reward = [ENVIRONMENT_ONLY]
        if self.multi_turn:
            require(not getattr(self, "dynamic_sampling", False), "dynamic_sampling",
                    "dynamic sampling is not supported with multi-turn episodes yet; turn one of them off")
            require(not getattr(self, "async_rollouts", False), "async_rollouts",
                    "async rollout workers do not run episodes yet; turn off async_rollouts")


def load_object(spec: str, field: str) -> Any:
    """A Python object from py:module:name or py:path/to/file.py:name (rlhfkit.pyspec)."""
    return pyspec.load_object(spec, f"config field '{field}'")


def load_tools(specs: list[str]) -> list:
    return [BUILTIN_TOOLS[s] if s in BUILTIN_TOOLS else load_object(s, "tools") for s in specs]


def load_factory(cfg, environment: Any = None, tools: list | None = None):
    """The per-episode environment factory of a run: `environment` / `tools` given from Python
    win over the `--environment` / `--tools` specs. A bundled task name reads that task module's
    `environment` (a factory) or `tools` (a list)."""
    tools = list(tools) if tools is not None else load_tools(cfg.tools)
    if environment is None and callable(cfg.environment):  # a class or factory set from Python
        environment = cfg.environment
    elif environment is None and cfg.environment:
        if cfg.environment.startswith("py:") or ":" in cfg.environment:
            environment = load_object(cfg.environment, "environment")
        else:
            try:
                task = importlib.import_module(f"rlhfkit.tasks.{cfg.environment}")
            except ImportError as e:
                raise ConfigError(f"config field 'environment': no bundled task {cfg.environment!r} ({e})") from e
            environment = getattr(task, "environment", None)
            tools = tools or list(getattr(task, "tools", []))
    return make_factory(environment, tools, cfg.tool_timeout)


def limits_of(cfg) -> Limits:
    total = getattr(cfg, "max_completion_length", None) or cfg.max_new_tokens  # `sample` calls it max_new_tokens
    return Limits(cfg.max_turns, cfg.max_turn_tokens or total, total)
