"""`serve run --workers N`: several server processes on PostgreSQL, the login limits counted in
Redis so that N workers still allow a guesser the limit once, not N times."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from rlhfkit.feedback import cli as feedback_cli
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.guard import LoginGuard, TooManyAttempts
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.tasks import create_task
from rlhfkit.feedback.testing import free_port, postgres_unavailable_reason, temp_postgres_database
from rlhfkit.feedback.web import TaskCache

use_test_hasher()

REDIS = "redis://127.0.0.1:6379/15"
PASSWORD = "the right password, long enough"


def redis_or_skip():
    """A client of the test Redis, or skip (as tests/test_serving_api.py does)."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.skip(f"no Redis at {REDIS}: {e}")
    return client


def forget(client, *markers: str) -> None:
    """Delete this test's counters: every key holding one of `markers` as a whole key part."""
    for marker in markers:
        for key in client.scan_iter(match=f"*/{marker}/*"):
            client.delete(key)


# --------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("db, storage, says", [
    ("sqlite", REDIS, "--workers 2 needs PostgreSQL"),
    ("postgresql://nobody@127.0.0.1:9/none", "memory://", "--workers 2 needs --rate-limit-storage redis://"),
])
def test_several_workers_are_refused_where_they_would_be_wrong(tmp_path, capsys, monkeypatch, db, storage, says):
    started = []
    monkeypatch.setattr(feedback_cli.uvicorn, "run", lambda *a, **k: started.append(a))  # never serve
    db = f"sqlite:///{tmp_path}/fb.db" if db == "sqlite" else db
    assert feedback_cli.cli(["run", "--db", db, "--workers", "2", "--rate-limit-storage", storage]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlhfkit serve run: {says}") and err.count("\n") == 1, err
    assert not started and not (tmp_path / "fb.db").exists()  # refused before anything was created


def test_a_bad_rate_limit_storage_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(feedback_cli.uvicorn, "run", lambda *a, **k: pytest.fail("served"))
    assert feedback_cli.cli(["run", "--db", f"sqlite:///{tmp_path}/fb.db", "--rate-limit-storage", "nosuch://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhfkit serve run: --rate-limit-storage 'nosuch://x'") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        feedback_cli.cli(["run", "--workers", "0"])
    assert e.value.code == 2 and "--workers" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# counters shared through Redis


def test_two_guards_on_redis_count_together_and_two_in_memory_do_not():
    client = redis_or_skip()
    marker = uuid.uuid4().hex
    account, ip = f"acct-{marker}", f"ip-{marker}"
    shared = [LoginGuard(per_ip="5/minute", per_account="3/minute", storage=REDIS) for _ in range(2)]
    apart = [LoginGuard(per_ip="5/minute", per_account="3/minute") for _ in range(2)]
    try:
        for guards in (shared, apart):  # three failures, split between the two "workers"
            for g in (guards[0], guards[1], guards[0]):
                g.before_attempt(ip, account)
                g.failed(account, ip)
        with pytest.raises(TooManyAttempts) as refused:
            shared[1].before_attempt(ip, account)  # its own count is 1; together they are at 3
        assert refused.value.status == 429 and 1 <= refused.value.retry_after <= 61
        assert "this account" in str(refused.value)
        apart[1].before_attempt(ip, account)  # in memory the second worker saw only 1 failure
        # every attempt counts against the address: 4 so far in Redis, the 5th passes, the 6th not
        shared[0].before_attempt(ip, f"other-{marker}")
        with pytest.raises(TooManyAttempts, match="this address"):
            shared[1].before_attempt(ip, f"other-{marker}")
    finally:
        forget(client, ip, account)
        for g in shared + apart:
            g.close()
    assert not list(client.scan_iter(match=f"*{marker}*"))  # cleaned up


def test_create_app_passes_the_storage_to_its_login_guard(tmp_path):
    """Two apps (two workers) built with the same Redis storage refuse the 11th failed login of
    an account from one address, wherever the attempts landed."""
    client = redis_or_skip()
    marker = uuid.uuid4().hex
    account = f"u{marker[:20]}"
    db = f"sqlite:///{tmp_path}/fb.db"
    upgrade(db)
    apps = [create_app(db, rate_limit_storage=REDIS) for _ in range(2)]
    body = {"username": account, "password": "wrong"}
    try:
        with TestClient(apps[0], client=(marker, 1)) as a, TestClient(apps[1], client=(marker, 2)) as b:
            codes = [(a, b)[i % 2].post("/api/login", json=body).status_code for i in range(11)]
    finally:
        forget(client, marker, account)
        for app in apps:
            app.state.login_guard.close()
            app.state.db.dispose()
    assert codes == [401] * 10 + [429]  # the default 10 failures a minute, counted across both apps


# --------------------------------------------------------------------------------------------
# per-process state


def test_a_task_closed_through_one_worker_stops_being_served_by_the_other(tmp_path):
    """Each worker caches task settings; closing a task changes one of them (open_to_all). The
    worker that closed it drops its copy at once, the others re-read theirs after the cache's
    time to live (5 s in the server; 0.3 s here)."""
    url = f"sqlite:///{tmp_path}/fb.db"
    upgrade(url)
    db = Database(url, pool_size=2)
    with db.session() as s:
        admin, ann = create_user(s, "adam", PASSWORD, "admin"), create_user(s, "ann", PASSWORD)
        tokens = {"admin": create_api_token(s, admin), "ann": create_api_token(s, ann)}
        task = create_task(s, "open", "pairwise", gold_rate=0.0)
        import_records(s, task, [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(3)])
        task_id = task.id
    db.dispose()
    a, b = create_app(url), create_app(url)
    b.state.tasks = TaskCache(ttl=0.3)
    as_ann = {"Authorization": f"Bearer {tokens['ann']}"}
    with TestClient(a) as ca, TestClient(b) as cb:
        assert ca.get(f"/api/tasks/{task_id}/next", headers=as_ann).status_code == 200  # both cache it, open
        assert cb.get(f"/api/tasks/{task_id}/next", headers=as_ann).status_code == 200
        closed = ca.post(f"/api/admin/tasks/{task_id}/close", headers={"Authorization": f"Bearer {tokens['admin']}"})
        assert closed.status_code == 200
        assert ca.get(f"/api/tasks/{task_id}/next", headers=as_ann).status_code == 404
        time.sleep(0.35)
        assert cb.get(f"/api/tasks/{task_id}/next", headers=as_ann).status_code == 404
    for app in (a, b):
        app.state.db.dispose()


# --------------------------------------------------------------------------------------------
# end to end: `serve run --workers 2` on PostgreSQL


def start_server(url: str, port: int, log, *options: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlhfkit.feedback.cli", "run", "--db", url, "--port", str(port),
           "--uncertainty-scorer", "none", "--forwarded-allow-ips", "127.0.0.1", *options]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, port: int, deadline: float) -> None:
    while time.time() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server on port {port} not healthy in time")


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
        except (OSError, ValueError):
            continue
    return found


def worker_of(conn: http.client.HTTPConnection, workers: set[int]) -> int | None:
    """The process holding the server's end of `conn` (Linux: /proc/net/tcp, then file descriptors)."""
    mine, theirs = conn.sock.getsockname()[1], conn.sock.getpeername()[1]
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    inodes = {r[9] for r in rows if int(r[1].split(":")[1], 16) == theirs and int(r[2].split(":")[1], 16) == mine}
    for pid in workers:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                    return pid
            except OSError:
                continue
    return None


def failed_logins(conns: list[http.client.HTTPConnection], n: int, username: str, address: str,
                  workers: set[int]) -> tuple[list[int], list[int | None]]:
    """`n` wrong-password logins, round robin over `conns` (all from `address`, forwarded by the
    trusted local proxy): the status codes and the worker that answered each."""
    codes, served_by = [], []
    body = json.dumps({"username": username, "password": "a wrong password"})
    for i in range(n):
        conn = conns[i % len(conns)]
        conn.request("POST", "/api/login", body=body,
                     headers={"Content-Type": "application/json", "X-Forwarded-For": address})
        resp = conn.getresponse()
        resp.read()
        codes.append(resp.status)
        served_by.append(worker_of(conn, workers))
    return codes, served_by


def connections_on_two_workers(port: int, workers: set[int], seconds: float = 20) -> list[http.client.HTTPConnection]:
    """Two keep-alive connections accepted by different workers (the kernel picks the worker;
    the second may still be starting when the first answers)."""
    by_worker: dict[int, http.client.HTTPConnection] = {}
    deadline = time.time() + seconds
    while time.time() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        pid = worker_of(conn, workers)
        if pid is not None and pid not in by_worker:
            by_worker[pid] = conn
            if len(by_worker) == 2:
                return list(by_worker.values())
        else:
            conn.close()
            time.sleep(0.05)
    raise AssertionError(f"every connection for {seconds} s went to one worker")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # uvicorn's supervisor stops its workers
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of its session left behind
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.postgres
def test_two_workers_on_postgres_hold_the_per_account_limit_of_one_process(tmp_path):
    if reason := postgres_unavailable_reason():
        pytest.skip(reason)
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux /proc to tell which worker answered")
    client = redis_or_skip()
    marker = uuid.uuid4().hex
    username = f"w{marker[:16]}"
    rng = random.Random(marker)
    host = rng.randrange(1, 255)  # three addresses of the benchmarking range, fresh for this run
    address_multi, address_single, address_owner = (f"198.18.{net}.{host}" for net in rng.sample(range(256), 3))
    with temp_postgres_database(prefix="rlhfkit_workers") as url, open(tmp_path / "server.log", "w") as log:
        subprocess.run([sys.executable, "-m", "rlhfkit.feedback.cli", "create-user", "--db", url,
                        "--username", username, "--password-env", "RLHFKIT_TEST_PW"], check=True, timeout=120,
                       env={**os.environ, "RLHFKIT_TEST_PW": PASSWORD}, capture_output=True)
        multi_port, single_port = free_port(), free_port()
        multi = start_server(url, multi_port, log, "--workers", "2", "--rate-limit-storage", REDIS)
        single = start_server(url, single_port, log)  # one process, memory:// counters
        try:
            deadline = time.time() + 60
            wait_healthy(multi, multi_port, deadline)
            wait_healthy(single, single_port, deadline)
            workers = children(multi.pid)
            conns = connections_on_two_workers(multi_port, workers)
            codes, served_by = failed_logins(conns, 12, username, address_multi, workers)
            one = http.client.HTTPConnection("127.0.0.1", single_port, timeout=30)
            expected, _ = failed_logins([one], 12, username, address_single, set())
            ok = http.client.HTTPConnection("127.0.0.1", multi_port, timeout=30)
            ok.request("POST", "/api/login", body=json.dumps({"username": username, "password": PASSWORD}),
                       headers={"Content-Type": "application/json", "X-Forwarded-For": address_owner})
            elsewhere = ok.getresponse().status  # the owner, from another address, still gets in
        finally:
            stop(multi)
            stop(single)
            forget(client, address_multi, address_single, address_owner, username)
    assert expected == [401] * 10 + [429] * 2  # a single process: the default 10 failures a minute
    assert codes == expected, (codes, served_by)
    assert len(set(served_by)) == 2 and None not in served_by  # both workers answered 401s and 429s
    assert {served_by[i] for i in range(10, 12)} == set(served_by)
    assert elsewhere == 200
