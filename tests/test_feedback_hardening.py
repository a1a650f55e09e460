"""Account and review hardening: no self-review, visible reject reasons, credentials that end
with a password change or a disabled account, token lifetimes and scopes, the last owner,
the audit trail with client addresses, trusted proxies and per-client login limits.
SQLite and PostgreSQL (the `db_url` fixture)."""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient

from rlhfkit.feedback import service as svc
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.guard import LoginGuard
from rlhfkit.feedback.security import create_api_token, use_test_hasher

use_test_hasher()
PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new stapler"


@pytest.fixture
def env(db_url):
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    with db.session() as s:
        users = {n: svc.create_user(s, n, PASSWORD, r) for n, r in
                 (("olga", "owner"), ("adam", "admin"), ("ann", "annotator"), ("ben", "annotator"))}
        tokens = {n: create_api_token(s, u) for n, u in users.items()}
        task = svc.create_task(s, "open", "pairwise", gold_rate=0.0, overlap=2)
        svc.import_records(s, task, [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(3)])
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
        token = create_api_token(s, svc.create_user(s, "ann", PASSWORD))
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="3/minute")))
    env = {"c": c, "tokens": {"ann": token}}
    for _ in range(3):
        assert change_password(env, "ann", "wrong guess 1").status_code == 403
    r = change_password(env, "ann", PASSWORD)  # refused before the check, even the right one
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    c.close()
    db.dispose()
