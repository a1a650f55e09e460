"""Record layouts (TRL's column names), format detection and validators.

Layouts (one record = one dict):

- ``text``               {"text": str}
- ``prompt_completion``  {"prompt": str | conv, "completion": str | conv}
- ``messages``           {"messages": conv}   (the last message is the assistant turn to learn)
- ``preference``         {"prompt"?: str | conv, "chosen": str | conv, "rejected": str | conv,
                          "label"?: float, "tie"?: bool, "margin"?: float, "annotator_id"?: any}
                         without "prompt", the shared beginning of chosen and rejected is the
                         prompt (TRL's implicit-prompt form)
- ``ranking``            {"prompt": str | conv, "responses": [str | conv, ...], "ranking": [int, ...]}
                         ranking lists indices into responses, best first
- ``unpaired``           {"prompt": str | conv, "completion": str | conv, "label": bool}  (KTO)
- ``prompt_only``        {"prompt": str | conv}   (prompts for PPO/GRPO/RLOO rollouts)

Alpaca and ShareGPT records are converted to ``prompt_completion`` and ``messages`` when read
(:mod:`rlhfkit.data.readers`).

where conv is a conversation: a list of {"role": "system"|"user"|"assistant"|"tool", "content": str}.

Comparisons (the preference and ranking layouts; one file may mix them) follow one rule for
every recipe that reads them (reward models, DPO and its relatives, `rlhfkit eval-rm`):

- a pair's ``label`` is P(chosen preferred): 1 (the default) chosen won, 0 rejected won, 0.5 a
  tie; ``tie: true`` is the same as ``label: 0.5``. Losses that take strict preferences
  (Bradley-Terry, DPO) read a label below 0.5 as "rejected won" (the pair is swapped) and
  skip and count ties; the tie-aware reward losses learn from every label.
- a ranking may be **partial**: ``ranking`` lists at least 2 distinct indices, best first, and
  responses it leaves out take part in no comparison (they are neither better nor worse than
  the ranked ones). A ranking has no ties: a repeated index is an error; write tied responses
  as a pair with ``tie: true``. The ranked responses must differ; a ranking gives its C(K, 2)
  pairs (InstructGPT, Ouyang et al. 2022, sec. 3.5).

Validators take the records (and optionally the source name for messages) and
``on_error="raise"`` (stop at the first bad record with a DataError naming file, line and
field) or ``"skip"`` (drop bad records, print one summary line, and attach a
``ValidationReport`` to the returned list as ``.report``).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.data.readers import Records, line_of, source_of
from rlhfkit.errors import ConfigError, DataError

FORMATS = ("text", "prompt_completion", "messages", "preference", "ranking", "unpaired", "prompt_only")
ROLES = frozenset({"system", "user", "assistant", "tool"})


def _fail(reason: str, source: str | None, line: int | None, field: str | None, detail: str = "") -> DataError:
    err = DataError(reason + (f": {detail}" if detail else ""), source=source, line=line, field=field)
    err.reason = reason  # short category used to count skips
    return err


# ---------------------------------------------------------------- conversations

def is_conversation(value: Any) -> bool:
    """A list of {role, content} dicts (the shape, not yet validated in depth)."""
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def check_conversation(conv: Any, source: str | None, line: int | None, name: str) -> None:
    if not isinstance(conv, list) or not conv:
        raise _fail("empty conversation", source, line, name, "expected a non-empty list of messages")
    for k, message in enumerate(conv):
        where = f"{name}[{k}]"
        if not isinstance(message, dict):
            raise _fail("malformed message", source, line, where, f"expected an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise _fail("unknown role", source, line, f"{where}.role",
                        f"got {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise _fail("malformed message", source, line, f"{where}.content",
                        f"content must be a string, got {type(message.get('content')).__name__}")


def _is_blank(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or not str(value[-1].get("content", "")).strip()
    return value is None


def check_text(value: Any, source: str | None, line: int | None, name: str, *,
               allow_empty: bool = False, response: bool = False) -> None:
    """`value` must be a string or a valid conversation; non-blank unless `allow_empty`.

    A conversation used as a response must end with an assistant message.
    """
    if value is None:
        raise _fail("missing column", source, line, name)
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise _fail("empty text", source, line, name)
        return
    if isinstance(value, list):
        check_conversation(value, source, line, name)
        if response and value[-1]["role"] != "assistant":
            raise _fail("response does not end with an assistant message", source, line,
                        f"{name}[{len(value) - 1}].role")
        if not allow_empty and _is_blank(value):
            raise _fail("empty text", source, line, f"{name}[{len(value) - 1}].content")
        return
    raise _fail("wrong type", source, line, name,
                f"expected a string or a list of {{role, content}} messages, got {type(value).__name__}")


# ---------------------------------------------------------------- detection

def detect_format(record: dict, source: str | None = None, line: int | None = None) -> str:
    """Which layout `record` follows: one of FORMATS (see the module docstring)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a dict record, got {type(record).__name__}", source=source, line=line)
    keys = {k for k, v in record.items() if v is not None}
    if "responses" in keys or "ranking" in keys:
        return "ranking"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "label" in keys and "completion" in keys:
        return "unpaired"
    if "messages" in keys:
        return "messages"
    if "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt_only"
    raise DataError(f"cannot tell the data format from columns {sorted(record) or '(none)'}; expected "
                    f"one of: {' | '.join(LAYOUT_COLUMNS.values())}, or Alpaca instruction+output or ShareGPT "
                    f"conversations (see docs/data.md)", source=source, line=line)


