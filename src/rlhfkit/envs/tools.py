"""Tools: plain Python functions the policy may call, their JSON schemas, and their execution.

A tool is any function (sync or async) with type hints and a Google-style docstring; its
schema is what `transformers.utils.get_json_schema` makes of them (the schema TRL and the
chat templates of Qwen, Llama 3.1 and Mistral expect in `apply_chat_template(tools=...)`).

Execution never raises into the rollout: an unknown tool, bad arguments, an exception or a
timeout becomes a tool message whose content starts with "error:" -- the model reads what
went wrong, as it would from a real tool, and the call is counted in `ToolStats.errors`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

from transformers.utils import get_json_schema

from rlhfkit.envs.parsing import ToolCall
from rlhfkit.errors import ConfigError

# one pool for every synchronous tool call: a call that overruns its timeout keeps its thread
# (Python cannot kill a thread), so tools that may hang should run in a subprocess (sandbox.py)
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="rlhfkit-tool")


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of `fn` ({"type": "function", "function": {...}}), from its hints and docstring."""
    try:
        return get_json_schema(fn)
    except Exception as e:  # transformers' TypeHintParsingException / DocstringParsingException
        raise ConfigError(f"tool {getattr(fn, '__name__', fn)!r}: {e} (a tool needs type hints on every argument "
                          "and a docstring with an Args: section)") from e


@dataclasses.dataclass
class ToolStats:
    """Counts of one episode's (or batch's) tool use."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0

    def add(self, other: ToolStats) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.timeouts += other.timeouts


class ToolBox:
    """Named tools with their schemas; `run(calls)` executes calls and returns tool messages."""

    def __init__(self, tools: Sequence[Callable] = (), timeout: float = 10.0):
        if timeout <= 0:
            raise ConfigError(f"config field 'tool_timeout': must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self.functions: dict[str, Callable] = {}
        self.schemas: list[dict] = []
        for fn in tools:
            schema = tool_schema(fn)
            name = schema["function"]["name"]
            if name in self.functions:
                raise ConfigError(f"two tools are named {name!r}; tool names must be unique")
            self.functions[name] = fn
            self.schemas.append(schema)

    def __bool__(self) -> bool:
        return bool(self.functions)

    def run(self, calls: Sequence[ToolCall]) -> tuple[list[dict], ToolStats]:
        """Execute `calls` (concurrently) and return one {"role": "tool"} message per call, in order."""
        stats = ToolStats(calls=len(calls))
        results = [self._start(c) for c in calls]
        messages = []
        for call, pending in zip(calls, results):
            content, failed, timed_out = self._finish(call, pending)
            stats.errors += failed
            stats.timeouts += timed_out
            messages.append({"role": "tool", "name": call.name, "content": content})
        return messages, stats

    def _start(self, call: ToolCall) -> Any:
        """A future for the call, or an error text when it cannot even start."""
        if call.error:
            return f"error: {call.error}"
        fn = self.functions.get(call.name)
        if fn is None:
            return f"error: unknown tool {call.name!r}; available: {sorted(self.functions)}"
        if not isinstance(call.arguments, dict):
            return f"error: arguments of {call.name} must be a JSON object"
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return f"error: {call.name}: {e}"
        if inspect.iscoroutinefunction(fn):
            return _POOL.submit(asyncio.run, fn(**call.arguments))
        return _POOL.submit(fn, **call.arguments)

    def _finish(self, call: ToolCall, pending: Any) -> tuple[str, bool, bool]:
        if isinstance(pending, str):
            return pending, True, False
        try:
            value = pending.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            pending.cancel()
            return f"error: {call.name} timed out after {self.timeout:g} s", True, True
        except Exception as e:  # the tool's own failure, shown to the model as a tool would show it
            return f"error: {type(e).__name__}: {e}", True, False
        return as_content(value), False, False


def as_content(value: Any) -> str:
    """A tool's return value as message text (JSON for containers, str otherwise)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value)
        except TypeError:
            return str(value)
    return str(value)
