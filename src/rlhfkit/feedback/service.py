"""The feedback service's operations, independent of HTTP: users, tasks, items, serving, labels.

Answer forms. Annotators answer in *display* terms (what they saw: left/right, positions on
screen); labels are stored in the *canonical* form, indices into the item's original
`responses` list, plus the display order, so that position bias can be measured later:

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

import datetime as dt
import functools
import json
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

from pydantic import ValidationError
from sqlalchemy import (
    JSON,
    DateTime,
    Integer,
    String,
    and_,
    bindparam,
    delete,
    exists,
    false,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from rlhfkit.errors import DataError
from rlhfkit.feedback.models import (
    QUESTION_TYPES,
    ROLES,
    SELECTIONS,
    STRENGTHS,
    Assignment,
    AuditEvent,
    Item,
    Label,
    LabelVersion,
    Task,
    TaskMember,
    User,
    utcnow,
)
from rlhfkit.feedback.names import lookalike_key
from rlhfkit.feedback.schemas import (
    ANSWER,
    MAX_RESPONSES,
    MAX_TEXT,
    first_error,
    is_blank,
    json_text_problem,
    name_problem,
    text_problem,
)
from rlhfkit.feedback.security import MIN_PASSWORD, hash_password

# an assignment not answered within this time frees its overlap slot for someone else
ASSIGNMENT_TIMEOUT = dt.timedelta(minutes=30)
DEFAULT_RUBRIC = ["helpful", "harmless", "honest"]
UNCERTAINTY_POOL = 256  # unlabelled items scored by the ensemble per request
CLAIM_ROUNDS = 4  # rounds of reading candidates and claiming one before waiting on locks
RELEASE_BATCH = 64  # expired assignments given back per /next (the rest on the next calls)
PAIR_CHOICES = {"left": 0, "right": 1}


# the client address of the request being served, set by the app's ClientAddress middleware and
# stored with every audit event; None outside a request (the CLI)
CLIENT_ADDRESS: ContextVar[str | None] = ContextVar("rlhfkit_client_address", default=None)


class InvalidAnswer(ValueError):
    """A submitted answer does not fit the question; `field` names the offending part."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field


class Forbidden(Exception):
    """The caller may not do this (HTTP 403), whatever its role: e.g. reviewing their own label."""


class Conflict(Exception):
    """The request conflicts with stored state (already labelled, key reused, not assigned)."""


# --------------------------------------------------------------------------------------------
# users and tasks


def username_key(name: str) -> str:
    """The identity of a user name: NFKC-normalised and case-folded (Unicode TR #36 / #31
    advice), so 'Admin', 'ADMIN' and full-width 'ａｄｍｉｎ' are one account."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def find_user(s: Session, name: str) -> User | None:
    if not isinstance(name, str) or name_problem(name) or len(name) > 64:
        return None
    return s.scalar(select(User).where(User.username_key == username_key(name)))


def check_password_policy(password: str, username: str = "") -> None:
    """At least 8 characters and not guessable: zxcvbn (Dropbox's estimator, with its lists of
    common passwords, names and keyboard patterns) must score it 2 or more out of 4."""
    from zxcvbn import zxcvbn

    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise InvalidAnswer("password", f"must have at least {MIN_PASSWORD} characters")
    if text_problem(password):
        raise InvalidAnswer("password", text_problem(password))
    result = zxcvbn(password[:100], user_inputs=[username] if username else [])
    if result["score"] < 2:
        hint = result["feedback"].get("warning") or "it is a common or easily guessed password"
        raise InvalidAnswer("password", f"too easy to guess ({hint.rstrip('.')}); choose a longer, less common one")


def audit(s: Session, actor: User | None, action: str, target: str = "", **detail: Any) -> None:
    client = CLIENT_ADDRESS.get()
    s.add(AuditEvent(actor_id=actor.id if actor else None, action=action, target=target[:128], detail=detail,
                     client=None if client is None else client[:64]))


def create_user(s: Session, username: str, password: str, role: str = "annotator",
                actor: User | None = None, reveal_lookalike: bool = False) -> User:
    """Add an account. A name that looks like an existing one (`names.lookalike_key`) is refused:
    with `reveal_lookalike` (the caller is an admin) naming that account, else only as "not
    available", so the refusal does not tell who has an account."""
    if role not in ROLES:
        raise InvalidAnswer("role", f"must be one of {ROLES}")
    if not isinstance(username, str) or not username or len(username) > 64 or name_problem(username) or \
            not username.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise InvalidAnswer("username", "1-64 letters, digits, '.', '-' or '_'")
    same = find_user(s, username)
    if same is not None and same.username == username:
        raise Conflict(f"user {username!r} already exists")
    key = lookalike_key(username)
    if len(key) > 255:
        raise InvalidAnswer("username", "too long once normalised; choose a shorter name")
    twin = same.username if same is not None else s.scalar(select(User.username).where(User.lookalike_key == key))
    if twin is not None:
        raise Conflict(f"user name {username!r} is not available: it looks like the existing account {twin!r}"
                       if reveal_lookalike else f"user name {username!r} is not available; choose another")
    check_password_policy(password, username)
    user = User(username=username, username_key=username_key(username), lookalike_key=key,
                password_hash=hash_password(password), role=role)
    s.add(user)
    try:
        s.flush()
    except IntegrityError:  # a concurrent request created the same or a look-alike name
        raise Conflict(f"user name {username!r} is not available; choose another") from None
    audit(s, actor, "user.create", username, role=role)
    return user


