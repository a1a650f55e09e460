"""Experiments on a running policy server: assignment, logging and the feedback API.

`install(app, experiment=..., db=...)` wraps an OpenAI-compatible ASGI app (the policy server)
so that, with nothing changed in its handlers:

- a request for the experiment's name as its ``model`` is sent to the arm of its user (the
  ``user`` field, a header or a cookie, in the experiment's `assign_by` order; a visitor with
  none of them gets a new id in the experiment's cookie). The arms are served under their arm
  names (``rlhfkit serve-policy --experiment FILE`` loads them), so the response's ``model`` is
  the arm: name arms neutrally (``a``, ``b``) if users must not know which they got;
- every POST to /v1/chat/completions and /v1/completions is logged to the traffic log (model
  version, arm, user key, sampling settings, token counts, latency, time to first byte, status),
  streamed or not, including errors, after the response has been sent;
- the feedback API (rlhfkit.serving.use_feedback) is mounted under /v1, and a small chat page
  at /chat (static/chat.html: thumbs, edit, regenerate and choose, all from the keyboard);
- with a safety monitor (rlhfkit.serving.monitor), every response is scored after it is sent;
  in blocking mode it is scored first and a flagged choice is replaced by the refusal
  (finish_reason ``content_filter``; a stream is held back until scored). The log keeps the
  generated text, so reviewers see what was blocked.

The middleware reads the request body once and hands the handler the (possibly rewritten) body;
the response passes through unchanged while a copy is parsed for the log.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from rlhfkit.serving.arena import add_arena_page, battle_arm
from rlhfkit.serving.experiments import (
    Experiment,
    Monitor,
    cookie_name,
    identify,
    load_experiment,
    new_unit_id,
)
from rlhfkit.serving.monitor import SafetyMonitor, make_safety_router
from rlhfkit.serving.traffic import TrafficLog
from rlhfkit.serving.use_feedback import mount_experiment_routes

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
PAGES_JS = CHAT_PAGE.with_name("pages.js")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop", "seed", "logprobs",
                   "top_logprobs", "stream")
COOKIE_MAX_AGE = 365 * 24 * 3600


@dataclass
class Route:
    arm: str | None
    model: str | None          # the served model the request goes to
    user_key: str | None
    set_cookie: str | None     # a Set-Cookie header value for a new visitor


class Live:
    """The experiment (if any) and the traffic log a server writes to."""

    def __init__(self, log: TrafficLog, experiment: Experiment | None = None, versions: dict | None = None):
        self.log, self.experiment = log, experiment
        self.monitor: SafetyMonitor | None = None
        self.paused: set[str] = set()
        # served model name -> version string logged with each response (registry id or folder)
        self.versions = dict(versions or {})

    def route(self, model: Any, user: Any, headers: dict, cookies: dict) -> Route:
        exp = self.experiment
        if exp is None or model != exp.name:
            return Route(None, model if isinstance(model, str) else None, None, None)
        found = identify(exp.assign_by, user if isinstance(user, str) else None, headers, cookies)
        set_cookie = None
        if found is None:
            unit, name = new_unit_id(), cookie_name(exp.assign_by)
            if name:
                set_cookie = f"{name}={unit}; Max-Age={COOKIE_MAX_AGE}; Path=/; HttpOnly; SameSite=Lax"
        else:
            unit = found[1]
        # a battle of the arena page goes to its side's arm (serving/arena.py); other requests by assignment
        arm = battle_arm(exp, headers, self.paused) or exp.assign(unit, paused=tuple(self.paused))
        return Route(arm.name, arm.name, exp.user_key(unit), set_cookie)

    def version(self, model: str | None, app: Any = None) -> str:
        """What produced a response: the registry id or folder of the served model, and the stamp
        of its weights (`system_fingerprint`), so a retrained folder is a new version."""
        if model is None:
            return "unknown"
        if model in self.versions:
            return self.versions[model]
        served = getattr(getattr(app, "state", None), "models", {}).get(model)
        if served is not None:
            return f"{served.registry_id or served.path}@{served.fingerprint}"
        if self.experiment is not None and model in self.experiment.arm_names:
            return self.experiment.arm(model).model
        return model


def _parse_response(body: bytes, stream: bool) -> tuple[str | None, list[str], dict | None, str | None]:
    """(response id, one text per choice, usage, error message) of a JSON or SSE response body."""
    if not stream:
        try:
            data = json.loads(body)
        except ValueError:
            return None, [], None, body[:500].decode(errors="replace")
        if "error" in data:
            return None, [], None, str(data["error"].get("message"))
        texts = [(c.get("message") or {}).get("content") or c.get("text") or "" for c in data.get("choices", [])]
        return data.get("id"), texts, data.get("usage"), None
    rid, texts, usage, err = None, {}, None, None
    for line in body.decode(errors="replace").splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            ev = json.loads(line[6:])
        except ValueError:
            continue
        if "error" in ev:
            err = str(ev["error"].get("message"))
            continue
        rid = rid or ev.get("id")
        usage = ev.get("usage") or usage
        for c in ev.get("choices", []):
            piece = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
            texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
    return rid, [texts[i] for i in sorted(texts)], usage, err


def _token_count(app: Any, model: str | None, texts: list[str]) -> int:
    """Completion tokens of a stream sent without usage, counted with the served model's tokenizer."""
    served = getattr(getattr(app, "state", None), "models", {}).get(model)
    tok = getattr(served, "tokenizer", None)
    return sum(len(tok.encode(t, add_special_tokens=False)) for t in texts) if tok is not None else 0


