"""Single-statement paths of /next and submit (PostgreSQL, autocommit).

On PostgreSQL every statement is a round trip to another process, and a transaction adds two
(BEGIN, COMMIT). The common /next and submit are therefore also written as a few statements
that are each atomic on their own, run in autocommit: /next reads its state in one SELECT and
claims an item and records the assignment in one statement (UPDATE ... RETURNING inside a
WITH, feeding the INSERT); submit marks the assignment answered and inserts the label in one
statement. Whatever they do not cover (an open or expired assignment, gold items, uncertainty
selection, a contended or finished task, an expired submit, a concurrent duplicate) raises
NeedsTransaction before anything is written, and the caller runs the transactional path in
`assign` / `labels`. docs/feedback.md gives the measurement that keeps this second copy.

The statements are built once per process with bound parameters: SQLAlchemy's compiled cache
already spares compiling a statement built anew, but building one of CTEs and subqueries in
Python costs about 0.3 ms, on every request.
"""

from __future__ import annotations

import functools
import random
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Integer,
    bindparam,
    exists,
    false,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhfkit.feedback.models import Assignment, Item, Label, Task, User, utcnow
from rlhfkit.feedback.service.answers import canonical_answer, label_extras
from rlhfkit.feedback.service.assign import (
    ASSIGNMENT_TIMEOUT,
    candidate_query,
    expired_open,
    locked_if_free,
    open_for,
)
from rlhfkit.feedback.service.labels import submit_lookup

# stand-ins for a task and a user in statements built once with bound parameters; the parameter
# names start with "b_", since an UPDATE or INSERT given a parameter named like a column of its
# table would also set that column
_TASK = SimpleNamespace(id=bindparam("b_task_id", type_=Integer), overlap=bindparam("b_overlap", type_=Integer))
_USER = SimpleNamespace(id=bindparam("b_user_id", type_=Integer))
_LABEL_FIELDS = ("item_id", "user_id", "task_id", "idempotency_key", "value", "display_order", "duration_ms",
                 "created_at", "version", "review_status", "strength", "comment")


class NeedsTransaction(Exception):
    """The single-statement path does not cover this request; run the transactional one.
    `gold` carries the gold-item draw already made (so the random stream is drawn once)."""

    def __init__(self, reason: str, gold: bool | None = None):
        super().__init__(reason)
        self.gold = gold


@functools.cache
def state_statement(limit: int = 32):
    """The user's open assignment, whether any assignment of the task expired, and up to `limit`
    candidates with their slots taken and response counts, in one SELECT (parameters b_task_id,
    b_user_id, b_overlap, b_cutoff)."""
    cutoff = bindparam("b_cutoff", type_=DateTime)
    cand = candidate_query(_TASK, _USER, gold=False, limit=limit).add_columns(
        Item.slots_taken, func.json_array_length(Item.responses).label("k")).subquery("cand")
    mine = select(Assignment.id).where(*open_for(_TASK, _USER, cutoff)).order_by(Assignment.id).limit(1)
    probe = select(mine.scalar_subquery().label("open_id"),
                   exists().where(*expired_open(_TASK, cutoff)).label("expired")).subquery("probe")
    return (select(probe.c.open_id, probe.c.expired, cand.c.id, cand.c.k)
            .select_from(probe.outerjoin(cand, true()))
            .order_by(cand.c.slots_taken.desc(), cand.c.id))


@functools.cache
def claim_statement():
    """Take one slot of item `b_item_id` (skipping it when another request holds its row) and
    insert the assignment, in one statement; returns the item and the assignment id, or no row."""
    locked = locked_if_free(bindparam("b_item_id", type_=Integer), _TASK.overlap, skip_locked=True)
    claimed = (update(Item).where(Item.id == locked, Item.slots_taken < _TASK.overlap)
               .values(slots_taken=Item.slots_taken + 1).returning(Item.id).cte("claimed"))
    added = (insert(Assignment).from_select(
        ["item_id", "user_id", "task_id", "display_order", "served_at", "completed", "released", "skipped"],
        select(claimed.c.id, _USER.id, _TASK.id, bindparam("b_order", type_=JSON), bindparam("b_now", type_=DateTime),
               false(), false(), false()))
        .returning(Assignment.id, Assignment.item_id).cte("added"))
    return select(Item, added.c.id).join(added, added.c.item_id == Item.id)


