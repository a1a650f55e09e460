"""The FastAPI application: JSON API under /api, server-rendered pages for browsers.

Authentication on every route except /login, /healthz and /static: a Bearer API token
(scripts) or a session cookie (browsers). Cookie-authenticated writes must carry the
session's CSRF token (form field `csrf_token` or header `X-CSRF-Token`); Bearer requests
need none because browsers never attach them on their own. Every page is rendered with
Jinja2 autoescaping and sent with a Content-Security-Policy that allows only this origin's
scripts, so prompt and response text (untrusted) can never run.

Each write commits before the response is sent: an acknowledged label is on disk.

The layers: the routers `api` (annotators' JSON API), `admin_api` (/api/admin) and `pages`
(HTML) authenticate, call the service and shape the reply; `web` holds what they share
(authentication, CSRF, the task cache, payloads); `service` holds every operation and every
SQL statement. This module composes the app: state, middleware, error handlers, routers.
"""

from __future__ import annotations

import random
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import exc as sa_exc
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from rlhfkit.errors import DataError
from rlhfkit.feedback import admin_api, api, pages
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.guard import (
    BodyLimit,
    ClientAddress,
    LoginGuard,
    SecurityHeaders,
    TooManyAttempts,
)
from rlhfkit.feedback.service.audit import CLIENT_ADDRESS
from rlhfkit.feedback.service.errors import Conflict, Forbidden, InvalidAnswer
from rlhfkit.feedback.web import HERE, TRANSIENT_SQLSTATES, AuthError, TaskCache, db_of


async def _validation(request: Request, exc: RequestValidationError):
    # never echo the submitted values back (a 2 MB password, a secret in the wrong field)
    errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return JSONResponse({"detail": f"field '{first['field']}': {first['message']}", "field": first["field"],
                         "errors": errors[:20]}, status_code=422)


async def _too_many(request: Request, exc: TooManyAttempts):
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers={"Retry-After": str(exc.retry_after)})


async def _db_data(request: Request, exc: sa_exc.DataError):
    # a safety net: the typed request models should have refused the value already
    return JSONResponse({"detail": "a value does not fit the database (out of range or not storable text)"},
                        status_code=422)


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


async def _auth(request: Request, exc: AuthError):
    if exc.status == 401 and not request.url.path.startswith("/api") and request.method == "GET":
        return RedirectResponse("/login", status_code=303)
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


async def _invalid(request: Request, exc: InvalidAnswer):
    return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=422)


async def _data(request: Request, exc: DataError):
    return JSONResponse({"detail": str(exc), "field": exc.field, "line": exc.line}, status_code=422)


def _status(code: int):
    async def handler(request: Request, exc: Exception):
        return JSONResponse({"detail": str(exc)}, status_code=code)
    return handler


async def _missing(request: Request, exc: LookupError):
    return JSONResponse({"detail": str(exc).strip("'\"")}, status_code=404)


ERROR_HANDLERS = ((RequestValidationError, _validation), (TooManyAttempts, _too_many), (sa_exc.DataError, _db_data),
                  (sa_exc.DBAPIError, _db_gone), (AuthError, _auth), (InvalidAnswer, _invalid), (DataError, _data),
                  (Forbidden, _status(403)), (Conflict, _status(409)), (LookupError, _missing))


def healthz(request: Request):
    db_of(request).ping()
    return {"ok": True, "backend": db_of(request).backend}


def create_app(db: Database | str, scorer=None, secure_cookies: bool = False,
               login_guard: LoginGuard | None = None, body_limit: int = 1 << 20,
               import_limit: int = 64 << 20, forwarded_allow_ips: str | list[str] | None = None,
               rate_limit_storage: str = "memory://") -> FastAPI:
    """Build the app for a database (URL or Database). `scorer` drives uncertainty selection.

    The client address (login limits, audit log) is the peer's, unless the peer is one of
    `forwarded_allow_ips` (addresses or networks of reverse proxies, comma-separated, or "*"):
    then it is the one their X-Forwarded-For names (uvicorn's ProxyHeadersMiddleware, which
    skips trusted hops from the right). By default no peer is trusted: any client can send the
    header, and believing it gave each request a fresh per-address login budget.

    `login_guard` holds the login rate limits and the bound on concurrent password checks (by
    default a LoginGuard counting in `rate_limit_storage`: memory://, or redis://HOST:PORT/DB to
    share the counts between worker processes); request bodies are limited to `body_limit` bytes
    (`import_limit` for item imports).
    """
    app = FastAPI(title="rlhfkit feedback", docs_url=None, redoc_url=None, openapi_url=None)
    state = app.state
    state.db = Database(db) if isinstance(db, str) else db
    state.tasks, state.scorer, state.secure_cookies = TaskCache(), scorer, secure_cookies
    state.login_guard = login_guard or LoginGuard(storage=rate_limit_storage)
    state.rng, state.rng_lock = random.Random(), threading.Lock()
    state.templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html
    app.add_middleware(BodyLimit, limit=body_limit,
                       larger=((lambda p: p.startswith("/api/admin/tasks/") and p.endswith("/items"), import_limit),))
    # security headers outside Starlette's error middleware, so 500 pages carry them too
    build = app.build_middleware_stack

    def stack():
        inner = ClientAddress(build(), CLIENT_ADDRESS)
        return SecurityHeaders(ProxyHeadersMiddleware(inner, forwarded_allow_ips) if forwarded_allow_ips else inner)
    app.build_middleware_stack = stack
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for exc_type, handler in ERROR_HANDLERS:
        app.add_exception_handler(exc_type, handler)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    for module in (api, admin_api, pages):
        app.include_router(module.router)
    return app
