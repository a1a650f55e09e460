"""rlhfkit.envs: tools (Python functions -> JSON schemas), tool-call parsing, the environment protocol.

    from rlhfkit.envs import ToolBox, make_factory, parse_tool_calls
    factory = make_factory(tools=[my_function])            # episodes with tools only
    factory = make_factory(MyTRLEnvironment)                # a TRL environment_factory class, unchanged

Multi-turn episodes that use them: rlhfkit.rollout.episodes. docs/agents.md.
"""

from rlhfkit.envs.parsing import PARSERS, ToolCall, detect_format, parse_tool_calls
from rlhfkit.envs.protocol import (
    Environment,
    StepResult,
    ToolEnvironment,
    TRLEnvironment,
    Turn,
    env_tool_schemas,
    make_factory,
)
from rlhfkit.envs.tools import ToolBox, ToolStats, tool_schema

__all__ = ["PARSERS", "Environment", "StepResult", "TRLEnvironment", "ToolBox", "ToolCall", "ToolEnvironment",
           "ToolStats", "Turn", "detect_format", "env_tool_schemas", "make_factory", "parse_tool_calls", "tool_schema"]
