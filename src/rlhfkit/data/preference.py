"""THE preference path, for reward models, DPO and its relatives and `rlhfkit eval-rm` alike:
records -> checked records -> :class:`Comparison` (text) -> :class:`EncodedComparison` (token
ids) -> one batch.

1. Records are checked only by :mod:`rlhfkit.data.schemas` (``validate_comparisons``): TRL's
   ``prompt``/``chosen``/``rejected`` pairs (text or conversations, implicit prompts split off;
   optional ``label``, ``tie``, ``margin``, ``annotator_id``) and ``prompt``/``responses``/
   ``ranking`` K-way rankings (possibly partial), mixed in one file if need be. The rules for
   labels, ties and partial rankings are in that module's docstring. For KTO, unpaired
   ``prompt``/``completion``/``label`` records take the same road from step 3 on.
2. Each record becomes a typed :class:`Comparison`: the prompt text and the response texts
   (chosen first / best first) after the chat template, with one prompt rendering shared by
   every response. :func:`strict_pairs` orients pairs for losses that take strict preferences.
3. :func:`encode_comparisons` is the one encoding loop: the prompt is encoded once per record
   and every response after it, by the rule of :mod:`rlhfkit.data.collate` (BOS first, a
   response ends with EOS, the prompt keeps its end and a response its start).
4. A batch (:class:`ResponseBatch`) lays rows out with prompts LEFT-padded to a common width P
   and responses RIGHT-padded after it, so every response starts at column P and one forward
   scores all of them; :func:`collate_comparisons` adds the pair/ranking layout
   (:class:`PreferenceBatch`) the reward recipe uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import combinations
from typing import Any

import torch

from rlhfkit.data.chat import to_prompt_completion, to_ranking_texts, to_text_pair
from rlhfkit.data.collate import encode_prompt, encode_prompt_completion
from rlhfkit.data.readers import Records, line_of, load_records, source_of
from rlhfkit.data.schemas import (
    detect_dataset_format,
    detect_format,
    validate_comparisons,
    validate_unpaired,
)
from rlhfkit.errors import DataError

# ---------------------------------------------------------------------------------------------
# records -> comparisons (text)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One labelled comparison of responses to one prompt, as text after the chat template.

    A pair has ``responses = (chosen, rejected)`` and ``label`` = P(chosen preferred) (0.5 a
    tie); a ranking (``ranked``) has K >= 2 responses best first and label 1. ``line`` is the
    record's line in its source, for messages.
    """

    prompt: str
    responses: tuple[str, ...]
    ranked: bool = False
    label: float = 1.0
    margin: float | None = None
    annotator: str | None = None
    line: int | None = None

    def pairs(self) -> list[Comparison]:
        """This comparison as pairs: a ranking gives its C(K, 2) pairs in ranking order (position
        i beats position j for i < j; InstructGPT, Ouyang et al. 2022, sec. 3.5), a pair itself."""
        if not self.ranked:
            return [self]
        return [dataclasses.replace(self, responses=(a, b), ranked=False, label=1.0)
                for a, b in combinations(self.responses, 2)]


def strict_pairs(comps: Iterable[Comparison]) -> tuple[list[Comparison], int]:
    """Comparisons for a loss that takes strict preferences (Bradley-Terry, DPO): a pair labelled
    below 0.5 is swapped (rejected won), a tie (0.5) is left out. Returns (kept, ties left out)."""
    kept, ties = [], 0
    for c in comps:
        if c.ranked or c.label > 0.5:
            kept.append(c)
        elif c.label == 0.5:
            ties += 1
        else:
            kept.append(dataclasses.replace(c, responses=c.responses[::-1], label=1.0 - c.label))
    return kept, ties


def _label(record: dict) -> float:
    return 0.5 if record.get("tie") is True else float(record.get("label", 1.0))


def _located(error: DataError, source: str, line: int) -> DataError:
    """`error` (raised without a location, e.g. by a chat template) with the record's source and line."""
    message = str(error)
    if error.field and message.startswith(f"field '{error.field}': "):
        message = message[len(f"field '{error.field}': "):]
    return DataError(message, source=source, line=line, field=error.field)


