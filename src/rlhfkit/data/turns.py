"""Multi-turn conversations as token ids, one turn at a time, never re-tokenising earlier turns.

Re-rendering a whole conversation and tokenising it again after every turn gives ids that can
differ from those the policy sampled: a sampled word split "ca"+"t" re-tokenises as "cat", a
template may rewrite past turns (Qwen 3 strips their reasoning), and text that decodes and
encodes differently (spaces, unknown bytes) moves. Training on those ids trains on tokens the
model never produced. Here each turn adds only its own ids:

- the policy's turns: the ids it sampled, as sampled (rollouts) or its content tokenised
  alone (SFT data, which has no sampled ids);
- everything else (tool results, a user's reply, the next generation prompt): the text the
  chat template adds after the assistant's end-of-turn token (:func:`template_suffix`),
  tokenised alone and appended.

The template is asked with `tools=` so that it renders tool calls and results its own way.
"""

from __future__ import annotations

from typing import Any

from rlhfkit.data.chat import apply_chat_template
from rlhfkit.data.collate import encode_prompt
from rlhfkit.errors import DataError

IGNORE_INDEX = -100
_DUMMY = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]


def render(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> str:
    """`messages` through the tokenizer's chat template, with `tools` schemas when there are any."""
    if not tools:
        return apply_chat_template(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return text if isinstance(text, str) else text[0]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of a piece of text alone: no BOS/EOS added (the template's own special tokens are in the text)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _after_turn_end(tokenizer: Any, rendered: str, end_text: str | None) -> int:
    """Where the assistant's last turn ends in `rendered`: just after its end-of-turn token."""
    eos = end_text or getattr(tokenizer, "eos_token", None)
    if eos and eos in rendered:
        return rendered.rindex(eos) + len(eos)
    return len(rendered)


def template_suffix(tokenizer: Any, history: list[dict], new_messages: list[dict], tools: list[dict] | None = None,
                    end_text: str | None = None, add_generation_prompt: bool = True) -> str:
    """The text the template writes after an assistant turn that ends `history` (which the policy
    ended with `end_text`, default the EOS token) when `new_messages` follow, plus the next
    generation prompt. Read from the real history when the template renders it as a prefix of the
    longer conversation; otherwise (templates that rewrite past turns) from a stand-in history."""
    for base in (history, _DUMMY):
        before = render(tokenizer, base, tools)
        after = render(tokenizer, base + new_messages, tools, add_generation_prompt=add_generation_prompt)
        cut = _after_turn_end(tokenizer, before, end_text)
        if after.startswith(before[:cut]):
            return after[cut:]
    raise DataError("the chat template does not render a conversation as a prefix of its continuation, so the "
                    "environment's tokens cannot be appended to the sampled ones", field="chat_template")


def encode_conversation(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None,
                        max_length: int | None = None) -> dict:
    """A multi-turn conversation (tool calls and results included) as {input_ids, labels}, the loss
    on the assistant turns only: each one's content tokens and its end-of-turn token; the first
    turns up to the first assistant message form the prompt. Ids are built turn by turn exactly as
    an episode builds them (module docstring). `truncated` says whether max_length cut it."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
    if first is None or first == 0:
        raise DataError("a conversation to train on needs a user turn before its first assistant turn", field="messages")
    prompt_text = render(tokenizer, messages[:first], tools, add_generation_prompt=True)
    ids, _ = encode_prompt(tokenizer, prompt_text)
    labels = [IGNORE_INDEX] * len(ids)
    i = first
    while i < len(messages):
        if messages[i].get("role") != "assistant":
            raise DataError(f"message {i} ({messages[i].get('role')!r}) should be an assistant turn", field="messages")
        turn = assistant_ids(tokenizer, messages[:i], messages[i], tools)
        ids += turn
        labels += turn
        j = i + 1
        while j < len(messages) and messages[j].get("role") != "assistant":
            j += 1
        if j == i + 1:
            break  # the conversation ends with this assistant turn
        suffix = encode_text(tokenizer, template_suffix(tokenizer, messages[:i + 1], messages[i + 1:j], tools))
        ids += suffix
        labels += [IGNORE_INDEX] * len(suffix)
        i = j
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids), "truncated": truncated}


def assistant_ids(tokenizer: Any, history: list[dict], message: dict, tools: list[dict] | None = None) -> list[int]:
    """The ids the policy writes for an assistant message: the text the template renders for the turn
    (tool calls in its own format) up to its end-of-turn token, then that token (the EOS)."""
    before = render(tokenizer, history, tools, add_generation_prompt=True)
    full = render(tokenizer, history + [message], tools)
    eos, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    if full.startswith(before):
        text = full[len(before):]
        text = text[:text.rindex(eos)] if eos and eos in text else text
    else:  # a template that rewrites earlier turns: the content as written
        text = message.get("content") or ""
    return encode_text(tokenizer, text) + ([eos_id] if eos_id is not None else [])


def is_multi_turn(record: dict) -> bool:
    """An SFT record to encode turn by turn: `messages` with tool calls, tool results or several assistant turns."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        return False
    assistant = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    return len(assistant) > 1 or any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool")
                                     for m in messages)