# the columns of each layout, as error messages name them
LAYOUT_COLUMNS = {"text": "text", "prompt_completion": "prompt+completion", "messages": "messages",
                  "preference": "prompt+chosen+rejected", "ranking": "prompt+responses+ranking",
                  "unpaired": "prompt+completion+label", "prompt_only": "prompt"}
SFT_FORMATS = ("text", "prompt_completion", "messages")


def require_layout(records: Sequence[dict], formats: Sequence[str], recipe: str, source: str | None = None) -> None:
    """Every record in one of `formats`; the first that is not raises DataError naming the file, the
    line, the columns it has and the columns `recipe` reads."""
    src = source_of(records, source)
    expected = " | ".join(LAYOUT_COLUMNS[f] for f in formats)
    for i, record in enumerate(records):
        line = line_of(records, i)
        if not isinstance(record, dict):
            raise DataError(f"expected an object, got {type(record).__name__}", source=src, line=line)
        try:
            fmt = detect_format(record, src, line)
        except DataError:
            fmt = None
        if fmt not in formats:
            found = f"a '{fmt}' record" if fmt else "its columns match no layout"
            raise DataError(f"{found} (columns: {', '.join(sorted(record)) or 'none'}); {recipe} takes {expected}, "
                            f"or Alpaca instruction+input+output or ShareGPT conversations (see docs/data.md)",
                            source=src, line=line)


def detect_dataset_format(records: Sequence[dict], source: str | None = None) -> str:
    """The layout shared by every record; the first record that differs raises DataError."""
    src = source_of(records, source)
    if not records:
        raise DataError("no records", source=src)
    first = detect_format(records[0], src, line_of(records, 0))
    for i, record in enumerate(records):
        fmt = detect_format(record, src, line_of(records, i))
        if fmt != first:
            raise DataError(f"record is in format '{fmt}' but the first record is '{first}'; one file "
                            f"must use one layout", source=src, line=line_of(records, i))
    return first


def is_conversational(record: dict) -> bool:
    """True if any text field of the record is a conversation."""
    for name in ("messages", "prompt", "completion", "chosen", "rejected"):
        if is_conversation(record.get(name)):
            return True
    responses = record.get("responses")
    return isinstance(responses, list) and any(is_conversation(r) for r in responses)


# ---------------------------------------------------------------- implicit prompts

def split_implicit_prompt(chosen: Any, rejected: Any, source: str | None = None,
                          line: int | None = None) -> tuple[Any, Any, Any]:
    """TRL's implicit-prompt form: the shared beginning of chosen and rejected is the prompt.

    Conversations split at the first message that differs, which must be an assistant
    message. Plain text splits before the last whitespace inside the shared prefix, so that
    both responses start on a word boundary (" word", as a byte-level BPE would tokenize it).
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        for name, conv in (("chosen", chosen), ("rejected", rejected)):
            if k >= len(conv):
                raise _fail("empty response after removing the shared prompt", source, line, name,
                            "one conversation is a prefix of the other")
            if conv[k].get("role") != "assistant":
                raise _fail("chosen and rejected differ before an assistant turn", source, line,
                            f"{name}[{k}].role", "the first differing message must be the assistant's")
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        cut = max((i for i in range(k) if chosen[i].isspace()), default=0)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise _fail("chosen and rejected mix text and conversation", source, line, "rejected")


def preference_parts(record: dict, source: str | None = None, line: int | None = None) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) with an implicit prompt split off when there is no prompt column."""
    if record.get("prompt") is not None:
        return record["prompt"], record["chosen"], record["rejected"]
    return split_implicit_prompt(record["chosen"], record["rejected"], source, line)


# ---------------------------------------------------------------- reports

