"""Create feedback items by sampling candidate responses from a policy (rlhfkit.rollout)."""

from __future__ import annotations

from rlhfkit.data.prompts import load_prompts
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rollout import generate


def records_from_policy(model, tokenizer, prompts: list[str], num_samples: int = 2, max_new_tokens: int = 32,
                        temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """Sample `num_samples` responses per prompt; one import record per prompt."""
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
    tokenizer = load_tokenizer(policy)
    model = load_policy(policy)
    return records_from_policy(model, tokenizer, load_prompts(prompts_path, tokenizer=tokenizer), num_samples, max_new_tokens,
                               temperature, seed)
