"""What the HTML forms send, read into the service's terms: an answer in display positions,
the optional strength and comment; and the notice a bulk review shows."""

from __future__ import annotations

from rlhfkit.feedback.models import Task
from rlhfkit.feedback.service.errors import InvalidAnswer


def form_answer(task: Task, form, k: int) -> dict:
    """Build a display-position answer from a submitted HTML form."""
    qt = task.question_type
    if qt == "pairwise":
        return {"choice": form.get("choice")}
    if qt == "ranking":
        try:
            return {"ranking": [int(x) for x in str(form.get("ranking", "")).split(",") if x != ""]}
        except ValueError:
            raise InvalidAnswer("ranking", "must be comma-separated positions") from None
    if qt == "rating":
        out = []
        for pos in range(k):
            r = {}
            for dim in task.rubric:
                v = form.get(f"r{pos}_{dim}")
                if v is None or not str(v).isdigit():
                    raise InvalidAnswer(f"ratings[{pos}].{dim}", "choose a score")
                r[dim] = int(v)
            out.append(r)
        return {"ratings": out}
    if qt == "thumbs":
        vals = [form.get(f"t{pos}") for pos in range(k)]
        if any(v not in ("up", "down") for v in vals):
            raise InvalidAnswer("thumbs", "choose thumbs up or down for every response")
        return {"thumbs": [v == "up" for v in vals]}
    if qt == "critique":
        return {"text": form.get("text")}
    pos = str(form.get("position", "0"))
    return {"position": int(pos) if pos.isdigit() else -1, "text": form.get("text")}


def form_extras(form) -> dict:
    """The optional strength and comment of a submitted form (empty fields are none)."""
    strength, comment = form.get("strength") or None, form.get("comment") or None
    return {"strength": None if strength is None else str(strength)[:16],
            "comment": None if comment is None else str(comment)}


def review_notice(counts: dict[str, int] | None) -> str:
    """What a bulk accept did, in words (None: nothing was selected)."""
    if counts is None:
        return "Select labels to accept first."
    return f"Accepted {counts['accepted']} label(s)" + (f"; left {counts['own']} of your own" if counts["own"] else "") \
        + (f"; {counts['not_pending']} already decided" if counts["not_pending"] else "") + "."
