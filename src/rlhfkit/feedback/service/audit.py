"""The audit log: every change to accounts, tasks and labels, with the client's address."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhfkit.feedback.models import AuditEvent, User

# the client address of the request being served, set by the app's ClientAddress middleware and
# stored with every audit event; None outside a request (the CLI)
CLIENT_ADDRESS: ContextVar[str | None] = ContextVar("rlhfkit_client_address", default=None)


def audit(s: Session, actor: User | None, action: str, target: str = "", **detail: Any) -> None:
    client = CLIENT_ADDRESS.get()
    s.add(AuditEvent(actor_id=actor.id if actor else None, action=action, target=target[:128], detail=detail,
                     client=None if client is None else client[:64]))


def recent_events(s: Session, limit: int = 200) -> list[tuple[AuditEvent, str | None]]:
    """The newest `limit` events, newest first, each with its actor's user name (None: the CLI)."""
    return list(s.execute(select(AuditEvent, User.username).outerjoin(User, User.id == AuditEvent.actor_id)
                          .order_by(AuditEvent.id.desc()).limit(limit)).tuples())
