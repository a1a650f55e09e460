"""Labels: submitting an answer exactly once, skipping an item, correcting one's own label, and
the reads of labels (one's own, one by id, its earlier versions)."""

from __future__ import annotations

import functools
import re
from typing import Any

from sqlalchemy import Integer, String, and_, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from rlhfkit.feedback.models import Assignment, Item, Label, LabelVersion, Task, User, utcnow
from rlhfkit.feedback.service.accounts import is_admin
from rlhfkit.feedback.service.answers import canonical_answer, label_extras
from rlhfkit.feedback.service.assign import give_back_slot, take_slot
from rlhfkit.feedback.service.audit import audit
from rlhfkit.feedback.service.errors import Conflict, InvalidAnswer

_LABEL_BY_KEY, _LABEL_DONE = aliased(Label, name="label_by_key"), aliased(Label, name="label_done")


@functools.cache
def submit_lookup_statement():
    """Item `b_item_id`, `b_user_id`'s assignment of it, their label stored under idempotency key
    `b_key` and the id of their label of the item, in one statement (built once, bound
    parameters: building a statement of joins costs more Python than the round trip)."""
    by_key, done, user_id = _LABEL_BY_KEY, _LABEL_DONE, bindparam("b_user_id", type_=Integer)
    return (select(Item, Assignment, by_key, done.id).select_from(Item)
            .outerjoin(Assignment, and_(Assignment.item_id == Item.id, Assignment.user_id == user_id))
            .outerjoin(by_key, and_(by_key.user_id == user_id, by_key.idempotency_key == bindparam("b_key", type_=String)))
            .outerjoin(done, and_(done.item_id == Item.id, done.user_id == user_id))
            .where(Item.id == bindparam("b_item_id", type_=Integer)))


def submit_lookup(s: Session, task: Task, user: User, item_id: int,
                  key: str) -> tuple[Item | None, Assignment | None, Label | None]:
    """(item, the user's assignment of it, the label stored under `key` when this is a retry),
    checked: a key used for another item, an item outside the task, an item not served to the
    user or already labelled by them raise."""
    if not isinstance(key, str) or not re.fullmatch(r"[!-~]{8,64}", key):
        raise InvalidAnswer("idempotency_key", "must be 8-64 printable ASCII characters (e.g. a UUID)")
    # one statement reads the item, the user's assignment of it, a label already stored under
    # this key (a retry), and whether the user already labelled the item
    row = s.execute(submit_lookup_statement(), {"b_item_id": item_id, "b_user_id": user.id, "b_key": key}).first()
    if row is None:  # no such item; a retry's key still wins (it names the item it was for)
        existing = _label_by_key(s, user, key)
        item = assignment = labelled = None
    else:
        item, assignment, existing, labelled = row
    if existing is not None:
        if existing.item_id != item_id:
            raise Conflict("idempotency_key was already used for another item")
        return item, assignment, existing
    if item is None or item.task_id != task.id:
        raise LookupError(f"item {item_id} is not in task {task.id}")
    if assignment is None:
        raise Conflict("this item was not served to you; ask for the next item first")
    # an open assignment has no label (both change in one transaction; a concurrent duplicate
    # hits uq_label_item_user below)
    if labelled is not None:
        raise Conflict("you already labelled this item")
    return item, assignment, None


def _label_by_key(s: Session, user: User, key: str) -> Label | None:
    return s.scalar(select(Label).where(Label.user_id == user.id, Label.idempotency_key == key))


def skip_item(s: Session, task: Task, user: User, item_id: int) -> None:
    """Pass on an item served to `user`: the assignment ends unanswered (skipped), its slot goes
    back to the item for someone else, and the item is not served to `user` again."""
    mine = and_(Assignment.item_id == item_id, Assignment.user_id == user.id, Assignment.task_id == task.id,
                Assignment.completed.is_(False))
    held = s.execute(update(Assignment).where(mine, Assignment.released.is_(False))
                     .values(completed=True, released=True, skipped=True)
                     .execution_options(synchronize_session=False)).rowcount
    if held:
        give_back_slot(s, item_id)
        return
    if not s.execute(update(Assignment).where(mine).values(completed=True, skipped=True)
                     .execution_options(synchronize_session=False)).rowcount:
        raise Conflict(f"item {item_id} is not waiting for your answer; ask for the next item")


