"""Typed request models: what every write route and the import accept, checked by pydantic.

Three classes of input used to reach the database and fail there (a 500), or worse be stored
and fail later on every read:

* text that is not valid UTF-8 once decoded (JSON ``"\\ud800"`` decodes to a lone surrogate,
  which neither the SQLite driver nor a UTF-8 response can encode) or holds a NUL byte
  (PostgreSQL text cannot hold one);
* answer values of the wrong JSON type (a list where a choice is expected, floats in a
  ranking, booleans posing as integers);
* ids outside the database's integer range (SQLite and PostgreSQL ``integer`` columns).

So text fields are `Text` / `Name`, ids are `DbId`, and answers are parsed by a discriminated
union over the task's question type with strict types and no extra fields.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

INT_MAX = 2**31 - 1  # PostgreSQL `integer`; SQLite's INTEGER is wider, the narrower one wins
MAX_TEXT = 20000
MAX_RESPONSES = 16


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text (NUL byte, lone surrogate), or None."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds a lone surrogate)"
    return None


def name_problem(value: str) -> str | None:
    """Like `text_problem`, and names (users, tasks, tokens) also refuse control characters:
    they end up in headers, file names and log lines."""
    problem = text_problem(value)
    if problem is None and any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value):
        problem = "must not contain control or formatting characters"
    return problem


# invisible characters: a text made only of these says nothing a reader can see
_INVISIBLE = ("Cc", "Cf", "Zs", "Zl", "Zp")


def is_blank(value: str) -> bool:
    """True when `value` shows nothing: only whitespace, separators and format characters
    (zero-width space U+200B, word joiner, BOM, ...), which `str.strip` keeps."""
    return all(unicodedata.category(ch) in _INVISIBLE for ch in value)


def _clean_text(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _clean_name(value: str) -> str:
    problem = name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def json_text_problem(value: Any, depth: int = 0) -> str | None:
    """Check every string (keys too) in a decoded JSON value; None when all can be stored."""
    if depth > 32:
        return "is nested too deeply"
    if isinstance(value, str):
        return text_problem(value)
    if isinstance(value, dict):
        for k, v in value.items():
            problem = text_problem(str(k)) or json_text_problem(v, depth + 1)
            if problem:
                return problem
    elif isinstance(value, list):
        for v in value:
            problem = json_text_problem(v, depth + 1)
            if problem:
                return problem
    elif isinstance(value, float) and not math.isfinite(value):
        return "must not hold NaN or infinite numbers"
    return None


Text = Annotated[str, StringConstraints(max_length=MAX_TEXT), AfterValidator(_clean_text)]
NonBlank = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT, pattern=r"\S"),
                     AfterValidator(_clean_text)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"\S"), AfterValidator(_clean_name)]
ShortName = Annotated[str, StringConstraints(max_length=64), AfterValidator(_clean_name)]
Password = Annotated[str, StringConstraints(min_length=1, max_length=1024), AfterValidator(_clean_text)]
DbId = Annotated[int, Field(strict=True, ge=1, le=INT_MAX)]
Position = Annotated[int, Field(strict=True, ge=0, lt=MAX_RESPONSES)]
Score = Annotated[int, Field(strict=True, ge=1, le=11)]
IdempotencyKey = Annotated[str, StringConstraints(min_length=8, max_length=64, pattern=r"^[!-~]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# --------------------------------------------------------------------------------------------
# answers, one model per question type (display positions; see service/answers.py for the stored form)


class PairwiseAnswer(_Strict):
    question_type: Literal["pairwise"]
    choice: Literal["left", "right", "tie", "both_bad"]


class RankingAnswer(_Strict):
    question_type: Literal["ranking"]
    ranking: list[Position] = Field(max_length=MAX_RESPONSES)


class RatingAnswer(_Strict):
    question_type: Literal["rating"]
    ratings: list[dict[ShortName, Score]] = Field(max_length=MAX_RESPONSES)


class ThumbsAnswer(_Strict):
    question_type: Literal["thumbs"]
    thumbs: list[StrictBool] = Field(max_length=MAX_RESPONSES)


class CritiqueAnswer(_Strict):
    question_type: Literal["critique"]
    text: NonBlank


class EditAnswer(_Strict):
    question_type: Literal["edit"]
    position: Position = 0
    text: NonBlank


Answer = Annotated[PairwiseAnswer | RankingAnswer | RatingAnswer | ThumbsAnswer | CritiqueAnswer | EditAnswer,
                   Field(discriminator="question_type")]
ANSWER = TypeAdapter(Answer)


def first_error(e: ValidationError, prefix: str, skip: int = 0) -> tuple[str, str]:
    """(field path, message) of the first error, without echoing the submitted value."""
    err = e.errors(include_input=False, include_url=False)[0]
    loc = [str(p) for p in err["loc"][skip:]]
    field = prefix + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc)
    return field, err["msg"]


# --------------------------------------------------------------------------------------------
# request bodies


class LoginBody(_Strict):
    username: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    password: Password
    token_name: ShortName = "api"


Strength = Literal["slightly", "clearly", "much"]
Comment = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_clean_text)]


class LabelBody(_Strict):
    item_id: DbId
    value: dict[str, Any]
    idempotency_key: IdempotencyKey
    strength: Strength | None = None  # pairwise: how much better the chosen response is
    comment: Comment | None = None
    # accepted for old clients and ignored: the server measures time from serve to submit
    duration_ms: Annotated[int, Field(strict=True, ge=0, le=86_400_000)] | None = None


class UserBody(_Strict):
    username: Name
    password: Password
    role: Literal["annotator", "admin", "owner"] = "annotator"


Days = Annotated[float, Field(gt=0, le=3650, allow_inf_nan=False)]


class TokenBody(_Strict):
    name: ShortName = "api"
    expires_days: Days | None = 90


class RoleBody(_Strict):
    role: Literal["annotator", "admin", "owner"]


class PasswordBody(_Strict):
    old_password: Password
    new_password: Password


class MemberBody(_Strict):
    username: Name


class CorrectionBody(_Strict):
    value: dict[str, Any]
    strength: Strength | None = None
    comment: Comment | None = None


class SkipBody(_Strict):
    item_id: DbId


class ReviewBody(_Strict):
    decision: Literal["accepted", "rejected"]
    reason: Annotated[str, StringConstraints(max_length=2000), AfterValidator(_clean_text)] = ""


class TaskBody(_Strict):
    name: Name
    question_type: Literal["pairwise", "ranking", "rating", "thumbs", "critique", "edit"]
    overlap: Annotated[int, Field(strict=True, ge=1, le=100)] = 1
    instructions: Text = ""
    rubric: list[ShortName] | None = Field(default=None, max_length=16)
    likert_points: Annotated[int, Field(strict=True, ge=2, le=11)] = 5
    randomize_order: StrictBool = True
    selection: Literal["random", "uncertainty"] = "random"
    gold_rate: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.1
    open_to_all: StrictBool = True
