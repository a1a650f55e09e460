"""Accounts: users and their names, passwords, roles (never without an owner), disabling (which
ends every credential for good), API tokens, browser sessions, and the lookup of the caller's
credential on every request. Shared by the web routes and the CLI."""

from __future__ import annotations

import functools
import unicodedata

from sqlalchemy import Connection, String, bindparam, delete, func, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached
from zxcvbn import zxcvbn

from rlhfkit.feedback.models import ROLES, ApiToken, LoginSession, User
from rlhfkit.feedback.names import lookalike_key
from rlhfkit.feedback.schemas import name_problem, text_problem
from rlhfkit.feedback.security import (
    MIN_PASSWORD,
    create_api_token,
    create_login_session,
    digest,
    hash_password,
)
from rlhfkit.feedback.service.audit import audit
from rlhfkit.feedback.service.errors import Conflict, Forbidden, InvalidAnswer

# A leaked token of an annotator or admin stops working within a year at most, as GitHub's
# fine-grained personal access tokens; owners may still issue non-expiring ones for automation.
MAX_TOKEN_DAYS = 365


# --------------------------------------------------------------------------------------------
# users


def username_key(name: str) -> str:
    """The identity of a user name: NFKC-normalised and case-folded (Unicode TR #36 / #31
    advice), so 'Admin', 'ADMIN' and full-width 'ａｄｍｉｎ' are one account."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def find_user(s: Session, name: str) -> User | None:
    if not isinstance(name, str) or name_problem(name) or len(name) > 64:
        return None
    return s.scalar(select(User).where(User.username_key == username_key(name)))


def named_user(s: Session, name: str) -> User:
    """The account called `name`; LookupError when there is none."""
    user = find_user(s, name)
    if user is None:
        raise LookupError(f"user {name!r} not found")
    return user


def all_users(s: Session) -> list[User]:
    return list(s.scalars(select(User).order_by(User.id)))


def is_admin(user: User) -> bool:
    return user.role in ("owner", "admin")


def check_password_policy(password: str, username: str = "") -> None:
    """At least 8 characters and not guessable: zxcvbn (Dropbox's estimator, with its lists of
    common passwords, names and keyboard patterns) must score it 2 or more out of 4."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise InvalidAnswer("password", f"must have at least {MIN_PASSWORD} characters")
    if text_problem(password):
        raise InvalidAnswer("password", text_problem(password))
    result = zxcvbn(password[:100], user_inputs=[username] if username else [])
    if result["score"] < 2:
        hint = result["feedback"].get("warning") or "it is a common or easily guessed password"
        raise InvalidAnswer("password", f"too easy to guess ({hint.rstrip('.')}); choose a longer, less common one")


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


def change_password(s: Session, user: User, old_hash: str, new_hash: str, keep_token: str | None = None,
                    keep_session: str | None = None) -> int:
    """Store `new_hash` as `user`'s password, provided it is still `old_hash` (the one checked
    before the transaction), and end every other credential; returns the tokens revoked."""
    s.refresh(user)
    if user.password_hash != old_hash:  # changed by a concurrent request since the check
        raise Conflict("the password was changed meanwhile; log in again with the new one")
    user.password_hash = new_hash
    # every other credential ends (browser sessions, API tokens including /api/login's): whoever
    # knew the old password or held a token is logged out; the credential that made the change stays
    revoked = revoke_credentials(s, user, keep_token=keep_token, keep_session=keep_session)
    audit(s, user, "user.password", user.username, tokens_revoked=revoked)
    return revoked


# --------------------------------------------------------------------------------------------
# API tokens and browser sessions


def token_days(user: User, expires_days: float | None) -> float | None:
    """The lifetime of a new token of `user` (None: never expires), refused beyond the maximum."""
    if user.role == "owner":
        return expires_days
    if expires_days is None or expires_days > MAX_TOKEN_DAYS:
        raise InvalidAnswer("expires_days", f"tokens of {user.role}s expire within {MAX_TOKEN_DAYS} days; "
                                            f"give a number of days up to {MAX_TOKEN_DAYS}")
    return expires_days