def create_task(s: Session, name: str, question_type: str, overlap: int = 1, instructions: str = "",
                rubric: Sequence[str] | None = None, likert_points: int = 5, randomize_order: bool = True,
                selection: str = "random", gold_rate: float = 0.1, open_to_all: bool = True,
                actor: User | None = None, **audit_detail: Any) -> Task:
    if question_type not in QUESTION_TYPES:
        raise InvalidAnswer("question_type", f"must be one of {QUESTION_TYPES}")
    if selection not in SELECTIONS:
        raise InvalidAnswer("selection", f"must be one of {SELECTIONS}")
    if not 1 <= overlap <= 100:
        raise InvalidAnswer("overlap", "must be between 1 and 100")
    if not 2 <= likert_points <= 11:
        raise InvalidAnswer("likert_points", "must be between 2 and 11")
    if not 0.0 <= gold_rate <= 1.0:
        raise InvalidAnswer("gold_rate", "must be between 0 and 1")
    if not name or len(name) > 128 or not name.strip():
        raise InvalidAnswer("name", "1-128 characters")
    if name_problem(name):
        raise InvalidAnswer("name", name_problem(name))
    if not isinstance(instructions, str) or text_problem(instructions) or len(instructions) > MAX_TEXT:
        raise InvalidAnswer("instructions", text_problem(instructions) or f"at most {MAX_TEXT} characters")
    for dim in rubric or ():
        if not isinstance(dim, str) or not dim or len(dim) > 64 or name_problem(dim):
            raise InvalidAnswer("rubric", "dimensions are names of 1-64 characters without control characters")
    if s.scalar(select(Task).where(Task.name == name)) is not None:
        raise Conflict(f"task {name!r} already exists")
    task = Task(name=name, question_type=question_type, overlap=overlap, instructions=instructions,
                rubric=list(rubric or (DEFAULT_RUBRIC if question_type == "rating" else [])),
                likert_points=likert_points, randomize_order=randomize_order, selection=selection,
                gold_rate=gold_rate, open_to_all=open_to_all)
    s.add(task)
    s.flush()
    audit(s, actor, "task.create", name, question_type=question_type, open_to_all=open_to_all, **audit_detail)
    return task


# --------------------------------------------------------------------------------------------
# items