@functools.cache
def label_insert_statement():
    """Complete assignment `b_assignment_id` if it is still open and insert the label, in one
    statement; returns the label id, or none when the assignment was no longer open."""
    done = (update(Assignment).where(Assignment.id == bindparam("b_assignment_id", type_=Integer),
                                     Assignment.completed.is_(False), Assignment.released.is_(False))
            .values(completed=True).returning(Assignment.id).cte("done"))
    table = Label.__table__  # the Core table: an ORM insert given parameters would be a bulk insert
    row = select(*[bindparam(f"b_{k}", type_=table.c[k].type) for k in _LABEL_FIELDS]).select_from(done)
    return insert(table).from_select(list(_LABEL_FIELDS), row).returning(table.c.id)


def next_assignment(s: Session, task: Task, user: User, rng: random.Random) -> tuple[Item, Assignment]:
    """`assign.next_assignment` for the common case on PostgreSQL in autocommit: two statements."""
    gold = task.gold_rate > 0 and rng.random() < task.gold_rate
    if gold or task.selection != "random":
        raise NeedsTransaction("gold item or uncertainty selection", gold)
    rows = s.execute(state_statement(), {"b_task_id": task.id, "b_user_id": user.id, "b_overlap": task.overlap,
                                         "b_cutoff": utcnow() - ASSIGNMENT_TIMEOUT}).all()
    if rows[0].open_id is not None or rows[0].expired or rows[0].id is None:
        raise NeedsTransaction("open or expired assignment, or no candidate left", gold)
    sizes = {r.id: r.k for r in rows}
    pool = [r.id for r in rows]
    first = rng.choice(pool)
    for item_id in [first] + [i for i in pool if i != first]:
        order = list(range(sizes[item_id]))
        if task.randomize_order:
            rng.shuffle(order)
        now = utcnow()
        try:
            got = s.execute(claim_statement(), {"b_item_id": item_id, "b_overlap": task.overlap, "b_user_id": user.id,
                                                "b_task_id": task.id, "b_order": order, "b_now": now}).first()
        except IntegrityError:  # the same user asked twice at once: the statement took nothing
            s.rollback()
            raise NeedsTransaction("concurrent /next of the same user", gold) from None
        if got is not None:
            item, assignment_id = got
            assignment = Assignment(id=assignment_id, item_id=item.id, user_id=user.id, task_id=task.id,
                                    display_order=order, served_at=now, completed=False, released=False)
            return item, assignment
    raise NeedsTransaction("every candidate was locked or full", gold)


def submit_label(s: Session, task: Task, user: User, item_id: int, raw: Any, key: str,
                 strength: str | None = None, comment: str | None = None) -> tuple[Label, bool]:
    """`labels.submit_label` on PostgreSQL in autocommit: two statements for a new label (the
    lookup, then the assignment UPDATE and label INSERT as one statement), one for a replay."""
    item, assignment, existing = submit_lookup(s, task, user, item_id, key)
    if existing is not None:
        return existing, True
    value = canonical_answer(task, item.responses, raw, assignment.display_order)
    extras = label_extras(task, value, strength, comment)
    if assignment.completed or assignment.released:
        raise NeedsTransaction("the assignment expired or was skipped")
    now = utcnow()
    fields = {"item_id": item_id, "user_id": user.id, "task_id": task.id, "idempotency_key": key, "value": value,
              "display_order": list(assignment.display_order),
              "duration_ms": int((now - assignment.served_at).total_seconds() * 1000), "created_at": now,
              "version": 1, "review_status": "pending", **extras}
    try:
        params = {f"b_{k}": v for k, v in fields.items()}
        label_id = s.scalar(label_insert_statement(), {**params, "b_assignment_id": assignment.id})
    except IntegrityError:  # a concurrent retry of the same submission won the race
        s.rollback()
        raise NeedsTransaction("concurrent submit of the same label") from None
    if label_id is None:  # expired and released meanwhile, or answered by a concurrent request
        raise NeedsTransaction("the assignment changed meanwhile")
    return Label(id=label_id, reviewed_by=None, reviewed_at=None, review_reason=None, **fields), False
