"""Accounts like a team tool (roles, task scoping, tokens, disabled users, passwords, unique
names, audit log) and review (corrections as versions, accept/reject, accepted-only export,
server-measured durations). SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.guard import LoginGuard
from rlhfkit.feedback.models import ApiToken, Label, LabelVersion, utcnow
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.tasks import create_task
from rlhfkit.feedback.testing import postgres_unavailable_reason, temp_postgres_database

use_test_hasher()
PASSWORD = "correct horse battery"
_PG_REASON = postgres_unavailable_reason()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request, tmp_path):
    if request.param == "sqlite":
        ctx, url = None, f"sqlite:///{tmp_path}/fb.db"
    else:
        if _PG_REASON:
            pytest.skip(_PG_REASON)
        ctx = temp_postgres_database()
        url = ctx.__enter__()
    upgrade(url)
    db = Database(url, pool_size=4)
    with db.session() as s:
        users = {n: create_user(s, n, PASSWORD, r) for n, r in
                 (("olga", "owner"), ("adam", "admin"), ("ann", "annotator"), ("ben", "annotator"))}
        tokens = {n: create_api_token(s, u) for n, u in users.items()}
        open_task = create_task(s, "open", "pairwise", gold_rate=0.0, overlap=2)
        closed = create_task(s, "closed", "pairwise", gold_rate=0.0, open_to_all=False)
        for t in (open_task, closed):
            import_records(s, t, [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(3)])
        ids = {"open": open_task.id, "closed": closed.id}
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="")))
    yield {"db": db, "c": c, "tokens": tokens, "tasks": ids}
    c.close()
    db.dispose()
    if ctx is not None:
        ctx.__exit__(None, None, None)


def H(env, who):
    return {"Authorization": f"Bearer {env['tokens'][who]}"}


def label_one(env, who, task="open", choice="left"):
    c, t = env["c"], env["tasks"][task]
    item = c.get(f"/api/tasks/{t}/next", headers=H(env, who)).json()
    r = c.post(f"/api/tasks/{t}/labels", headers=H(env, who),
               json={"item_id": item["item_id"], "value": {"choice": choice}, "idempotency_key": uuid.uuid4().hex,
                     "duration_ms": 1})
    assert r.status_code == 201, r.text
    return r.json()


def test_annotators_see_only_open_tasks_and_their_own(env):
    c, closed = env["c"], env["tasks"]["closed"]
    assert [t["name"] for t in c.get("/api/tasks", headers=H(env, "ann")).json()] == ["open"]
    assert c.get(f"/api/tasks/{closed}/next", headers=H(env, "ann")).status_code == 404
    assert [t["name"] for t in c.get("/api/tasks", headers=H(env, "adam")).json()] == ["open", "closed"]
    r = c.post(f"/api/admin/tasks/{closed}/members", headers=H(env, "adam"), json={"username": "ANN"})
    assert r.status_code == 201
    assert [t["name"] for t in c.get("/api/tasks", headers=H(env, "ann")).json()] == ["open", "closed"]
    assert c.get(f"/api/tasks/{closed}/next", headers=H(env, "ann")).status_code == 200
    assert [t["name"] for t in c.get("/api/tasks", headers=H(env, "ben")).json()] == ["open"]


def test_roles_owner_admin_annotator(env):
    c = env["c"]
    new = {"username": "newbie", "password": PASSWORD}
    assert c.post("/api/admin/users", headers=H(env, "ann"), json=new).status_code == 403
    assert c.post("/api/admin/users", headers=H(env, "adam"), json={**new, "role": "admin"}).status_code == 403
    assert c.post("/api/admin/users", headers=H(env, "adam"), json=new).status_code == 201
    assert c.post("/api/admin/users/newbie/role", headers=H(env, "adam"), json={"role": "admin"}).status_code == 403
    assert c.post("/api/admin/users/newbie/role", headers=H(env, "olga"), json={"role": "admin"}).status_code == 200
    assert c.post("/api/admin/users/olga/disable", headers=H(env, "adam")).status_code == 403


def test_usernames_unique_after_case_folding_and_nfkc(env):
    c = env["c"]
    for name in ("ADAM", "Adam", "ａｄａｍ", "ＡＤＡＭ"):
        r = c.post("/api/admin/users", headers=H(env, "olga"), json={"username": name, "password": PASSWORD})
        assert r.status_code == 409, (name, r.text)
    # and one can log in with any spelling of the same name
    assert c.post("/api/login", json={"username": "ａｄａｍ", "password": PASSWORD}).json()["username"] == "adam"


@pytest.mark.parametrize("weak", ["password1", "P@ssw0rd", "qwertyuiop", "iloveyou2", "adamadam1"])
def test_common_passwords_are_refused(env, weak):
    r = env["c"].post("/api/admin/users", headers=H(env, "olga"), json={"username": "adam2", "password": weak})
    assert r.status_code == 422 and r.json()["field"] == "password", r.text


def test_tokens_expire_are_listed_and_revoked(env):
    c = env["c"]
    r = c.post("/api/tokens", headers=H(env, "ann"), json={"name": "script", "expires_days": 1})
    assert r.status_code == 201
    script = {"Authorization": f"Bearer {r.json()['token']}"}
    assert c.get("/api/me", headers=script).status_code == 200
    listed = c.get("/api/tokens", headers=H(env, "ann")).json()
    assert [t["name"] for t in listed][-1] == "script" and listed[-1]["expires_at"] is not None
    assert "token" not in listed[-1] and not any("hash" in k for k in listed[-1])
    with env["db"].session() as s:  # a day later
        s.execute(update(ApiToken).where(ApiToken.id == listed[-1]["id"])
                  .values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    assert c.get("/api/me", headers=script).status_code == 401
    r = c.post("/api/tokens", headers=H(env, "ann"), json={"name": "other"})
    other = {"Authorization": f"Bearer {r.json()['token']}"}
    tid = c.get("/api/tokens", headers=H(env, "ann")).json()[-1]["id"]
    assert c.delete(f"/api/tokens/{tid}", headers=H(env, "ben")).status_code == 404  # not his
    assert c.delete(f"/api/tokens/{tid}", headers=H(env, "ann")).status_code == 200
    assert c.get("/api/me", headers=other).status_code == 401
    assert c.get("/api/admin/users/ann/tokens", headers=H(env, "adam")).status_code == 200


def test_disabled_user_cannot_log_in_but_labels_stay(env):
    c = env["c"]
    label_one(env, "ann")
    assert c.post("/api/admin/users/ann/disable", headers=H(env, "adam")).status_code == 200
    assert c.get("/api/me", headers=H(env, "ann")).status_code == 401
    assert c.post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 401
    labels = c.get(f"/api/admin/tasks/{env['tasks']['open']}/labels", headers=H(env, "adam")).json()
    assert [lab["annotator"] for lab in labels] == ["ann"]
    assert c.post("/api/admin/users/ann/enable", headers=H(env, "adam")).status_code == 200
    assert c.get("/api/me", headers=H(env, "ann")).status_code == 401  # tokens stay revoked
    assert c.post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 200


def test_password_change(env):
    c = env["c"]
    body = {"old_password": "not it at all", "new_password": "another fine passphrase"}
    assert c.post("/api/me/password", headers=H(env, "ann"), json=body).status_code == 403
    weak = {"old_password": PASSWORD, "new_password": "password"}
    assert c.post("/api/me/password", headers=H(env, "ann"), json=weak).status_code == 422
    body["old_password"] = PASSWORD
    assert c.post("/api/me/password", headers=H(env, "ann"), json=body).status_code == 200
    assert c.post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 401
    assert c.post("/api/login", json={"username": "ann", "password": body["new_password"]}).status_code == 200


def test_audit_log_records_account_token_role_and_export_events(env):
    c, t = env["c"], env["tasks"]["open"]
    c.post("/api/admin/users", headers=H(env, "adam"), json={"username": "zed", "password": PASSWORD})
    c.post("/api/admin/users/zed/tokens", headers=H(env, "adam"), json={"name": "ci", "expires_days": 7})
    tid = c.get("/api/admin/users/zed/tokens", headers=H(env, "adam")).json()[0]["id"]
    c.delete(f"/api/tokens/{tid}", headers=H(env, "adam"))
    c.post("/api/admin/users/zed/role", headers=H(env, "olga"), json={"role": "admin"})
    c.get(f"/api/admin/tasks/{t}/export", headers=H(env, "adam"))
    assert c.get("/api/admin/audit", headers=H(env, "ann")).status_code == 403
    log = c.get("/api/admin/audit", headers=H(env, "adam")).json()
    got = [(e["actor"], e["action"], e["target"]) for e in reversed(log)][-5:]
    assert got == [("adam", "user.create", "zed"), ("adam", "token.issue", "zed"), ("adam", "token.revoke", "zed"),
                   ("olga", "user.role", "zed"), ("adam", "task.export", "open")]
    assert log[1]["detail"] == {"old": "annotator", "new": "admin"}


def test_correction_keeps_versions_and_review_locks_it(env):
    c = env["c"]
    lab = label_one(env, "ann", choice="left")
    first = lab["value"]
    r = c.put(f"/api/labels/{lab['id']}", headers=H(env, "ann"), json={"value": {"choice": "right"}})
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["value"] != first
    assert c.put(f"/api/labels/{lab['id']}", headers=H(env, "ben"), json={"value": {"choice": "left"}}).status_code == 404
    assert c.put(f"/api/labels/{lab['id']}", headers=H(env, "ann"), json={"value": {"choice": [1]}}).status_code == 422
    versions = c.get(f"/api/labels/{lab['id']}/versions", headers=H(env, "ann")).json()
    assert [(v["version"], v["value"]) for v in versions] == [(1, first), (2, r.json()["value"])]
    r = c.post(f"/api/admin/labels/{lab['id']}/review", headers=H(env, "adam"), json={"decision": "rejected"})
    assert r.status_code == 422 and r.json()["field"] == "reason"
    r = c.post(f"/api/admin/labels/{lab['id']}/review", headers=H(env, "adam"),
               json={"decision": "rejected", "reason": "the left one is rude"})
    assert r.status_code == 200 and r.json()["review"] == {"status": "rejected", "reason": "the left one is rude"}
    assert c.put(f"/api/labels/{lab['id']}", headers=H(env, "ann"), json={"value": {"choice": "tie"}}).status_code == 409
    assert c.get(f"/api/labels/{lab['id']}", headers=H(env, "ann")).json()["review"]["reason"] == "the left one is rude"
    assert c.post(f"/api/admin/labels/{lab['id']}/review", headers=H(env, "ann"),
                  json={"decision": "accepted"}).status_code == 403
    with env["db"].read_session() as s:
        assert len(list(s.scalars(select(LabelVersion)))) == 1


def test_review_queue_and_accepted_only_export(env):
    c, t = env["c"], env["tasks"]["open"]
    a, b = label_one(env, "ann"), label_one(env, "ben")
    queue = c.get(f"/api/admin/tasks/{t}/review", headers=H(env, "adam")).json()
    assert sorted(x["id"] for x in queue) == sorted([a["id"], b["id"]])
    c.post(f"/api/admin/labels/{a['id']}/review", headers=H(env, "adam"), json={"decision": "accepted"})
    c.post(f"/api/admin/labels/{b['id']}/review", headers=H(env, "adam"), json={"decision": "rejected", "reason": "x"})
    assert [x["id"] for x in c.get(f"/api/admin/tasks/{t}/review", headers=H(env, "adam")).json()] == []
    everything = c.get(f"/api/admin/tasks/{t}/export?ties=keep", headers=H(env, "adam")).text.splitlines()
    accepted = c.get(f"/api/admin/tasks/{t}/export?ties=keep&status=accepted", headers=H(env, "adam")).text.splitlines()
    assert len(everything) == 2 and len(accepted) == 1


def test_durations_are_measured_by_the_server(env):
    c, t = env["c"], env["tasks"]["open"]
    item = c.get(f"/api/tasks/{t}/next", headers=H(env, "ann")).json()
    with env["db"].session() as s:  # served 42 s ago
        from rlhfkit.feedback.models import Assignment

        s.execute(update(Assignment).values(served_at=utcnow() - dt.timedelta(seconds=42)))
    r = c.post(f"/api/tasks/{t}/labels", headers=H(env, "ann"),
               json={"item_id": item["item_id"], "value": {"choice": "left"}, "idempotency_key": uuid.uuid4().hex,
                     "duration_ms": 1})
    assert 42_000 <= r.json()["duration_ms"] < 60_000
    with env["db"].read_session() as s:
        assert 42_000 <= s.scalar(select(Label.duration_ms)) < 60_000


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_migration_0002_keeps_existing_accounts_and_labels(backend, tmp_path):
    from sqlalchemy import text

    if backend == "postgres" and _PG_REASON:
        pytest.skip(_PG_REASON)
    ctx = temp_postgres_database() if backend == "postgres" else None
    url = ctx.__enter__() if ctx else f"sqlite:///{tmp_path}/old.db"
    try:
        upgrade(url, "0001")
        db = Database(url, pool_size=1)
        with db.engine.begin() as conn:  # two accounts that only differ by case, made before 0002
            for i, name in ((1, "Admin"), (2, "admin")):
                conn.execute(text("INSERT INTO users (id, username, password_hash, role, active, created_at) "
                                  "VALUES (:i, :n, 'x', 'annotator', true, CURRENT_TIMESTAMP)"), {"i": i, "n": name})
        db.dispose()
        upgrade(url)
        db = Database(url, pool_size=1)
        with db.read_session() as s:
            from rlhfkit.feedback.models import User

            keys = sorted(s.scalars(select(User.username_key)))
        db.dispose()
        assert keys == ["admin", "admin#2"]
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
