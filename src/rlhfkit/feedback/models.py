"""Database schema of the feedback service (SQLAlchemy 2 declarative models).

The schema is created and upgraded only through the Alembic migrations shipped in
``rlhfkit/feedback/migrations``; a test checks that the migrations and these models agree.

Labels are stored in the *original* response order of their item (index 0 is the first
response of the imported record), whatever order the annotator saw; the order shown is kept
in ``display_order`` so position bias can be measured.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

QUESTION_TYPES = ("pairwise", "ranking", "rating", "thumbs", "critique", "edit")
# owner: everything, including making admins; admin: tasks, annotators, review, export;
# annotator: labels the tasks open to them
ROLES = ("owner", "admin", "annotator")
REVIEW_STATES = ("pending", "accepted", "rejected")
# how much better the chosen response of a pairwise answer is, as the ranking UIs of Argilla
# and Label Studio ask; exported with TRL's reward `margin` (Llama 2's scale, Touvron et al. 2023)
STRENGTHS = {"slightly": 1 / 3, "clearly": 2 / 3, "much": 1.0}
SELECTIONS = ("random", "uncertainty")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("username_key", name="uq_users_username_key"),
                      Index("uq_users_lookalike_key", "lookalike_key", unique=True))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    # NFKC + case folding of the name: 'Admin' and full-width 'ａｄｍｉｎ' are one account
    username_key: Mapped[str] = mapped_column(String(64), nullable=False)
    # equal for names that look alike (Cyrillic 'а' and Latin 'a', 'ı' and 'i': names.py); NULL
    # only for accounts that already looked like an older one when the column was added
    lookalike_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="annotator")
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class ApiToken(Base):
    """Bearer tokens for scripts; only a SHA-256 digest of the secret is stored."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    revoked: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    user: Mapped[User] = relationship()


class LoginSession(Base):
    """Browser login sessions (cookie holds the secret; the table holds its digest)."""

    __tablename__ = "login_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    csrf_token: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)
    user: Mapped[User] = relationship()


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    question_type: Mapped[str] = mapped_column(String(16), nullable=False)
    instructions: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # rubric dimensions for Likert ratings; scale is 1..likert_points
    rubric: Mapped[list[Any]] = mapped_column(JSON, nullable=False, default=list)
    likert_points: Mapped[int] = mapped_column(Integer, nullable=False, default=5)
    overlap: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    randomize_order: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    selection: Mapped[str] = mapped_column(String(16), nullable=False, default="random")
    # share of served items that are gold (honeypot) items, while unseen gold items remain
    gold_rate: Mapped[float] = mapped_column(Float, nullable=False, default=0.1)
    # False: only annotators added as members (task_members) see and label the task
    open_to_all: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class TaskMember(Base):
    """An annotator allowed on a task that is not open to all."""

    __tablename__ = "task_members"
    __table_args__ = (UniqueConstraint("task_id", "user_id", name="uq_task_member"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, index=True)
    external_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    responses: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    is_gold: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # the expected answer of a gold item, in the canonical (original-order) label form
    gold_value: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    # assignments of this item that hold an overlap slot (completed, or open and not yet
    # released by the expiry sweep); kept in the transaction that changes them
    slots_taken: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")


# serving reads a task's items with free slots, fullest first, in this index's order
Index("ix_items_open_slots", Item.task_id, Item.is_gold, Item.slots_taken.desc(), Item.id)


class Assignment(Base):
    """An item served to an annotator: the order shown and when it was shown."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "user_id", name="uq_assignment_item_user"),
        Index("ix_assignments_user_open", "user_id", "task_id", "completed"),
        Index("ix_assignments_expiry", "task_id", "completed", "released", "served_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), nullable=False, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, index=True)
    display_order: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    served_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    completed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # set when the assignment expired unanswered and its slot went back to the item
    released: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    # the annotator passed on the item (completed and released: it goes to someone else)
    skipped: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("item_id", "user_id", name="uq_label_item_user"),
        UniqueConstraint("user_id", "idempotency_key", name="uq_label_user_key"),
        Index("ix_labels_task_user", "task_id", "user_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), nullable=False, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False)
    idempotency_key: Mapped[str] = mapped_column(String(64), nullable=False)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    display_order: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    # measured by the server from serve to submit (clients' own timings are not trusted)
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    # corrections: `value` is the latest version; earlier ones are kept in label_versions
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    review_status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    reviewed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    review_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # pairwise: how much better the chosen response is (a key of STRENGTHS); any type: a note
    strength: Mapped[str | None] = mapped_column(String(16), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)


class LabelVersion(Base):
    """A superseded value of a label (the annotator corrected it)."""

    __tablename__ = "label_versions"
    __table_args__ = (UniqueConstraint("label_id", "version", name="uq_label_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)  # when it was superseded


class AuditEvent(Base):
    """Who did what to accounts, tokens, roles, reviews and exports (readable by admins)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow, index=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    target: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    # the request's client address (after the trusted-proxy rule); None from the CLI
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)