def submit_label(s: Session, task: Task, user: User, item_id: int, raw: Any, key: str,
                 duration_ms: int | None = None, strength: str | None = None,
                 comment: str | None = None) -> tuple[Label, bool]:
    """Store one answer exactly once. Returns (label, replayed).

    The stored duration is measured by the server from serve to submit; a client-supplied
    `duration_ms` is ignored (quality control must not trust it).

    A retry with the same idempotency key returns the stored label (replayed=True) without
    writing; a different key for an item the user already labelled is a Conflict.
    """
    item, assignment, existing = submit_lookup(s, task, user, item_id, key)
    if existing is not None:
        return existing, True
    value = canonical_answer(task, item.responses, raw, assignment.display_order)
    extras = label_extras(task, value, strength, comment)
    if assignment.skipped:
        raise Conflict("you skipped this item; ask for the next item")
    if not assignment.completed:
        _complete(s, task, item, assignment)
    measured = int((utcnow() - assignment.served_at).total_seconds() * 1000)
    label = Label(item_id=item_id, user_id=user.id, task_id=task.id, idempotency_key=key, value=value,
                  display_order=list(assignment.display_order),
                  duration_ms=measured, **extras)
    s.add(label)
    try:
        s.flush()
    except IntegrityError:  # a concurrent retry of the same submission won the race
        s.rollback()
        existing = _label_by_key(s, user, key)
        if existing is not None and existing.item_id == item_id:
            return existing, True
        raise Conflict("you already labelled this item") from None
    return label, False


def _complete(s: Session, task: Task, item: Item, assignment: Assignment) -> None:
    """Mark an open assignment answered. Its slot still counts unless the expiry sweep gave it
    back; then the submit is accepted only if the item has a free slot again (nobody took it)."""
    still_held = s.execute(update(Assignment).where(
        Assignment.id == assignment.id, Assignment.completed.is_(False), Assignment.released.is_(False))
        .values(completed=True).execution_options(synchronize_session=False)).rowcount
    if not still_held:
        if not take_slot(s, task, item.id, gold=item.is_gold):
            raise Conflict("your assignment of this item expired and it was given to someone else; "
                           "ask for the next item")
        s.execute(update(Assignment).where(Assignment.id == assignment.id)
                  .values(completed=True, released=False).execution_options(synchronize_session=False))
    s.expire(assignment, ["completed", "released"])


def correct_label(s: Session, label: Label, user: User, raw: Any, strength: str | None = None,
                  comment: str | None = None) -> Label:
    """Replace the value of `user`'s own label with a corrected answer (a new version; the old
    value is kept in label_versions). Only while it is not yet reviewed."""
    if label.user_id != user.id:
        raise LookupError(f"label {label.id} not found")
    if label.review_status != "pending":
        raise Conflict(f"label {label.id} was already {label.review_status} by a reviewer; it can no longer change")
    task, item = s.get(Task, label.task_id), s.get(Item, label.item_id)
    value = canonical_answer(task, item.responses, raw, label.display_order)
    extras = label_extras(task, value, strength, comment)
    s.add(LabelVersion(label_id=label.id, version=label.version, value=label.value, created_at=utcnow()))
    label.value, label.version = value, label.version + 1
    label.strength, label.comment = extras["strength"], extras["comment"]
    audit(s, user, "label.correct", str(label.id), version=label.version)
    s.flush()
    return label


# --------------------------------------------------------------------------------------------
# reads


def get_label(s: Session, label_id: int) -> Label:
    """Label `label_id`; LookupError when there is none."""
    label = s.get(Label, label_id)
    if label is None:
        raise LookupError(f"label {label_id} not found")
    return label


def visible_label(s: Session, label_id: int, user: User) -> Label:
    """Label `label_id` if `user` made it or is an admin; another annotator's label is reported
    as missing, so not even its existence leaks."""
    label = s.get(Label, label_id)
    if label is None or (label.user_id != user.id and not is_admin(user)):
        raise LookupError(f"label {label_id} not found")
    return label


def own_label(s: Session, label_id: int, user: User) -> Label:
    """Label `label_id` if `user` made it (what the correction pages may show and change)."""
    label = s.get(Label, label_id)
    if label is None or label.user_id != user.id:
        raise LookupError(f"label {label_id} not found")
    return label


def label_context(s: Session, label: Label) -> tuple[Task, Item]:
    """The task and the item a label belongs to."""
    return s.get(Task, label.task_id), s.get(Item, label.item_id)


def labels_of(s: Session, user: User, task_id: int | None = None) -> list[Label]:
    """`user`'s labels, oldest first, of one task or all."""
    q = select(Label).where(Label.user_id == user.id).order_by(Label.id)
    if task_id is not None:
        q = q.where(Label.task_id == task_id)
    return list(s.scalars(q))


def recent_labels(s: Session, user: User, limit: int = 500) -> list[tuple[Label, Task, Item]]:
    """`user`'s newest labels with their task and item, newest first."""
    return list(s.execute(select(Label, Task, Item).join(Task, Task.id == Label.task_id)
                          .join(Item, Item.id == Label.item_id).where(Label.user_id == user.id)
                          .order_by(Label.id.desc()).limit(limit)).tuples())


def versions_of(s: Session, label: Label) -> list[LabelVersion]:
    """The values a label held before its corrections, oldest first."""
    return list(s.scalars(select(LabelVersion).where(LabelVersion.label_id == label.id)
                          .order_by(LabelVersion.version)))
