"""Serving items: which item an annotator sees next, overlap slots, claims under concurrency,
and giving back the slots of assignments left unanswered."""

from __future__ import annotations

import datetime as dt
import random

from sqlalchemy import and_, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhfkit.feedback.active import most_uncertain
from rlhfkit.feedback.models import Assignment, Item, Task, User, utcnow

# an assignment not answered within this time frees its overlap slot for someone else
ASSIGNMENT_TIMEOUT = dt.timedelta(minutes=30)
UNCERTAINTY_POOL = 256  # unlabelled items scored by the ensemble per request
CLAIM_ROUNDS = 4  # rounds of reading candidates and claiming one before waiting on locks
RELEASE_BATCH = 64  # expired assignments given back per /next (the rest on the next calls)


def open_assignment(s: Session, task: Task, user: User) -> Assignment | None:
    return s.scalar(select(Assignment).where(*open_for(task, user)).order_by(Assignment.id).limit(1))


def open_for(task: Task, user: User, cutoff=None) -> tuple:
    """Predicates of the user's open assignment: served after `cutoff` (default: now minus the
    assignment timeout) and not completed."""
    cutoff = utcnow() - ASSIGNMENT_TIMEOUT if cutoff is None else cutoff
    return (Assignment.task_id == task.id, Assignment.user_id == user.id, Assignment.completed.is_(False),
            Assignment.served_at > cutoff)


def expired_open(task: Task, cutoff=None) -> tuple:
    cutoff = utcnow() - ASSIGNMENT_TIMEOUT if cutoff is None else cutoff
    return (Assignment.task_id == task.id, Assignment.completed.is_(False), Assignment.released.is_(False),
            Assignment.served_at <= cutoff)


def _open_and_expired(s: Session, task: Task, user: User) -> tuple[int | None, bool]:
    """(id of the user's open assignment in `task` or None, whether any assignment of the task
    has expired unanswered), in one statement: the start of every /next."""
    mine = select(Assignment.id).where(*open_for(task, user)).order_by(Assignment.id).limit(1)
    expired = exists().where(*expired_open(task))
    row = s.execute(select(mine.scalar_subquery(), expired)).one()
    return row[0], bool(row[1])


def locked_if_free(item_id, overlap, skip_locked: bool):
    """Scalar subquery: `item_id` once its row is locked for this transaction, provided the item
    still has a free slot (`slots_taken < overlap`; overlap None: gold items, no limit). With
    `skip_locked`, an item another transaction holds gives NULL instead of a wait.

    Only an item with a free slot is locked, so a transaction holds at most the lock of the
    item it is taking and commits right after. Transactions that kept the locks of items they
    had found full deadlocked in the waiting round of `_claim`. FOR NO KEY UPDATE does not
    conflict with the KEY SHARE locks that inserting labels and assignments takes on the item.
    SQLite renders no lock clause and needs none: its writers run one at a time (BEGIN
    IMMEDIATE and the in-process write lock).
    """
    q = select(Item.id).where(Item.id == item_id)
    if overlap is not None:
        q = q.where(Item.slots_taken < overlap)
    return q.with_for_update(key_share=True, skip_locked=skip_locked).scalar_subquery()


def release_expired(s: Session, task: Task) -> int:
    """Give the slots of expired, unanswered assignments of `task` back to their items.

    Each release is a conditional update of the assignment (still open and not released), so
    two concurrent sweeps, or a sweep and a late submit, cannot both act on one assignment; the
    item's count drops in the same transaction. Reads only expired open assignments through
    ix_assignments_expiry, at most RELEASE_BATCH of them.
    """
    cutoff = utcnow() - ASSIGNMENT_TIMEOUT
    rows = s.execute(select(Assignment.id, Assignment.item_id).where(*expired_open(task))
                     .order_by(Assignment.item_id).limit(RELEASE_BATCH)).all()
    released = 0
    for aid, item_id in rows:
        done = s.execute(update(Assignment).where(
            Assignment.id == aid, Assignment.completed.is_(False), Assignment.released.is_(False),
            Assignment.served_at <= cutoff).values(released=True).execution_options(synchronize_session=False))
        if done.rowcount:
            s.execute(update(Item).where(Item.id == item_id).values(slots_taken=Item.slots_taken - 1)
                      .execution_options(synchronize_session=False))
            released += 1
    return released


def take_slot(s: Session, task: Task, item_id: int, gold: bool) -> bool:
    """Count one more assignment on the item, unless its overlap is full (gold items have no
    limit). One conditional UPDATE: on PostgreSQL it takes the row lock and re-checks the
    condition on the newest row version (READ COMMITTED), so two transactions can never both
    take the last slot; on SQLite writers run one at a time."""
    cond = Item.id == item_id if gold else and_(Item.id == item_id, Item.slots_taken < task.overlap)
    done = s.execute(update(Item).where(cond).values(slots_taken=Item.slots_taken + 1)
                     .execution_options(synchronize_session=False))
    return bool(done.rowcount)


def give_back_slot(s: Session, item_id: int) -> None:
    """One assignment fewer on the item (skipped or expired)."""
    s.execute(update(Item).where(Item.id == item_id).values(slots_taken=Item.slots_taken - 1)
              .execution_options(synchronize_session=False))


