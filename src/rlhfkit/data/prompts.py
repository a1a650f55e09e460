"""Prompt lists for generation: the bundled task's splits, a text file or records with a `prompt`.

One loader for every recipe that samples (sample, PPO/GRPO/RLOO, best-of-N, rejection sampling,
eval, the feedback service's sampler).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhfkit.data.chat import to_prompt_text
from rlhfkit.data.readers import load_records
from rlhfkit.errors import DataError
from rlhfkit.tasks import kindly

KINDLY_SPLITS = {"kindly:train": "train", "kindly:eval": "eval"}


def load_prompts(source: str, split: str = "train", tokenizer: Any = None, limit: int = 0) -> list[str]:
    """Prompt strings from `source`; the first `limit` of them when limit > 0.

    `source` is `kindly` (the bundled task's `split`), `kindly:train` / `kindly:eval`, a `.txt`
    file (one prompt a line, blank lines skipped) or anything `load_records` reads with a
    `prompt` column or a `messages` conversation ending in a user turn. A conversation prompt is rendered with the tokenizer's chat template when
    one is given, else its turns' contents are joined by newlines. An empty or non-text prompt
    raises DataError naming the file, line and field; so does a source without prompts.
    """
    if source == "kindly" or source in KINDLY_SPLITS:
        prompts = list(kindly.prompts(KINDLY_SPLITS.get(source, split)))
    elif str(source).endswith(".txt"):
        prompts = [line for line in Path(source).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for i, record in enumerate(load_records(source, split=split), 1):
            if record.get("prompt") is None and isinstance(record.get("messages"), list):
                # a conversation ending in a user turn: the model writes the next assistant turn
                msgs = record["messages"]
                if not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "user":
                    raise DataError("a prompt conversation must end with a user message", source=str(source),
                                    line=i, field="messages")
                record = {"prompt": msgs}
            if record.get("prompt") is None:
                raise DataError("missing the prompt (a `prompt` column, or `messages` ending in a user turn)",
                                source=str(source), line=i, field="prompt")
            p = record["prompt"]
            if isinstance(p, list):
                if tokenizer is not None:
                    p = to_prompt_text(record, tokenizer)
                else:
                    p = "\n".join(str(m.get("content", "")) for m in p if isinstance(m, dict))
            if not isinstance(p, str) or not p.strip():
                raise DataError("prompt is empty or not text", source=str(source), line=i, field="prompt")
            prompts.append(p)
    if not prompts:
        raise DataError("no prompts found", source=str(source))
    return prompts[:limit] if limit > 0 else prompts
