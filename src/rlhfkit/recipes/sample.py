"""Generate responses from a policy for a prompt file.

    rlhfkit sample --model runs/sft/final --prompts kindly --num_samples 4 --output samples.jsonl

Prompts come from any data file with a `prompt` column (text or conversation; chat
templates applied) or `kindly` / `kindly:train` for the bundled task's prompt splits.
Each output line is `{"prompt": ..., "responses": [...]}` (the input of `rlhfkit label`),
or with `--flat true` one `{"prompt", "completion"}` line per sample.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from tqdm.auto import tqdm

from rlhfkit.config import require
from rlhfkit.data.prompts import load_prompts
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.recipes.agentic import sample_rows
from rlhfkit.rollout import generate
from rlhfkit.rollout.episode_args import EpisodeArgs
from rlhfkit.train.runs import atomic_path, seed_everything


@dataclasses.dataclass
class Config(EpisodeArgs):
    model: str = "kindly"
    """Policy to sample from (folder, hub name, or 'kindly' for the bundled base)."""
    prompts: str = "kindly"
    """Prompt source: a data file with a `prompt` column, or kindly / kindly:train / kindly:eval."""
    output: str = "samples.jsonl"
    """Output JSONL (written atomically)."""
    num_samples: int = 1
    """Responses per prompt."""
    max_new_tokens: int = 32
    """Longest response in tokens (generation stops at EOS before that)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_prompts: int = 0
    """Use only the first N prompts (0: all)."""
    max_prompt_length: int = 64
    """Prompts longer than this many tokens keep their last tokens (the count is printed)."""
    batch_size: int = 64
    """Rows per generation forward."""
    flat: bool = False
    """One line per sample ({prompt, completion}) instead of one per prompt ({prompt, responses})."""
    seed: int = 0
    """Sampling seed."""
    dtype: str = "float32"
    """Weights dtype."""

    def __post_init__(self) -> None:
        self._check_episode_args()
        require(self.num_samples >= 1, "num_samples", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")


@torch.no_grad()
def main(cfg: Config) -> list[dict]:
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    model = load_policy(cfg.model, cfg.dtype, trainable=False)
    if cfg.multi_turn:  # episodes with tools / an environment: one line per episode (recipes/agentic.py)
        rows = sample_rows(cfg, model, tokenizer)
        return _write(cfg.output, rows)
    prompts = load_prompts(cfg.prompts, "eval", tokenizer)
    if cfg.max_prompts > 0:
        prompts = prompts[: cfg.max_prompts]
    rows: list[dict] = []
    truncated = 0
    chunk = max(1, cfg.batch_size // cfg.num_samples)
    for start in tqdm(range(0, len(prompts), chunk), desc="sample", unit="batch"):
        part = prompts[start:start + chunk]
        out = generate(model, tokenizer, part, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                       cfg.num_samples, cfg.batch_size, seed=cfg.seed + start, max_prompt_length=cfg.max_prompt_length)
        truncated += out.num_truncated_prompts
        for i, p in enumerate(part):
            responses = out.responses[i * cfg.num_samples:(i + 1) * cfg.num_samples]
            if cfg.flat:
                rows.extend({"prompt": p, "completion": r} for r in responses)
            else:
                rows.append({"prompt": p, "responses": responses})
    if truncated:
        print(f"note: {truncated} prompts were longer than max_prompt_length={cfg.max_prompt_length} tokens and kept their last tokens")
    return _write(cfg.output, rows)


def _write(output: str, rows: list[dict]) -> list[dict]:
    with atomic_path(output) as tmp:
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} lines to {output}")
    return rows