def _take_slot_returning(s: Session, task: Task, item_id: int, gold: bool, lock: bool = False,
                         wait: bool = False) -> Item | None:
    """`take_slot` that also reads the item back (UPDATE ... RETURNING: one round trip for the
    claim and the item to show). With `lock` (PostgreSQL), the row is locked first in the same
    statement (`locked_if_free`): an item another transaction holds is skipped, unless `wait`."""
    target = Item.id == item_id
    if lock:
        target = Item.id == locked_if_free(item_id, None if gold else task.overlap, skip_locked=not wait)
    cond = target if gold else and_(target, Item.slots_taken < task.overlap)
    return s.scalars(update(Item).where(cond).values(slots_taken=Item.slots_taken + 1).returning(Item)
                     .execution_options(synchronize_session=False, populate_existing=True)).first()


def candidate_query(task: Task, user: User, gold: bool, limit: int = 32):
    """The SELECT behind `candidate_ids` (separate so its plan can be checked)."""
    mine = exists().where(Assignment.item_id == Item.id, Assignment.user_id == user.id)
    q = select(Item.id).where(Item.task_id == task.id, Item.is_gold.is_(gold), ~mine)
    if not gold:  # every annotator sees every gold item; real items stop at `overlap` annotators
        q = q.where(Item.slots_taken < task.overlap)
    return q.order_by(Item.slots_taken.desc(), Item.id).limit(limit)


def candidate_ids(s: Session, task: Task, user: User, gold: bool, limit: int = 32) -> list[int]:
    """Ids of items this user has not been served whose overlap is not yet taken by others.

    Items already started by others come first, so overlap completes before new items open.
    The query walks ix_items_open_slots (task, gold, slots_taken DESC, id) and probes the
    (item, user) unique index for each row, so it reads about `limit` items plus those the user
    already has, whatever the size of the task.
    """
    return list(s.scalars(candidate_query(task, user, gold, limit)))


def next_assignment(s: Session, task: Task, user: User, rng: random.Random | None = None,
                    scorer=None, gold: bool | None = None) -> tuple[Item, Assignment] | None:
    """The item to show `user` next (and its display order), or None when nothing is left.
    `gold`: whether to serve a gold item (None: draw it with probability task.gold_rate).

    The common path costs four statements: the user's open assignment and whether any expired
    (one SELECT), the candidates, the claim (UPDATE ... RETURNING the item) and the INSERT of
    the assignment.
    """
    rng = rng or random.Random()
    current_id, expired = _open_and_expired(s, task, user)
    if current_id is not None:
        current = s.get(Assignment, current_id)
        return s.get(Item, current.item_id), current
    if expired and release_expired(s, task):
        s.commit()  # releases are committed on their own: no item locks held while claiming
    if gold is None:  # drawn here unless the caller drew it already
        gold = task.gold_rate > 0 and rng.random() < task.gold_rate
    item = _gold_item(s, task, user, rng) if gold else None
    if item is None:
        item = _real_item(s, task, user, rng, scorer)
    if item is None:  # no real item is left: gold items (no overlap limit) keep coming
        item = _gold_item(s, task, user, rng)
        if item is None:  # none, or deleted meanwhile
            return None
    order = list(range(len(item.responses)))
    if task.randomize_order:
        rng.shuffle(order)
    assignment = Assignment(item_id=item.id, user_id=user.id, task_id=task.id, display_order=order)
    s.add(assignment)
    try:
        s.flush()
    except IntegrityError:  # the same user asked twice at once; serve the first assignment
        s.rollback()
        again = open_assignment(s, task, user)
        return None if again is None else (s.get(Item, again.item_id), again)
    return item, assignment


def _gold_item(s: Session, task: Task, user: User, rng: random.Random) -> Item | None:
    golds = candidate_ids(s, task, user, gold=True, limit=64)
    return _take_slot_returning(s, task, rng.choice(golds), gold=True) if golds else None


def _real_item(s: Session, task: Task, user: User, rng: random.Random, scorer) -> Item | None:
    """Claim a real item: candidates are read without locks; claiming one locks it and takes a
    slot only if one is still free. When every candidate was taken meanwhile, read them again."""
    uncertain = task.selection == "uncertainty" and scorer is not None
    for attempt in range(CLAIM_ROUNDS):
        pool = candidate_ids(s, task, user, gold=False, limit=UNCERTAINTY_POOL if uncertain else 32)
        if not pool:
            return None
        first = _choose(s, pool, task, rng, scorer)
        item = _claim(s, task, [first] + [i for i in pool if i != first], wait=attempt == CLAIM_ROUNDS - 1)
        if item is not None:
            return item
    return None


def _claim(s: Session, task: Task, ordered: list[int], wait: bool = False) -> Item | None:
    """The first item of `ordered` whose row lock we get and that still has a free slot.

    Items locked by a concurrent /next are skipped, unless `wait` (the last round: wait for
    their holders, who commit within one request, rather than report the task finished).
    """
    postgres = s.get_bind().dialect.name == "postgresql"
    for item_id in ordered:  # lock (or skip), take the slot and read the item in one round trip
        item = _take_slot_returning(s, task, item_id, gold=False, lock=postgres, wait=wait)
        if item is not None:
            return item
    return None


def _choose(s: Session, pool: list[int], task: Task, rng: random.Random, scorer) -> int:
    if task.selection == "uncertainty" and scorer is not None and task.question_type in ("pairwise", "ranking"):
        if hasattr(scorer, "for_task"):  # a per-task scorer refit on the task's own labels
            scorer = scorer.for_task(s, task)
        if scorer is not None:
            rows = s.execute(select(Item.id, Item.prompt, Item.responses).where(Item.id.in_(pool))).all()
            return rows[most_uncertain(scorer, [(r.prompt, r.responses) for r in rows])].id
    # the pool lists items others already started first; drawing among its head finishes
    # overlapping items before opening new ones, while annotators still get different items
    return rng.choice(pool)
