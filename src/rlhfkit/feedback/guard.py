"""Protection around the app: login rate limits, a bound on concurrent password checks,
request body size limits and security headers on every response (errors included).

Login abuse (issue 13): each Argon2id check costs 64 MiB and tens of milliseconds of CPU by
design (RFC 9106), so an anonymous flood of logins used to drive the server to gigabytes and
annotators' requests to seconds. Three layers stop that:

* rate limits per client IP (every attempt) and per account *and* client IP (failed attempts, a
  short and a long window, so a guesser is slowed first and then shut out for the hour), kept by
  the `limits` library's moving-window limiter rather than a hand-written counter. Counting
  failures per account alone let anyone lock a named account out for an hour with 50 wrong
  guesses; now a guesser only locks out their own address. Failures summed over all addresses
  (a distributed guesser) slow every attempt on the account by `slow_delay` seconds instead,
  the owner's included, but never refuse it;
* at most `max_concurrent` password checks at once (default: half the cores), in a dedicated thread pool, so the
  server's request threads stay free for annotators; more than `max_waiting` queued checks
  are refused at once with 503 and Retry-After;
* unknown and disabled accounts are checked against a dummy hash, so a wrong user name costs
  the same time as a wrong password and does not reveal which accounts exist.

The counters live where `storage` says (a `limits` storage URL, `serve run --rate-limit-storage`):
`memory://` counts inside this process, `redis://HOST:PORT/DB` in Redis, shared by every worker
process and every server started with the same URL. Several workers must share their counters:
each one counting on its own would give a guesser N times the budget. The password-check pool
and its bound are per process (`serve run --workers` divides the cores between the workers).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from limits import RateLimitItem, parse_many
from limits.errors import ConfigurationError
from limits.storage import Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhfkit.errors import ConfigError

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class TooManyAttempts(Exception):
    """A login was refused before checking the password; `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: int, status: int = 429):
        super().__init__(message)
        self.retry_after, self.status = max(1, retry_after), status


NAMESPACE = "rlhfkit-feedback-login"  # the first part of every counter's key (a shared Redis holds others)


def limit_storage(url: str) -> Storage:
    """The `limits` storage of a URL (memory://, redis://HOST:PORT/DB, ...); a ConfigError naming
    --rate-limit-storage for an unknown scheme or a missing client package (redis)."""
    try:
        return storage_from_string(url)
    except ConfigurationError as e:
        raise ConfigError(f"--rate-limit-storage {url!r}: {e}") from None


def check_storage(url: str) -> None:
    """Raise a ConfigError naming --rate-limit-storage when the URL is not a storage or the
    storage cannot be reached (a server should refuse to start rather than answer every login
    with an error)."""
    storage = limit_storage(url)
    try:
        ok = storage.check()
    except Exception as e:  # the client library's own connection errors
        raise ConfigError(f"--rate-limit-storage {url!r}: cannot reach it: {str(e).strip()[:200]}") from None
    if not ok:
        raise ConfigError(f"--rate-limit-storage {url!r}: cannot reach it")


class LoginGuard:
    """Rate limits and the bounded password-check pool shared by the login routes. `storage` is
    where the limits are counted (module docstring)."""

    def __init__(self, per_ip: str = "60/minute;600/hour", per_account: str = "10/minute;50/hour",
                 max_concurrent: int | None = None, max_waiting: int = 16,
                 per_account_global: str = "100/hour", slow_delay: float = 2.0, storage: str = "memory://"):
        # at most half the cores hash passwords, so annotators' requests always find a free one
        max_concurrent = max_concurrent or max(1, (os.cpu_count() or 2) // 2)
        self.limiter = MovingWindowRateLimiter(limit_storage(storage))
        self.remote = not storage.startswith("memory://")  # counters behind a network round trip
        self.per_ip: list[RateLimitItem] = parse_many(per_ip) if per_ip else []
        self.per_account: list[RateLimitItem] = parse_many(per_account) if per_account else []
        self.per_account_global: list[RateLimitItem] = parse_many(per_account_global) if per_account_global else []
        self.slow_delay = slow_delay
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrent,
                                                          thread_name_prefix="password-check")
        self.max_concurrent, self.max_waiting = max_concurrent, max_waiting
        self._lock = threading.Lock()
        self._queued = 0
        self.peak_running = 0  # observed, for tests and the benchmark
        self._running = 0

    @property
    def queued(self) -> int:
        """Password checks running or waiting now."""
        with self._lock:
            return self._queued

    def _retry_after(self, limit: RateLimitItem, *keys: str) -> int:
        reset, _ = self.limiter.get_window_stats(limit, *keys)
        return int(reset - time.time()) + 1

    def before_attempt(self, ip: str, account: str) -> float:
        """Count an attempt from `ip`; refuse when the IP, or the account from this IP, is over
        its limit. Returns the delay (seconds) to wait before checking the password: nonzero
        while the account's failures from all addresses are over `per_account_global`."""
        for limit in self.per_ip:  # every attempt counts, refused ones too
            if not self.limiter.hit(limit, NAMESPACE, "ip", ip):
                raise TooManyAttempts("too many login attempts from this address; try again later",
                                      self._retry_after(limit, NAMESPACE, "ip", ip))
        for limit in self.per_account:
            if not self.limiter.test(limit, NAMESPACE, "account", account, ip):
                raise TooManyAttempts("too many failed logins for this account from this address; try again later",
                                      self._retry_after(limit, NAMESPACE, "account", account, ip))
        if any(not self.limiter.test(limit, NAMESPACE, "account-all", account) for limit in self.per_account_global):
            return self.slow_delay
        return 0.0

    async def admit(self, ip: str, account: str) -> None:
        """`before_attempt`, then its delay, spent without holding a thread."""
        delay = await self._counting(self.before_attempt, ip, account)
        if delay:
            await asyncio.sleep(delay)

    def failed(self, account: str, ip: str) -> None:
        for limit in self.per_account:
            self.limiter.hit(limit, NAMESPACE, "account", account, ip)
        for limit in self.per_account_global:
            self.limiter.hit(limit, NAMESPACE, "account-all", account)

    async def count_failure(self, account: str, ip: str) -> None:
        """`failed`, from the event loop."""
        await self._counting(self.failed, account, ip)

    async def _counting(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a call on the counters. Remote counters (Redis) are a network round trip: it runs
        in a thread, not on the event loop, and a storage that fails refuses the login with 503
        instead of letting it through uncounted."""
        if not self.remote:
            return fn(*args)
        try:
            return await asyncio.to_thread(fn, *args)
        except TooManyAttempts:
            raise
        except Exception as e:  # the storage client's connection and timeout errors
            raise TooManyAttempts("login limits cannot be checked right now; try again shortly", 2,
                                  status=503) from e

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a password check in the bounded pool without holding a request thread."""
        with self._lock:
            if self._queued >= self.max_concurrent + self.max_waiting:
                raise TooManyAttempts("the server is busy checking passwords; try again shortly", 2, status=503)
            self._queued += 1
        try:
            return await asyncio.wrap_future(self.pool.submit(self._counted, fn, *args))
        finally:
            with self._lock:
                self._queued -= 1

    def _counted(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            self._running += 1
            self.peak_running = max(self.peak_running, self._running)
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# pure ASGI middleware


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether or not Content-Length is sent.

    `larger` maps a path predicate to a higher limit (the item import takes big batches).
    """

    def __init__(self, app: ASGIApp, limit: int = 1 << 20,
                 larger: tuple[tuple[Callable[[str], bool], int], ...] = ()):
        self.app, self.limit, self.larger = app, limit, larger

    def _limit(self, path: str) -> int:
        for match, n in self.larger:
            if match(path):
                return n
        return self.limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_json(send, 413, {"detail": f"request body larger than {limit} bytes"})
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI and our form routes re-raise HTTPException as is
                    raise HTTPException(413, f"request body larger than {limit} bytes")
            return message

        await self.app(scope, limited, send)


class ClientAddress:
    """Make the request's client address (after any trusted proxy rewrote it) what audit events
    record, for the duration of the request (a context variable, copied into worker threads)."""

    def __init__(self, app: ASGIApp, var: ContextVar[str | None]):
        self.app, self.var = app, var

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        token = self.var.set(client[0] if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            self.var.reset(token)


class SecurityHeaders:
    """Add the security headers to every response, including the 500s written by Starlette's
    outermost error middleware: this wraps the whole middleware stack."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in dict(SECURITY_HEADERS)]
                headers += SECURITY_HEADERS
                # pages carry CSRF tokens and labels: never cache them (static files may be)
                if not path.startswith("/static/") and not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
