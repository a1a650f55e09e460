"""The FastAPI application: JSON API under /api, server-rendered pages for browsers.

Authentication on every route except /login, /healthz and /static: a Bearer API token
(scripts) or a session cookie (browsers). Cookie-authenticated writes must carry the
session's CSRF token (form field `csrf_token` or header `X-CSRF-Token`); Bearer requests
need none because browsers never attach them on their own. Every page is rendered with
Jinja2 autoescaping and sent with a Content-Security-Policy that allows only this origin's
scripts, so prompt and response text (untrusted) can never run.

Each write commits before the response is sent: an acknowledged label is on disk.

The routers are `api` (annotators' JSON API), `admin_api` (/api/admin) and `pages` (HTML);
`web` holds what they share (authentication, CSRF, the task cache, payloads). This module
builds the app: middleware, error handlers and the routers.
"""

from __future__ import annotations

import random
import threading

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from rlhfkit.errors import DataError
from rlhfkit.feedback import service as svc
from rlhfkit.feedback.admin_api import admin_api_routes
from rlhfkit.feedback.api import api_routes
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.guard import (
    BodyLimit,
    ClientAddress,
    LoginGuard,
    SecurityHeaders,
    TooManyAttempts,
)
from rlhfkit.feedback.pages import page_routes
from rlhfkit.feedback.web import (
    HERE,
    TRANSIENT_SQLSTATES,
    AuthError,
    TaskCache,
    principal_dependency,
)


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
    api_routes(**ctx)
    admin_api_routes(**ctx)
    page_routes(**ctx)
    return app
