"""Request plumbing shared by the routers: authentication (Bearer tokens and browser sessions),
CSRF, roles, the task cache, client addresses, the login check, and JSON payloads.

The app keeps what requests share in `app.state` (set by `app.create_app`): `db`, `tasks` (the
TaskCache), `login_guard`, `scorer`, `templates`, `secure_cookies` and the random source.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path as FilePath
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlhfkit.feedback.db import Database
from rlhfkit.feedback.guard import LoginGuard
from rlhfkit.feedback.models import ApiToken, Item, Label, Task, User, utcnow
from rlhfkit.feedback.schemas import INT_MAX, name_problem, text_problem
from rlhfkit.feedback.security import digest, same, verify_password
from rlhfkit.feedback.service import accounts, tasks
from rlhfkit.feedback.service.audit import audit

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


def db_of(request: Request) -> Database:
    return request.app.state.db


def rng_of(request: Request) -> random.Random:
    """A random source of its own for this request (drawn from the app's, under its lock)."""
    state = request.app.state
    with state.rng_lock:
        return random.Random(state.rng.getrandbits(64))


# --------------------------------------------------------------------------------------------
# authentication


def lookup_principal(request: Request, conn) -> tuple[User, str | None]:
    """(user, csrf token or None for Bearer auth) from the request's credentials, one statement
    on `conn` (a session or a Core connection); the user is detached. Raises AuthError(401)
    when anonymous."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        found = accounts.token_principal(conn, digest(header[7:].strip()))
        if found is None or found[1] or not found[0].active or (found[2] is not None and found[2] <= utcnow()):
            raise AuthError(401, "invalid, expired or revoked API token")
        return found[0], None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        found = accounts.session_principal(conn, digest(cookie))
        if found is not None and found[2] > utcnow() and found[0].active:
            return found[0], found[1]
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
    return accounts.attach(s, known[0]), known[1]


def principal(request: Request) -> None:
    """The route dependency that authenticates every request of a protected route."""
    with db_of(request).lookup_connection() as conn:  # one row, without an ORM session
        request.state.principal = lookup_principal(request, conn)


AUTH = [Depends(principal)]  # `dependencies=AUTH` on every route but login, /healthz and /static


def check_csrf(request: Request, csrf: str | None, form_token: str | None = None) -> None:
    if csrf is None:  # Bearer-authenticated
        return
    if not (same(request.headers.get("x-csrf-token"), csrf) or same(form_token, csrf)):
        raise AuthError(403, "missing or wrong CSRF token")


def require_admin(user: User) -> None:
    if not accounts.is_admin(user):
        raise AuthError(403, "admin role required")


def visible_task(request: Request, s: Session, task_id: int, user: User) -> Task:
    """The task (settings from the app's cache), or 404 when it does not exist or the user is
    not a member (no existence leak)."""
    task = request.app.state.tasks.get(s, task_id)
    if task is None or not tasks.can_see_task(s, task, user):
        raise LookupError(f"task {task_id} does not exist")
    return task


class TaskCache:
    """Task settings by id, read once every `ttl` seconds per process instead of on every /next
    and submit.

    A task's settings do not change once it is created, except `open_to_all`, which closing the
    task clears: the process that closes it drops its copy (`invalidate`), and the other worker
    processes of `serve run --workers N` hold theirs for at most `ttl` seconds more, so a closed
    task stops being served everywhere within `ttl` (5 s). Entries are detached copies (in no
    session), shared read-only between request threads. Membership of closed tasks is not
    cached: it is checked on each request.
    """

    def __init__(self, size: int = 1024, ttl: float = 5.0):
        self.size, self.ttl = size, ttl
        self._tasks: OrderedDict[int, tuple[Task, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, s: Session, task_id: int) -> Task | None:
        now = time.monotonic()
        with self._lock:
            task, read_at = self._tasks.get(task_id, (None, 0.0))
            if task is not None and now - read_at < self.ttl:
                self._tasks.move_to_end(task_id)
                return task
        task = tasks.task_settings(s, task_id)
        if task is None:
            return None
        with self._lock:
            self._tasks[task_id] = (task, now)
            self._tasks.move_to_end(task_id)
            while len(self._tasks) > self.size:
                self._tasks.popitem(last=False)
        return task

    def invalidate(self, task_id: int | None = None) -> None:
        with self._lock:
            if task_id is None:
                self._tasks.clear()
            else:
                self._tasks.pop(task_id, None)


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


# --------------------------------------------------------------------------------------------
# password checks


def _lookup_and_verify(db: Database, username: str, password: str) -> tuple[User | None, bool]:
    """(the account named, whether `password` is theirs); always one Argon2 check (dummy hash
    for unknown, disabled or unstorable names, so timing does not reveal which accounts exist)."""
    user = None
    if not text_problem(password):
        with db.read_session() as s:  # verify outside the write lock: Argon2 is slow
            user = accounts.find_user(s, username)
    stored = user.password_hash if user is not None and user.active else None
    return user, verify_password(stored, password)


def _audit_login(db: Database, username: str, user: User | None, ok: bool, via: str) -> None:
    """Record a login attempt, failed or not (the client address comes with every event)."""
    with db.session() as s:
        target = user.username if user is not None else ("?" if name_problem(username) else username)
        audit(s, user, "login.ok" if ok else "login.failed", target, via=via)


async def check_login(request: Request, username: str, password: str, via: str) -> User | None:
    """The account if `password` is theirs, else None; rate-limited by the app's LoginGuard
    (per address and per account), the Argon2 check in its bounded pool, and audited."""
    guard: LoginGuard = request.app.state.login_guard
    db = db_of(request)
    account = accounts.username_key(username)[:64] if not text_problem(username) else "?"
    ip = client_host(request)
    await guard.admit(ip, account)
    user, ok = await guard.run(_lookup_and_verify, db, username, password)
    if not ok:
        await guard.count_failure(account, ip)
    await run_in_threadpool(_audit_login, db, username, user, ok, via)
    return user if ok else None


async def check_own_password(request: Request, user: User, password: str) -> bool:
    """Whether `password` is `user`'s: the same limits as a login (a wrong one counts as a
    failed login of the account), the Argon2 check in the guard's pool."""
    guard: LoginGuard = request.app.state.login_guard
    account = accounts.username_key(user.username)[:64]
    ip = client_host(request)
    await guard.admit(ip, account)
    if await guard.run(verify_password, user.password_hash, password):
        return True
    await guard.count_failure(account, ip)
    return False


# --------------------------------------------------------------------------------------------
# payloads


def item_payload(task: Task, item: Item, order: list[int]) -> dict:
    return {"task_id": task.id, "item_id": item.id, "question_type": task.question_type, "prompt": item.prompt,
            "responses": [item.responses[i] for i in order], "rubric": task.rubric,
            "likert_points": task.likert_points, "instructions": task.instructions,
            "idempotency_key": uuid.uuid4().hex}


def token_payload(t: ApiToken) -> dict:
    """An API token as listed to its owner or an admin (never its secret)."""
    return {"id": t.id, "name": t.name, "created_at": t.created_at.isoformat() + "Z", "revoked": t.revoked,
            "expires_at": None if t.expires_at is None else t.expires_at.isoformat() + "Z"}


def label_payload(label: Label) -> dict:
    return {"id": label.id, "item_id": label.item_id, "task_id": label.task_id, "value": label.value,
            "display_order": label.display_order, "duration_ms": label.duration_ms,
            "created_at": label.created_at.isoformat() + "Z", "version": label.version,
            "strength": label.strength, "comment": label.comment,
            "review": {"status": label.review_status, "reason": label.review_reason}}


def content_disposition(filename: str) -> str:
    """An attachment header for any file name: an ASCII fallback plus RFC 5987/6266 `filename*`
    with the UTF-8 name percent-encoded (task names may hold any printable Unicode)."""
    fallback = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("_") or "export.jsonl"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