def _comparison(record: dict, tokenizer: Any, line: int) -> Comparison:
    if record.get("ranking") is not None:
        prompt, texts = to_ranking_texts(record, tokenizer)
        return Comparison(prompt, tuple(texts), ranked=True, line=line)
    margin, annotator = record.get("margin"), record.get("annotator_id", record.get("annotator"))
    prompt, chosen, rejected = to_text_pair(record, tokenizer)
    return Comparison(prompt, (chosen, rejected), label=_label(record), margin=None if margin is None else float(margin),
                      annotator=None if annotator is None else str(annotator), line=line)


def read_comparisons(records: Sequence[dict], tokenizer: Any = None, source: str | None = None,
                     on_bad: str = "error", log: Callable[[str], Any] | None = print) -> Records:
    """Check records (schemas) and turn them into :class:`Comparison` s, in record order.

    `on_bad`: "error" stops at the first bad record (DataError naming source, line and field);
    "skip" drops bad records, counts them by reason in the returned list's ``.report`` and
    prints its summary line through `log`.
    """
    src = source_of(records, source)
    checked = validate_comparisons(records, src, on_error={"error": "raise"}.get(on_bad, on_bad), log=log)
    out = Records(source=src, lines=checked.lines)
    out.report = checked.report
    for i, record in enumerate(checked):
        try:
            out.append(_comparison(record, tokenizer, checked.line_of(i)))
        except DataError as e:
            raise _located(e, src, checked.line_of(i)) from None
    return out


# ---------------------------------------------------------------------------------------------
# comparisons -> token ids: the one encoding loop


@dataclasses.dataclass(frozen=True)
class EncodedComparison:
    """A :class:`Comparison` as token ids: the prompt once (BOS first), each response after it."""

    prompt: list[int]
    responses: tuple[list[int], ...]
    ranked: bool = False
    label: float = 1.0
    margin: float | None = None

    @property
    def sequences(self) -> list[list[int]]:
        """Each response's full row, prompt + response."""
        return [self.prompt + r for r in self.responses]


@dataclasses.dataclass
class EncodeCounts:
    """What encoding did: examples cut to max_length (any response, or the prompt), responses
    cut, prompts cut, and comparisons dropped because their responses became identical."""

    truncated: int = 0
    truncated_rows: int = 0
    prompt_truncated: int = 0
    identical: int = 0


def encode_texts(items: Iterable[tuple[str, Sequence[str]]], tokenizer: Any, max_length: int,
                 max_prompt_length: int | None, counts: EncodeCounts) -> Iterator[tuple[list[int], list[list[int]]] | None]:
    """THE encoding loop: (prompt, responses) -> (prompt ids, [response ids]) with the prompt
    encoded once and shared, counting truncation in `counts`. Yields None for an item whose
    responses are identical after truncation: it carries no preference (dropped and counted)."""
    for prompt, responses in items:
        shared = encode_prompt(tokenizer, prompt or "", max_length, max_prompt_length or None)
        encoded = [encode_prompt_completion(tokenizer, prompt or "", r, max_length, prompt_ids=shared) for r in responses]
        cut = [e.truncated for e in encoded]
        counts.truncated += any(cut)
        counts.truncated_rows += sum(cut)
        counts.prompt_truncated += bool(shared[1])
        rows = [e.input_ids[e.prompt_length:] for e in encoded]
        if len({tuple(r) for r in rows}) < len(rows):
            counts.identical += 1
            yield None
        else:
            yield list(shared[0]), rows


def encode_comparisons(comps: Sequence[Comparison], tokenizer: Any, max_length: int,
                       max_prompt_length: int | None = None) -> tuple[list[EncodedComparison], EncodeCounts]:
    """Token ids of each comparison (:func:`encode_texts`), in order; returns (encoded, counts)."""
    counts = EncodeCounts()
    encoded = encode_texts(((c.prompt, c.responses) for c in comps), tokenizer, max_length, max_prompt_length, counts)
    out = [EncodedComparison(e[0], tuple(e[1]), c.ranked, c.label, c.margin)
           for c, e in zip(comps, encoded) if e is not None]
    return out, counts


# ---------------------------------------------------------------------------------------------
# DPO and KTO: encoded pairs, or unpaired examples


