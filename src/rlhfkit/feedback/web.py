"""Request plumbing shared by the routers: authentication (Bearer tokens and browser sessions),
CSRF, roles, the task cache, client addresses, the login check, and JSON payloads."""

from __future__ import annotations

import functools
import re
import threading
import uuid
from collections import OrderedDict
from pathlib import Path as FilePath
from typing import Annotated
from urllib.parse import quote

from fastapi import FastAPI, Path, Query, Request
from sqlalchemy import Connection, String, bindparam, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session, make_transient_to_detached
from starlette.concurrency import run_in_threadpool

from rlhfkit.feedback import service as svc
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.guard import (
    LoginGuard,
)
from rlhfkit.feedback.models import (
    ApiToken,
    Item,
    Label,
    LoginSession,
    Task,
    User,
    utcnow,
)
from rlhfkit.feedback.schemas import (
    INT_MAX,
    name_problem,
    text_problem,
)
from rlhfkit.feedback.security import (
    digest,
    same,
    verify_password,
)

HERE = FilePath(__file__).resolve().parent
SESSION_COOKIE = "rlhfkit_session"
PRELOGIN_COOKIE = "rlhfkit_prelogin"
LOGIN_TOKEN_DAYS = 30  # tokens from /api/login expire; long-lived ones are issued on purpose
PathId = Annotated[int, Path(ge=1, le=INT_MAX)]
QueryId = Annotated[int | None, Query(ge=1, le=INT_MAX)]
PathName = Annotated[str, Path(min_length=1, max_length=64)]
ReviewStatus = Annotated[str, Query(pattern="^(pending|accepted|rejected|all)$")]
Annotator = Annotated[str, Query(max_length=64)]
Page = Annotated[int, Query(ge=1, le=INT_MAX)]


TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected: retry the request


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# authentication


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


def lookup_principal(request: Request, conn: Session | Connection) -> tuple[User, str | None]:
    """(user, csrf token or None for Bearer auth) from the request's credentials, one statement
    on `conn`; the user is detached. Raises AuthError(401) when anonymous."""
    by_token, by_session = _principal_statements()
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        row = conn.execute(by_token, {"b_digest": digest(header[7:].strip())}).first()
        if row is None or row.revoked or not row.u_active or \
                (row.expires_at is not None and row.expires_at <= utcnow()):
            raise AuthError(401, "invalid, expired or revoked API token")
        return _user_of(row), None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        row = conn.execute(by_session, {"b_digest": digest(cookie)}).first()
        if row is not None and row.expires_at > utcnow() and row.u_active:
            return _user_of(row), row.csrf_token
    raise AuthError(401, "authentication required: log in or send 'Authorization: Bearer <token>'")


def authenticate(request: Request, s: Session) -> tuple[User, str | None]:
    """Return (user, csrf token or None for Bearer auth), the user in session `s`; raise
    AuthError(401) when anonymous.

    The route dependency `principal` has usually authenticated the request already (before
    the body was validated, so anonymous callers learn nothing about the API); then the user
    it loaded is attached to the caller's session without another query (one lookup per
    request, not three).
    """
    known = getattr(request.state, "principal", None) or lookup_principal(request, s)
    return s.merge(known[0], load=False), known[1]


def principal_dependency(db: Database):
    def principal(request: Request) -> None:
        with db.lookup_connection() as conn:  # one row, without an ORM session
            request.state.principal = lookup_principal(request, conn)
    return principal


def check_csrf(request: Request, csrf: str | None, form_token: str | None = None) -> None:
    if csrf is None:  # Bearer-authenticated
        return
    if not (same(request.headers.get("x-csrf-token"), csrf) or same(form_token, csrf)):
        raise AuthError(403, "missing or wrong CSRF token")


def require_admin(user: User) -> None:
    if not svc.is_admin(user):
        raise AuthError(403, "admin role required")


def visible_task(s: Session, task_id: int, user: User, tasks: TaskCache | None = None) -> Task:
    """The task, or 404 when it does not exist or the user is not a member (no existence leak)."""
    task = tasks.get(s, task_id) if tasks is not None else s.get(Task, task_id)
    if task is None or not svc.can_see_task(s, task, user):
        raise LookupError(f"task {task_id} does not exist")
    return task


