"""Annotators' preference strength, comment and skip (stored, exported), and the review queue
page: the pair side by side with the choice marked, filters, pages and bulk accept. SQLite
and PostgreSQL."""

from __future__ import annotations

import json
import re
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


@pytest.fixture
def env(db_url):
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    with db.session() as s:
        users = {n: create_user(s, n, PASSWORD, r) for n, r in
                 (("olga", "owner"), ("adam", "admin"), ("ann", "annotator"), ("ben", "annotator"))}
        tokens = {n: create_api_token(s, u) for n, u in users.items()}
        task = create_task(s, "pairs", "pairwise", gold_rate=0.0, overlap=2, randomize_order=False)
        import_records(s, task, [{"prompt": f"prompt {i}", "responses": [f"left {i}", f"right {i}"]}
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


# --------------------------------------------------------------------------------------------
# the review page


def many(env, n=24):
    """A task of n + 2 items: ann labels n of them, ben one and adam (an admin) one."""
    c = env["c"]
    r = c.post("/api/admin/tasks", headers=H(env, "olga"),
               json={"name": "many", "question_type": "pairwise", "randomize_order": False, "gold_rate": 0.0})
    t = r.json()["id"]
    c.post(f"/api/admin/tasks/{t}/items", headers=H(env, "olga"),
           json=[{"prompt": f"q{i}", "responses": [f"first {i}", f"second {i}"]} for i in range(n + 2)])
    ids = {}
    for who, count in (("ann", n), ("ben", 1), ("adam", 1)):
        for _ in range(count):
            item = c.get(f"/api/tasks/{t}/next", headers=H(env, who)).json()
            r = c.post(f"/api/tasks/{t}/labels", headers=H(env, who),
                       json={"item_id": item["item_id"], "value": {"choice": "right"}, "strength": "clearly",
                             "idempotency_key": uuid.uuid4().hex})
            ids.setdefault(who, []).append(r.json()["id"])
    return t, ids


def sections(html):
    return re.findall(r'<section class="review-item[^"]*" id="review-(\d+)">', html)


def test_the_review_page_shows_the_pair_with_the_choice_marked(env):
    _, r = submit(env, "ann", "right", strength="much", comment="B is kinder")
    html = env["c"].get(f"/admin/tasks/{env['task']}/review", headers=H(env, "adam")).text
    chosen = re.findall(r'<article class="response chosen">\s*<h3>(\w)(.*?)</h3>\s*<pre class="text">(.*?)</pre>', html, re.S)
    assert len(chosen) == 1 and chosen[0][0] == "B" and "preferred · much better" in chosen[0][1]
    assert chosen[0][2].startswith("right ")
    assert "B is much better" in html and "B is kinder" in html and '{"choice"' not in html


def test_the_review_page_filters_pages_and_accepts_in_bulk(env):
    c = env["c"]
    t, ids = many(env)
    page1 = c.get(f"/admin/tasks/{t}/review", headers=H(env, "adam")).text
    assert len(sections(page1)) == 20 and "page 1 of 2" in page1 and 'id="next-page"' in page1
    page2 = c.get(f"/admin/tasks/{t}/review?page=2", headers=H(env, "adam")).text
    assert len(sections(page2)) == 6
    bens = c.get(f"/admin/tasks/{t}/review?annotator=ben", headers=H(env, "adam")).text
    assert sections(bens) == [str(i) for i in ids["ben"]]
    # adam's own label has no checkbox; selecting it anyway leaves it pending
    assert f'value="{ids["adam"][0]}" form="bulk"' not in page2 and "Your own label" in page2
    picked = ids["ann"][:3] + ids["adam"]
    r = c.post(f"/admin/tasks/{t}/review/bulk", headers=H(env, "adam"),
               data={"label_id": [str(i) for i in picked], "status": "pending", "page": "1"})
    assert r.status_code == 200 and "Accepted 3 label(s); left 1 of your own." in r.text
    accepted = c.get(f"/api/admin/tasks/{t}/review?status=accepted", headers=H(env, "adam")).json()
    assert sorted(x["id"] for x in accepted) == sorted(ids["ann"][:3])
    done = c.get(f"/admin/review?task={t}&status=accepted&annotator=ann", headers=H(env, "adam"))
    assert sections(done.text) == [str(i) for i in sorted(ids["ann"][:3])]
    assert c.get(f"/admin/tasks/{t}/review?status=bogus", headers=H(env, "adam")).status_code == 422


def test_annotators_skip_and_comment_from_the_labelling_page(env):
    c, t = env["c"], env["task"]
    page = c.get(f"/tasks/{t}", headers=H(env, "ann")).text
    assert 'id="skip"' in page and 'name="strength"' in page and 'name="comment"' in page
    item_id = re.search(r'name="item_id" value="(\d+)"', page).group(1)
    r = c.post(f"/tasks/{t}", headers=H(env, "ann"), data={"item_id": item_id, "action": "skip"},
               follow_redirects=False)
    assert r.status_code == 303
    page = c.get(f"/tasks/{t}", headers=H(env, "ann")).text
    second = re.search(r'name="item_id" value="(\d+)"', page).group(1)
    key = re.search(r'name="idempotency_key" value="(\w+)"', page).group(1)
    assert second != item_id
    r = c.post(f"/tasks/{t}", headers=H(env, "ann"), follow_redirects=False,
               data={"item_id": second, "idempotency_key": key, "choice": "left", "strength": "slightly",
                     "comment": "close call"})
    assert r.status_code == 303
    (lab,) = c.get("/api/labels/mine", headers=H(env, "ann")).json()
    assert (lab["item_id"], lab["strength"], lab["comment"]) == (int(second), "slightly", "close call")
