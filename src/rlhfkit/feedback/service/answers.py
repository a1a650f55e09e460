"""Answers: checked against the question and the item, and mapped from what the annotator saw
to what is stored.

Annotators answer in *display* terms (what they saw: left/right, positions on screen); labels
are stored in the *canonical* form, indices into the item's original `responses` list, plus
the display order, so that position bias can be measured later:

=========  ============================================  =========================================
type       submitted (display positions)                  stored (original indices)
=========  ============================================  =========================================
pairwise   {"choice": "left"|"right"|"tie"|"both_bad"}    {"choice": "a"|"b"|"tie"|"both_bad"}
ranking    {"ranking": [pos, ...]} best first             {"ranking": [idx, ...]}
rating     {"ratings": [{dim: 1..P}, ...]} per position   {"ratings": [{dim: score}, ...]} per idx
thumbs     {"thumbs": [true|false, ...]} per position     {"thumbs": [bool, ...]} per idx
critique   {"text": "..."}                                {"text": "..."}
edit       {"position": pos, "text": "..."}               {"response": idx, "text": "..."}
=========  ============================================  =========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from rlhfkit.feedback.models import STRENGTHS, Task
from rlhfkit.feedback.schemas import ANSWER, first_error, is_blank, text_problem
from rlhfkit.feedback.service.errors import InvalidAnswer

PAIR_CHOICES = {"left": 0, "right": 1}


def canonical_answer(task: Task, responses: Sequence[str], raw: Any, order: Sequence[int]) -> dict:
    """Validate an answer given in display positions and map it to original indices.

    The shape and JSON types are checked by the typed models in `schemas` (a discriminated
    union on the task's question type); what depends on the item (how many responses, the
    rubric, the Likert scale) is checked here.
    """
    if not isinstance(raw, dict):
        raise InvalidAnswer("value", "must be a JSON object")
    k, qt = len(responses), task.question_type
    try:
        ans = ANSWER.validate_python({**raw, "question_type": qt})
    except ValidationError as e:
        raise InvalidAnswer(*first_error(e, "value", skip=1)) from None
    if qt == "pairwise":
        if ans.choice in PAIR_CHOICES:
            return {"choice": "ab"[order[PAIR_CHOICES[ans.choice]]]}
        return {"choice": ans.choice}
    if qt == "ranking":
        if sorted(ans.ranking) != list(range(k)):
            raise InvalidAnswer("value.ranking", f"must list every position 0..{k - 1} once, best first")
        return {"ranking": [order[p] for p in ans.ranking]}
    if qt == "rating":
        return {"ratings": _ratings(task, ans.ratings, k, order)}
    if qt == "thumbs":
        if len(ans.thumbs) != k:
            raise InvalidAnswer("value.thumbs", f"must be {k} booleans (true = thumbs up)")
        out_t = [False] * k
        for pos, t in enumerate(ans.thumbs):
            out_t[order[pos]] = t
        return {"thumbs": out_t}
    if qt == "critique":
        return {"text": ans.text}
    if ans.position >= k:
        raise InvalidAnswer("value.position", f"must be a position 0..{k - 1}")
    return {"response": order[ans.position], "text": ans.text}


def _ratings(task: Task, ratings: list[dict], k: int, order: Sequence[int]) -> list[dict]:
    if len(ratings) != k:
        raise InvalidAnswer("value.ratings", f"must hold one rating object per response ({k})")
    out: list[dict] = [{}] * k
    for pos, r in enumerate(ratings):
        if set(r) != set(task.rubric):
            raise InvalidAnswer(f"value.ratings[{pos}]", f"must rate exactly {task.rubric}")
        for dim, v in r.items():
            if not 1 <= v <= task.likert_points:
                raise InvalidAnswer(f"value.ratings[{pos}].{dim}", f"must be an integer 1..{task.likert_points}")
        out[order[pos]] = dict(r)
    return out


def label_extras(task: Task, value: dict, strength: str | None = None, comment: str | None = None) -> dict:
    """The strength and comment stored with a label, checked: a strength belongs to a pairwise
    answer that prefers one response; a comment of only invisible characters is no comment."""
    if strength is not None:
        if strength not in STRENGTHS:
            raise InvalidAnswer("strength", f"must be one of {sorted(STRENGTHS)}")
        if task.question_type != "pairwise" or value.get("choice") not in ("a", "b"):
            raise InvalidAnswer("strength", "only a pairwise answer that prefers one response has a strength")
    if comment is not None:
        if not isinstance(comment, str) or len(comment) > 2000 or text_problem(comment):
            raise InvalidAnswer("comment", text_problem(comment) if isinstance(comment, str) and text_problem(comment)
                                else "at most 2000 characters of text")
        comment = None if is_blank(comment) else comment
    return {"strength": strength, "comment": comment}
