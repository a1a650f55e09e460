"""Tool calls in a model's text, in the formats of the common chat templates.

- "hermes" (Hermes 2 Pro, Qwen 2/2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call;
- "llama3" (Llama 3.1/3.2 JSON tool calling): the turn is a JSON object
  ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``; several separated by ";");
- "mistral": ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3 tokenizers) or
  ``[TOOL_CALLS]name[ARGS]{...}`` (v11+).

The format is read from the tokenizer's chat template (:func:`detect_format`): the template
that renders tool calls to the model is the one that decides how the model writes them.
A block that names a tool but is not valid JSON is returned as a call with `error` set, so
the model is told what was wrong instead of the turn silently counting as a final answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from rlhfkit.errors import ConfigError


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: Any
    error: str = ""
    """Why the call could not be parsed (the call is then answered with this error)."""

    def as_message_call(self) -> dict:
        """The OpenAI / transformers form, for an assistant message's `tool_calls`."""
        args = self.arguments if isinstance(self.arguments, dict) else {}
        return {"type": "function", "function": {"name": self.name, "arguments": args}}


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_ARGS = re.compile(r"\[TOOL_CALLS\]\s*([\w.\-]+)\s*\[ARGS\]", re.DOTALL)


def _from_json(text: str, args_key: str = "arguments") -> ToolCall:
    text = text.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return ToolCall("", None, f"tool call is not valid JSON ({e.msg} at char {e.pos}): {text[:80]!r}")
    return _from_object(obj, args_key)


def _from_object(obj: Any, args_key: str) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", None, f"a tool call is a JSON object with a 'name': got {json.dumps(obj)[:80]}")
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string (OpenAI style)
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return ToolCall(obj["name"], None, f"the arguments of {obj['name']} are not a JSON object")
    return ToolCall(obj["name"], args)


def parse_hermes(text: str) -> list[ToolCall]:
    return [_from_json(block) for block in _HERMES.findall(text)]


def parse_llama3(text: str) -> list[ToolCall]:
    body = text.split("<|python_tag|>", 1)[1] if "<|python_tag|>" in text else text
    body = body.replace("<|eom_id|>", "").replace("<|eot_id|>", "").strip()
    if not body.startswith("{"):
        return []  # plain text: a final answer
    calls = []
    decoder, pos = json.JSONDecoder(), 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", None, f"tool call is not valid JSON ({e.msg}): {body[pos:pos + 80]!r}"))
            break
        calls.append(_from_object(obj, "parameters"))
        pos = end
        while pos < len(body) and body[pos] in " \n;":
            pos += 1
    return calls


def parse_mistral(text: str) -> list[ToolCall]:
    if "[TOOL_CALLS]" not in text:
        return []
    named = list(_MISTRAL_ARGS.finditer(text))
    if named:  # [TOOL_CALLS]name[ARGS]{...}
        calls = []
        for m in named:
            try:
                args, _ = json.JSONDecoder().raw_decode(text, m.end())
                calls.append(ToolCall(m.group(1), args))
            except json.JSONDecodeError as e:
                calls.append(ToolCall(m.group(1), None, f"the arguments of {m.group(1)} are not valid JSON ({e.msg})"))
        return calls
    body = text.split("[TOOL_CALLS]", 1)[1].replace("</s>", "").strip()
    try:
        obj, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as e:
        return [ToolCall("", None, f"tool calls are not valid JSON ({e.msg}): {body[:80]!r}")]
    return [_from_object(o, "arguments") for o in (obj if isinstance(obj, list) else [obj])]


PARSERS = {"hermes": parse_hermes, "llama3": parse_llama3, "mistral": parse_mistral}


def detect_format(tokenizer: Any) -> str:
    """The tool-call format a tokenizer's chat template uses (hermes when it does not say)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates (e.g. "default", "tool_use")
        template = " ".join(str(t) for t in template.values())
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return "hermes"


def get_parser(name: str):
    if name not in PARSERS:
        raise ConfigError(f"config field 'tool_format': unknown tool-call format {name!r}; choose from {sorted(PARSERS)}")
    return PARSERS[name]


def strip_tool_calls(text: str, fmt: str = "hermes") -> str:
    """The turn's text without its tool calls (an assistant message's `content`; its calls go to `tool_calls`)."""
    if fmt == "hermes":
        return _HERMES.sub("", text).strip()
    if fmt == "mistral":
        return text.split("[TOOL_CALLS]", 1)[0].strip()
    return "" if parse_llama3(text) else text


def parse_tool_calls(text: str, fmt: str = "hermes") -> list[ToolCall]:
    """The tool calls in one assistant turn (empty: the turn is a final answer)."""
    return get_parser(fmt)(text)