def _record_responses(rec: dict, source: str, line: int) -> list[str]:
    if "responses" in rec:
        responses = rec["responses"]
    elif "response" in rec:
        responses = [rec["response"]]
    elif "chosen" in rec and "rejected" in rec:
        responses = [rec["chosen"], rec["rejected"]]
    elif "completion" in rec:
        responses = [rec["completion"]]
    else:
        raise DataError("needs 'responses' (list), 'response', 'completion' or 'chosen'+'rejected'",
                        source=source, line=line, field="responses")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise DataError("must be a non-empty list of strings", source=source, line=line, field="responses")
    if len(responses) > MAX_RESPONSES or any(len(r) > MAX_TEXT for r in responses):
        raise DataError(f"at most {MAX_RESPONSES} responses of {MAX_TEXT} characters", source=source,
                        line=line, field="responses")
    for i, r in enumerate(responses):
        if text_problem(r):
            raise DataError(text_problem(r), source=source, line=line, field=f"responses[{i}]")
    return responses


def item_from_record(task: Task, rec: Any, source: str = "<records>", line: int = 0) -> Item:
    """Validate one import record (prompt + responses [+ id, gold, meta]) into an Item."""
    if not isinstance(rec, dict):
        raise DataError("each record must be a JSON object", source=source, line=line)
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_TEXT:
        raise DataError(f"must be a non-empty string of at most {MAX_TEXT} characters", source=source,
                        line=line, field="prompt")
    if text_problem(prompt):
        raise DataError(text_problem(prompt), source=source, line=line, field="prompt")
    responses = _record_responses(rec, source, line)
    rid, meta = rec.get("id"), rec.get("meta") or {}
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int) or name_problem(str(rid))
                            or len(str(rid)) > 128):
        raise DataError("must be a string or integer of at most 128 characters, without control characters",
                        source=source, line=line, field="id")
    if not isinstance(meta, dict) or json_text_problem(meta) or len(json.dumps(meta)) > MAX_TEXT:
        raise DataError(f"must be a JSON object of at most {MAX_TEXT} characters with storable text "
                        f"({json_text_problem(meta) or 'not an object or too large'})", source=source, line=line,
                        field="meta")
    need = {"pairwise": (2, 2), "ranking": (2, MAX_RESPONSES)}.get(task.question_type, (1, MAX_RESPONSES))
    if not need[0] <= len(responses) <= need[1]:
        raise DataError(f"a {task.question_type} item needs {need[0]}..{need[1]} responses, got {len(responses)}",
                        source=source, line=line, field="responses")
    item = Item(task_id=task.id, prompt=prompt, responses=responses, meta=meta,
                external_id=None if rid is None else str(rid))
    if rec.get("gold") is not None:
        gold = rec["gold"]
        # gold answers in a file name responses by their file order: pairwise "a"/"b" (or
        # left/right), other types the same fields as a submission with responses in file order
        if task.question_type == "pairwise" and isinstance(gold, dict) and gold.get("choice") in ("a", "b"):
            gold = {"choice": {"a": "left", "b": "right"}[gold["choice"]]}
        try:
            item.gold_value = canonical_answer(task, responses, gold, list(range(len(responses))))
        except InvalidAnswer as e:
            raise DataError(str(e), source=source, line=line, field="gold") from e
        item.is_gold = True
    return item


def import_records(s: Session, task: Task, records: Iterable[Any], source: str = "<records>",
                   actor: User | None = None, **audit_detail: Any) -> int:
    """Add items from import records (all or nothing: any bad record raises DataError)."""
    items = [item_from_record(task, rec, source, i + 1) for i, rec in enumerate(records)]
    s.add_all(items)
    s.flush()
    audit(s, actor, "task.import", task.name, items=len(items), gold=sum(it.is_gold for it in items),
          source=source[-128:], **audit_detail)
    return len(items)


def read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 (byte {e.start + 1})", source=path, line=n) from None
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg})", source=path, line=n) from e
    return out


