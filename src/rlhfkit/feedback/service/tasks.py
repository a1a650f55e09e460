"""Tasks: creating them, who sees them (open to all, members, admins), closing them, progress."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session, make_transient_to_detached

from rlhfkit.feedback.models import QUESTION_TYPES, SELECTIONS, Item, Label, Task, TaskMember, User
from rlhfkit.feedback.schemas import MAX_TEXT, name_problem, text_problem
from rlhfkit.feedback.service.accounts import is_admin
from rlhfkit.feedback.service.audit import audit
from rlhfkit.feedback.service.errors import Conflict, InvalidAnswer

DEFAULT_RUBRIC = ["helpful", "harmless", "honest"]


def _check_settings(name: str, question_type: str, overlap: int, instructions: str, rubric, likert_points: int,
                    selection: str, gold_rate: float) -> None:
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


def create_task(s: Session, name: str, question_type: str, overlap: int = 1, instructions: str = "",
                rubric: Sequence[str] | None = None, likert_points: int = 5, randomize_order: bool = True,
                selection: str = "random", gold_rate: float = 0.1, open_to_all: bool = True,
                actor: User | None = None, **audit_detail: Any) -> Task:
    _check_settings(name, question_type, overlap, instructions, rubric, likert_points, selection, gold_rate)
    if task_by_name(s, name) is not None:
        raise Conflict(f"task {name!r} already exists")
    task = Task(name=name, question_type=question_type, overlap=overlap, instructions=instructions,
                rubric=list(rubric or (DEFAULT_RUBRIC if question_type == "rating" else [])),
                likert_points=likert_points, randomize_order=randomize_order, selection=selection,
                gold_rate=gold_rate, open_to_all=open_to_all)
    s.add(task)
    s.flush()
    audit(s, actor, "task.create", name, question_type=question_type, open_to_all=open_to_all, **audit_detail)
    return task


def get_or_create_task(s: Session, name: str, question_type: str, **settings: Any) -> Task:
    """The task called `name`, created with `settings` if there is none; a task of that name
    holding another question type is refused (its labels would not fit the new items)."""
    task = task_by_name(s, name)
    if task is None:
        return create_task(s, name, question_type, **settings)
    if task.question_type != question_type:
        raise ValueError(f"task {name!r} exists with type {task.question_type}, not {question_type}")
    return task


def task_by_name(s: Session, name: str) -> Task | None:
    return s.scalar(select(Task).where(Task.name == name))


def get_task(s: Session, task_id: int) -> Task:
    """Task `task_id`; LookupError when there is none."""
    task = s.get(Task, task_id)
    if task is None:
        raise LookupError(f"task {task_id} does not exist")
    return task


def all_tasks(s: Session) -> list[Task]:
    return list(s.scalars(select(Task).order_by(Task.id)))


def task_settings(s: Session, task_id: int) -> Task | None:
    """A detached copy of task `task_id` (in no session), read as plain columns; None if missing."""
    row = s.execute(select(*Task.__table__.columns).where(Task.id == task_id)).first()
    if row is None:
        return None
    task = Task(**row._mapping)
    make_transient_to_detached(task)
    return task


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


def progress(s: Session, task: Task, user: User | None = None) -> dict:
    """Labels done (by `user`, or in total) and items still open for this task."""
    total_items = s.scalar(select(func.count()).select_from(Item).where(Item.task_id == task.id, Item.is_gold.is_(False))) or 0
    all_labels = s.scalar(select(func.count()).select_from(Label).where(Label.task_id == task.id)) or 0
    out = {"items": total_items, "labels": all_labels, "target_labels": total_items * task.overlap}
    if user is not None:
        out["mine"] = s.scalar(select(func.count()).select_from(Label).where(
            and_(Label.task_id == task.id, Label.user_id == user.id))) or 0
    return out