@dataclasses.dataclass
class PreferenceData:
    """Tokenised data for DPO-style losses. Pairs: rows[i] = (prompt, chosen, rejected);
    unpaired: (prompt, completion) with `labels[i]` True for desirable. `kl_index` (unpaired,
    filled on first use) pairs each prompt with another prompt's completion for KTO's KL term."""

    rows: list[tuple[list[int], ...]]
    labels: list[bool] | None = None
    truncated: int = 0
    prompt_truncated: int = 0
    skipped: int = 0
    from_rankings: int = 0
    ties: int = 0
    kl_index: list[int] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def paired(self) -> bool:
        return self.labels is None

    def fingerprint(self) -> str:
        """sha256 over the token ids (which already reflect the tokenizer, templates and truncation)."""
        blob = json.dumps({"rows": self.rows, "labels": self.labels}, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def preference_texts(records: Sequence[dict], unpaired: bool, tokenizer: Any, loss_name: str = "",
                     log: Callable[[str], None] = print) -> tuple[list[tuple], list[bool] | None, int, int]:
    """Records -> text tuples for DPO-style losses; returns (texts, labels, pairs from rankings, ties left out).

    Comparisons are read as every recipe reads them (:func:`read_comparisons`), rankings expanded
    to their pairs, pairs oriented and ties left out (:func:`strict_pairs`). With `unpaired` (a
    KTO-style loss) a pair becomes a desirable and an undesirable example (Ethayarajh et al.
    2024, sec. 4); without it unpaired records are an error.
    """
    source = source_of(records)
    if not records:
        raise DataError("no records", source=source)
    if detect_format(records[0], source, line_of(records, 0)) == "unpaired":
        detect_dataset_format(records, source)  # one layout: names the first record that differs
        if not unpaired:
            raise DataError(f"loss '{loss_name}' needs paired data (prompt/chosen/rejected) but got unpaired "
                            f"prompt/completion/label records; use --loss kto", source=source, field="label")
        records = validate_unpaired(records, source)
        return [to_prompt_completion(r, tokenizer) for r in records], [r["label"] for r in records], 0, 0
    comps = read_comparisons(records, tokenizer, source)
    rankings = sum(c.ranked for c in comps)
    pairs, ties = strict_pairs(p for c in comps for p in c.pairs())
    from_rankings = sum(len(c.responses) * (len(c.responses) - 1) // 2 for c in comps if c.ranked)
    if rankings:
        log(f"expanded {rankings} rankings into {from_rankings} pairs")
    if ties:
        log(f"left out {ties} pairs labelled as ties (label 0.5): this loss learns strict preferences only")
    texts = [(c.prompt, *c.responses) for c in pairs]
    if unpaired:
        n = len(texts)
        return [(p, c) for p, c, _ in texts] + [(p, r) for p, _, r in texts], [True] * n + [False] * n, from_rankings, ties
    return texts, None, from_rankings, ties


def encode_preferences(texts: list[tuple], labels: list[bool] | None, tokenizer: Any, max_length: int,
                       max_prompt_length: int | None = None) -> PreferenceData:
    """Token rows of (prompt, response, ...) text tuples through :func:`encode_texts`; a pair
    identical after truncation is skipped (counted)."""
    counts = EncodeCounts()
    out = PreferenceData(rows=[], labels=[] if labels is not None else None)
    for i, enc in enumerate(encode_texts(((p, rs) for p, *rs in texts), tokenizer, max_length, max_prompt_length,
                                         counts)):
        if enc is None:
            continue
        out.rows.append((enc[0], *enc[1]))
        if labels is not None:
            out.labels.append(labels[i])
    out.truncated, out.prompt_truncated, out.skipped = counts.truncated, counts.prompt_truncated, counts.identical
    return out


def load_preferences(source: Any, split: str, unpaired: bool, tokenizer: Any, max_length: int, limit: int | None = None,
                     loss_name: str = "", log: Callable[[str], None] = print,
                     max_prompt_length: int | None = None) -> PreferenceData:
    """Read, check, template and encode preference data for DPO-style losses, reporting
    truncation and skips."""
    records = load_records(source, split=split)
    name = records.source or "data"
    if limit is not None and len(records) > limit:
        log(f"using the first {limit} of {len(records)} records of {name} [{split}]")
        records = records[:limit]
    texts, labels, from_rankings, ties = preference_texts(records, unpaired, tokenizer, loss_name, log)
    data = encode_preferences(texts, labels, tokenizer, max_length, max_prompt_length)
    data.from_rankings, data.ties = from_rankings, ties
    if data.truncated:
        log(f"{data.truncated} of {len(texts)} examples from {name} [{split}] were longer than max_length={max_length} "
            f"and were truncated ({data.prompt_truncated} prompts cut from the left; responses keep their start)")
    if data.skipped:
        log(f"skipped {data.skipped} pairs from {name} [{split}] whose chosen and rejected responses were "
            f"identical after truncation")
    if not data.rows:
        raise DataError("no usable examples left", source=name)
    return data


def kto_mismatched_index(prompt_keys: Sequence[Any]) -> list[int]:
    """For each row i, the row j whose completion pairs with prompt i in KTO's KL estimate.

    j is the first row after i (cyclically) with a different prompt, so rows that share a
    prompt (several completions of one prompt, rankings expanded to pairs) never give a
    "mismatched" pair that is in fact matched. Raises ValueError when every row has the
    same prompt (no mismatched pair exists).
    """
    n = len(prompt_keys)
    out = []
    for i in range(n):
        j = next(((i + k) % n for k in range(1, n) if prompt_keys[(i + k) % n] != prompt_keys[i]), None)
        if j is None:
            raise ValueError("KTO's KL estimate needs completions of at least two different prompts in a batch")
        out.append(j)
    return out


def example_rows(data: PreferenceData, index: list[int], kl: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) rows of the examples `index`. Pairs: all chosen rows, then all rejected
    rows (one forward). Unpaired with `kl`: the mismatched rows for KTO's KL estimate, prompt of
    i with the completion of row :func:`kto_mismatched_index` gives, so completions of a shared
    prompt never pair up; a fixed pairing keeps reference log-probs cacheable."""
    if data.paired:
        return [(data.rows[i][0], data.rows[i][1]) for i in index] + [(data.rows[i][0], data.rows[i][2]) for i in index]
    if kl:
        if data.kl_index is None:
            try:
                data.kl_index = kto_mismatched_index([tuple(r[0]) for r in data.rows])
            except ValueError as e:
                raise DataError(f"{e}; every example has the same prompt, so pass --kto_kl false") from None
        return [(data.rows[i][0], data.rows[data.kl_index[i]][1]) for i in index]
    return [(data.rows[i][0], data.rows[i][1]) for i in index]


# ---------------------------------------------------------------------------------------------
# batches


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
    """Comparisons laid out for ONE forward.

    `rows` holds the chosen rows of the B pairs, then their B rejected rows, then the K rows
    of each ranking (best first), as a :class:`ResponseBatch` (prompts left-padded, responses
    right-padded). `labels` (B,) is P(chosen preferred), `margins` (B,) or None, `rank_index`
    (Br, K) gathers each ranking's rows (valid where `rank_mask`), `order` maps the batch's
    comparisons back to the input order (pairs first, then rankings).
    """

    rows: ResponseBatch
    num_pairs: int
    labels: torch.Tensor
    margins: torch.Tensor | None
    rank_index: torch.Tensor
    rank_mask: torch.Tensor
    order: list[int]


def collate_comparisons(comps: Sequence[EncodedComparison], pad_id: int, device: Any = "cpu") -> PreferenceBatch:
    """Encoded comparisons -> :class:`PreferenceBatch`: chosen rows of all pairs, then their
    rejected rows, then ranking rows."""
    pairs = [c for c in comps if not c.ranked]
    ranks = [c for c in comps if c.ranked]
    rows = [(c.prompt, c.responses[0]) for c in pairs] + [(c.prompt, c.responses[1]) for c in pairs]
    k_max = max((len(c.responses) for c in ranks), default=0)
    rank_index = torch.zeros((len(ranks), k_max), dtype=torch.long)
    rank_mask = torch.zeros((len(ranks), k_max), dtype=torch.bool)
    for b, c in enumerate(ranks):
        start = len(rows)
        rows.extend((c.prompt, r) for r in c.responses)
        rank_index[b, :len(c.responses)] = torch.arange(start, start + len(c.responses))
        rank_mask[b, :len(c.responses)] = True
    margins = [c.margin for c in pairs]
    return PreferenceBatch(
        rows=collate_responses(rows, pad_id, device), num_pairs=len(pairs),
        labels=torch.tensor([float(c.label) for c in pairs], dtype=torch.float32, device=device),
        margins=None if not margins or any(m is None for m in margins) else torch.tensor(margins, device=device),
        rank_index=rank_index.to(device), rank_mask=rank_mask.to(device),
        order=[i for i, c in enumerate(comps) if not c.ranked] + [i for i, c in enumerate(comps) if c.ranked])
