"""The environment protocol: what a multi-turn episode talks to.

An environment is one object per episode (state lives on it; episodes never share one):

    reset(row: dict) -> list[dict]
        The conversation the episode starts from (at least one message), given the dataset
        row (its `prompt` and every extra column).
    step(turn: Turn) -> StepResult(messages, reward=0.0, done=False)
        The model's turn (its text and parsed tool calls) -> the messages the environment
        answers with (tool results, a user's reply, game feedback), a reward for this turn,
        and whether the episode is over. Either method may be `async def`.
    tools: list of callables (optional)
        Their schemas go to the chat template's `tools=`.

Rewards: the per-turn rewards of an episode are summed (undiscounted) into its environment
reward, which is added to the `--reward` specs' weighted total; an environment may reward
per turn, only at the end, or not at all (then the specs score the episode).

Two ready-made environments: :class:`ToolEnvironment` (tools only: a turn with tool calls is
answered with their results, a turn without any ends the episode) and :class:`TRLEnvironment`,
which runs a class written for TRL's ``GRPOTrainer(environment_factory=...)`` unchanged: its
``reset(**row)`` may return text appended to the last user message, its public methods are the
tools, and its optional ``get_reward()`` scores the finished episode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from rlhfkit.envs.parsing import ToolCall
from rlhfkit.envs.tools import ToolBox, ToolStats
from rlhfkit.errors import ConfigError, DataError


@dataclasses.dataclass
class Turn:
    """One assistant turn as the environment sees it."""

    text: str
    """The turn's text, special tokens skipped, tool-call blocks removed (the message's `content`)."""
    tool_calls: list[ToolCall]
    """Tool calls parsed from the raw text in the template's format (empty: a final answer)."""
    truncated: bool = False
    """The turn hit its token limit before its end-of-turn token (it is still passed to step)."""
    raw: str = ""
    """The whole turn as sampled (special tokens kept, end-of-turn token dropped)."""

    def as_message(self) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            msg["tool_calls"] = [c.as_message_call() for c in self.tool_calls]
        return msg


@dataclasses.dataclass
class StepResult:
    messages: list[dict]
    reward: float = 0.0
    done: bool = False
    tool_stats: ToolStats = dataclasses.field(default_factory=ToolStats)


@runtime_checkable
class Environment(Protocol):
    def reset(self, row: dict) -> list[dict]: ...

    def step(self, turn: Turn) -> StepResult: ...


def call_maybe_async(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), awaited when it is a coroutine function (episodes step in threads)."""
    out = fn(*args, **kwargs)
    return asyncio.run(out) if inspect.isawaitable(out) else out


def prompt_messages(row: dict) -> list[dict]:
    """A dataset row's prompt as messages (a plain-text prompt becomes one user message)."""
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return [dict(m) for m in prompt]
    raise DataError("a row needs a 'prompt' (text or messages) to start an episode", field="prompt")


class ToolEnvironment:
    """Tools only: tool calls are executed and answered; a turn without tool calls ends the episode."""

    def __init__(self, tools: ToolBox):
        self.toolbox = tools

    @property
    def tools(self) -> list[Callable]:
        return list(self.toolbox.functions.values())

    def reset(self, row: dict) -> list[dict]:
        return prompt_messages(row)

    def step(self, turn: Turn) -> StepResult:
        if not turn.tool_calls or turn.truncated:
            return StepResult([], 0.0, True)
        messages, stats = self.toolbox.run(turn.tool_calls)
        return StepResult(messages, 0.0, False, stats)


def public_methods(instance: Any) -> list[Callable]:
    """A TRL environment's tools: its public methods other than reset and get_reward (listed on the class,
    as TRL does, so properties are not evaluated)."""
    names = [n for n, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
             if not n.startswith("_") and n not in ("reset", "get_reward")]
    return [getattr(instance, n) for n in names]


class TRLEnvironment:
    """Adapter for a TRL ``environment_factory`` instance (see the module docstring)."""

    def __init__(self, instance: Any, extra_tools: Sequence[Callable] = (), timeout: float = 10.0):
        if not callable(getattr(instance, "reset", None)):
            raise ConfigError(f"environment {type(instance).__name__}: a TRL environment defines a callable reset()")
        self.instance = instance
        self.toolbox = ToolBox([*extra_tools, *public_methods(instance)], timeout)

    @property
    def tools(self) -> list[Callable]:
        return list(self.toolbox.functions.values())

    def reset(self, row: dict) -> list[dict]:
        messages = prompt_messages(row)
        observation = call_maybe_async(self.instance.reset, **row)
        if observation is not None:  # TRL appends the observation to the last user message
            last = messages[-1]
            messages[-1] = {**last, "content": str(last["content"]) + str(observation)}
        return messages

    def step(self, turn: Turn) -> StepResult:
        if turn.tool_calls and not turn.truncated:
            messages, stats = self.toolbox.run(turn.tool_calls)
            return StepResult(messages, 0.0, False, stats)
        get_reward = getattr(self.instance, "get_reward", None)
        reward = float(call_maybe_async(get_reward)) if callable(get_reward) else 0.0
        return StepResult([], reward, True)


def make_factory(environment: Any = None, tools: Sequence[Callable] = (), timeout: float = 10.0) -> Callable[[], Any]:
    """A zero-argument factory of per-episode environments from what the user gave:
    an rlhfkit environment class/factory (reset(row) + step(turn)), a TRL environment_factory,
    or nothing (the tools alone)."""
    if environment is None:
        if not tools:
            raise ConfigError("config field 'environment': give an environment or at least one tool")
        return lambda: ToolEnvironment(ToolBox(tools, timeout))

    def build() -> Any:
        instance = environment()
        if callable(getattr(instance, "step", None)) and callable(getattr(instance, "reset", None)):
            return instance  # rlhfkit's protocol
        return TRLEnvironment(instance, tools, timeout)

    return build


def env_tool_schemas(env: Any) -> list[dict]:
    """The schemas of an environment's tools (those the chat template is given)."""
    toolbox = getattr(env, "toolbox", None)
    if isinstance(toolbox, ToolBox):
        return toolbox.schemas
    return ToolBox(getattr(env, "tools", None) or []).schemas
