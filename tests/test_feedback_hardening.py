"""Account and review hardening: no self-review, visible reject reasons, credentials that end
with a password change or a disabled account, token lifetimes and scopes, the last owner,
the audit trail with client addresses, trusted proxies and per-client login limits.
SQLite and PostgreSQL (the `db_url` fixture)."""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.guard import LoginGuard
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.tasks import create_task

use_test_hasher()
PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new stapler"


@pytest.fixture
def env(db_url):
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    with db.session() as s:
        users = {n: create_user(s, n, PASSWORD, r) for n, r in
                 (("olga", "owner"), ("adam", "admin"), ("ann", "annotator"), ("ben", "annotator"))}
        tokens = {n: create_api_token(s, u) for n, u in users.items()}
        task = create_task(s, "open", "pairwise", gold_rate=0.0, overlap=2)
        import_records(s, task, [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(3)])
        task_id = task.id
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="")))
    yield {"db": db, "c": c, "tokens": tokens, "task": task_id}
    c.close()
    db.dispose()


def H(env, who):
    token = env["tokens"][who] if who in env["tokens"] else who
    return {"Authorization": f"Bearer {token}"}


def label_one(env, who, choice="left"):
    c, t = env["c"], env["task"]
    item = c.get(f"/api/tasks/{t}/next", headers=H(env, who)).json()
    r = c.post(f"/api/tasks/{t}/labels", headers=H(env, who),
               json={"item_id": item["item_id"], "value": {"choice": choice}, "idempotency_key": uuid.uuid4().hex})
    assert r.status_code == 201, r.text
    return r.json()


def export(env, status="accepted"):
    r = env["c"].get(f"/api/admin/tasks/{env['task']}/export?status={status}", headers=H(env, "olga"))
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


# --------------------------------------------------------------------------------------------
# review


def test_reviewers_cannot_accept_their_own_labels(env):
    c = env["c"]
    own = label_one(env, "adam")
    r = c.post(f"/api/admin/labels/{own['id']}/review", headers=H(env, "adam"), json={"decision": "accepted"})
    assert r.status_code == 403 and "your own label" in r.json()["detail"], r.text
    assert c.get(f"/api/labels/{own['id']}", headers=H(env, "adam")).json()["review"]["status"] == "pending"
    other = label_one(env, "ann")
    assert c.post(f"/api/admin/labels/{other['id']}/review", headers=H(env, "adam"),
                  json={"decision": "accepted"}).status_code == 200
    assert len(export(env)) == 1


def test_self_approved_labels_stored_earlier_are_not_exported_as_accepted(env):
    own = label_one(env, "adam")
    with env["db"].session() as s:  # as a database written before self-review was refused holds it
        from rlhfkit.feedback.models import Label

        lab = s.get(Label, own["id"])
        lab.review_status, lab.reviewed_by = "accepted", lab.user_id
    assert export(env) == []
    assert len(export(env, "all")) == 1


@pytest.mark.parametrize("reason", ["\u200b", " \u200b\u2060 ", "\ufeff", "\u3000", "\u00a0\u200d"])
def test_invisible_reject_reasons_are_refused(env, reason):
    c = env["c"]
    lab = label_one(env, "ann")
    r = c.post(f"/api/admin/labels/{lab['id']}/review", headers=H(env, "adam"),
               json={"decision": "rejected", "reason": reason})
    assert r.status_code == 422 and r.json()["field"] == "reason", r.text
    assert c.get(f"/api/labels/{lab['id']}", headers=H(env, "ann")).json()["review"]["status"] == "pending"


# --------------------------------------------------------------------------------------------
# password change


def change_password(env, who, old, new=NEW_PASSWORD):
    return env["c"].post("/api/me/password", headers=H(env, who), json={"old_password": old, "new_password": new})


def test_wrong_old_passwords_are_rate_limited_like_logins(db_url):
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    with db.session() as s:
        token = create_api_token(s, create_user(s, "ann", PASSWORD))
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="3/minute")))
    env = {"c": c, "tokens": {"ann": token}}
    for _ in range(3):
        assert change_password(env, "ann", "wrong guess 1").status_code == 403
    r = change_password(env, "ann", PASSWORD)  # refused before the check, even the right one
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    c.close()
    db.dispose()


# --------------------------------------------------------------------------------------------
# credentials, token scopes and lifetimes, the last owner


def test_a_password_change_revokes_the_other_api_tokens(env):
    c = env["c"]
    login_token = c.post("/api/login", json={"username": "ann", "password": PASSWORD}).json()["token"]
    assert c.get("/api/me", headers=H(env, login_token)).status_code == 200
    assert change_password(env, "ann", PASSWORD).status_code == 200
    assert c.get("/api/me", headers=H(env, login_token)).status_code == 401
    assert c.get("/api/me", headers=H(env, "ann")).status_code == 200  # the token that made the change
    states = {t["id"]: t["revoked"] for t in c.get("/api/tokens", headers=H(env, "ann")).json()}
    assert sorted(states.values()) == [False, True]