# --------------------------------------------------------------------------------------------
# answers


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
        if len(ans.ratings) != k:
            raise InvalidAnswer("value.ratings", f"must hold one rating object per response ({k})")
        out: list[dict] = [{}] * k
        for pos, r in enumerate(ans.ratings):
            if set(r) != set(task.rubric):
                raise InvalidAnswer(f"value.ratings[{pos}]", f"must rate exactly {task.rubric}")
            for dim, v in r.items():
                if not 1 <= v <= task.likert_points:
                    raise InvalidAnswer(f"value.ratings[{pos}].{dim}", f"must be an integer 1..{task.likert_points}")
            out[order[pos]] = dict(r)
        return {"ratings": out}
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


# --------------------------------------------------------------------------------------------
# serving items


def _open_assignment(s: Session, task: Task, user: User) -> Assignment | None:
    return s.scalar(select(Assignment).where(*_open_for(task, user)).order_by(Assignment.id).limit(1))


def _open_for(task: Task, user: User, cutoff=None) -> tuple:
    """Predicates of the user's open assignment: served after `cutoff` (default: now minus the
    assignment timeout) and not completed."""
    cutoff = utcnow() - ASSIGNMENT_TIMEOUT if cutoff is None else cutoff
    return (Assignment.task_id == task.id, Assignment.user_id == user.id, Assignment.completed.is_(False),
            Assignment.served_at > cutoff)


def _expired_open(task: Task, cutoff=None) -> tuple:
    cutoff = utcnow() - ASSIGNMENT_TIMEOUT if cutoff is None else cutoff
    return (Assignment.task_id == task.id, Assignment.completed.is_(False), Assignment.released.is_(False),
            Assignment.served_at <= cutoff)


def _open_and_expired(s: Session, task: Task, user: User) -> tuple[int | None, bool]:
    """(id of the user's open assignment in `task` or None, whether any assignment of the task
    has expired unanswered), in one statement: the start of every /next."""
    mine = select(Assignment.id).where(*_open_for(task, user)).order_by(Assignment.id).limit(1)
    expired = exists().where(*_expired_open(task))
    row = s.execute(select(mine.scalar_subquery(), expired)).one()
    return row[0], bool(row[1])