@dataclass
class ValidationReport:
    """What a validator kept and skipped; `summary()` is the line callers print."""

    name: str
    source: str | None
    total: int = 0
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.total - self.kept

    def add(self, error: DataError) -> None:
        self.reasons[getattr(error, "reason", str(error))] += 1
        if len(self.examples) < 3:
            self.examples.append(str(error))

    def summary(self) -> str:
        where = f" from {self.source}" if self.source else ""
        text = f"{self.name}: kept {self.kept} of {self.total} records{where}"
        if self.skipped:
            why = ", ".join(f"{reason}: {n}" for reason, n in self.reasons.most_common())
            text += f"; skipped {self.skipped} ({why}); first: {self.examples[0]}"
        return text

    def __str__(self) -> str:
        return self.summary()


def _run(name: str, records: Sequence[dict], source: str | None, on_error: str,
         check: Callable[[dict, str | None, int], dict], log: Callable[[str], Any] | None) -> Records:
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    src = source_of(records, source)
    report = ValidationReport(name, src, total=len(records))
    kept, lines = [], []
    for i, record in enumerate(records):
        line = line_of(records, i)
        try:
            if not isinstance(record, dict):
                raise _fail("not an object", src, line, None)
            kept.append(check(record, src, line))
        except DataError as error:
            if on_error == "raise":
                raise
            report.add(error)
            continue
        lines.append(line)
    report.kept = len(kept)
    out = Records(kept, source=src, lines=lines)
    out.report = report
    if report.skipped and log is not None:
        log(report.summary())
    return out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------- validators

def _check_margin(record: dict, source: str | None, line: int) -> None:
    margin = record.get("margin")
    if margin is None:
        return
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise _fail("margin is not a finite number", source, line, "margin", f"got {margin!r}")


def _check_label(record: dict, source: str | None, line: int) -> None:
    tie = record.get("tie")
    if tie is not None and not isinstance(tie, bool):
        raise _fail("tie must be true or false", source, line, "tie", f"got {tie!r}")
    label = record.get("label")
    if label is None:
        return
    if isinstance(label, bool):
        return
    if not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:  # also refuses NaN
        raise _fail("label must be a number in [0, 1]", source, line, "label",
                    f"P(chosen preferred): 1 chosen won, 0 rejected won, 0.5 a tie; got {label!r}")
    if tie and label != 0.5:
        raise _fail("tie: true contradicts the label", source, line, "label", f"a tie has label 0.5, got {label!r}")


def _check_prompt(record: dict, source: str | None, line: int) -> None:
    if record.get("prompt") is None:
        raise _fail("missing column", source, line, "prompt")
    check_text(record["prompt"], source, line, "prompt", allow_empty=isinstance(record["prompt"], str))


def _sft_check(record: dict, source: str | None, line: int) -> dict:
    fmt = detect_format(record, source, line)
    if fmt == "text":
        check_text(record["text"], source, line, "text")
    elif fmt == "prompt_completion":
        _check_prompt(record, source, line)
        check_text(record["completion"], source, line, "completion", response=True)
    elif fmt == "messages":
        check_text(record["messages"], source, line, "messages", response=True)
    else:
        raise _fail("not an SFT record", source, line, None,
                    f"format '{fmt}'; SFT takes text, prompt+completion or messages")
    return record


def _preference_check(record: dict, source: str | None, line: int) -> dict:
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise _fail("missing column", source, line, name)
        check_text(record[name], source, line, name, response=True)
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _fail("chosen and rejected mix text and conversation", source, line, "rejected")
    if chosen == rejected:
        raise _fail("chosen identical to rejected", source, line, "rejected")
    if record.get("prompt") is not None:
        _check_prompt(record, source, line)
    else:
        split_implicit_prompt(chosen, rejected, source, line)
    _check_margin(record, source, line)
    _check_label(record, source, line)
    return record


def _ranking_check(record: dict, source: str | None, line: int) -> dict:
    _check_prompt(record, source, line)
    responses, ranking = record.get("responses"), record.get("ranking")
    if not isinstance(responses, list) or len(responses) < 2:
        raise _fail("need a list of at least 2 responses", source, line, "responses")
    for k, response in enumerate(responses):
        check_text(response, source, line, f"responses[{k}]", response=True)
    if not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise _fail("ranking must be a list of integer indices", source, line, "ranking", f"got {ranking!r}")
    k = len(responses)
    bad = [i for i in ranking if not 0 <= i < k]
    if bad:
        raise _fail("ranking index out of range", source, line, "ranking", f"{bad} not in 0..{k - 1}")
    dupes = sorted(i for i, n in Counter(ranking).items() if n > 1)
    if dupes:
        raise _fail("duplicate ranking index", source, line, "ranking",
                    f"{dupes} appear more than once; a ranking has no ties (write tied responses as a pair "
                    f"with tie: true)")
    if len(ranking) < 2:
        raise _fail("ranking must list at least 2 responses", source, line, "ranking",
                    f"got {ranking!r}; best first (unlisted responses take part in no comparison)")
    if len({isinstance(responses[i], str) for i in ranking}) > 1:  # one rendering rule for the whole ranking
        raise _fail("ranked responses mix text and conversation", source, line, "responses")
    seen: dict[str, int] = {}
    for idx in ranking:  # unranked responses are compared with nothing, so only ranked ones must differ
        key = repr(responses[idx])
        if key in seen:
            raise _fail("identical responses", source, line, f"responses[{idx}]",
                        f"same as responses[{seen[key]}]")
        seen[key] = idx
    _check_margin(record, source, line)
    return record