def test_re_enabling_a_user_does_not_bring_back_old_tokens_or_sessions(env):
    c = env["c"]
    page = c.get("/login")
    import re

    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    browser = TestClient(c.app)
    browser.cookies.set("rlhfkit_prelogin", c.cookies.get("rlhfkit_prelogin"))
    r = browser.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": csrf},
                     follow_redirects=False)
    assert r.status_code == 303 and browser.get("/api/me").status_code == 200
    for action in ("disable", "enable"):
        assert c.post(f"/api/admin/users/ann/{action}", headers=H(env, "adam")).status_code == 200
    assert c.get("/api/me", headers=H(env, "ann")).status_code == 401
    assert browser.get("/api/me").status_code == 401
    assert c.post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 200
    browser.close()


def test_only_owners_manage_owners_tokens(env):
    c = env["c"]
    assert c.get("/api/admin/users/olga/tokens", headers=H(env, "adam")).status_code == 403
    tid = c.get("/api/admin/users/olga/tokens", headers=H(env, "olga")).json()[0]["id"]
    assert c.delete(f"/api/tokens/{tid}", headers=H(env, "adam")).status_code == 403
    assert c.get("/api/me", headers=H(env, "olga")).status_code == 200
    ann_tid = c.get("/api/admin/users/ann/tokens", headers=H(env, "adam")).json()[0]["id"]
    assert c.delete(f"/api/tokens/{ann_tid}", headers=H(env, "adam")).status_code == 200


@pytest.mark.parametrize("days", [None, 366, 3650])
def test_non_owner_tokens_have_a_maximum_lifetime(env, days):
    c = env["c"]
    r = c.post("/api/tokens", headers=H(env, "ann"), json={"name": "forever", "expires_days": days})
    assert r.status_code == 422 and r.json()["field"] == "expires_days", r.text
    r = c.post("/api/admin/users/ann/tokens", headers=H(env, "olga"), json={"name": "ci", "expires_days": days})
    assert r.status_code == 422 and r.json()["field"] == "expires_days", r.text
    assert c.post("/api/tokens", headers=H(env, "ann"), json={"expires_days": 365}).status_code == 201
    assert c.post("/api/tokens", headers=H(env, "olga"), json={"expires_days": days}).status_code == 201


def test_the_last_owner_cannot_be_demoted_or_disabled(env):
    c = env["c"]
    r = c.post("/api/admin/users/olga/role", headers=H(env, "olga"), json={"role": "admin"})
    assert r.status_code == 409 and "last" in r.json()["detail"], r.text
    assert c.post("/api/admin/users/adam/role", headers=H(env, "olga"), json={"role": "owner"}).status_code == 200
    r = c.post("/api/admin/users/olga/role", headers=H(env, "olga"), json={"role": "admin"})
    assert r.status_code == 200, r.text
    r = c.post("/api/admin/users/adam/role", headers=H(env, "adam"), json={"role": "annotator"})
    assert r.status_code == 409, r.text
    assert c.get("/api/me", headers=H(env, "adam")).json()["role"] == "owner"


# --------------------------------------------------------------------------------------------
# client addresses: trusted proxies only


def guard_app(db_url, **kw):
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    with db.session() as s:
        create_user(s, "alice", PASSWORD)
    guard = LoginGuard(per_ip=kw.pop("per_ip", ""), per_account=kw.pop("per_account", ""),
                       **{k: kw.pop(k) for k in list(kw) if k.startswith("per_account") or k == "slow_delay"})
    return db, create_app(db, login_guard=guard, **kw)


def login(c, password="wrong password", forwarded=None, user="alice"):
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return c.post("/api/login", json={"username": user, "password": password}, headers=headers)


def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_configured_proxy(db_url):
    db, app = guard_app(db_url, per_ip="3/minute")
    c = TestClient(app, client=("203.0.113.9", 5000))
    for i in range(3):
        assert login(c, forwarded=f"198.51.100.{i}").status_code == 401
    r = login(c, PASSWORD, forwarded="198.51.100.77")  # a fresh forged address does not help
    assert r.status_code == 429 and "address" in r.json()["detail"]
    db.dispose()


