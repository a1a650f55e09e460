"""Create feedback items by sampling candidate responses from a policy (rlhfkit.rollout)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.errors import DataError


def read_prompts(path: str) -> list[str]:
    """One prompt a line (.txt) or JSONL records with a 'prompt' field."""
    prompts = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg})", source=path, line=n) from e
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise DataError("needs a string 'prompt'", source=path, line=n, field="prompt")
            prompts.append(rec["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise DataError("no prompts found", source=path)
    return prompts


def records_from_policy(model, tokenizer, prompts: list[str], num_samples: int = 2, max_new_tokens: int = 32,
                        temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """Sample `num_samples` responses per prompt; one import record per prompt."""
    from rlhfkit.rollout import generate

    roll = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                    num_samples=num_samples, seed=seed)
    grouped: dict[int, list[str]] = {}
    owners = [int(i) for i in roll.prompt_index] if getattr(roll, "prompt_index", None) is not None else \
        [n // num_samples for n in range(len(roll.responses))]  # rows are prompt-major
    for owner, response in zip(owners, roll.responses):
        grouped.setdefault(owner, []).append(response)
    return [{"prompt": prompts[i], "responses": grouped[i], "meta": {"source": "policy", "temperature": temperature}}
            for i in range(len(prompts))]


def sample_records(policy: str, prompts_path: str, num_samples: int, max_new_tokens: int, temperature: float,
                   seed: int) -> list[dict]:
    from rlhfkit.models import load_policy, load_tokenizer

    tokenizer = load_tokenizer(policy)
    model = load_policy(policy)
    return records_from_policy(model, tokenizer, read_prompts(prompts_path), num_samples, max_new_tokens,
                               temperature, seed)
