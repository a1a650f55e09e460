"""Login abuse (rate limits, bounded password checks, dummy hash, body limit) and the small
hardening items: security headers on errors, no-store pages, no echo in 422s, logout, CLI."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from rlhfkit.feedback import security
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.guard import LoginGuard
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.tasks import create_task
from rlhfkit.feedback.testing import ServerThread

use_test_hasher()
PASSWORD = "correct horse battery"
FLOOD_ROUNDS, FLOOD_SAMPLES = 4, 6  # quiet and flooded turns, annotator /next+submit pairs in each
FLOOD = """
import signal, sys, threading, uuid, httpx
stop = threading.Event(); seen = []
def run():
    with httpx.Client(base_url=sys.argv[1], timeout=60) as c:
        while not stop.is_set():
            try:
                seen.append(c.post("/api/login", json={"username": "u" + uuid.uuid4().hex[:8],
                                                       "password": "guess guess"}).status_code)
            except httpx.HTTPError:
                pass
signal.signal(signal.SIGTERM, lambda *a: stop.set())
ts = [threading.Thread(target=run) for _ in range(16)]
[t.start() for t in ts]; [t.join() for t in ts]
print(" ".join(map(str, seen)))
"""


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path}/fb.db"
    upgrade(url)
    db = Database(url, pool_size=8)
    yield db
    db.dispose()


@pytest.fixture
def costly_hasher():
    """Argon2id at a realistic cost (64 MiB, like the default profile) for timing tests."""
    old = security._hasher
    security._hasher = PasswordHasher(time_cost=1, memory_cost=64 * 1024, parallelism=1)
    yield
    security._hasher = old


def make_users(db, *names, role="annotator"):
    with db.session() as s:
        return {n: create_api_token(s, create_user(s, n, PASSWORD, role)) for n in names}


def test_wrong_passwords_are_rate_limited_per_account_and_per_ip(db):
    make_users(db, "alice", "bob")
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="8/minute", per_account="3/minute;10/hour")))
    for _ in range(3):
        assert c.post("/api/login", json={"username": "alice", "password": "wrong password"}).status_code == 401
    r = c.post("/api/login", json={"username": "ALICE", "password": PASSWORD})  # same account, any case
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60, r.text
    assert c.post("/api/login", json={"username": "bob", "password": PASSWORD}).status_code == 200
    for _ in range(3):  # attempts 6-8 from this address (the refused one counted too)
        c.post("/api/login", json={"username": f"x{uuid.uuid4().hex[:6]}", "password": "nope nope"})
    r = c.post("/api/login", json={"username": "bob", "password": PASSWORD})
    assert r.status_code == 429 and "address" in r.json()["detail"]


def test_form_login_is_rate_limited_too(db):
    make_users(db, "alice")
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="2/minute")))
    for status in (401, 401, 429):
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        r = c.post("/login", data={"username": "alice", "password": "bad guess!", "csrf_token": token},
                   follow_redirects=False)
        assert r.status_code == status


def test_unknown_users_cost_as_much_as_known_ones(db, costly_hasher):
    make_users(db, "alice")  # hashed with the costly parameters
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="")))

    def median_ms(username):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert c.post("/api/login", json={"username": username, "password": "wrong password"}).status_code == 401
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    median_ms("warmup")  # the dummy hash is made on first use
    known, unknown = median_ms("alice"), median_ms("nobody-here")
    # before the dummy hash, unknown users answered ~100x faster than known ones
    assert 0.5 < unknown / known < 2.0, (known, unknown)


def test_login_flood_keeps_annotators_fast_and_memory_bounded(db, costly_hasher):
    tokens = make_users(db, "ann")
    with db.session() as s:
        task = create_task(s, "t", "pairwise", overlap=1, gold_rate=0.0)
        import_records(s, task, [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(200)])
        task_id = task.id
    guard = LoginGuard(per_ip="", per_account="", max_concurrent=1, max_waiting=8)  # flood all the way in

    headers = {"Authorization": f"Bearer {tokens['ann']}"}

    def annotator_latencies(base, n):
        lat = []
        with httpx.Client(base_url=base, timeout=60, headers=headers) as c:
            for _ in range(n):
                t0 = time.perf_counter()
                item = c.get(f"/api/tasks/{task_id}/next").json()
                r = c.post(f"/api/tasks/{task_id}/labels", json={"item_id": item["item_id"], "value": {"choice": "left"},
                                                               "idempotency_key": uuid.uuid4().hex})
                assert r.status_code == 201
                lat.append(time.perf_counter() - t0)
        return sorted(lat)

    def wait_for(condition, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "the login flood did not stop or start"
            time.sleep(0.02)

    with ServerThread(create_app(db, login_guard=guard)) as srv:
        # the flood comes from another process, as it would: it must not share our GIL. It is
        # paused (SIGSTOP) and resumed in turns, so the quiet control and the flooded samples
        # are interleaved and see the same load from other work on this shared machine
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, srv.url], stdout=subprocess.PIPE, text=True)
        quiet, lat = [], []
        try:
            time.sleep(1.0)
            for _ in range(FLOOD_ROUNDS):
                os.kill(flood.pid, signal.SIGSTOP)
                wait_for(lambda: guard.queued == 0)  # the checks already queued finish: quiet
                quiet += annotator_latencies(srv.url, FLOOD_SAMPLES)
                os.kill(flood.pid, signal.SIGCONT)
                wait_for(lambda: guard.queued >= guard.max_concurrent)  # the flood is back in
                time.sleep(0.3)
                lat += annotator_latencies(srv.url, FLOOD_SAMPLES)
        finally:
            os.kill(flood.pid, signal.SIGCONT)
            flood.terminate()
            statuses = [int(x) for x in flood.communicate(timeout=30)[0].split()]
    assert guard.peak_running == 1  # one 64 MiB Argon2 check at a time, whatever the flood
    assert statuses.count(401) > 0 and statuses.count(503) > 0 and set(statuses) <= {401, 503}
    quiet, lat = sorted(quiet), sorted(lat)
    p95, quiet_p95 = (np.percentile(x, 95) for x in (lat, quiet))
    print(f"annotator /next+submit: quiet p95 {quiet_p95 * 1000:.0f} ms; under a login flood median "
          f"{statistics.median(lat) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms; flood answers {len(statuses)} "
          f"({statuses.count(503)} refused busy)")
    # the bound: half a second, or 8x the p95 of the interleaved quiet control when other work
    # slows this shared machine (both halves slow alike). Measured on 2 cores at load average
    # 11-13: with one check at a time, flooded p95 208-375 ms against quiet 46-76 ms; with
    # sixteen at once (no useful bound), 625-920 ms against quiet 35-77 ms, which fails here.
    assert p95 < max(0.5, 8 * quiet_p95), (quiet, lat)


def test_request_bodies_are_limited_and_never_echoed(db):
    make_users(db, "alice")
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="")))
    huge = "p" * (2 << 20)
    r = c.post("/api/login", json={"username": "alice", "password": huge})
    assert r.status_code == 413 and huge[:1000] not in r.text

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(40):
            yield b"x" * 65536

    r = c.post("/api/login", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    secret = "s3cret-" * 200
    r = c.post("/api/login", json={"username": "alice", "password": secret})
    assert r.status_code == 422 and "s3cret" not in r.text and r.json()["field"] == "body.password"


def test_security_headers_on_errors_and_no_store_pages(db):
    tokens = make_users(db, "alice")
    app = create_app(db)

    @app.get("/boom")
    def boom():
        raise RuntimeError("unexpected")

    c = TestClient(app, raise_server_exceptions=False)
    for path, status in (("/boom", 500), ("/nope", 404), ("/api/tasks/0/next", 401), ("/login", 200)):
        r = c.get(path, headers={"Authorization": f"Bearer {tokens['alice']}"} if status == 401 else {})
        assert r.status_code == (422 if path == "/api/tasks/0/next" else status), (path, r.status_code)
        assert "default-src 'self'" in r.headers["content-security-policy"], path
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store", path
    assert c.get("/static/style.css").headers.get("cache-control") != "no-store"


def test_logout_without_a_session_cookie_is_401(db):
    tokens = make_users(db, "alice")
    c = TestClient(create_app(db))
    assert c.post("/logout").status_code == 401
    assert c.post("/logout", headers={"Authorization": f"Bearer {tokens['alice']}"}).status_code == 401


def test_cli_export_refuses_to_overwrite_and_taken_username_is_one_line(tmp_path, capsys, monkeypatch):
    from rlhfkit.feedback.cli import cli

    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("PW", PASSWORD)
    assert cli(["create-user", "--db", url, "--username", "ann", "--password-env", "PW"]) == 0
    assert cli(["create-user", "--db", url, "--username", "ann", "--password-env", "PW"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["rlhfkit serve create-user: user 'ann' already exists"]
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "p", "responses": ["a", "b"]}\n')
    assert cli(["import", "--db", url, "--task", "t", str(src)]) == 0
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    assert cli(["export", "--db", url, "--task", "t", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "precious\n"
    assert cli(["export", "--db", url, "--task", "t", "--out", str(out), "--force"]) == 0
    assert out.read_text() != "precious\n"