class TaskCache:
    """Task settings by id, read once per process instead of on every /next and submit.

    A task's settings do not change once it is created (no route or command edits them), so a
    copy stays valid; `invalidate` drops one, for code that changes or deletes a task. Entries
    are detached copies (in no session), shared read-only between request threads. Membership
    of closed tasks is not cached: it is checked on each request.
    """

    def __init__(self, size: int = 1024):
        self.size = size
        self._tasks: OrderedDict[int, Task] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, s: Session, task_id: int) -> Task | None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                self._tasks.move_to_end(task_id)
                return task
        row = s.execute(select(*Task.__table__.columns).where(Task.id == task_id)).first()
        if row is None:
            return None
        task = Task(**row._mapping)
        make_transient_to_detached(task)
        with self._lock:
            self._tasks[task_id] = task
            while len(self._tasks) > self.size:
                self._tasks.popitem(last=False)
        return task

    def invalidate(self, task_id: int | None = None) -> None:
        with self._lock:
            if task_id is None:
                self._tasks.clear()
            else:
                self._tasks.pop(task_id, None)



def task_or_404(s: Session, task_id: int) -> Task:
    task = s.get(Task, task_id)
    if task is None:
        raise LookupError(f"task {task_id} does not exist")
    return task


def item_payload(task: Task, item: Item, order: list[int]) -> dict:
    return {"task_id": task.id, "item_id": item.id, "question_type": task.question_type, "prompt": item.prompt,
            "responses": [item.responses[i] for i in order], "rubric": task.rubric,
            "likert_points": task.likert_points, "instructions": task.instructions,
            "idempotency_key": uuid.uuid4().hex}


def label_payload(label: Label) -> dict:
    return {"id": label.id, "item_id": label.item_id, "task_id": label.task_id, "value": label.value,
            "display_order": label.display_order, "duration_ms": label.duration_ms,
            "created_at": label.created_at.isoformat() + "Z", "version": label.version,
            "strength": label.strength, "comment": label.comment,
            "review": {"status": label.review_status, "reason": label.review_reason}}


def credential_digests(request: Request) -> tuple[str | None, str | None]:
    """(token digest, session digest) of the credential this request came with."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return digest(header[7:].strip()), None
    cookie = request.cookies.get(SESSION_COOKIE)
    return None, digest(cookie) if cookie else None


def client_host(request: Request) -> str:
    """The client's address: the peer, or what a trusted proxy forwarded (see `create_app`)."""
    return request.client.host if request.client else "?"


def _lookup_and_verify(db: Database, username: str, password: str) -> tuple[User | None, bool]:
    """(the account named, whether `password` is theirs); always one Argon2 check (dummy hash
    for unknown, disabled or unstorable names, so timing does not reveal which accounts exist)."""
    user = None
    if not text_problem(password):
        with db.read_session() as s:  # verify outside the write lock: Argon2 is slow
            user = svc.find_user(s, username)
    stored = user.password_hash if user is not None and user.active else None
    return user, verify_password(stored, password)


def _audit_login(db: Database, username: str, user: User | None, ok: bool, via: str) -> None:
    """Record a login attempt, failed or not (the client address comes with every event)."""
    with db.session() as s:
        target = user.username if user is not None else ("?" if name_problem(username) else username)
        svc.audit(s, user, "login.ok" if ok else "login.failed", target, via=via)


def login_checker(app: FastAPI, db: Database):
    async def check_login(request: Request, username: str, password: str, via: str) -> User | None:
        guard: LoginGuard = app.state.login_guard
        account = svc.username_key(username)[:64] if not text_problem(username) else "?"
        ip = client_host(request)
        await guard.admit(ip, account)
        user, ok = await guard.run(_lookup_and_verify, db, username, password)
        if not ok:
            guard.failed(account, ip)
        await run_in_threadpool(_audit_login, db, username, user, ok, via)
        return user if ok else None
    return check_login


def content_disposition(filename: str) -> str:
    """An attachment header for any file name: an ASCII fallback plus RFC 5987/6266 `filename*`
    with the UTF-8 name percent-encoded (task names may hold any printable Unicode)."""
    fallback = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("_") or "export.jsonl"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