def issue_token(s: Session, user: User, name: str, days: float | None, actor: User | None = None,
                **detail) -> str:
    """A new API token of `user` (audited as issued by `actor`); returns its secret, shown once."""
    audit(s, actor, "token.issue", user.username, name=name, **detail)
    return create_api_token(s, user, name, days)


def issue_login_token(s: Session, user_id: int, name: str, days: float) -> str:
    """The token /api/login hands out after a successful password check."""
    user = s.get(User, user_id)
    return issue_token(s, user, name, days, actor=user, via="login")


def tokens_of(s: Session, user: User) -> list[ApiToken]:
    return list(s.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))


def revoke_token(s: Session, token_id: int, actor: User | None = None, **detail) -> tuple[ApiToken, bool]:
    """Revoke token `token_id`; returns (token, whether it was revoked already). With an `actor`
    (a web request): annotators revoke their own tokens, admins those of annotators too, and
    only an owner those of admins and owners; a token out of reach is reported as missing."""
    tok = s.get(ApiToken, token_id)
    if tok is None or (actor is not None and tok.user_id != actor.id and not is_admin(actor)):
        raise LookupError(f"token {token_id} not found")
    if actor is not None and tok.user_id != actor.id and tok.user.role != "annotator" and actor.role != "owner":
        raise Forbidden("only an owner can manage the tokens of admins and owners")
    already = tok.revoked
    tok.revoked = True
    if actor is not None or not already:
        audit(s, actor, "token.revoke", tok.user.username, token_id=tok.id, name=tok.name, **detail)
    return tok, already


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


def start_login_session(s: Session, user_id: int) -> str:
    """A new browser session of the user; returns the cookie's secret."""
    secret, _ = create_login_session(s, s.get(User, user_id))
    return secret


def end_login_session(s: Session, cookie: str) -> None:
    """Log out: delete the browser session whose cookie is `cookie` (if it still exists)."""
    sess = s.scalar(select(LoginSession).where(LoginSession.session_hash == digest(cookie)))
    if sess is not None:
        s.delete(sess)


# --------------------------------------------------------------------------------------------
# the caller's credential, on every request


@functools.cache
def _principal_statements():
    """The token and the browser-session lookups, each one SELECT of plain columns (the
    credential's checks and the user's columns), built once with a bound digest: loading them
    as ORM entities cost more Python than the database round trip itself."""
    user_columns = [attr.columns[0].label(f"u_{attr.key}") for attr in sa_inspect(User).column_attrs]
    digest_param = bindparam("b_digest", type_=String)
    by_token = (select(ApiToken.revoked, ApiToken.expires_at, *user_columns)
                .join_from(ApiToken, User, User.id == ApiToken.user_id).where(ApiToken.token_hash == digest_param))
    by_session = (select(LoginSession.expires_at, LoginSession.csrf_token, *user_columns)
                  .join_from(LoginSession, User, User.id == LoginSession.user_id)
                  .where(LoginSession.session_hash == digest_param))
    return by_token, by_session


def _user_of(row) -> User:
    """A detached User (in no session, as if loaded and the session closed) from a row of
    `_principal_statements`; sessions take it with `merge(load=False)`, without a query."""
    m = row._mapping
    user = User(**{attr.key: m[f"u_{attr.key}"] for attr in sa_inspect(User).column_attrs})
    make_transient_to_detached(user)
    return user


def token_principal(conn: Session | Connection, token_digest: str):
    """(detached user, revoked, expires_at) of the API token with this digest, or None; one statement."""
    row = conn.execute(_principal_statements()[0], {"b_digest": token_digest}).first()
    return None if row is None else (_user_of(row), row.revoked, row.expires_at)


def session_principal(conn: Session | Connection, session_digest: str):
    """(detached user, csrf token, expires_at) of the browser session with this digest, or None."""
    row = conn.execute(_principal_statements()[1], {"b_digest": session_digest}).first()
    return None if row is None else (_user_of(row), row.csrf_token, row.expires_at)


def attach(s: Session, user: User) -> User:
    """`user` (detached, from the lookup) in session `s`, without a query."""
    return s.merge(user, load=False)