def _locked_if_free(item_id, overlap, skip_locked: bool):
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
    rows = s.execute(select(Assignment.id, Assignment.item_id).where(*_expired_open(task))
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


def _take_slot_returning(s: Session, task: Task, item_id: int, gold: bool, lock: bool = False,
                         wait: bool = False) -> Item | None:
    """`take_slot` that also reads the item back (UPDATE ... RETURNING: one round trip for the
    claim and the item to show). With `lock` (PostgreSQL), the row is locked first in the same
    statement (`_locked_if_free`): an item another transaction holds is skipped, unless `wait`."""
    target = Item.id == item_id
    if lock:
        target = Item.id == _locked_if_free(item_id, None if gold else task.overlap, skip_locked=not wait)
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
    item = None
    if gold is None:  # drawn here unless the caller drew it already
        gold = task.gold_rate > 0 and rng.random() < task.gold_rate
    if gold:
        golds = candidate_ids(s, task, user, gold=True, limit=64)
        item = _take_slot_returning(s, task, rng.choice(golds), gold=True) if golds else None
    if item is None:
        uncertain = task.selection == "uncertainty" and scorer is not None
        # candidates are read without locks; claiming one locks it and takes a slot only if one
        # is still free. When every candidate was taken meanwhile, read the candidates again.
        for attempt in range(CLAIM_ROUNDS):
            pool = candidate_ids(s, task, user, gold=False, limit=UNCERTAINTY_POOL if uncertain else 32)
            if not pool:
                break
            first = _choose(s, pool, task, rng, scorer)
            item = _claim(s, task, user, [first] + [i for i in pool if i != first],
                          wait=attempt == CLAIM_ROUNDS - 1)
            if item is not None:
                break
        if item is None:  # no real item is left: gold items (no overlap limit) keep coming
            golds = candidate_ids(s, task, user, gold=True, limit=64)
            if not golds:
                return None
            item = _take_slot_returning(s, task, rng.choice(golds), gold=True)
            if item is None:  # deleted meanwhile
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
        again = _open_assignment(s, task, user)
        return None if again is None else (s.get(Item, again.item_id), again)
    return item, assignment


def _claim(s: Session, task: Task, user: User, ordered: list[int], wait: bool = False) -> Item | None:
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
        from rlhfkit.feedback.active import most_uncertain

        if hasattr(scorer, "for_task"):  # a per-task scorer refit on the task's own labels
            scorer = scorer.for_task(s, task)
        if scorer is not None:
            rows = s.execute(select(Item.id, Item.prompt, Item.responses).where(Item.id.in_(pool))).all()
            return rows[most_uncertain(scorer, [(r.prompt, r.responses) for r in rows])].id
    # the pool lists items others already started first; drawing among its head finishes
    # overlapping items before opening new ones, while annotators still get different items
    return rng.choice(pool)


# --------------------------------------------------------------------------------------------
# labels


_LABEL_BY_KEY, _LABEL_DONE = aliased(Label, name="label_by_key"), aliased(Label, name="label_done")
# stand-ins for a task and a user in statements built once with bound parameters (below); the
# parameter names start with "b_", since an UPDATE or INSERT given a parameter named like a
# column of its table would also set that column
_TASK = SimpleNamespace(id=bindparam("b_task_id", type_=Integer), overlap=bindparam("b_overlap", type_=Integer))
_USER = SimpleNamespace(id=bindparam("b_user_id", type_=Integer))


@functools.cache
def _submit_lookup_statement():
    """Item `item_id`, `user_id`'s assignment of it, their label stored under idempotency key `key`
    and the id of their label of the item, in one statement (built once, bound parameters)."""
    by_key, done, user_id = _LABEL_BY_KEY, _LABEL_DONE, _USER.id
    return (select(Item, Assignment, by_key, done.id).select_from(Item)
            .outerjoin(Assignment, and_(Assignment.item_id == Item.id, Assignment.user_id == user_id))
            .outerjoin(by_key, and_(by_key.user_id == user_id, by_key.idempotency_key == bindparam("b_key", type_=String)))
            .outerjoin(done, and_(done.item_id == Item.id, done.user_id == user_id))
            .where(Item.id == bindparam("b_item_id", type_=Integer)))


def _submit_lookup(s: Session, task: Task, user: User, item_id: int,
                   key: str) -> tuple[Item | None, Assignment | None, Label | None]:
    """(item, the user's assignment of it, the label stored under `key` when this is a retry),
    checked: a key used for another item, an item outside the task, an item not served to the
    user or already labelled by them raise."""
    if not isinstance(key, str) or not re.fullmatch(r"[!-~]{8,64}", key):
        raise InvalidAnswer("idempotency_key", "must be 8-64 printable ASCII characters (e.g. a UUID)")
    # one statement reads the item, the user's assignment of it, a label already stored under
    # this key (a retry), and whether the user already labelled the item
    row = s.execute(_submit_lookup_statement(), {"b_item_id": item_id, "b_user_id": user.id, "b_key": key}).first()
    if row is None:  # no such item; a retry's key still wins (it names the item it was for)
        existing = s.scalar(select(Label).where(Label.user_id == user.id, Label.idempotency_key == key))
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


def skip_item(s: Session, task: Task, user: User, item_id: int) -> None:
    """Pass on an item served to `user`: the assignment ends unanswered (skipped), its slot goes
    back to the item for someone else, and the item is not served to `user` again."""
    mine = and_(Assignment.item_id == item_id, Assignment.user_id == user.id, Assignment.task_id == task.id,
                Assignment.completed.is_(False))
    held = s.execute(update(Assignment).where(mine, Assignment.released.is_(False))
                     .values(completed=True, released=True, skipped=True)
                     .execution_options(synchronize_session=False)).rowcount
    if held:
        s.execute(update(Item).where(Item.id == item_id).values(slots_taken=Item.slots_taken - 1)
                  .execution_options(synchronize_session=False))
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
    item, assignment, existing = _submit_lookup(s, task, user, item_id, key)
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
        existing = s.scalar(select(Label).where(Label.user_id == user.id, Label.idempotency_key == key))
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


def is_admin(user: User) -> bool:
    return user.role in ("owner", "admin")


def can_see_task(s: Session, task: Task, user: User) -> bool:
    """Admins see every task; annotators the open ones and those they are members of."""
    if is_admin(user) or task.open_to_all:
        return True
    return s.scalar(select(TaskMember.id).where(TaskMember.task_id == task.id, TaskMember.user_id == user.id)) is not None


def visible_tasks(s: Session, user: User) -> list[Task]:
    q = select(Task).order_by(Task.id)
    if not is_admin(user):
        member = select(TaskMember.task_id).where(TaskMember.user_id == user.id)
        q = q.where(or_(Task.open_to_all.is_(True), Task.id.in_(member)))
    return list(s.scalars(q))


def add_member(s: Session, task: Task, user: User, actor: User | None = None) -> None:
    if s.scalar(select(TaskMember.id).where(TaskMember.task_id == task.id, TaskMember.user_id == user.id)) is None:
        s.add(TaskMember(task_id=task.id, user_id=user.id))
        audit(s, actor, "task.member.add", task.name, user=user.username)


def close_task(s: Session, task: Task, actor: User | None = None) -> None:
    """Take a task away from annotators: no longer open to all and without members, so /next
    serves none of its items. Its labels, review and export stay; an admin can open it again."""
    task.open_to_all = False
    s.execute(delete(TaskMember).where(TaskMember.task_id == task.id))
    audit(s, actor, "task.close", task.name)


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


def progress(s: Session, task: Task, user: User | None = None) -> dict:
    """Labels done (by `user`, or in total) and items still open for this task."""
    total_items = s.scalar(select(func.count()).select_from(Item).where(Item.task_id == task.id, Item.is_gold.is_(False))) or 0
    all_labels = s.scalar(select(func.count()).select_from(Label).where(Label.task_id == task.id)) or 0
    out = {"items": total_items, "labels": all_labels, "target_labels": total_items * task.overlap}
    if user is not None:
        out["mine"] = s.scalar(select(func.count()).select_from(Label).where(
            and_(Label.task_id == task.id, Label.user_id == user.id))) or 0
    return out


# --------------------------------------------------------------------------------------------
# single-statement paths (PostgreSQL, autocommit)
#
# On PostgreSQL every statement is a round trip to another process, and a transaction adds two
# (BEGIN, COMMIT). The common /next and submit are therefore also written as a few statements
# that are each atomic on their own, run in autocommit: /next reads its state in one SELECT and
# claims an item and records the assignment in one statement (UPDATE ... RETURNING inside a
# WITH, feeding the INSERT); submit marks the assignment answered and inserts the label in one
# statement. Whatever they do not cover (an open or expired assignment, gold items, uncertainty
# selection, a contended or finished task, an expired submit, a concurrent duplicate) raises
# NeedsTransaction before anything is written, and the caller runs the transactional path above.


class NeedsTransaction(Exception):
    """The single-statement path does not cover this request; run the transactional one.
    `gold` carries the gold-item draw already made (so the random stream is drawn once)."""

    def __init__(self, reason: str, gold: bool | None = None):
        super().__init__(reason)
        self.gold = gold


# The statements of the PostgreSQL fast path are built once per process with bound parameters:
# SQLAlchemy's compiled cache already spares compiling a statement built anew, but building one of
# CTEs and subqueries in Python costs about 0.3 ms, on every request.


@functools.cache
def _fast_state_statement(limit: int = 32):
    """The user's open assignment, whether any assignment of the task expired, and up to `limit`
    candidates with their slots taken and response counts, in one SELECT (parameters b_task_id,
    b_user_id, b_overlap, b_cutoff)."""
    cutoff = bindparam("b_cutoff", type_=DateTime)
    cand = candidate_query(_TASK, _USER, gold=False, limit=limit).add_columns(
        Item.slots_taken, func.json_array_length(Item.responses).label("k")).subquery("cand")
    mine = select(Assignment.id).where(*_open_for(_TASK, _USER, cutoff)).order_by(Assignment.id).limit(1)
    probe = select(mine.scalar_subquery().label("open_id"),
                   exists().where(*_expired_open(_TASK, cutoff)).label("expired")).subquery("probe")
    return (select(probe.c.open_id, probe.c.expired, cand.c.id, cand.c.k)
            .select_from(probe.outerjoin(cand, true()))
            .order_by(cand.c.slots_taken.desc(), cand.c.id))


@functools.cache
def _claim_statement():
    """Take one slot of item `item_id` (skipping it when another request holds its row) and
    insert the assignment, in one statement; returns the item and the assignment id, or no row."""
    locked = _locked_if_free(bindparam("b_item_id", type_=Integer), _TASK.overlap, skip_locked=True)
    claimed = (update(Item).where(Item.id == locked, Item.slots_taken < _TASK.overlap)
               .values(slots_taken=Item.slots_taken + 1).returning(Item.id).cte("claimed"))
    added = (insert(Assignment).from_select(
        ["item_id", "user_id", "task_id", "display_order", "served_at", "completed", "released", "skipped"],
        select(claimed.c.id, _USER.id, _TASK.id, bindparam("b_order", type_=JSON), bindparam("b_now", type_=DateTime),
               false(), false(), false()))
        .returning(Assignment.id, Assignment.item_id).cte("added"))
    return select(Item, added.c.id).join(added, added.c.item_id == Item.id)


_LABEL_FIELDS = ("item_id", "user_id", "task_id", "idempotency_key", "value", "display_order", "duration_ms",
                 "created_at", "version", "review_status", "strength", "comment")


@functools.cache
def _label_insert_statement():
    """Complete assignment `assignment_id` if it is still open and insert the label, in one
    statement; returns the label id, or none when the assignment was no longer open."""
    done = (update(Assignment).where(Assignment.id == bindparam("b_assignment_id", type_=Integer),
                                     Assignment.completed.is_(False), Assignment.released.is_(False))
            .values(completed=True).returning(Assignment.id).cte("done"))
    table = Label.__table__  # the Core table: an ORM insert given parameters would be a bulk insert
    row = select(*[bindparam(f"b_{k}", type_=table.c[k].type) for k in _LABEL_FIELDS]).select_from(done)
    return insert(table).from_select(list(_LABEL_FIELDS), row).returning(table.c.id)


def next_assignment_autocommit(s: Session, task: Task, user: User,
                               rng: random.Random) -> tuple[Item, Assignment] | None:
    """`next_assignment` for the common case on PostgreSQL in autocommit: two statements."""
    gold = task.gold_rate > 0 and rng.random() < task.gold_rate
    if gold or task.selection != "random":
        raise NeedsTransaction("gold item or uncertainty selection", gold)
    rows = s.execute(_fast_state_statement(), {"b_task_id": task.id, "b_user_id": user.id, "b_overlap": task.overlap,
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
            got = s.execute(_claim_statement(), {"b_item_id": item_id, "b_overlap": task.overlap, "b_user_id": user.id,
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


def submit_label_autocommit(s: Session, task: Task, user: User, item_id: int, raw: Any,
                            key: str, strength: str | None = None, comment: str | None = None) -> tuple[Label, bool]:
    """`submit_label` on PostgreSQL in autocommit: two statements for a new label (the lookup,
    then the assignment UPDATE and label INSERT as one statement), one for a replay."""
    item, assignment, existing = _submit_lookup(s, task, user, item_id, key)
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
        label_id = s.scalar(_label_insert_statement(), {**params, "b_assignment_id": assignment.id})
    except IntegrityError:  # a concurrent retry of the same submission won the race
        s.rollback()
        raise NeedsTransaction("concurrent submit of the same label") from None
    if label_id is None:  # expired and released meanwhile, or answered by a concurrent request
        raise NeedsTransaction("the assignment changed meanwhile")
    return Label(id=label_id, reviewed_by=None, reviewed_at=None, review_reason=None, **fields), False
