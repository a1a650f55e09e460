"""Preference data on its way to a model: records -> texts -> token rows -> one batch.

Records are TRL's preference layouts: `prompt`/`chosen`/`rejected` pairs (text or
conversations, implicit prompts split off), `prompt`/`responses`/`ranking` rankings (expanded
to every ordered pair) and, for unpaired losses (KTO), `prompt`/`completion`/`label`.

Token rows follow the one encoding rule of :mod:`rlhfkit.data.collate` (BOS first, responses
end with EOS, the prompt keeps its end and a response its start) with the prompt encoded once
per record, so chosen and rejected share identical prompt tokens.

A batch (:class:`ResponseBatch`) lays rows out with prompts LEFT-padded to a common width P
and responses RIGHT-padded after it, so every response starts at column P and one forward
(:func:`rlhfkit.logprobs.response_logprobs`) scores all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch

from rlhfkit.errors import DataError


@dataclasses.dataclass
class PreferenceData:
    """Tokenised preference data. Pairs: rows[i] = (prompt, chosen, rejected); unpaired:
    (prompt, completion) with `labels[i]` True for desirable."""

    rows: list[tuple[list[int], ...]]
    labels: list[bool] | None = None
    truncated: int = 0
    prompt_truncated: int = 0
    skipped: int = 0
    from_rankings: int = 0
    kl_index: list[int] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def paired(self) -> bool:
        return self.labels is None

    def fingerprint(self) -> str:
        """sha256 over the token ids (which already reflect the tokenizer, templates and truncation)."""
        blob = json.dumps({"rows": self.rows, "labels": self.labels}, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def preference_texts(records, unpaired: bool, tokenizer, loss_name: str = "",
                     log: Callable[[str], None] = print) -> tuple[list[tuple], list[bool] | None, int]:
    """Records of any supported layout -> text tuples; returns (texts, labels, n_from_rankings).

    With `unpaired` (a KTO-style loss) pairs become a desirable and an undesirable example
    (Ethayarajh et al. 2024, sec. 4); without it unpaired records are an error.
    """
    from rlhfkit.data.chat import to_prompt_completion, to_text_pair
    from rlhfkit.data.schemas import (
        detect_dataset_format,
        rankings_to_pairs,
        validate_preferences,
        validate_rankings,
        validate_unpaired,
    )

    source = getattr(records, "source", None) or "data"
    fmt = detect_dataset_format(records, source)  # raises on empty or mixed layouts, naming the line
    from_rankings = 0
    if fmt == "ranking":
        n = len(records)
        records = rankings_to_pairs(validate_rankings(records, source))
        from_rankings = len(records)
        log(f"expanded {n} rankings into {from_rankings} pairs")
        fmt = "preference"
    if fmt == "unpaired":
        if not unpaired:
            raise DataError(f"loss '{loss_name}' needs paired data (prompt/chosen/rejected) but got unpaired "
                            f"prompt/completion/label records; use --loss kto", source=source, field="label")
        records = validate_unpaired(records, source)
        return [to_prompt_completion(r, tokenizer) for r in records], [r["label"] for r in records], 0
    if fmt != "preference":
        raise DataError(f"records look like '{fmt}' data; this recipe needs prompt/chosen/rejected pairs, "
                        f"prompt/responses/ranking rankings or (for kto) prompt/completion/label", source=source)
    pairs = [to_text_pair(r, tokenizer) for r in validate_preferences(records, source)]
    if unpaired:
        n = len(pairs)
        return [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], [True] * n + [False] * n, from_rankings
    return pairs, None, from_rankings


def encode_preferences(texts: list[tuple], labels: list[bool] | None, tokenizer, max_length: int,
                       max_prompt_length: int | None = None) -> PreferenceData:
    """Token ids per example; a pair identical after truncation carries no preference and is skipped (counted)."""
    from rlhfkit.data.collate import encode_prompt, encode_prompt_completion

    out = PreferenceData(rows=[], labels=[] if labels is not None else None)
    for i, (prompt, *responses) in enumerate(texts):
        shared = encode_prompt(tokenizer, prompt, max_length, max_prompt_length or None)
        encoded = [encode_prompt_completion(tokenizer, prompt, r, max_length, prompt_ids=shared) for r in responses]
        out.truncated += any(e.truncated for e in encoded)
        out.prompt_truncated += bool(shared[1])
        r_ids = [e.input_ids[e.prompt_length:] for e in encoded]
        if len(r_ids) == 2 and r_ids[0] == r_ids[1]:
            out.skipped += 1
            continue
        out.rows.append((list(shared[0]), *r_ids))
        if labels is not None:
            out.labels.append(labels[i])
    return out


def load_preferences(source: Any, split: str, unpaired: bool, tokenizer, max_length: int, limit: int | None = None,
                     loss_name: str = "", log: Callable[[str], None] = print,
                     max_prompt_length: int | None = None) -> PreferenceData:
    """Read, check, template and encode preference data, reporting truncation and skips."""
    from rlhfkit.data.readers import Records, load_records

    records = load_records(source, split=split)
    name = getattr(records, "source", None) or "data"
    if limit is not None and len(records) > limit:
        log(f"using the first {limit} of {len(records)} records of {name} [{split}]")
        records = Records(records[:limit], source=records.source, lines=(records.lines or [])[:limit] or None)
    texts, labels, from_rankings = preference_texts(records, unpaired, tokenizer, loss_name, log)
    data = encode_preferences(texts, labels, tokenizer, max_length, max_prompt_length)
    data.from_rankings = from_rankings
    if data.truncated:
        log(f"{data.truncated} of {len(texts)} examples from {name} [{split}] were longer than max_length={max_length} "
            f"and were truncated ({data.prompt_truncated} prompts cut from the left; responses keep their start)")
    if data.skipped:
        log(f"skipped {data.skipped} pairs from {name} [{split}] whose chosen and rejected responses were "
            f"identical after truncation")
    if not data.rows:
        raise DataError("no usable examples left", source=name)
    return data


def example_rows(data: PreferenceData, index: list[int], kl: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) rows of the examples `index`. Pairs: all chosen rows, then all rejected
    rows (one forward). Unpaired with `kl`: the mismatched rows for KTO's KL estimate, prompt of
    i with the completion of the first example after i (in dataset order, cyclically) whose
    prompt differs (:func:`rlhfkit.losses.preference.kto_mismatched_index`), so completions of
    a shared prompt never pair up; a fixed pairing keeps reference log-probs cacheable."""
    if data.paired:
        return [(data.rows[i][0], data.rows[i][1]) for i in index] + [(data.rows[i][0], data.rows[i][2]) for i in index]
    if kl:
        if data.kl_index is None:
            from rlhfkit.losses.preference import kto_mismatched_index

            try:
                data.kl_index = kto_mismatched_index([tuple(r[0]) for r in data.rows])
            except ValueError as e:
                raise DataError(f"{e}; every example has the same prompt, so pass --kto_kl false") from None
        return [(data.rows[i][0], data.rows[data.kl_index[i]][1]) for i in index]
    return [(data.rows[i][0], data.rows[i][1]) for i in index]


