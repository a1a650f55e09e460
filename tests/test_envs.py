"""Tools, tool-call parsing, the sandboxed code tool and the environment protocol (rlhfkit.envs)."""

from __future__ import annotations

import asyncio
import time

import pytest

from rlhfkit.envs import (
    ToolBox,
    ToolCall,
    ToolEnvironment,
    TRLEnvironment,
    Turn,
    detect_format,
    make_factory,
    parse_tool_calls,
    sandbox,
    tool_schema,
)
from rlhfkit.errors import ConfigError


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


async def slow_echo(text: str, delay: float = 0.0) -> str:
    """Echo text after a delay.

    Args:
        text: what to echo
        delay: seconds to wait
    """
    await asyncio.sleep(delay)
    return text


def broken(x: int) -> int:
    """Always fails.

    Args:
        x: anything
    """
    raise ValueError("no luck")


def test_schema_from_hints_and_docstring():
    s = tool_schema(add)
    assert s["function"]["name"] == "add"
    assert s["function"]["description"] == "Add two integers."
    assert s["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first"}
    assert s["function"]["parameters"]["required"] == ["a", "b"]
    assert tool_schema(slow_echo)["function"]["parameters"]["required"] == ["text"]


def test_schema_errors_name_the_tool():
    def nohints(a):
        """Doc.

        Args:
            a: x
        """

    with pytest.raises(ConfigError, match="nohints"):
        tool_schema(nohints)


def test_parse_hermes_llama3_mistral():
    hermes = 'ok <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><tool_call>{"name": "x"}</tool_call>'
    calls = parse_tool_calls(hermes, "hermes")
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", {"a": 1, "b": 2}, ""), ("x", {}, "")]
    assert parse_tool_calls("the answer is 3", "hermes") == []
    bad = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>', "hermes")
    assert bad[0].error.startswith("tool call is not valid JSON")

    llama = '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 3, "b": 4}}'
    assert [(c.name, c.arguments) for c in parse_tool_calls(llama, "llama3")] == [("add", {"a": 1, "b": 2}),
                                                                                  ("add", {"a": 3, "b": 4})]
    assert parse_tool_calls("It is 3.", "llama3") == []

    v3 = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    v11 = '[TOOL_CALLS]add[ARGS]{"a": 5, "b": 6}'
    assert [(c.name, c.arguments) for c in parse_tool_calls(v3, "mistral")] == [("add", {"a": 1, "b": 2})]
    assert [(c.name, c.arguments) for c in parse_tool_calls(v11, "mistral")] == [("add", {"a": 5, "b": 6})]
    # OpenAI style: arguments as a JSON string
    assert parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>')[0].arguments == {"a": 1}
    with pytest.raises(ConfigError, match="tool_format"):
        parse_tool_calls("", "xml")


def test_detect_format_reads_the_template():
    class Tok:
        chat_template = "{% if tools %}<tool_call>{% endif %}"

    assert detect_format(Tok) == "hermes"
    Tok.chat_template = "{{ '[TOOL_CALLS]' }}"
    assert detect_format(Tok) == "mistral"
    Tok.chat_template = "{% if message.role == 'ipython' %}{% endif %}"
    assert detect_format(Tok) == "llama3"


def test_toolbox_runs_sync_async_errors_and_timeouts():
    box = ToolBox([add, slow_echo, broken], timeout=0.5)
    msgs, stats = box.run([ToolCall("add", {"a": 2, "b": 3}), ToolCall("slow_echo", {"text": "hi"}),
                           ToolCall("broken", {"x": 1}), ToolCall("nope", {}), ToolCall("add", {"a": 1}),
                           ToolCall("", None, "tool call is not valid JSON"),
                           ToolCall("slow_echo", {"text": "late", "delay": 3.0})])
    contents = [m["content"] for m in msgs]
    assert contents[:2] == ["5", "hi"]
    assert contents[2] == "error: ValueError: no luck"
    assert contents[3].startswith("error: unknown tool 'nope'")
    assert contents[4].startswith("error: add: missing a required argument: 'b'")
    assert contents[5] == "error: tool call is not valid JSON"
    assert contents[6] == "error: slow_echo timed out after 0.5 s"
    assert all(m["role"] == "tool" for m in msgs) and msgs[0]["name"] == "add"
    assert (stats.calls, stats.errors, stats.timeouts) == (7, 5, 1)
    with pytest.raises(ConfigError, match="unique"):
        ToolBox([add, add])


def test_sandbox_limits():
    assert sandbox.run_code("print(6 * 7)") == "42\n"
    t0 = time.perf_counter()
    assert sandbox.run_code("while True: pass", cpu_seconds=1, wall_time=10) == "error: stopped after 1 s of CPU time"
    assert time.perf_counter() - t0 < 8
    assert sandbox.run_code("import time; time.sleep(30)", wall_time=1.0) == "error: stopped after 1 s of wall time"
    assert "MemoryError" in sandbox.run_code("x = bytearray(2 * 10**9)", memory_mb=200)
    assert sandbox.run_code("import os; print(sorted(os.environ))") .strip() in ("['LC_CTYPE', 'PATH']", "['PATH']")
    if sandbox.network_isolated():
        out = sandbox.run_code("import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)")
        assert "OSError" in out or "unreachable" in out
    assert tool_schema(sandbox.python)["function"]["name"] == "python"


def test_tool_environment_protocol():
    env = make_factory(tools=[add])()
    assert isinstance(env, ToolEnvironment)
    assert env.reset({"prompt": "2+3?", "answer": 5}) == [{"role": "user", "content": "2+3?"}]
    res = env.step(Turn("", [ToolCall("add", {"a": 2, "b": 3})]))
    assert (res.messages, res.reward, res.done) == ([{"role": "tool", "name": "add", "content": "5"}], 0.0, False)
    assert env.step(Turn("5", [])).done
    assert env.step(Turn("<tool_call>{", [ToolCall("add", {"a": 1, "b": 1})], truncated=True)).done
    with pytest.raises(ConfigError, match="at least one tool"):
        make_factory()


class Counter:
    """A TRL environment_factory class: reset(**row), tools as public methods, get_reward()."""

    def __init__(self):
        self.total = 0
        self.target = None

    def reset(self, **kwargs):
        self.total, self.target = 0, kwargs["answer"]
        return " (start at 0)"

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: how much
        """
        self.total += by
        return self.total

    def get_reward(self) -> float:
        return float(self.total == self.target)


def test_trl_environment_factory_class_unchanged():
    factory = make_factory(Counter)
    a, b = factory(), factory()
    assert isinstance(a, TRLEnvironment) and a.instance is not b.instance  # one per episode
    assert [s["function"]["name"] for s in a.toolbox.schemas] == ["increment"]
    assert a.reset({"prompt": "count to 3", "answer": 3}) == [{"role": "user", "content": "count to 3 (start at 0)"}]
    b.reset({"prompt": [{"role": "user", "content": "to 1"}], "answer": 1})
    for _ in range(3):
        r = a.step(Turn("", [ToolCall("increment", {"by": 1})]))
        assert not r.done and r.reward == 0.0
    assert r.messages[0]["content"] == "3"
    end = a.step(Turn("done", []))
    assert end.done and end.reward == 1.0
    assert b.step(Turn("done", [])).reward == 0.0  # b's state is its own
