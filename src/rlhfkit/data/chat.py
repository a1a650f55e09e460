"""Chat templates: conversations -> (prompt text, response text) with a shared prompt.

A conversation is rendered with the tokenizer's own chat template. A tokenizer without one
(or no tokenizer) uses PLAIN_CHAT_TEMPLATE, which is also the bundled task's template:

    user: How are you?<eos>
    assistant: Fine, thanks.<eos>

and, with add_generation_prompt, a trailing ``assistant:`` to be continued by the model.

To split a conversation into prompt and response, the prompt messages are rendered with
the generation prompt and the whole conversation without it; the response text is what the
full rendering adds after the prompt rendering. Anything after the response's last
end-of-sequence token (the template's separator newline) is dropped, because generation
stops at that token and the model never produces what follows.
"""

from __future__ import annotations

from typing import Any

from rlhfkit.data.schemas import preference_parts
from rlhfkit.errors import DataError

# Jinja form of the fallback, usable as `tokenizer.chat_template` when saving a model.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def render_plain(messages: list[dict], add_generation_prompt: bool = False, eos_token: str = "") -> str:
    """PLAIN_CHAT_TEMPLATE in Python (no Jinja needed)."""
    text = "".join(f"{m['role']}: {m['content']}{eos_token}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render `messages` to text with the tokenizer's template, or the plain fallback."""
    if tokenizer is not None and not has_chat_template(tokenizer) and hasattr(tokenizer, "apply_chat_template"):
        # the conversation is rendered with the plain template, so that becomes the tokenizer's
        # template: a model trained on it is saved with the template it was trained on
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    if tokenizer is not None and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        if not isinstance(text, str):  # some versions wrap single conversations in a list
            text = text[0]
        return text
    eos = (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else ""
    return render_plain(messages, add_generation_prompt, eos)


def _as_conversation(value: Any, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _response_text(tokenizer: Any, prompt_msgs: list[dict], prompt_text: str, response_msgs: list[dict]) -> str:
    full = apply_chat_template(tokenizer, prompt_msgs + response_msgs, add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise DataError("the chat template does not render the prompt as a prefix of the full "
                        "conversation, so prompt and response cannot be separated; use a template "
                        "whose add_generation_prompt output is a prefix of the rendered reply",
                        field="chat_template")
    response = full[len(prompt_text):]
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if eos and eos in response:
        response = response[: response.rindex(eos) + len(eos)]
    return response


def _conversational(*values: Any) -> bool:
    return any(isinstance(v, list) for v in values)


def conversation_split(tokenizer: Any, prompt: Any, responses: list[Any]) -> tuple[str, list[str]]:
    """(prompt_text, [response_text, ...]) with one prompt rendering shared by all responses.

    Plain strings pass through unchanged unless some part is a conversation; then a string
    prompt becomes one user message and a string response one assistant message.
    """
    if not _conversational(prompt, *responses):
        return prompt or "", list(responses)
    prompt_msgs = _as_conversation(prompt, "user") if prompt not in (None, "", []) else []
    prompt_text = apply_chat_template(tokenizer, prompt_msgs, add_generation_prompt=True) if prompt_msgs else ""
    texts = [_response_text(tokenizer, prompt_msgs, prompt_text, _as_conversation(r, "assistant"))
             for r in responses]
    return prompt_text, texts


def to_prompt_completion(record: dict, tokenizer: Any = None) -> tuple[str, str]:
    """(prompt_text, completion_text) for SFT / KTO records.

    `text` records have an empty prompt; `messages` records learn their last (assistant)
    message with everything before it as the prompt.
    """
    if record.get("messages") is not None:
        messages = record["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError("the last message must be the assistant's", field="messages")
        prompt_text, (completion,) = conversation_split(tokenizer, messages[:-1], [messages[-1:]])
        return prompt_text, completion
    if record.get("completion") is not None:
        prompt_text, (completion,) = conversation_split(tokenizer, record.get("prompt"), [record["completion"]])
        return prompt_text, completion
    if record.get("text") is not None:
        return "", record["text"]
    raise DataError(f"no completion to learn in a record with columns {sorted(record)}", field="completion")


def to_prompt_text(record: dict, tokenizer: Any = None) -> str:
    """The prompt of any record rendered for generation (rollouts)."""
    prompt = record.get("prompt")
    if prompt is None:
        raise DataError("record has no prompt", field="prompt")
    if isinstance(prompt, list):
        return apply_chat_template(tokenizer, prompt, add_generation_prompt=True)
    return prompt


def to_text_pair(record: dict, tokenizer: Any = None) -> tuple[str, str, str]:
    """(prompt_text, chosen_text, rejected_text) of a preference record.

    The prompt text is rendered once, so it is identical for chosen and rejected; an
    implicit prompt (no prompt column) is split off first.
    """
    prompt, chosen, rejected = preference_parts(record)
    prompt_text, (chosen_text, rejected_text) = conversation_split(tokenizer, prompt, [chosen, rejected])
    return prompt_text, chosen_text, rejected_text


def to_ranking_texts(record: dict, tokenizer: Any = None) -> tuple[str, list[str]]:
    """(prompt_text, response texts in ranking order, best first) of a ranking record."""
    ordered = [record["responses"][i] for i in record["ranking"]]
    return conversation_split(tokenizer, record.get("prompt"), ordered)
