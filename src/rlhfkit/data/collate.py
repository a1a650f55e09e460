"""Tokenization with prompt-masked labels, truncation, padding and batch collators.

Labels follow the Hugging Face convention: aligned with `input_ids` (the model shifts), and
IGNORE_INDEX (-100) wherever no loss is taken: prompt tokens, the BOS token and padding.

Prompt and completion are tokenized separately and concatenated. Tokenizing the joined text
would let a BPE merge a token across the boundary ("Hello wor" + "ld" -> "world"), and then
no token boundary matches the prompt/completion boundary; with separate tokenization the mask
is exact by construction.

Truncation (one rule for every collator, so a prompt is cut identically for all of its
responses):
1. the prompt keeps its last `max_prompt_length` tokens, when that is set;
2. if the prompt alone leaves no room for a response token under `max_length`, it keeps its
   last `max_length // 2` tokens;
3. the response keeps its first `max_length - len(prompt)` tokens (a cut response loses its
   EOS, which is right: the text did not end there).
BOS counts as part of the prompt and is never cut away. No example is dropped for length: the
prompt gives way first, so every example keeps at least its first response token. Recipes count
the examples they truncated (and how many of those lost part of their prompt) and print both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized prompt+response: ids, prompt-masked labels and what truncation did."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool
    prompt_truncated: bool = False

    def as_dict(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels,
                "attention_mask": [1] * len(self.input_ids)}


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: str, max_length: int | None = None,
                  max_prompt_length: int | None = None) -> tuple[list[int], bool]:
    """Prompt ids with BOS (if the tokenizer has one and it is not already first), left-truncated.

    Returns (ids, truncated). Encode once and pass to `encode_prompt_completion(prompt_ids=...)`
    to share one prompt between several responses.
    """
    ids = _token_ids(tokenizer, prompt)
    bos = getattr(tokenizer, "bos_token_id", None)
    has_bos = bos is not None
    if has_bos and (not ids or ids[0] != bos):  # templates often write BOS into the text already
        ids = [bos] + ids
    n = len(ids)
    limit = n
    if max_prompt_length is not None:
        limit = min(limit, max_prompt_length)
    if max_length is not None and limit >= max_length:
        limit = max_length // 2
    if limit < n:
        keep = max(limit - int(has_bos), 0)  # cut from the left but keep BOS in front
        ids = ([ids[0]] if has_bos else []) + (ids[n - keep:] if keep else [])
    return ids, len(ids) < n


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str, max_length: int | None = None,
                             add_eos: bool = True, max_prompt_length: int | None = None,
                             prompt_ids: tuple[list[int], bool] | None = None) -> Encoded:
    """Tokenize prompt and completion separately, concatenate, truncate (module docstring)."""
    p_ids, p_cut = prompt_ids if prompt_ids is not None else encode_prompt(
        tokenizer, prompt, max_length, max_prompt_length)
    c_ids = _token_ids(tokenizer, completion)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None and (not c_ids or c_ids[-1] != eos):
        c_ids.append(eos)
    c_cut = False
    if max_length is not None and len(p_ids) + len(c_ids) > max_length:
        c_ids = c_ids[: max(max_length - len(p_ids), 0)]
        c_cut = True
    return Encoded(input_ids=p_ids + c_ids, labels=[IGNORE_INDEX] * len(p_ids) + c_ids,
                   prompt_length=len(p_ids), truncated=p_cut or c_cut, prompt_truncated=p_cut)


def tokenize_prompt_completion(tokenizer: Any, prompt: str, completion: str, max_length: int | None = None,
                               add_eos: bool = True, max_prompt_length: int | None = None) -> dict[str, list[int]]:
    """dict(input_ids, labels, attention_mask) as lists; labels are -100 on every prompt token
    (BOS included), the completion and its EOS are supervised."""
    return encode_prompt_completion(tokenizer, prompt, completion, max_length, add_eos,
                                    max_prompt_length).as_dict()


# ---------------------------------------------------------------- padding


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (input_ids, attention_mask) LongTensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}


class PadCollator:
    """Pad a list of per-example dicts into tensors.

    `input_ids` pad with `pad_token_id`, `labels` with -100, `attention_mask` and
    `position_ids` (and any other list-valued key) with 0. `padding_side="left"` is for
    generation: prompts end at the same column. An `attention_mask` is created when the
    features have none, except for packed rows (features with `document_ids`). Scalar keys
    are stacked into a tensor.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_token_id is None:
            raise ConfigError("pad_token_id is None: the tokenizer has no pad token; set one "
                              "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, rows: list[list[int]], value: int, width: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            row = torch.as_tensor(row, dtype=torch.long)
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, width - len(row):] = row
        return out

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        features = [dict(f) for f in features]
        # packed rows (with document_ids) get no mask: an attention_mask would stop transformers
        # from masking attention per document (see rlhfkit.data.packing)
        if "attention_mask" not in features[0] and "document_ids" not in features[0]:
            for f in features:
                f["attention_mask"] = [1] * len(f["input_ids"])
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)) or (torch.is_tensor(values[0]) and values[0].dim() == 1):
                pad = self.pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
                batch[key] = self._pad(values, pad, width)
            else:
                batch[key] = torch.as_tensor(values)
        return batch
