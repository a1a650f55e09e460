"""Review: accepting and rejecting labels, the review queue (which labels a reviewer sees,
with filters and pages; how each answer is shown next to the responses it is about) and bulk
decisions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhfkit.feedback.models import REVIEW_STATES, Item, Label, Task, User, utcnow
from rlhfkit.feedback.schemas import is_blank
from rlhfkit.feedback.service.accounts import find_user
from rlhfkit.feedback.service.audit import audit
from rlhfkit.feedback.service.errors import Conflict, Forbidden, InvalidAnswer

PER_PAGE = 20
STRENGTH_WORDS = {"slightly": "slightly better", "clearly": "clearly better", "much": "much better"}


def review_label(s: Session, label: Label, reviewer: User, decision: str, reason: str = "") -> Label:
    """Accept or reject a label; a rejection needs a reason the annotator can read."""
    if decision not in ("accepted", "rejected"):
        raise InvalidAnswer("decision", "must be 'accepted' or 'rejected'")
    if label.user_id == reviewer.id:  # a second pair of eyes, or the review means nothing
        raise Forbidden("you cannot review your own label; another admin must review it")
    if decision == "rejected" and is_blank(reason):
        raise InvalidAnswer("reason", "say why the label is rejected (visible text, not only spaces or "
                                      "invisible characters)")
    reason = "" if is_blank(reason) else reason
    label.review_status, label.reviewed_by, label.reviewed_at = decision, reviewer.id, utcnow()
    label.review_reason = reason or None
    audit(s, reviewer, f"label.{decision[:-2]}", str(label.id), reason=reason)
    s.flush()
    return label


def labels_with_annotators(s: Session, task_id: int, status: str | None = None) -> list[tuple[Label, str]]:
    """The task's labels (only those in review `status`, when given), each with its annotator's name."""
    q = select(Label, User.username).join(User, User.id == Label.user_id).where(Label.task_id == task_id)
    if status is not None:
        q = q.where(Label.review_status == status)
    return list(s.execute(q.order_by(Label.id)).tuples())


@dataclass
class ResponseView:
    text: str
    mark: str = ""  # what the answer says of this response ("chosen · much better", "rank 2", ...)
    chosen: bool = False


@dataclass
class LabelView:
    label: Label
    annotator: str
    prompt: str
    responses: list[ResponseView]
    summary: str  # the answer in words
    own: bool = False  # the reviewer's own label: not theirs to decide
    text: str | None = None  # a critique or a rewritten response
    extra: dict = field(default_factory=dict)


def _summary_and_marks(task: Task, item: Item, v: dict) -> tuple[str, list[ResponseView], str | None]:
    rs = [ResponseView(r) for r in item.responses]
    qt = task.question_type
    if qt == "pairwise":
        choice = v.get("choice")
        if choice in ("a", "b"):
            win = "ab".index(choice)
            rs[win].chosen, rs[win].mark = True, "preferred"
            return f"{'AB'[win]} is better", rs, None
        for r in rs:
            r.mark = "tie" if choice == "tie" else "bad"
        return ("tie" if choice == "tie" else "both bad"), rs, None
    if qt == "ranking":
        for place, idx in enumerate(v.get("ranking", [])):
            rs[idx].mark, rs[idx].chosen = f"rank {place + 1}", place == 0
        return "ranking, best first: " + " > ".join(chr(65 + i) for i in v.get("ranking", [])), rs, None
    if qt == "rating":
        for r, scores in zip(rs, v.get("ratings", []), strict=False):
            r.mark = ", ".join(f"{k} {s}" for k, s in scores.items())
        return "ratings", rs, None
    if qt == "thumbs":
        for r, up in zip(rs, v.get("thumbs", []), strict=False):
            r.mark, r.chosen = ("thumbs up" if up else "thumbs down"), bool(up)
        return "thumbs", rs, None
    if qt == "edit":
        idx = v.get("response", 0)
        rs[idx].mark = "rewritten"
        return f"rewrote {chr(65 + idx)}", rs, v.get("text")
    return "critique", rs, v.get("text")


def label_view(task: Task, item: Item, label: Label, annotator: str, reviewer: User) -> LabelView:
    summary, responses, text = _summary_and_marks(task, item, label.value)
    if label.strength and task.question_type == "pairwise":
        summary = f"{summary[0]} is {STRENGTH_WORDS[label.strength]}"
        for r in responses:
            if r.chosen:
                r.mark = f"preferred · {STRENGTH_WORDS[label.strength]}"
    return LabelView(label, annotator, item.prompt, responses, summary, own=label.user_id == reviewer.id, text=text)


@dataclass
class Queue:
    rows: list[LabelView]
    total: int
    page: int
    pages: int
    annotators: list[str]


def queue(s: Session, task: Task, reviewer: User, status: str = "pending", annotator: str = "",
          page: int = 1) -> Queue:
    """One page of the task's labels in `status` ("all" for any), by `annotator` when given."""
    q = select(Label, User.username, Item).join(User, User.id == Label.user_id).join(Item, Item.id == Label.item_id) \
        .where(Label.task_id == task.id)
    if status in REVIEW_STATES:
        q = q.where(Label.review_status == status)
    if annotator:
        who = find_user(s, annotator)
        q = q.where(Label.user_id == (who.id if who is not None else -1))
    total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
    pages = max(1, math.ceil(total / PER_PAGE))
    page = min(max(1, page), pages)
    rows = s.execute(q.order_by(Label.id).offset((page - 1) * PER_PAGE).limit(PER_PAGE)).all()
    names = s.scalars(select(User.username).join(Label, Label.user_id == User.id).where(Label.task_id == task.id)
                      .distinct().order_by(User.username))
    return Queue([label_view(task, item, lab, name, reviewer) for lab, name, item in rows], total, page, pages,
                 list(names))


def accept_many(s: Session, task: Task, reviewer: User, label_ids: list[int]) -> dict[str, int]:
    """Accept each pending label of `task` among `label_ids`; the reviewer's own labels and
    labels no longer pending are left as they are and counted."""
    counts = {"accepted": 0, "own": 0, "not_pending": 0}
    labels = s.scalars(select(Label).where(Label.task_id == task.id, Label.id.in_(label_ids[:1000]))
                       .order_by(Label.id)).all()
    for label in labels:
        if label.review_status != "pending":
            counts["not_pending"] += 1
            continue
        try:
            review_label(s, label, reviewer, "accepted")
        except Forbidden:
            counts["own"] += 1
            continue
        counts["accepted"] += 1
    if not labels and label_ids:
        raise Conflict("none of the selected labels belongs to this task")
    return counts
