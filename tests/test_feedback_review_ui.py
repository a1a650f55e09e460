"""Annotators' preference strength, comment and skip (stored, exported), and the review queue
page: the pair side by side with the choice marked, filters, pages and bulk accept. SQLite
and PostgreSQL."""

from __future__ import annotations

import json
import re
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


@pytest.fixture
def env(db_url):
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    with db.session() as s:
        users = {n: svc.create_user(s, n, PASSWORD, r) for n, r in
                 (("olga", "owner"), ("adam", "admin"), ("ann", "annotator"), ("ben", "annotator"))}
        tokens = {n: create_api_token(s, u) for n, u in users.items()}
        task = svc.create_task(s, "pairs", "pairwise", gold_rate=0.0, overlap=2, randomize_order=False)
        svc.import_records(s, task, [{"prompt": f"prompt {i}", "responses": [f"left {i}", f"right {i}"]}
                                     for i in range(4)])
        task_id = task.id
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="")))
    yield {"db": db, "c": c, "tokens": tokens, "task": task_id}
    c.close()
    db.dispose()


def H(env, who):
    return {"Authorization": f"Bearer {env['tokens'][who]}"}


def submit(env, who, choice="left", **extra):
    c, t = env["c"], env["task"]
    item = c.get(f"/api/tasks/{t}/next", headers=H(env, who)).json()
    return item, c.post(f"/api/tasks/{t}/labels", headers=H(env, who),
                        json={"item_id": item["item_id"], "value": {"choice": choice},
                              "idempotency_key": uuid.uuid4().hex, **extra})


def test_strength_and_comment_are_stored_and_exported(env):
    c = env["c"]
    _, r = submit(env, "ann", "right", strength="much", comment="the left one is rude")
    assert r.status_code == 201, r.text
    assert (r.json()["strength"], r.json()["comment"]) == ("much", "the left one is rude")
    assert submit(env, "ann", "left")[1].status_code == 201  # neither given
    lines = c.get(f"/api/admin/tasks/{env['task']}/export", headers=H(env, "adam")).text.splitlines()
    recs = [json.loads(line) for line in lines]
    i = recs[0]["prompt"].split()[-1]
    assert recs[0] == {"prompt": f"prompt {i}", "chosen": f"right {i}", "rejected": f"left {i}", "strength": "much",
                       "margin": 1.0, "comment": "the left one is rude"}
    assert (recs[1]["strength"], recs[1]["margin"], recs[1]["comment"]) == (None, 0.0, None)


@pytest.mark.parametrize("choice,extra,field", [
    ("tie", {"strength": "clearly"}, "strength"),
    ("left", {"strength": "enormously"}, "strength"),
    ("left", {"comment": "bad\x00"}, "comment"),
    ("left", {"comment": "x" * 2001}, "comment"),
])
def test_bad_strength_or_comment_is_a_422_naming_the_field(env, choice, extra, field):
    _, r = submit(env, "ann", choice, **extra)
    assert r.status_code == 422 and r.json()["field"].endswith(field), r.text


def test_a_skipped_item_goes_to_someone_else_and_not_back(env):
    c, t = env["c"], env["task"]
    first = c.get(f"/api/tasks/{t}/next", headers=H(env, "ann")).json()
    assert c.post(f"/api/tasks/{t}/skip", headers=H(env, "ann"), json={"item_id": first["item_id"]}).status_code == 200
    seen = []
    while (r := c.get(f"/api/tasks/{t}/next", headers=H(env, "ann"))).status_code == 200:
        item = r.json()
        seen.append(item["item_id"])
        c.post(f"/api/tasks/{t}/labels", headers=H(env, "ann"),
               json={"item_id": item["item_id"], "value": {"choice": "left"}, "idempotency_key": uuid.uuid4().hex})
    assert first["item_id"] not in seen and len(seen) == 3
    late = c.post(f"/api/tasks/{t}/labels", headers=H(env, "ann"),
                  json={"item_id": first["item_id"], "value": {"choice": "left"}, "idempotency_key": uuid.uuid4().hex})
    assert late.status_code == 409
    assert c.post(f"/api/tasks/{t}/skip", headers=H(env, "ann"), json={"item_id": first["item_id"]}).status_code == 409
    from rlhfkit.feedback.models import Item

    with env["db"].read_session() as s:
        assert s.get(Item, first["item_id"]).slots_taken == 0  # its slot went back
