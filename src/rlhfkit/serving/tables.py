"""Tables of served traffic and of the feedback given on it, in the feedback database.

They share the feedback service's declarative ``Base`` (and so its engine code, SQLite or
PostgreSQL) and are created by its Alembic migration 0007. Feedback refers to a served response
by the ``response_id`` the server returned (``chatcmpl-...``), so an application can attach
feedback with nothing but the id of the response it showed.

Users are stored only as ``user_key``: a keyed hash of the assignment unit (the ``user`` field,
a header or a cookie), so that per-user analysis works without keeping the identifier itself.
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
)
from sqlalchemy.orm import Mapped, mapped_column

from rlhfkit.feedback.models import Base, utcnow

FEEDBACK_KINDS = ("thumbs", "rating", "edit", "comment", "pairwise")


class ServedResponse(Base):
    """One request to the policy server and its response, with what produced it."""

    __tablename__ = "served_responses"
    __table_args__ = (Index("ix_served_experiment_arm", "experiment", "arm", "created_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    experiment: Mapped[str | None] = mapped_column(String(128), nullable=True)
    arm: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str] = mapped_column(String(255), nullable=False)
    user_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    endpoint: Mapped[str] = mapped_column(String(32), nullable=False, default="chat")
    # the request's `messages` (chat) or `prompt` (completions), and one text per choice
    request: Mapped[Any] = mapped_column(JSON, nullable=False)
    response: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[int] = mapped_column(Integer, nullable=False, default=200)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow, index=True)
    # set by the safety monitor after the response was sent (NULL: not scored)
    safety_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    safety_flag: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    safety_judge: Mapped[str | None] = mapped_column(String(128), nullable=True)


class UseFeedback(Base):
    """Feedback from real use on a served response: thumbs, a 1-5 rating, an edit, a comment,
    or a pairwise pick between it and `other_response_id` (regenerate and choose)."""

    __tablename__ = "use_feedback"
    __table_args__ = (UniqueConstraint("response_id", "idempotency_key", name="uq_use_feedback_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[str] = mapped_column(ForeignKey("served_responses.response_id", ondelete="CASCADE"),
                                             nullable=False, index=True)
    other_response_id: Mapped[str | None] = mapped_column(
        ForeignKey("served_responses.response_id", ondelete="CASCADE"), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    # thumbs: {"up": bool}; rating: {"rating": 1..5}; edit: {"text", "choice"}; comment: {"text"};
    # pairwise: {"chosen": response id of the picked one}
    value: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    user_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow, index=True)
