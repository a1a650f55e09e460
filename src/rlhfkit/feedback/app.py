"""The FastAPI application: JSON API under /api, server-rendered pages for browsers.

Authentication on every route except /login, /healthz and /static: a Bearer API token
(scripts) or a session cookie (browsers). Cookie-authenticated writes must carry the
session's CSRF token (form field `csrf_token` or header `X-CSRF-Token`); Bearer requests
need none because browsers never attach them on their own. Every page is rendered with
Jinja2 autoescaping and sent with a Content-Security-Policy that allows only this origin's
scripts, so prompt and response text (untrusted) can never run.

Each write commits before the response is sent: an acknowledged label is on disk.
"""

from __future__ import annotations

import functools
import json
import random
import re
import secrets
import threading
import uuid
from collections import OrderedDict
from pathlib import Path as FilePath
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import Connection, String, bindparam, select
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session, make_transient_to_detached
from starlette.concurrency import run_in_threadpool
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from rlhfkit.errors import DataError
from rlhfkit.feedback import accounts
from rlhfkit.feedback import review as rv
from rlhfkit.feedback import service as svc
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.guard import BodyLimit, ClientAddress, LoginGuard, SecurityHeaders, TooManyAttempts
from rlhfkit.feedback.models import (
    ApiToken,
    AuditEvent,
    Item,
    Label,
    LabelVersion,
    LoginSession,
    Task,
    User,
    utcnow,
)
from rlhfkit.feedback.schemas import (
    INT_MAX,
    CorrectionBody,
    LabelBody,
    LoginBody,
    MemberBody,
    PasswordBody,
    ReviewBody,
    RoleBody,
    SkipBody,
    TaskBody,
    TokenBody,
    UserBody,
    name_problem,
    text_problem,
)
from rlhfkit.feedback.security import (
    create_api_token,
    create_login_session,
    digest,
    hash_password,
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


# --------------------------------------------------------------------------------------------


def create_app(db: Database | str, scorer=None, secure_cookies: bool = False,
               login_guard: LoginGuard | None = None, body_limit: int = 1 << 20,
               import_limit: int = 64 << 20, forwarded_allow_ips: str | list[str] | None = None) -> FastAPI:
    """Build the app for a database (URL or Database). `scorer` drives uncertainty selection.

    The client address (login limits, audit log) is the peer's, unless the peer is one of
    `forwarded_allow_ips` (addresses or networks of reverse proxies, comma-separated, or "*"):
    then it is the one their X-Forwarded-For names (uvicorn's ProxyHeadersMiddleware, which
    skips trusted hops from the right). By default no peer is trusted: any client can send the
    header, and believing it gave each request a fresh per-address login budget.

    `login_guard` holds the login rate limits and the bound on concurrent password checks;
    request bodies are limited to `body_limit` bytes (`import_limit` for item imports).
    """
    db = Database(db) if isinstance(db, str) else db
    app = FastAPI(title="rlhfkit feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db = db
    app.state.tasks = TaskCache()
    app.state.login_guard = login_guard or LoginGuard()
    app.add_middleware(BodyLimit, limit=body_limit,
                       larger=((lambda p: p.startswith("/api/admin/tasks/") and p.endswith("/items"), import_limit),))
    # security headers outside Starlette's error middleware, so 500 pages carry them too
    build = app.build_middleware_stack

    def stack():
        inner = ClientAddress(build(), svc.CLIENT_ADDRESS)
        return SecurityHeaders(ProxyHeadersMiddleware(inner, forwarded_allow_ips) if forwarded_allow_ips else inner)
    app.build_middleware_stack = stack
    app.state.scorer = scorer
    app.state.rng = random.Random()
    app.state.rng_lock = threading.Lock()
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def rng() -> random.Random:
        with app.state.rng_lock:
            return random.Random(app.state.rng.getrandbits(64))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # never echo the submitted values back (a 2 MB password, a secret in the wrong field)
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        return JSONResponse({"detail": f"field '{first['field']}': {first['message']}", "field": first["field"],
                             "errors": errors[:20]}, status_code=422)

    @app.exception_handler(TooManyAttempts)
    async def _too_many(request: Request, exc: TooManyAttempts):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(sa_exc.DataError)
    async def _db_data(request: Request, exc: sa_exc.DataError):
        # a safety net: the typed request models should have refused the value already
        return JSONResponse({"detail": "a value does not fit the database (out of range or not storable text)"},
                            status_code=422)

    @app.exception_handler(sa_exc.DBAPIError)
    async def _db_gone(request: Request, exc: sa_exc.DBAPIError):
        # the database dropped a pooled connection (restarted, or the connection was killed):
        # SQLAlchemy has invalidated the pool, so a retry gets a fresh connection
        if exc.connection_invalidated:
            return JSONResponse({"detail": "the database connection was lost; retry"}, status_code=503,
                                headers={"Retry-After": "1"})
        # PostgreSQL broke a deadlock or a serialization conflict by aborting this transaction:
        # nothing was written, and the same request succeeds when sent again
        if getattr(exc.orig, "sqlstate", None) in TRANSIENT_SQLSTATES:
            return JSONResponse({"detail": "a concurrent request conflicted with this one; retry"},
                                status_code=503, headers={"Retry-After": "1"})
        raise exc

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError):
        if exc.status == 401 and not request.url.path.startswith("/api") and request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(svc.InvalidAnswer)
    async def _invalid(request: Request, exc: svc.InvalidAnswer):
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=422)

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError):
        return JSONResponse({"detail": str(exc), "field": exc.field, "line": exc.line}, status_code=422)

    @app.exception_handler(svc.Forbidden)
    async def _forbidden(request: Request, exc: svc.Forbidden):
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(svc.Conflict)
    async def _conflict(request: Request, exc: svc.Conflict):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(LookupError)
    async def _missing(request: Request, exc: LookupError):
        return JSONResponse({"detail": str(exc).strip("'\"")}, status_code=404)

    @app.get("/healthz")
    def healthz():
        with db.read_session() as s:
            s.execute(select(1))
        return {"ok": True, "backend": db.backend}

    ctx = {"app": app, "db": db, "templates": templates, "rng": rng, "secure": secure_cookies,
           "auth": [Depends(principal_dependency(db))]}
    _api_routes(**ctx)
    _admin_api_routes(**ctx)
    _page_routes(**ctx)
    return app


