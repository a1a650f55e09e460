"""Packing: several tokenized examples per fixed-length row, positions restarting per example.

Attention across packed documents, as checked against transformers 5.23 (LlamaModel, sdpa
and eager): `create_causal_mask` detects packing from `position_ids` (a position that is not
the previous one + 1 starts a new document) and then masks attention per document, but ONLY
when the model is called with `attention_mask=None` and without a KV cache. So call the model
as ``model(input_ids=..., position_ids=..., use_cache=False)`` with no attention_mask
(`PadCollator` leaves packed rows, recognised by their `document_ids`, without one): passing
an all-ones attention_mask, or leaving `use_cache` at its default True (the model then creates
a cache), silently falls back to one causal mask over the whole row, and tokens attend across
document boundaries. `tests/test_data_packing.py` checks this on a tiny Llama. For models or
versions without that detection, `packed_attention_mask` builds the block-diagonal causal
mask explicitly (4-D, passed as `attention_mask`; transformers uses a 4-D mask as given).

Either way the loss never crosses a boundary: the label of each document's first token is
-100, so no position is trained to predict the next document from the previous one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from rlhfkit.errors import DataError

IGNORE_INDEX = -100


def _best_fit_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing bin packing; returns rows as lists of example indices.

    Longest first, each into the fullest row that still has room (bisect over remaining
    capacities keeps it O(n log n)-ish). Deterministic: ties break on the example index.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in order:
        n = lengths[i]
        slot = bisect.bisect_left(free, (n, -1))
        if slot == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
            continue
        capacity, row = free.pop(slot)
        rows[row].append(i)
        bisect.insort(free, (capacity - n, row))
    return rows


def pack_sequences(examples: Sequence[dict], max_length: int, eos_id: int,
                   pad_id: int | None = None) -> list[dict[str, list[int]]]:
    """Pack tokenized, prompt-masked examples into rows of exactly `max_length` tokens.

    `examples` are dicts with `input_ids` and optionally `labels` (as from
    `tokenize_prompt_completion`; without labels every token is supervised). Returns one dict
    per row with `input_ids`, `labels`, `position_ids` (restarting at 0 for every example) and
    `document_ids` (index of the example within its row, -1 on the padding), lists of
    `max_length` ints, ready for `PadCollator` (which adds no attention_mask to packed rows).
    The unused tail of a row is filled with `pad_id` (default `eos_id`), labels -100, and its
    own positions 0, 1, ... so it forms a separate, unsupervised segment.

    An example longer than `max_length` raises DataError: truncate when tokenizing.
    """
    if max_length < 1:
        raise ValueError("max_length must be >= 1")
    pad = eos_id if pad_id is None else pad_id
    ids = [list(e["input_ids"]) for e in examples]
    labels = [list(e["labels"]) if e.get("labels") is not None else list(e["input_ids"]) for e in examples]
    for i, (x, y) in enumerate(zip(ids, labels)):
        if len(x) > max_length:
            raise DataError(f"example has {len(x)} tokens, more than max_length={max_length}; "
                            f"tokenize with max_length to truncate it first", line=i + 1, field="input_ids")
        if len(x) != len(y):
            raise DataError("input_ids and labels differ in length", line=i + 1, field="labels")
    rows = []
    for members in _best_fit_rows([len(x) for x in ids], max_length) if ids else []:
        row = {"input_ids": [], "labels": [], "position_ids": [], "document_ids": []}
        for d, i in enumerate(m for m in members if ids[m]):
            n = len(ids[i])
            row["input_ids"] += ids[i]
            row["labels"] += [IGNORE_INDEX] + labels[i][1:]  # never predict a document from the one before
            row["position_ids"] += list(range(n))
            row["document_ids"] += [d] * n
        tail = max_length - len(row["input_ids"])
        row["input_ids"] += [pad] * tail
        row["labels"] += [IGNORE_INDEX] * tail
        row["position_ids"] += list(range(tail))
        row["document_ids"] += [-1] * tail
        rows.append(row)
    return rows


def packed_attention_mask(document_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T) from `document_ids`, additive (0 or dtype min).

    Query t sees key s iff s <= t and both belong to the same document; the padding tail
    (-1) is a segment of its own, so no query row is fully masked.
    """
    doc = document_ids
    t = doc.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc.device).tril()
    same = doc.unsqueeze(-1) == doc.unsqueeze(-2)
    allowed = same & causal
    allowed |= torch.eye(t, dtype=torch.bool, device=doc.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def packing_efficiency(rows: Sequence[dict]) -> float:
    """Share of row positions holding real tokens (1.0 = no padding)."""
    total = sum(len(r["document_ids"]) for r in rows)
    return sum(d >= 0 for r in rows for d in r["document_ids"]) / total if total else 0.0