class ExperimentMiddleware:
    """Pure ASGI middleware (module docstring)."""

    def __init__(self, app: Any, live: Live):
        self.app, self.live = app, live

    async def __call__(self, scope, receive, send):
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        if not isinstance(req, dict):  # the handler answers the 400
            return await self.app(scope, _replay(body, receive), send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cookies = {k: m.value for k, m in SimpleCookie(headers.get("cookie", "")).items()}
        route = self.live.route(req.get("model"), req.get("user"), headers, cookies)
        if route.arm is not None:
            req["model"] = route.model
            body = json.dumps(req).encode()
        await self._forward(scope, _replay(body, receive), send, req, route, endpoint)

    async def _forward(self, scope, receive, send, req: dict, route: Route, endpoint: str) -> None:
        start = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "chunks": [], "first": None, "scores": None}
        monitor = self.live.monitor
        hold = monitor is not None and monitor.cfg.block
        held: list[dict] = []

        async def capture(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
                if route.set_cookie:
                    msg = {**msg, "headers": list(msg.get("headers", [])) + [(b"set-cookie", route.set_cookie.encode())]}
            elif msg["type"] == "http.response.body" and msg.get("body"):
                state["first"] = state["first"] or time.perf_counter()
                state["chunks"].append(msg["body"])
            if not hold:
                return await send(msg)
            held.append(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                for out in await self._screen(held, state, req, endpoint):
                    await send(out)

        try:
            await self.app(scope, receive, capture)
        finally:
            self._log(scope, req, route, endpoint, state, start)

    async def _screen(self, held: list[dict], state: dict, req: dict, endpoint: str) -> list[dict]:
        """Blocking mode: score the finished response; replace flagged choices by the refusal."""
        monitor, stream = self.live.monitor, bool(req.get("stream"))
        body = b"".join(state["chunks"])
        if state["status"] >= 400:
            return held
        _, texts, _, _ = _parse_response(body, stream)
        prompt = req.get("messages") if endpoint == "chat" else req.get("prompt")
        state["scores"] = await asyncio.to_thread(monitor.score, prompt, texts) if texts else []
        flagged = {i for i, f in enumerate(monitor.flags(state["scores"])) if f}
        if not flagged:
            return held
        new = censor(body, stream, flagged, monitor.cfg.refusal)
        start = held[0]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        if not stream:
            headers.append((b"content-length", str(len(new)).encode()))
        return [{**start, "headers": headers}, {"type": "http.response.body", "body": new, "more_body": False}]

    def _log(self, scope, req: dict, route: Route, endpoint: str, state: dict, start: float) -> None:
        end = time.perf_counter()
        rid, texts, usage, err = _parse_response(b"".join(state["chunks"]), bool(req.get("stream")))
        model = route.model if route.arm is not None else req.get("model")
        usage = usage or {}
        self.live.log.record(
            response_id=rid or f"error-{uuid.uuid4().hex}", experiment=self.live.experiment.name if route.arm else None,
            arm=route.arm, model_version=self.live.version(model if isinstance(model, str) else None, scope.get("app"))[:255],
            user_key=route.user_key, endpoint=endpoint,
            request=req.get("messages") if endpoint == "chat" else req.get("prompt"), response=texts,
            sampling={k: req[k] for k in SAMPLING_FIELDS if k in req},
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or _token_count(scope.get("app"), model, texts)),
            latency_ms=(end - start) * 1000, ttft_ms=(state["first"] - start) * 1000 if state["first"] else None,
            status=state["status"], error=err)
        if self.live.monitor is not None and rid and state["status"] < 400 and texts:
            prompt = req.get("messages") if endpoint == "chat" else req.get("prompt")
            self.live.monitor.submit(rid, route.arm, prompt, texts, state["scores"])


def censor(body: bytes, stream: bool, flagged: set[int], refusal: str) -> bytes:
    """The response with the text of each flagged choice replaced by `refusal`."""
    def fix(choice: dict, first: bool) -> None:
        if choice.get("index") not in flagged:
            return
        if "delta" in choice:
            if "content" in choice["delta"]:
                choice["delta"]["content"] = refusal if first else ""
        elif "message" in choice:
            choice["message"]["content"] = refusal
        else:
            choice["text"] = refusal if first else ""
        if choice.get("finish_reason"):
            choice["finish_reason"] = "content_filter"

    if not stream:
        data = json.loads(body)
        for c in data.get("choices", []):
            fix(c, True)
        return json.dumps(data).encode()
    out, seen = [], set()
    for block in body.decode().split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            ev = json.loads(block[6:])
            for c in ev.get("choices", []):
                has_text = bool((c.get("delta") or {}).get("content") if "delta" in c else c.get("text"))
                fix(c, has_text and c.get("index") not in seen)
                if has_text:
                    seen.add(c.get("index"))
            block = "data: " + json.dumps(ev)
        out.append(block)
    return "\n\n".join(out).encode()


def _replay(body: bytes, receive):
    """The request body once, then the client's own messages (a streaming response listens for
    the disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _csp(page: str) -> str:
    """A Content-Security-Policy allowing only the page's own inline script and style (by hash),
    scripts of this server (the shared /static/pages.js) and requests to this server."""
    def digest(tag: str) -> str:
        body = page.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    return (f"default-src 'none'; script-src 'self' {digest('script')}; style-src {digest('style')}; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_chat_page(app: Any, live: Live) -> None:
    """GET /chat (the page) and GET /v1/chat/config (the model it talks to: the experiment's
    name, or the first served model); and the arena's page and routes (serving/arena.py)."""
    from fastapi.responses import HTMLResponse, Response

    def page_headers(page: str) -> dict:
        return {"Content-Security-Policy": _csp(page), "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}

    page = CHAT_PAGE.read_text()
    headers = page_headers(page)
    add_arena_page(app, live, page_headers)
    script = PAGES_JS.read_text()

    @app.get("/static/pages.js", include_in_schema=False)
    async def pages_js():  # what the chat and arena pages share: the streaming reader, el()
        return Response(script, media_type="application/javascript",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    @app.get("/chat", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page, headers=headers)

    @app.get("/v1/chat/config", include_in_schema=False)
    async def chat_config():
        if live.experiment is not None:
            return {"model": live.experiment.name}
        return {"model": next(iter(getattr(app.state, "models", {}) or {}), None)}


def served_models(models: list[str], experiment: str | None) -> list[str]:
    """`--model` values plus one ``ARM=MODEL`` per arm of `experiment` not already served by name."""
    if not experiment:
        return list(models)
    named = {m.partition("=")[0] for m in models}
    return list(models) + [f"{a.name}={a.model}" for a in load_experiment(experiment).arms if a.name not in named]


def install(app: Any, db: str, experiment: str | Experiment | None = None, versions: dict | None = None,
            dependencies: list | None = None, monitor: Monitor | str | None = None, scorer: Any = None) -> Live:
    """Log `app`'s traffic to the feedback database `db`, run `experiment` (a file or an
    Experiment) on it, mount the feedback and safety APIs, and start the safety monitor
    (`monitor`, a judge spec or settings; default: the experiment's). Returns the `Live` state."""
    exp = load_experiment(experiment) if isinstance(experiment, str) else experiment
    log = TrafficLog(db, retention_days=exp.retention_days if exp else None)
    atexit.register(log.close)  # flush what is queued when the worker exits
    live = Live(log, exp, versions)
    monitor = Monitor(spec=monitor) if isinstance(monitor, str) else monitor or (exp.monitor if exp else None)
    if monitor is not None:
        live.monitor = SafetyMonitor(monitor, log.db, live, scorer, control=exp.control if exp else None)
        atexit.register(live.monitor.close)  # atexit runs last-in first: the monitor ends before the log
    mount_experiment_routes(app, log.db, log, dependencies)
    app.include_router(make_safety_router(log.db, live.monitor, dependencies), prefix="/v1")
    add_chat_page(app, live)
    app.add_middleware(ExperimentMiddleware, live=live)
    app.state.live = live
    return live