def test_the_served_app_ignores_x_forwarded_for_from_local_clients(db_url):
    """`serve run` as configured by the CLI: uvicorn's default trusted X-Forwarded-For from
    127.0.0.1, so a local client (or a proxy passing the header through) got a fresh address,
    and a fresh per-address login budget, with every request."""
    import threading
    import time

    import httpx
    import uvicorn

    from rlhfkit.feedback.cli import _parser, build_app, server_options
    from rlhfkit.feedback.testing import free_port

    db, _ = guard_app(db_url)
    args = _parser().parse_args(["run", "--db", db_url, "--port", str(free_port()), "--uncertainty-scorer", "none"])
    app = build_app(args)
    app.state.login_guard = LoginGuard(per_ip="3/minute", per_account="")
    server = uvicorn.Server(uvicorn.Config(app, **server_options(args)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=30) as c:
            codes = [login(c, forwarded=f"198.51.100.{i}").status_code for i in range(4)]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.db.dispose()
        db.dispose()
    assert codes == [401, 401, 401, 429]


def test_a_configured_proxy_forwards_the_client_address(db_url):
    db, app = guard_app(db_url, per_ip="3/minute", forwarded_allow_ips="10.0.0.2")
    proxy = TestClient(app, client=("10.0.0.2", 5000))
    for _ in range(3):
        assert login(proxy, forwarded="198.51.100.1").status_code == 401
    assert login(proxy, forwarded="198.51.100.1").status_code == 429
    assert login(proxy, PASSWORD, forwarded="198.51.100.2").status_code == 200  # another client behind it
    db.dispose()


# --------------------------------------------------------------------------------------------
# failed logins: per account and client, then a slowdown, never a lockout


def test_guessing_from_one_address_does_not_lock_the_owner_out(db_url):
    db, app = guard_app(db_url, per_account="3/minute;50/hour")
    attacker = TestClient(app, client=("203.0.113.9", 5000))
    for _ in range(3):
        assert login(attacker).status_code == 401
    assert login(attacker, PASSWORD).status_code == 429
    owner = TestClient(app, client=("192.0.2.44", 5000))
    assert login(owner, PASSWORD).status_code == 200
    db.dispose()


def test_guessing_from_many_addresses_slows_the_account_down(db_url):
    import time

    db, app = guard_app(db_url, per_account="3/minute", per_account_global="5/minute", slow_delay=0.6)
    for i in range(5):  # five addresses, one failure each: no per-address limit is reached
        assert login(TestClient(app, client=(f"203.0.113.{i}", 5000))).status_code == 401
    owner = TestClient(app, client=("192.0.2.44", 5000))
    t0 = time.perf_counter()
    assert login(owner, PASSWORD).status_code == 200  # slowed, not refused
    assert time.perf_counter() - t0 >= 0.6
    t0 = time.perf_counter()
    assert login(owner, PASSWORD, user="ALICE2".lower()).status_code == 401  # other accounts: no delay
    assert time.perf_counter() - t0 < 0.5
    db.dispose()


# --------------------------------------------------------------------------------------------
# audit trail


def browser_login(c, username, password):
    import re

    page = c.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return c.post("/login", data={"username": username, "password": password, "csrf_token": csrf},
                  follow_redirects=False)


def audit_log(env):
    return list(reversed(env["c"].get("/api/admin/audit?limit=1000", headers=H(env, "olga")).json()))


def test_the_audit_log_records_tasks_imports_corrections_and_logins_with_the_client_address(env):
    db, here = env["db"], ("198.51.100.23", 4000)
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account=""), forwarded_allow_ips="10.0.0.2"),
                   client=here)
    r = c.post("/api/admin/tasks", headers=H(env, "adam"), json={"name": "new", "question_type": "pairwise"})
    assert r.status_code == 201
    task_id = r.json()["id"]
    assert c.post(f"/api/admin/tasks/{task_id}/items", headers=H(env, "adam"),
                  json=[{"prompt": "p", "responses": ["x", "y"]}]).status_code == 201
    lab = label_one(env, "ann")
    assert c.put(f"/api/labels/{lab['id']}", headers=H(env, "ann"), json={"value": {"choice": "right"}}).status_code == 200
    assert c.post("/api/login", json={"username": "ann", "password": "not the password"}).status_code == 401
    assert c.post("/api/login", json={"username": "nobody", "password": "not the password"}).status_code == 401
    assert c.post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 200
    assert browser_login(c, "ben", "not the password").status_code == 401
    assert browser_login(c, "ben", PASSWORD).status_code == 303
    proxied = TestClient(c.app, client=("10.0.0.2", 4000))
    assert proxied.post("/api/login", json={"username": "ben", "password": PASSWORD},
                        headers={"X-Forwarded-For": "192.0.2.8"}).status_code == 200
    got = [(e["actor"], e["action"], e["target"], e["detail"].get("via"), e["client"]) for e in audit_log(env)
           if e["action"] in ("task.create", "task.import", "label.correct", "login.ok", "login.failed")
           and e["client"] is not None]  # the fixture's own task and import came from no client
    addr = here[0]
    assert got == [
        ("adam", "task.create", "new", None, addr), ("adam", "task.import", "new", None, addr),
        ("ann", "label.correct", str(lab["id"]), None, addr),
        ("ann", "login.failed", "ann", "api", addr), (None, "login.failed", "nobody", "api", addr),
        ("ann", "login.ok", "ann", "api", addr), ("ben", "login.failed", "ben", "browser", addr),
        ("ben", "login.ok", "ben", "browser", addr), ("ben", "login.ok", "ben", "api", "192.0.2.8")]
    c.close()
    proxied.close()


def test_account_events_carry_the_client_address(env):
    c = TestClient(env["c"].app, client=("198.51.100.5", 4000))
    assert c.post("/api/admin/users/ben/disable", headers=H(env, "adam")).status_code == 200
    event = audit_log(env)[-1]
    assert (event["action"], event["client"]) == ("user.disable", "198.51.100.5")