def _unpaired_check(record: dict, source: str | None, line: int) -> dict:
    _check_prompt(record, source, line)
    if record.get("completion") is None:
        raise _fail("missing column", source, line, "completion")
    check_text(record["completion"], source, line, "completion", response=True)
    label = record.get("label")
    if label is None:
        raise _fail("missing column", source, line, "label")
    if isinstance(label, bool):
        return record
    if isinstance(label, int) and label in (0, 1):  # 0/1 from parquet or pandas: normalise
        return {**record, "label": bool(label)}
    raise _fail("label must be true or false", source, line, "label", f"got {label!r}")


def validate_sft(records: Sequence[dict], source: str | None = None, on_error: str = "raise",
                 log: Callable[[str], Any] | None = _stderr) -> Records:
    """Records for SFT: text, prompt+completion or messages (ending with an assistant turn), non-empty."""
    return _run("validate_sft", records, source, on_error, _sft_check, log)


def validate_preferences(records: Sequence[dict], source: str | None = None, on_error: str = "raise",
                         log: Callable[[str], Any] | None = _stderr) -> Records:
    """Pairwise preferences: chosen and rejected present, non-empty, of one kind, not identical.

    An optional prompt (text or conversation), `margin` (finite number, used by margin
    reward losses) and `annotator_id` (any value) are kept as they are.
    """
    return _run("validate_preferences", records, source, on_error, _preference_check, log)


def validate_rankings(records: Sequence[dict], source: str | None = None, on_error: str = "raise",
                      log: Callable[[str], Any] | None = _stderr) -> Records:
    """K-way rankings: valid responses; ranking >= 2 distinct indices, best first, naming distinct
    responses (a partial ranking leaves the others out: module docstring)."""
    return _run("validate_rankings", records, source, on_error, _ranking_check, log)


COMPARISON_FORMATS = ("preference", "ranking")


def _comparison_check(record: dict, source: str | None, line: int) -> dict:
    fmt = detect_format(record, source, line)
    if fmt == "preference":
        return _preference_check(record, source, line)
    if fmt == "ranking":
        return _ranking_check(record, source, line)
    raise _fail("not a comparison record", source, line, None,
                f"a '{fmt}' record (columns: {', '.join(sorted(record))}); preference data takes "
                f"{LAYOUT_COLUMNS['preference']} | {LAYOUT_COLUMNS['ranking']}")


def validate_comparisons(records: Sequence[dict], source: str | None = None, on_error: str = "raise",
                         log: Callable[[str], Any] | None = _stderr) -> Records:
    """Pairs and rankings, mixed in one file as the reward and DPO recipes both read them; each
    record checked by :func:`validate_preferences`' or :func:`validate_rankings`' rules."""
    return _run("validate_comparisons", records, source, on_error, _comparison_check, log)


def validate_unpaired(records: Sequence[dict], source: str | None = None, on_error: str = "raise",
                      log: Callable[[str], Any] | None = _stderr) -> Records:
    """KTO records: prompt, non-empty completion, boolean label (0/1 integers become booleans)."""
    return _run("validate_unpaired", records, source, on_error, _unpaired_check, log)


def _prompt_only_check(record: dict, source: str | None, line: int) -> dict:
    _check_prompt(record, source, line)
    return record


def validate_prompts(records: Sequence[dict], source: str | None = None, on_error: str = "raise",
                     log: Callable[[str], Any] | None = _stderr) -> Records:
    """Records that carry a usable `prompt` (any layout with one)."""
    return _run("validate_prompts", records, source, on_error, _prompt_only_check, log)


VALIDATORS: dict[str, Callable[..., Records]] = {
    "text": validate_sft,
    "prompt_completion": validate_sft,
    "messages": validate_sft,
    "preference": validate_preferences,
    "ranking": validate_rankings,
    "unpaired": validate_unpaired,
    "prompt_only": validate_prompts,
}


def validate_records(records: Sequence[dict], fmt: str | None = None, source: str | None = None,
                     on_error: str = "raise", log: Callable[[str], Any] | None = _stderr) -> Records:
    """Validate with the validator of `fmt` (detected from the records when None)."""
    fmt = fmt or detect_dataset_format(records, source)
    if fmt not in VALIDATORS:
        raise ConfigError(f"unknown data format {fmt!r}; expected one of {list(VALIDATORS)}")
    return VALIDATORS[fmt](records, source=source, on_error=on_error, log=log)
