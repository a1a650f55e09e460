"""Prompt datasets for the on-policy recipes: prompts, their extra columns, templating, scheduling.

A prompt is plain text or a conversation (TRL layouts: `prompt` as a list of messages, or
`messages` ending in a user turn). Every other column (e.g. `answer`) travels with its
prompt and reaches the reward functions as a keyword list, as in TRL's GRPOTrainer.

Sources: `kindly` / `kindly:train` / `kindly:eval` (the bundled task), a bundled task module
`rlhfkit.tasks.NAME` with a `prompt_records(split) -> list[dict]` function (`NAME` or
`NAME:split`), a `.txt` file (one prompt a line), or anything `rlhfkit.data.load_records`
reads (JSONL, JSON, parquet, a save_to_disk folder, a `datasets.Dataset`, a list of dicts).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from rlhfkit.data.chat import apply_chat_template
from rlhfkit.data.readers import Records, load_records
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.train.batches import epoch_order

_TEXT_COLUMNS = ("prompt", "messages", "completion")


@dataclasses.dataclass
class PromptSet:
    prompts: list[Any]
    """Each prompt as given: a string, or a list of {"role", "content"} messages."""
    columns: dict[str, list[Any]]
    """Extra dataset columns, one value per prompt, passed to reward functions by name."""
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: list[int]) -> PromptSet:
        return PromptSet([self.prompts[i] for i in index], {k: [v[i] for i in index] for k, v in self.columns.items()},
                         self.source)

    @property
    def conversational(self) -> bool:
        return bool(self.prompts) and isinstance(self.prompts[0], list)


def _bundled_task(source: str, split: str) -> list[dict] | None:
    name, _, sp = str(source).partition(":")
    if not name.isidentifier():
        return None
    try:
        module = importlib.import_module(f"rlhfkit.tasks.{name}")
    except ImportError:
        return None
    if name == "kindly":
        return [{"prompt": p} for p in module.prompts(sp or split)]
    fn = getattr(module, "prompt_records", None)
    return fn(sp or split) if fn is not None else None


def _prompt_of(record: dict, source: str, line: int) -> Any:
    if "prompt" in record:
        p = record["prompt"]
    elif "messages" in record:
        p = record["messages"]
        if not isinstance(p, list) or not p or not isinstance(p[-1], dict) or p[-1].get("role") != "user":
            raise DataError("'messages' must end with a user turn for generation", source=source, line=line,
                            field="messages")
    else:
        raise DataError("no 'prompt' (or 'messages') column", source=source, line=line, field="prompt")
    if isinstance(p, list):
        if not p or not all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
            raise DataError("a conversational prompt is a list of {role, content} messages", source=source,
                            line=line, field="prompt")
        return p
    if not isinstance(p, str) or not p.strip():
        raise DataError("prompt is empty or not text", source=source, line=line, field="prompt")
    return p


def load_prompt_set(source: Any, split: str = "train", limit: int = 0) -> PromptSet:
    """Prompts and their extra columns from `source` (module docstring); the first `limit` if > 0."""
    name = source if isinstance(source, str) else type(source).__name__
    if isinstance(source, str) and not source:
        raise ConfigError("no prompt source given: pass --prompts FILE (JSONL/JSON/parquet with a 'prompt' column)")
    records = _bundled_task(source, split) if isinstance(source, str) else None
    if records is None and isinstance(source, str) and source.endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"prompt file {source} does not exist")
        numbered = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        records = Records([{"prompt": line} for _, line in numbered], source=source, lines=[i for i, _ in numbered])
    if records is None:
        records = load_records(source, split=split)
    if limit > 0:
        records = records[:limit]
    if not records:
        raise DataError("no prompts found", source=name)
    # errors cite the record's line in its file (blank lines are skipped, so not its index)
    line = records.line_of if isinstance(records, Records) else (lambda index: index + 1)
    prompts = [_prompt_of(r, name, line(i)) for i, r in enumerate(records)]
    keys = [k for k in records[0] if k not in _TEXT_COLUMNS]
    for i, r in enumerate(records):
        missing = [k for k in keys if k not in r]
        if missing:
            raise DataError(f"column '{missing[0]}' is missing here but present in the first record", source=name,
                            line=line(i), field=missing[0])
    return PromptSet(prompts, {k: [r[k] for r in records] for k in keys}, name)


def default_eval_source(prompts: str) -> str:
    """The held-out prompts of a bundled task ('NAME:eval'), or '' for a user's dataset."""
    name = str(prompts).partition(":")[0]
    return f"{name}:eval" if isinstance(prompts, str) and _bundled_task(name, "eval") is not None else ""


def render_prompt(tokenizer: Any, prompt: Any) -> str:
    """The text the policy continues: a conversation through the policy tokenizer's chat template
    with the generation prompt (as SFT and DPO render prompts), plain text as is."""
    if isinstance(prompt, list):
        return apply_chat_template(tokenizer, prompt, add_generation_prompt=True)
    return prompt


def as_completions(prompts: list[Any], responses: list[str]) -> list[Any]:
    """Completions as TRL passes them to reward functions: assistant messages for conversations."""
    return [[{"role": "assistant", "content": r}] if isinstance(p, list) else r for p, r in zip(prompts, responses)]


def prompts_for_step(n_prompts: int, step: int, per_process: int, seed: int, num_processes: int = 1,
                     process_index: int = 0) -> list[int]:
    """Indices of this process's prompts for update `step`: a pure function of (seed, step), so a
    resumed run replays exactly the prompts an uninterrupted run would have used."""

    global_n = per_process * num_processes
    if n_prompts < global_n:
        raise ConfigError(f"{n_prompts} prompts are fewer than prompts_per_step x processes = {global_n}")
    per_epoch = n_prompts // global_n
    epoch, pos = divmod(step, per_epoch)
    chunk = epoch_order(n_prompts, seed, epoch)[pos * global_n:(pos + 1) * global_n]
    return chunk[process_index * per_process:(process_index + 1) * per_process]


def rollout_seed(seed: int, step: int, process_index: int = 0) -> int:
    """The sampling seed of update `step`'s rollout on process `process_index`: a pure function of
    (seed, step, process), so a resumed run samples what an uninterrupted one would have."""
    return seed * 1_000_003 + step * 7919 + process_index


def rows_of(prompt_set: PromptSet, prompt_index: Any) -> tuple[list[Any], dict[str, list]]:
    """(prompts, columns) repeated for each rollout row (`Rollout.prompt_index`), for scoring."""
    rows = [int(i) for i in prompt_index]
    return [prompt_set.prompts[i] for i in rows], {k: [v[i] for i in rows] for k, v in prompt_set.columns.items()}
