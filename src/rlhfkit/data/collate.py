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
BOS counts as part of the prompt and is never cut away. Every collator counts the examples it
truncated (`truncated` per row in the batch, cumulative `num_truncated` on the collator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.data.chat import to_prompt_completion, to_ranking_texts, to_text_pair
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


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


class _Counting:
    """Shared bookkeeping: how many examples were seen and truncated (for the caller to print)."""

    num_examples: int = 0
    num_truncated: int = 0

    def _count(self, flags: list[bool]) -> torch.Tensor:
        self.num_examples += len(flags)
        self.num_truncated += sum(flags)
        return torch.tensor(flags, dtype=torch.bool)

    def truncation_summary(self) -> str:
        return f"{type(self).__name__}: truncated {self.num_truncated} of {self.num_examples} examples"


class SFTCollator(_Counting):
    """SFT records (text, prompt+completion, messages) -> padded, prompt-masked batch."""

    def __init__(self, tokenizer: Any, max_length: int, max_prompt_length: int | None = None,
                 padding_side: str = "right"):
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.pad = PadCollator(_pad_id(tokenizer), padding_side)

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = [encode_prompt_completion(self.tokenizer, *to_prompt_completion(r, self.tokenizer),
                                         self.max_length, max_prompt_length=self.max_prompt_length)
                for r in records]
        batch = self.pad([e.as_dict() for e in rows])
        batch["truncated"] = self._count([e.truncated for e in rows])
        return batch


class PreferenceCollator(_Counting):
    """Preference records -> one batch of 2B rows: the B chosen rows, then the B rejected rows.

    Chosen and rejected go through ONE forward (`logits[:B]` chosen, `logits[B:]` rejected).
    Both share the prompt tokenization, so their prompt tokens are identical. Extra keys:
    `truncated` (B,) bool (a pair counts once if either side was cut) and `margin` (B,) float
    when any record has a margin (missing margins are 0).
    """

    def __init__(self, tokenizer: Any, max_length: int, max_prompt_length: int | None = None):
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.pad = PadCollator(_pad_id(tokenizer), "right")

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        chosen, rejected, flags = [], [], []
        for record in records:
            prompt, c_text, r_text = to_text_pair(record, self.tokenizer)
            shared = encode_prompt(self.tokenizer, prompt, self.max_length, self.max_prompt_length)
            c = encode_prompt_completion(self.tokenizer, prompt, c_text, self.max_length, prompt_ids=shared)
            r = encode_prompt_completion(self.tokenizer, prompt, r_text, self.max_length, prompt_ids=shared)
            chosen.append(c.as_dict())
            rejected.append(r.as_dict())
            flags.append(c.truncated or r.truncated)
        batch = self.pad(chosen + rejected)
        batch["truncated"] = self._count(flags)
        if any(r.get("margin") is not None for r in records):
            batch["margin"] = torch.tensor([float(r.get("margin") or 0.0) for r in records])
        return batch


class RankingCollator(_Counting):
    """Ranking records -> all K responses of every prompt in one batch, best first.

    Rows of record b are contiguous, `group_sizes[b]` of them, ordered by rank (row 0 of a
    group is the best response), so a K-way (Plackett-Luce or all-pairs) loss needs one
    forward. Extra keys: `group_sizes` (B,) long, `truncated` (B,) bool.
    """

    def __init__(self, tokenizer: Any, max_length: int, max_prompt_length: int | None = None):
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.pad = PadCollator(_pad_id(tokenizer), "right")

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows, sizes, flags = [], [], []
        for record in records:
            prompt, responses = to_ranking_texts(record, self.tokenizer)
            shared = encode_prompt(self.tokenizer, prompt, self.max_length, self.max_prompt_length)
            encoded = [encode_prompt_completion(self.tokenizer, prompt, text, self.max_length, prompt_ids=shared)
                       for text in responses]
            rows.extend(e.as_dict() for e in encoded)
            sizes.append(len(encoded))
            flags.append(any(e.truncated for e in encoded))
        batch = self.pad(rows)
        batch["group_sizes"] = torch.tensor(sizes, dtype=torch.long)
        batch["truncated"] = self._count(flags)
        return batch


class UnpairedCollator(_Counting):
    """KTO records (prompt, completion, label) -> B prompt-masked rows plus `label` (B,) bool.

    With `kl_rows=True` another B rows follow, pairing prompt i with completion i+1 (mod B):
    the mismatched pairs KTO uses to estimate its KL reference point (Ethayarajh et al. 2024,
    eq. 7), in the same forward.
    """

    def __init__(self, tokenizer: Any, max_length: int, max_prompt_length: int | None = None,
                 kl_rows: bool = False):
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.kl_rows = kl_rows
        self.pad = PadCollator(_pad_id(tokenizer), "right")

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        parts = [to_prompt_completion({"prompt": r["prompt"], "completion": r["completion"]}, self.tokenizer)
                 for r in records]
        prompts = [encode_prompt(self.tokenizer, p, self.max_length, self.max_prompt_length) for p, _ in parts]
        encoded = [encode_prompt_completion(self.tokenizer, p, c, self.max_length, prompt_ids=ids)
                   for (p, c), ids in zip(parts, prompts)]
        rows = [e.as_dict() for e in encoded]
        if self.kl_rows:
            n = len(parts)
            rows += [encode_prompt_completion(self.tokenizer, parts[i][0], parts[(i + 1) % n][1], self.max_length,
                                              prompt_ids=prompts[i]).as_dict() for i in range(n)]
        batch = self.pad(rows)
        batch["label"] = torch.tensor([bool(r["label"]) for r in records], dtype=torch.bool)
        batch["truncated"] = self._count([e.truncated for e in encoded])
        return batch
