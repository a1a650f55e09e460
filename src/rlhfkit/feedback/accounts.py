"""Account state changes shared by the web routes and the CLI: roles (never without an owner),
disabling (which ends every credential for good), revoking credentials after a password
change, and how long a token may live."""

from __future__ import annotations

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from rlhfkit.feedback.models import ROLES, ApiToken, LoginSession, User
from rlhfkit.feedback.service import Conflict, InvalidAnswer, audit

# A leaked token of an annotator or admin stops working within a year at most, as GitHub's
# fine-grained personal access tokens; owners may still issue non-expiring ones for automation.
MAX_TOKEN_DAYS = 365


def token_days(user: User, expires_days: float | None) -> float | None:
    """The lifetime of a new token of `user` (None: never expires), refused beyond the maximum."""
    if user.role == "owner":
        return expires_days
    if expires_days is None or expires_days > MAX_TOKEN_DAYS:
        raise InvalidAnswer("expires_days", f"tokens of {user.role}s expire within {MAX_TOKEN_DAYS} days; "
                                            f"give a number of days up to {MAX_TOKEN_DAYS}")
    return expires_days


def _other_active_owners(s: Session, user: User) -> int:
    # on PostgreSQL the owners' rows are locked, so two owners demoting each other at once
    # cannot both see the other one still there
    ids = select(User.id).where(User.role == "owner", User.active.is_(True), User.id != user.id)
    if s.get_bind().dialect.name == "postgresql":
        return len(s.scalars(ids.with_for_update()).all())
    return s.scalar(select(func.count()).select_from(ids.subquery())) or 0


def _keep_an_owner(s: Session, user: User, what: str) -> None:
    if user.role == "owner" and user.active and not _other_active_owners(s, user):
        raise Conflict(f"{user.username!r} is the last active owner and cannot be {what}; make another owner first")


def set_role(s: Session, user: User, role: str, actor: User | None = None, **detail) -> str:
    """Change `user`'s role (audited); returns the old one. The last active owner keeps theirs."""
    if role not in ROLES:
        raise InvalidAnswer("role", f"must be one of {ROLES}")
    old = user.role
    if role != "owner":
        _keep_an_owner(s, user, "demoted")
    audit(s, actor, "user.role", user.username, old=old, new=role, **detail)
    user.role = role
    return old


def set_active(s: Session, user: User, active: bool, actor: User | None = None, **detail) -> None:
    """Disable or enable `user` (audited). Disabling revokes every token and ends every browser
    session, so enabling the account later gives back none of them: the user logs in again."""
    if not active:
        _keep_an_owner(s, user, "disabled")
        revoke_credentials(s, user)
    user.active = active
    audit(s, actor, f"user.{'enable' if active else 'disable'}", user.username, **detail)


def revoke_credentials(s: Session, user: User, keep_token: str | None = None, keep_session: str | None = None) -> int:
    """Revoke all of `user`'s API tokens and end their browser sessions, except the token and
    the session with the given digests (the credential making a password change); returns the
    number of tokens revoked."""
    tokens = update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked.is_(False))
    if keep_token:
        tokens = tokens.where(ApiToken.token_hash != keep_token)
    n = s.execute(tokens.values(revoked=True).execution_options(synchronize_session=False)).rowcount
    sessions = delete(LoginSession).where(LoginSession.user_id == user.id)
    if keep_session:
        sessions = sessions.where(LoginSession.session_hash != keep_session)
    s.execute(sessions.execution_options(synchronize_session=False))
    return n
