"""Preference comparisons for reward models: records -> checked texts -> token units -> batches.

A *comparison* is a pair (prompt, chosen, rejected, label = P(chosen preferred), margin,
annotator) or a ranking (prompt, responses best first). Every bad record either stops with a
DataError naming source, line and field, or (``on_bad="skip"``) is dropped and counted by
reason, and the counts are printed by the caller; nothing is dropped silently.

A *unit* is the token form: a pair is 2 rows, a ranking K rows, sharing one prompt encoding.
:func:`collate_units` lays out one :class:`rlhfkit.data.preference.PreferenceBatch` (the batch
type DPO uses too) so that every row goes through a single forward pass: the chosen rows of all
pairs, then their rejected rows, then the ranking rows, with an index that gathers each
ranking's K rewards back into a (B, K) matrix.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from rlhfkit.data.collate import encode_prompt, encode_prompt_completion
from rlhfkit.data.preference import PreferenceBatch, collate_preferences
from rlhfkit.errors import DataError

# ---------------------------------------------------------------------------------------------
# records -> comparisons (text), with every bad record an error or a counted skip


@dataclasses.dataclass
class Comparisons:
    pairs: list[dict] = dataclasses.field(default_factory=list)     # prompt, chosen, rejected, label, margin, annotator
    rankings: list[dict] = dataclasses.field(default_factory=list)  # prompt, responses (best first)
    skipped: Counter = dataclasses.field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.pairs) + len(self.rankings)


def _label(rec: dict) -> float:
    if rec.get("tie") is True:
        return 0.5
    y = rec.get("label", 1.0)
    if isinstance(y, bool):
        return float(y)
    if not isinstance(y, int | float) or not 0.0 <= float(y) <= 1.0:
        raise ValueError(f"must be a number in [0, 1] (1: chosen preferred, 0.5: tie), got {y!r}")
    return float(y)


def _parse_pair(rec: dict, tokenizer: Any) -> dict:
    """One preference record -> comparison dict (texts); raises _Bad(field, message, reason)."""
    from rlhfkit.data import conversation_split
    from rlhfkit.data.schemas import preference_parts

    for f in ("chosen", "rejected"):
        v = rec.get(f)
        if v is None:
            raise _Bad(f, "missing", "missing chosen/rejected")
        if not isinstance(v, str | list):
            raise _Bad(f, f"must be a string or a conversation, got {type(v).__name__}", "wrong type")
    try:
        prompt, chosen, rejected = preference_parts(rec)
        prompt, (chosen, rejected) = conversation_split(tokenizer, prompt, [chosen, rejected])
    except DataError as e:
        raise _Bad(e.field or "chosen", str(e), "malformed conversation") from None
    for f, v in (("chosen", chosen), ("rejected", rejected)):
        if not v.strip():
            raise _Bad(f, "is empty", "empty response")
    if chosen == rejected:
        raise _Bad("rejected", "is identical to chosen", "chosen identical to rejected")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    try:
        out["label"] = _label(rec)
    except ValueError as e:
        raise _Bad("label", str(e), "bad label") from None
    margin = rec.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int | float)):
        raise _Bad("margin", f"must be a number, got {margin!r}", "bad margin")
    out["margin"] = None if margin is None else float(margin)
    annotator = rec.get("annotator_id", rec.get("annotator"))
    out["annotator"] = None if annotator is None else str(annotator)
    return out


def _parse_ranking(rec: dict, tokenizer: Any) -> dict:
    from rlhfkit.data import conversation_split

    responses, ranking = rec.get("responses"), rec.get("ranking")
    if not isinstance(responses, list) or len(responses) < 2:
        raise _Bad("responses", "must be a list of at least 2 responses", "bad responses")
    if not isinstance(ranking, list) or len(ranking) < 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise _Bad("ranking", "must be a list of at least 2 integer indices into responses, best first", "bad ranking")
    if len(set(ranking)) != len(ranking):
        raise _Bad("ranking", f"has duplicate indices {ranking}", "duplicate ranking index")
    if any(i < 0 or i >= len(responses) for i in ranking):
        raise _Bad("ranking", f"index out of range 0..{len(responses) - 1}: {ranking}", "ranking index out of range")
    ordered = [responses[i] for i in ranking]
    if any(r is None or (isinstance(r, str) and not r.strip()) or r == [] for r in ordered):
        raise _Bad("responses", "a ranked response is empty", "empty response")
    try:
        prompt, texts = conversation_split(tokenizer, rec.get("prompt"), ordered)
    except DataError as e:
        raise _Bad(e.field or "responses", str(e), "malformed conversation") from None
    if len(set(texts)) != len(texts):
        raise _Bad("responses", "two ranked responses are identical", "chosen identical to rejected")
    return {"prompt": prompt, "responses": texts}


class _Bad(Exception):
    def __init__(self, field: str, message: str, reason: str):
        super().__init__(message)
        self.field, self.reason = field, reason


def parse_comparisons(records: list[dict], source: str | None = None, on_bad: str = "error",
                      tokenizer: Any = None) -> Comparisons:
    """Sort records into pairs and rankings; a bad record raises DataError or is counted as skipped."""
    comps = Comparisons()
    lines = getattr(records, "lines", None)
    for i, rec in enumerate(records):
        line = lines[i] if lines else i + 1
        try:
            if "responses" in rec or "ranking" in rec:
                comps.rankings.append(_parse_ranking(rec, tokenizer))
            else:
                comps.pairs.append({**_parse_pair(rec, tokenizer), "line": line})
        except _Bad as bad:
            if on_bad == "error":
                raise DataError(f"{bad} (use --on_bad_record skip to drop such records and count them)",
                                source=source, line=line, field=bad.field) from None
            comps.skipped[bad.reason] += 1
    return comps


def load_comparisons(source: str, split: str = "train", on_bad: str = "error", tokenizer: Any = None,
                     from_feedback: str = "") -> Comparisons:
    if from_feedback:
        from rlhfkit.feedback.export import load_preferences  # the feedback service is optional

        records, source = load_preferences(from_feedback), f"feedback database {from_feedback}"
    else:
        from rlhfkit.data.readers import load_records

        records = load_records(source, split=split)
    comps = parse_comparisons(records, source, on_bad, tokenizer)
    if not len(comps):
        raise DataError("no usable preference or ranking records", source=source)
    return comps


def report_skips(comps: Comparisons, what: str, printer=print) -> None:
    if comps.skipped:
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(comps.skipped.items()))
        printer(f"reward: skipped {sum(comps.skipped.values())} {what} record(s): {detail}")


# ---------------------------------------------------------------------------------------------
# comparisons -> token units -> batches


def tokenize_units(comps: Comparisons, tokenizer: Any, max_length: int, loss: str,
                   max_prompt_length: int = 0) -> tuple[list[dict], Counter]:
    """Token-level units: a pair (2 rows) or a ranking (K rows). Returns (units, counts).

    Under the strict Bradley-Terry loss, pairs labelled 0 are flipped and ties (0.5) skipped
    and counted; the tie-aware losses keep every label.
    """
    counts: Counter = Counter()

    def enc(prompt: str, responses: list[str]) -> tuple[list[list[int]], int]:
        shared = encode_prompt(tokenizer, prompt or "", max_length, max_prompt_length or None)  # shared by all responses
        rows = []
        for response in responses:
            e = encode_prompt_completion(tokenizer, prompt or "", response, max_length, prompt_ids=shared)
            counts["truncated_rows"] += int(e.truncated)
            rows.append(e.input_ids)
        return rows, len(shared[0])

    units = []
    for p in comps.pairs:
        c, r, y = p["chosen"], p["rejected"], p["label"]
        if loss == "bradley_terry":
            if y == 0.5:
                counts["ties_skipped"] += 1
                continue
            if y < 0.5:
                c, r, y = r, c, 1 - y
        rows, n_prompt = enc(p["prompt"], [c, r])
        units.append({"kind": "pair", "rows": rows, "prompt_length": n_prompt, "label": y, "margin": p["margin"]})
    for k in comps.rankings:
        rows, n_prompt = enc(k["prompt"], k["responses"])
        units.append({"kind": "rank", "rows": rows, "prompt_length": n_prompt})
    return units, counts


def collate_units(units: list[dict], pad_id: int) -> PreferenceBatch:
    """One batch: chosen rows of all pairs, then their rejected rows, then ranking rows."""
    return collate_preferences(units, pad_id)