@dataclasses.dataclass
class ResponseBatch:
    """(prompt, response) rows padded for one forward.

    input_ids, attention_mask: (N, P + R), prompts left-padded to P, responses right-padded to R;
    response_mask: (N, R), 1 on real response tokens; response_width: R.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def to(self, device: Any) -> ResponseBatch:
        return ResponseBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_mask)))


def collate_responses(rows: list[tuple[list[int], list[int]]], pad_id: int, device: Any = "cpu") -> ResponseBatch:
    """Lay (prompt ids, response ids) rows out as a :class:`ResponseBatch`."""
    P = max(len(p) for p, _ in rows)
    R = max(len(r) for _, r in rows)
    ids = torch.full((len(rows), P + R), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P + R), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(p):P + len(r)] = 1
    return ResponseBatch(ids, mask, mask[:, P:].clone()).to(device)


@dataclasses.dataclass
class PreferenceBatch:
    """Comparisons laid out for ONE forward, shared by the reward and DPO recipes.

    `rows` holds the chosen rows of the B pairs, then their B rejected rows, then the K rows
    of each ranking (best first), as a :class:`ResponseBatch` (prompts left-padded, responses
    right-padded). `labels` (B,) is P(chosen preferred), `margins` (B,) or None, `rank_index`
    (Br, K) gathers each ranking's rows (valid where `rank_mask`), `order` maps batch units
    back to the input order (pairs first, then rankings).
    """

    rows: ResponseBatch
    num_pairs: int
    labels: torch.Tensor
    margins: torch.Tensor | None
    rank_index: torch.Tensor
    rank_mask: torch.Tensor
    order: list[int]


def collate_preferences(units: list[dict], pad_id: int, device: Any = "cpu") -> PreferenceBatch:
    """Token units -> :class:`PreferenceBatch`.

    A unit is ``{"kind": "pair" | "rank", "rows": [full token ids, ...], "prompt_length": n}``
    (its rows share their first n tokens, the prompt), pairs also ``label`` and ``margin``.
    """
    pairs = [u for u in units if u["kind"] == "pair"]
    ranks = [u for u in units if u["kind"] == "rank"]
    split = [(u, r) for u in pairs for r in u["rows"][:1]] + [(u, r) for u in pairs for r in u["rows"][1:2]]
    rows = [(r[:u["prompt_length"]], r[u["prompt_length"]:]) for u, r in split]
    k_max = max((len(u["rows"]) for u in ranks), default=0)
    rank_index = torch.zeros((len(ranks), k_max), dtype=torch.long)
    rank_mask = torch.zeros((len(ranks), k_max), dtype=torch.bool)
    for b, u in enumerate(ranks):
        start = len(rows)
        rows.extend((r[:u["prompt_length"]], r[u["prompt_length"]:]) for r in u["rows"])
        rank_index[b, :len(u["rows"])] = torch.arange(start, start + len(u["rows"]))
        rank_mask[b, :len(u["rows"])] = True
    margins = [u.get("margin") for u in pairs]
    return PreferenceBatch(
        rows=collate_responses(rows, pad_id, device), num_pairs=len(pairs),
        labels=torch.tensor([float(u.get("label", 1.0)) for u in pairs], dtype=torch.float32, device=device),
        margins=None if not margins or any(m is None for m in margins) else torch.tensor(margins, device=device),
        rank_index=rank_index.to(device), rank_mask=rank_mask.to(device),
        order=[i for i, u in enumerate(units) if u["kind"] == "pair"] + [i for i, u in enumerate(units) if u["kind"] == "rank"])


def pair_units(data: PreferenceData, index: list[int]) -> list[dict]:
    """Paired :class:`PreferenceData` examples as token units for :func:`collate_preferences`."""
    return [{"kind": "pair", "rows": [data.rows[i][0] + data.rows[i][1], data.rows[i][0] + data.rows[i][2]],
             "prompt_length": len(data.rows[i][0]), "label": 1.0, "margin": None} for i in index]