def _task(s: Session, task_id: int) -> Task:
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


def _credential_digests(request: Request) -> tuple[str | None, str | None]:
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


def _api_routes(app, db, templates, rng, secure, auth):
    check_login = login_checker(app, db)

    @app.post("/api/login")
    async def api_login(body: LoginBody, request: Request):
        user = await check_login(request, body.username, body.password, "api")
        if user is None:
            raise AuthError(401, "wrong username or password")
        token = await run_in_threadpool(_new_token, user.id, body.token_name)
        return {"token": token, "username": user.username, "role": user.role}

    def _new_token(user_id: int, name: str) -> str:
        with db.session() as s:
            user = s.get(User, user_id)
            svc.audit(s, user, "token.issue", user.username, name=name, via="login")
            return create_api_token(s, user, name, expires_days=LOGIN_TOKEN_DAYS)

    def token_row(t: ApiToken) -> dict:
        return {"id": t.id, "name": t.name, "created_at": t.created_at.isoformat() + "Z", "revoked": t.revoked,
                "expires_at": None if t.expires_at is None else t.expires_at.isoformat() + "Z"}

    @app.get("/api/tokens", dependencies=auth)
    def my_tokens(request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            return [token_row(t) for t in s.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))]

    @app.post("/api/tokens", status_code=201, dependencies=auth)
    def issue_my_token(body: TokenBody, request: Request):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            days = accounts.token_days(user, body.expires_days)
            svc.audit(s, user, "token.issue", user.username, name=body.name, expires_days=days)
            return {"token": create_api_token(s, user, body.name, days)}

    @app.delete("/api/tokens/{token_id}", dependencies=auth)
    def revoke_token(token_id: PathId, request: Request):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            tok = s.get(ApiToken, token_id)
            if tok is None or (tok.user_id != user.id and not svc.is_admin(user)):
                raise LookupError(f"token {token_id} not found")
            if tok.user_id != user.id and tok.user.role != "annotator" and user.role != "owner":
                raise AuthError(403, "only an owner can manage the tokens of admins and owners")
            tok.revoked = True
            svc.audit(s, user, "token.revoke", tok.user.username, token_id=tok.id, name=tok.name)
            return token_row(tok)

    @app.post("/api/me/password", dependencies=auth)
    async def change_password(body: PasswordBody, request: Request):
        user, csrf = request.state.principal
        check_csrf(request, csrf)
        # The old password is a login in disguise: the same limits, and the Argon2 checks run
        # in the guard's pool, before any transaction, so no write lock waits on them.
        guard: LoginGuard = app.state.login_guard
        account = svc.username_key(user.username)[:64]
        ip = client_host(request)
        await guard.admit(ip, account)
        if not await guard.run(verify_password, user.password_hash, body.old_password):
            guard.failed(account, ip)
            raise AuthError(403, "the current password is wrong")
        await run_in_threadpool(svc.check_password_policy, body.new_password, user.username)
        new_hash = await guard.run(hash_password, body.new_password)
        return await run_in_threadpool(_store_password, request, user.password_hash, new_hash)

    def _store_password(request: Request, old_hash: str, new_hash: str) -> dict:
        with db.session() as s:
            user, _ = authenticate(request, s)
            s.refresh(user)
            if user.password_hash != old_hash:  # changed by a concurrent request since the check
                raise svc.Conflict("the password was changed meanwhile; log in again with the new one")
            user.password_hash = new_hash
            # every other credential ends (browser sessions, API tokens including /api/login's):
            # whoever knew the old password or held a token is logged out; the credential that
            # made the change stays
            keep_token, keep_session = _credential_digests(request)
            revoked = accounts.revoke_credentials(s, user, keep_token=keep_token, keep_session=keep_session)
            svc.audit(s, user, "user.password", user.username, tokens_revoked=revoked)
            return {"ok": True, "tokens_revoked": revoked}

    @app.get("/api/me", dependencies=auth)
    def me(request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            return {"id": user.id, "username": user.username, "role": user.role}

    @app.get("/api/tasks", dependencies=auth)
    def tasks(request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            return [{"id": t.id, "name": t.name, "question_type": t.question_type, "overlap": t.overlap,
                     "progress": svc.progress(s, t, user)} for t in svc.visible_tasks(s, user)]

    single_statement = db.backend == "postgresql"  # see service: single-statement paths

    @app.get("/api/tasks/{task_id}/next", dependencies=auth)
    def next_item(task_id: PathId, request: Request):
        r, gold = rng(), None
        if single_statement:
            with db.lookup_session() as s:  # autocommit
                user, _ = authenticate(request, s)
                task = visible_task(s, task_id, user, app.state.tasks)
                try:
                    item, assignment = svc.next_assignment_autocommit(s, task, user, r)
                    return item_payload(task, item, assignment.display_order)
                except svc.NeedsTransaction as e:
                    gold = e.gold
        with db.session() as s:
            user, _ = authenticate(request, s)
            task = visible_task(s, task_id, user, app.state.tasks)
            got = svc.next_assignment(s, task, user, r, app.state.scorer, gold=gold)
            if got is None:
                return Response(status_code=204)
            item, assignment = got
            payload = item_payload(task, item, assignment.display_order)
        return payload

    @app.post("/api/tasks/{task_id}/labels", dependencies=auth)
    def submit(task_id: PathId, body: LabelBody, request: Request):
        if single_statement:
            with db.lookup_session() as s:  # autocommit: the label is durable once the statement returns
                user, csrf = authenticate(request, s)
                check_csrf(request, csrf)
                task = visible_task(s, task_id, user, app.state.tasks)
                try:
                    label, replay = svc.submit_label_autocommit(s, task, user, body.item_id, body.value,
                                                                body.idempotency_key, body.strength, body.comment)
                    return JSONResponse({**label_payload(label), "replayed": replay},
                                        status_code=200 if replay else 201)
                except svc.NeedsTransaction:
                    pass
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            task = visible_task(s, task_id, user, app.state.tasks)
            label, replay = svc.submit_label(s, task, user, body.item_id, body.value, body.idempotency_key,
                                             body.duration_ms, body.strength, body.comment)
            s.commit()  # durable before we acknowledge
            out = label_payload(label)
        return JSONResponse({**out, "replayed": replay}, status_code=200 if replay else 201)

    @app.post("/api/tasks/{task_id}/skip", dependencies=auth)
    def skip(task_id: PathId, body: SkipBody, request: Request):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            svc.skip_item(s, visible_task(s, task_id, user, app.state.tasks), user, body.item_id)
            return {"skipped": body.item_id}

    @app.get("/api/labels/mine", dependencies=auth)
    def my_labels(request: Request, task_id: QueryId = None):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            q = select(Label).where(Label.user_id == user.id).order_by(Label.id)
            if task_id is not None:
                q = q.where(Label.task_id == task_id)
            return [label_payload(lab) for lab in s.scalars(q)]

    @app.get("/api/labels/{label_id}", dependencies=auth)
    def get_label(label_id: PathId, request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            label = s.get(Label, label_id)
            # another annotator's label is reported as missing: not even its existence leaks
            if label is None or (label.user_id != user.id and not svc.is_admin(user)):
                raise LookupError(f"label {label_id} not found")
            return label_payload(label)

    @app.put("/api/labels/{label_id}", dependencies=auth)
    def correct(label_id: PathId, body: CorrectionBody, request: Request):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf)
            label = s.get(Label, label_id)
            if label is None:
                raise LookupError(f"label {label_id} not found")
            return label_payload(svc.correct_label(s, label, user, body.value, body.strength, body.comment))

    @app.get("/api/labels/{label_id}/versions", dependencies=auth)
    def versions(label_id: PathId, request: Request):
        with db.read_session() as s:
            user, _ = authenticate(request, s)
            label = s.get(Label, label_id)
            if label is None or (label.user_id != user.id and not svc.is_admin(user)):
                raise LookupError(f"label {label_id} not found")
            old = s.scalars(select(LabelVersion).where(LabelVersion.label_id == label_id).order_by(LabelVersion.version))
            return [{"version": v.version, "value": v.value, "superseded_at": v.created_at.isoformat() + "Z"}
                    for v in old] + [{"version": label.version, "value": label.value, "superseded_at": None}]


def _admin_api_routes(app, db, templates, rng, secure, auth):
    from rlhfkit.feedback import export as ex

    def admin(request: Request, s: Session, write: bool = False) -> User:
        user, csrf = authenticate(request, s)
        require_admin(user)
        if write:
            check_csrf(request, csrf)
        return user

    def may_manage(actor: User, role: str) -> None:
        # admins manage annotators; only an owner creates, changes or disables admins and owners
        if role != "annotator" and actor.role != "owner":
            raise AuthError(403, "only an owner can manage admins and owners")

    def named_user(s: Session, username: str) -> User:
        user = svc.find_user(s, username)
        if user is None:
            raise LookupError(f"user {username!r} not found")
        return user

    def user_row(u: User) -> dict:
        return {"id": u.id, "username": u.username, "role": u.role, "active": u.active}

    @app.post("/api/admin/users", status_code=201, dependencies=auth)
    def new_user(body: UserBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            may_manage(actor, body.role)
            return user_row(svc.create_user(s, body.username, body.password, body.role, actor=actor,
                                            reveal_lookalike=True))  # only admins reach this route

    @app.get("/api/admin/users", dependencies=auth)
    def list_users(request: Request):
        with db.read_session() as s:
            admin(request, s)
            return [user_row(u) for u in s.scalars(select(User).order_by(User.id))]

    @app.post("/api/admin/users/{username}/role", dependencies=auth)
    def set_role(username: PathName, body: RoleBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            user = named_user(s, username)
            may_manage(actor, user.role)
            may_manage(actor, body.role)
            accounts.set_role(s, user, body.role, actor)
            return user_row(user)

    @app.post("/api/admin/users/{username}/tokens", status_code=201, dependencies=auth)
    def new_token(username: PathName, request: Request, body: TokenBody | None = None):
        body = body or TokenBody(name="admin-issued")
        with db.session() as s:
            actor = admin(request, s, write=True)
            user = named_user(s, username)
            may_manage(actor, user.role)
            days = accounts.token_days(user, body.expires_days)
            svc.audit(s, actor, "token.issue", user.username, name=body.name, expires_days=days)
            return {"token": create_api_token(s, user, body.name, days)}

    @app.get("/api/admin/users/{username}/tokens", dependencies=auth)
    def user_tokens(username: PathName, request: Request):
        with db.read_session() as s:
            actor = admin(request, s)
            user = named_user(s, username)
            may_manage(actor, user.role)
            return [{"id": t.id, "name": t.name, "revoked": t.revoked, "created_at": t.created_at.isoformat() + "Z",
                     "expires_at": None if t.expires_at is None else t.expires_at.isoformat() + "Z"}
                    for t in s.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))]

    @app.post("/api/admin/users/{username}/{action}", dependencies=auth)
    def set_active(username: PathName, action: Annotated[str, Path(pattern="^(disable|enable)$")], request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            user = named_user(s, username)
            may_manage(actor, user.role)
            if user.id == actor.id:
                raise svc.Conflict("you cannot disable yourself")
            # labels stay; disabling also revokes every token and session, for good
            accounts.set_active(s, user, action == "enable", actor)
            return user_row(user)

    @app.get("/api/admin/audit", dependencies=auth)
    def audit_log(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 200):
        with db.read_session() as s:
            admin(request, s)
            rows = s.execute(select(AuditEvent, User.username).outerjoin(User, User.id == AuditEvent.actor_id)
                             .order_by(AuditEvent.id.desc()).limit(limit))
            return [{"id": e.id, "at": e.at.isoformat() + "Z", "actor": name, "action": e.action, "target": e.target,
                     "detail": e.detail, "client": e.client} for e, name in rows]

    @app.post("/api/admin/tasks/{task_id}/members", status_code=201, dependencies=auth)
    def add_member(task_id: PathId, body: MemberBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            svc.add_member(s, _task(s, task_id), named_user(s, body.username), actor)
            return {"ok": True}

    @app.get("/api/admin/tasks/{task_id}/review", dependencies=auth)
    def review_queue(task_id: PathId, request: Request,
                     status: Annotated[str, Query(pattern="^(pending|accepted|rejected)$")] = "pending"):
        with db.read_session() as s:
            admin(request, s)
            _task(s, task_id)
            return [{**label_payload(lab), "annotator": name} for lab, name in s.execute(
                select(Label, User.username).join(User, User.id == Label.user_id)
                .where(Label.task_id == task_id, Label.review_status == status).order_by(Label.id))]

    @app.post("/api/admin/labels/{label_id}/review", dependencies=auth)
    def review(label_id: PathId, body: ReviewBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            label = s.get(Label, label_id)
            if label is None:
                raise LookupError(f"label {label_id} not found")
            return label_payload(svc.review_label(s, label, actor, body.decision, body.reason))

    @app.post("/api/admin/tasks", status_code=201, dependencies=auth)
    def new_task(body: TaskBody, request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            task = svc.create_task(s, **body.model_dump(), actor=actor)
            return {"id": task.id, "name": task.name}

    @app.post("/api/admin/tasks/{task_id}/items", status_code=201, dependencies=auth)
    def add_items(task_id: PathId, records: list[Any], request: Request):
        with db.session() as s:
            actor = admin(request, s, write=True)
            return {"imported": svc.import_records(s, _task(s, task_id), records, source="request body",
                                                   actor=actor)}

    @app.get("/api/admin/tasks/{task_id}/labels", dependencies=auth)
    def all_labels(task_id: PathId, request: Request):
        with db.read_session() as s:
            admin(request, s)
            rows = s.execute(select(Label, User.username).join(User, User.id == Label.user_id)
                             .where(Label.task_id == task_id).order_by(Label.id))
            return [{**label_payload(lab), "annotator": name} for lab, name in rows]

    @app.get("/api/admin/tasks/{task_id}/qc", dependencies=auth)
    def qc(task_id: PathId, request: Request):
        with db.read_session() as s:
            admin(request, s)
            return ex.task_qc(s, _task(s, task_id))

    @app.get("/api/admin/tasks/{task_id}/export", dependencies=auth)
    def export(task_id: PathId, request: Request, kind: str = "preferences", aggregate: str = "none",
               ties: str = "skip", status: Annotated[str, Query(pattern="^(all|accepted)$")] = "all"):
        with db.session() as s:
            actor = admin(request, s)
            task = _task(s, task_id)
            try:
                records, skipped = ex.export_records(s, task, kind, aggregate, ties=ties,
                                                     only_accepted=status == "accepted")
            except ValueError as e:
                raise HTTPException(422, str(e)) from e
            svc.audit(s, actor, "task.export", task.name, kind=kind, aggregate=aggregate, status=status,
                      records=len(records))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": content_disposition(f"{task.name}-{kind}.jsonl"),
                                 "X-Skipped": json.dumps(skipped)})


def content_disposition(filename: str) -> str:
    """An attachment header for any file name: an ASCII fallback plus RFC 5987/6266 `filename*`
    with the UTF-8 name percent-encoded (task names may hold any printable Unicode)."""
    fallback = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("_") or "export.jsonl"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


# --------------------------------------------------------------------------------------------
# pages


def _form_answer(task: Task, form, k: int) -> dict:
    """Build a display-position answer from a submitted HTML form."""
    qt = task.question_type
    if qt == "pairwise":
        return {"choice": form.get("choice")}
    if qt == "ranking":
        try:
            return {"ranking": [int(x) for x in str(form.get("ranking", "")).split(",") if x != ""]}
        except ValueError:
            raise svc.InvalidAnswer("ranking", "must be comma-separated positions") from None
    if qt == "rating":
        out = []
        for pos in range(k):
            r = {}
            for dim in task.rubric:
                v = form.get(f"r{pos}_{dim}")
                if v is None or not str(v).isdigit():
                    raise svc.InvalidAnswer(f"ratings[{pos}].{dim}", "choose a score")
                r[dim] = int(v)
            out.append(r)
        return {"ratings": out}
    if qt == "thumbs":
        vals = [form.get(f"t{pos}") for pos in range(k)]
        if any(v not in ("up", "down") for v in vals):
            raise svc.InvalidAnswer("thumbs", "choose thumbs up or down for every response")
        return {"thumbs": [v == "up" for v in vals]}
    if qt == "critique":
        return {"text": form.get("text")}
    pos = str(form.get("position", "0"))
    return {"position": int(pos) if pos.isdigit() else -1, "text": form.get("text")}


def _form_extras(form) -> dict:
    """The optional strength and comment of a submitted form (empty fields are none)."""
    strength, comment = form.get("strength") or None, form.get("comment") or None
    return {"strength": None if strength is None else str(strength)[:16],
            "comment": None if comment is None else str(comment)}


def _page_routes(app, db, templates, rng, secure, auth):
    def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request):
        token = secrets.token_urlsafe(24)
        resp = render(request, "login.html", csrf_token=token, error=None, user=None)
        resp.set_cookie(PRELOGIN_COOKIE, token, httponly=True, samesite="strict", secure=secure)
        return resp

    check_login = login_checker(app, db)

    @app.post("/login")
    async def login_submit(request: Request):
        form = await request.form()
        if not same(form.get("csrf_token"), request.cookies.get(PRELOGIN_COOKIE)):
            raise AuthError(403, "missing or wrong CSRF token; reload the login page")
        username, password = str(form.get("username", ""))[:64], str(form.get("password", ""))[:1024]
        user = await check_login(request, username, password, "browser")  # Argon2 in its own bounded pool
        return await run_in_threadpool(_login_done, request, user)

    def _login_done(request: Request, user: User | None):
        if user is None:
            token = secrets.token_urlsafe(24)
            resp = render(request, "login.html", 401, csrf_token=token, error="Wrong username or password.", user=None)
            resp.set_cookie(PRELOGIN_COOKIE, token, httponly=True, samesite="strict", secure=secure)
            return resp
        with db.session() as s:
            secret, _ = create_login_session(s, s.get(User, user.id))
        target = "/admin" if svc.is_admin(user) else "/"
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="strict", secure=secure)
        resp.delete_cookie(PRELOGIN_COOKIE)
        return resp

    @app.post("/logout")
    async def logout(request: Request):
        if not request.cookies.get(SESSION_COOKIE):  # API tokens are revoked, not logged out
            raise AuthError(401, "not logged in (no session cookie)")
        form = await request.form()
        return await run_in_threadpool(_logout, request, form)

    def _logout(request: Request, form):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf, form.get("csrf_token"))
            if csrf is None:
                raise AuthError(401, "not logged in with a browser session")
            sess = s.scalar(select(LoginSession).where(LoginSession.session_hash == digest(request.cookies[SESSION_COOKIE])))
            if sess is not None:
                s.delete(sess)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    @app.get("/", response_class=HTMLResponse, dependencies=auth)
    def home(request: Request):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            tasks = [(t, svc.progress(s, t, user)) for t in svc.visible_tasks(s, user)]
            return render(request, "home.html", user=user, csrf_token=csrf, tasks=tasks)

    @app.get("/tasks/{task_id}", response_class=HTMLResponse, dependencies=auth)
    def label_page(task_id: PathId, request: Request, error: str | None = None, status: int = 200):
        with db.session() as s:
            user, csrf = authenticate(request, s)
            task = visible_task(s, task_id, user, app.state.tasks)
            got = svc.next_assignment(s, task, user, rng(), app.state.scorer)
            prog = svc.progress(s, task, user)
            item = item_payload(task, got[0], got[1].display_order) if got else None
            s.commit()
            return render(request, "label.html", status, user=user, csrf_token=csrf, task=task, item=item,
                          progress=prog, error=error)

    @app.post("/tasks/{task_id}", dependencies=auth)
    async def label_submit(task_id: PathId, request: Request):
        form = await request.form()  # parsed on the event loop; the database work runs in a thread
        return await run_in_threadpool(_label_submit, task_id, request, form)

    def _label_submit(task_id: int, request: Request, form):
        error = None
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf, form.get("csrf_token"))
            task = visible_task(s, task_id, user, app.state.tasks)
            try:
                item_id = int(str(form.get("item_id", "")))
                if not 1 <= item_id <= INT_MAX:
                    raise LookupError(f"item {item_id} not found")
                item = s.get(Item, item_id)
                if item is None:
                    raise LookupError(f"item {item_id} not found")
                if form.get("action") == "skip":
                    svc.skip_item(s, task, user, item_id)
                else:
                    raw = _form_answer(task, form, len(item.responses))
                    svc.submit_label(s, task, user, item_id, raw, str(form.get("idempotency_key", "")),
                                     **_form_extras(form))
                s.commit()
            except (ValueError, svc.InvalidAnswer, svc.Conflict, LookupError) as e:
                s.rollback()
                error = str(e)
        if error is not None:  # re-render outside the write session (it takes the write lock)
            return label_page(task_id, request, error=error, status=422)
        return RedirectResponse(f"/tasks/{task_id}", status_code=303)

    @app.get("/admin", response_class=HTMLResponse, dependencies=auth)
    def admin_home(request: Request):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            tasks = [(t, svc.progress(s, t)) for t in s.scalars(select(Task).order_by(Task.id))]
            return render(request, "admin.html", user=user, csrf_token=csrf, tasks=tasks)

    @app.get("/admin/tasks/{task_id}", response_class=HTMLResponse, dependencies=auth)
    def admin_task(task_id: PathId, request: Request):
        from rlhfkit.feedback import export as ex

        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            task = _task(s, task_id)
            report = ex.task_qc(s, task)
            return render(request, "admin_task.html", user=user, csrf_token=csrf, task=task, report=report,
                          kinds=ex.kinds_for(task.question_type), progress=svc.progress(s, task))

    @app.get("/labels", response_class=HTMLResponse, dependencies=auth)
    def my_labels_page(request: Request):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            rows = s.execute(select(Label, Task, Item).join(Task, Task.id == Label.task_id)
                             .join(Item, Item.id == Label.item_id).where(Label.user_id == user.id)
                             .order_by(Label.id.desc()).limit(500)).all()
            return render(request, "my_labels.html", user=user, csrf_token=csrf, rows=rows)

    def _own_label(s: Session, label_id: int, user: User) -> Label:
        label = s.get(Label, label_id)
        if label is None or label.user_id != user.id:
            raise LookupError(f"label {label_id} not found")
        return label

    @app.get("/labels/{label_id}/edit", response_class=HTMLResponse, dependencies=auth)
    def correction_page(label_id: PathId, request: Request, error: str | None = None, status: int = 200):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            label = _own_label(s, label_id, user)
            task, item = s.get(Task, label.task_id), s.get(Item, label.item_id)
            payload = item_payload(task, item, label.display_order)
            return render(request, "label.html", status, user=user, csrf_token=csrf, task=task, item=payload,
                          progress=svc.progress(s, task, user), error=error, correcting=label,
                          form_action=f"/labels/{label.id}/edit")

    @app.post("/labels/{label_id}/edit", dependencies=auth)
    async def correction_submit(label_id: PathId, request: Request):
        form = await request.form()
        return await run_in_threadpool(_correction_submit, label_id, request, form)

    def _correction_submit(label_id: int, request: Request, form):
        error = None
        with db.session() as s:
            user, csrf = authenticate(request, s)
            check_csrf(request, csrf, form.get("csrf_token"))
            label = _own_label(s, label_id, user)
            task = s.get(Task, label.task_id)
            try:
                raw = _form_answer(task, form, len(label.display_order))
                svc.correct_label(s, label, user, raw, **_form_extras(form))
                s.commit()
            except (ValueError, svc.InvalidAnswer, svc.Conflict) as e:
                s.rollback()
                error = str(e)
        if error is not None:
            return correction_page(label_id, request, error=error, status=422)
        return RedirectResponse("/labels", status_code=303)

    @app.get("/admin/review", dependencies=auth)
    def review_filter(task: Annotated[int, Query(ge=1, le=INT_MAX)], request: Request, annotator: Annotator = "",
                      status: ReviewStatus = "pending"):
        """The filter form's target: the queue of the chosen task (a GET form cannot pick a path)."""
        return RedirectResponse(f"/admin/tasks/{task}/review?{urlencode({'annotator': annotator, 'status': status})}",
                                status_code=303)

    @app.get("/admin/tasks/{task_id}/review", response_class=HTMLResponse, dependencies=auth)
    def review_page(task_id: PathId, request: Request, annotator: Annotator = "", status: ReviewStatus = "pending",
                    page: Page = 1):
        return _review_page(task_id, request, annotator, status, page)

    def _review_page(task_id: int, request: Request, annotator: str = "", status: str = "pending", page: int = 1,
                     error: str | None = None, notice: str | None = None, code: int = 200):
        with db.read_session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            task = _task(s, task_id)
            q = rv.queue(s, task, user, status, annotator, page)
            tasks = list(s.scalars(select(Task).order_by(Task.id)))
            return render(request, "review.html", code, user=user, csrf_token=csrf, task=task, queue=q, tasks=tasks,
                          annotator=annotator, review_status=status, error=error, notice=notice)

    @app.post("/admin/tasks/{task_id}/review/bulk", dependencies=auth)
    async def review_bulk(task_id: PathId, request: Request):
        form = await request.form()
        return await run_in_threadpool(_review_bulk, task_id, request, form)

    def _review_bulk(task_id: int, request: Request, form):
        ids = [int(v) for v in form.getlist("label_id") if str(v).isdigit() and 1 <= int(v) <= INT_MAX]
        with db.session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            check_csrf(request, csrf, form.get("csrf_token"))
            counts = rv.accept_many(s, _task(s, task_id), user, ids) if ids else None
        notice = "Select labels to accept first." if counts is None else \
            f"Accepted {counts['accepted']} label(s)" + (f"; left {counts['own']} of your own" if counts["own"] else "") \
            + (f"; {counts['not_pending']} already decided" if counts["not_pending"] else "") + "."
        status = str(form.get("status", "pending"))
        page = str(form.get("page", "1"))
        return _review_page(task_id, request, annotator=str(form.get("annotator", ""))[:64],
                           status=status if status in ("pending", "accepted", "rejected", "all") else "pending",
                           page=int(page) if page.isdigit() and int(page) <= INT_MAX else 1, notice=notice)

    @app.post("/admin/labels/{label_id}/review", dependencies=auth)
    async def review_submit(label_id: PathId, request: Request):
        form = await request.form()
        return await run_in_threadpool(_review_submit, label_id, request, form)

    def _review_submit(label_id: int, request: Request, form):
        error = None
        with db.session() as s:
            user, csrf = authenticate(request, s)
            require_admin(user)
            check_csrf(request, csrf, form.get("csrf_token"))
            label = s.get(Label, label_id)
            if label is None:
                raise LookupError(f"label {label_id} not found")
            task_id = label.task_id
            reason = str(form.get("reason", ""))[:2000]
            try:
                if text_problem(reason):
                    raise svc.InvalidAnswer("reason", text_problem(reason))
                svc.review_label(s, label, user, str(form.get("decision", "")), reason)
                s.commit()
            except (svc.InvalidAnswer, svc.Forbidden) as e:
                s.rollback()
                error, status = str(e), 403 if isinstance(e, svc.Forbidden) else 422
        if error is not None:
            return _review_page(task_id, request, error=error, code=status)
        return RedirectResponse(f"/admin/tasks/{task_id}/review", status_code=303)
