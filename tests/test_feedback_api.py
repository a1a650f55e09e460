"""Feedback service API against SQLite (WAL) and the real PostgreSQL server."""

from __future__ import annotations

import re
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import QUESTION_TYPES, Label, Task
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.tasks import DEFAULT_RUBRIC, create_task

use_test_hasher()  # accounts are created per test; real Argon2 costs ~1 s each here

PASSWORD = "correct horse battery"
XSS_PROMPT = 'Say hi <script>window.__xss=1</script>'
XSS_RESPONSE = '<img src=x onerror="window.__xss=2">hello'



@pytest.fixture
def env(db_url):
    """A migrated database with an admin, two annotators (API tokens) and a pairwise task."""
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    with db.session() as s:
        admin = create_user(s, "boss", PASSWORD, "owner")
        alice = create_user(s, "alice", PASSWORD)
        bob = create_user(s, "bob", PASSWORD)
        tokens = {u.username: create_api_token(s, u) for u in (admin, alice, bob)}
        task = create_task(s, "pairs", "pairwise", overlap=2, gold_rate=0.0)
        import_records(s, task, [{"prompt": f"p{i}", "responses": [f"good {i}", f"bad {i}"]} for i in range(3)])
        import_records(s, task, [{"prompt": XSS_PROMPT, "responses": [XSS_RESPONSE, "plain"]}])
        task_id = task.id
    app = create_app(db)
    client = TestClient(app)
    yield {"db": db, "client": client, "tokens": tokens, "task": task_id, "app": app}
    client.close()
    db.dispose()


def auth(env, who):
    return {"Authorization": f"Bearer {env['tokens'][who]}"}


def label_all(env, who, choice="left"):
    c, n = env["client"], 0
    while True:
        r = c.get(f"/api/tasks/{env['task']}/next", headers=auth(env, who))
        if r.status_code == 204:
            return n
        item = r.json()
        r = c.post(f"/api/tasks/{env['task']}/labels", headers=auth(env, who),
                   json={"item_id": item["item_id"], "value": {"choice": choice}, "idempotency_key": uuid.uuid4().hex})
        assert r.status_code == 201, r.text
        n += 1


def test_migrations_match_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from rlhfkit.feedback.db import current_revision
    from rlhfkit.feedback.models import Base
    from rlhfkit.serving import tables  # noqa: F401  (the served-traffic tables of migration 0007)

    upgrade(db_url)
    assert current_revision(db_url) == "0007"
    db = Database(db_url, pool_size=1)
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        if db.backend == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    db.dispose()


def test_label_flow_idempotency_and_order(env):
    c, t = env["client"], env["task"]
    r = c.get(f"/api/tasks/{t}/next", headers=auth(env, "alice"))
    assert r.status_code == 200
    item = r.json()
    # the same open item is served again until answered (stable order on reload)
    assert c.get(f"/api/tasks/{t}/next", headers=auth(env, "alice")).json()["responses"] == item["responses"]
    body = {"item_id": item["item_id"], "value": {"choice": "left"}, "idempotency_key": "k" * 16}
    first = c.post(f"/api/tasks/{t}/labels", headers=auth(env, "alice"), json=body)
    assert first.status_code == 201 and first.json()["replayed"] is False
    again = c.post(f"/api/tasks/{t}/labels", headers=auth(env, "alice"), json=body)
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["id"] == first.json()["id"]
    # a new key for the same item is a conflict, not a second label
    body2 = dict(body, idempotency_key="z" * 16)
    assert c.post(f"/api/tasks/{t}/labels", headers=auth(env, "alice"), json=body2).status_code == 409
    stored = first.json()
    # canonical answer: "left" maps to whichever original response was shown on the left
    left_original = stored["display_order"][0]
    assert stored["value"] == {"choice": "ab"[left_original]}
    with env["db"].session() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 1


def test_order_randomised_and_recorded(env):
    orders = set()
    c, t = env["client"], env["task"]
    for who in ("alice", "bob"):
        for _ in range(4):
            r = c.get(f"/api/tasks/{t}/next", headers=auth(env, who))
            if r.status_code == 204:
                break
            item = r.json()
            c.post(f"/api/tasks/{t}/labels", headers=auth(env, who),
                   json={"item_id": item["item_id"], "value": {"choice": "left"}, "idempotency_key": uuid.uuid4().hex})
    with env["db"].session() as s:
        for lab in s.scalars(select(Label)):
            orders.add(tuple(lab.display_order))
            # stored choice is the response that was on the left
            assert lab.value["choice"] == "ab"[lab.display_order[0]]
    assert orders <= {(0, 1), (1, 0)} and len(orders) >= 1


def test_overlap_and_no_repeats(env):
    assert label_all(env, "alice") == 4
    assert label_all(env, "bob") == 4
    with env["db"].session() as s:
        create_user(s, "carol", PASSWORD)
        from rlhfkit.feedback.models import User

        env["tokens"]["carol"] = create_api_token(s, s.scalar(select(User).where(User.username == "carol")))
    # overlap 2 is reached: a third annotator gets nothing
    assert label_all(env, "carol") == 0
    with env["db"].session() as s:
        per_item = s.execute(select(Label.item_id, func.count()).group_by(Label.item_id)).all()
    assert sorted(n for _, n in per_item) == [2, 2, 2, 2]


def test_annotators_cannot_read_others_labels_or_admin_routes(env):
    c, t = env["client"], env["task"]
    label_all(env, "alice")
    mine = c.get("/api/labels/mine", headers=auth(env, "alice")).json()
    assert len(mine) == 4
    other = c.get(f"/api/labels/{mine[0]['id']}", headers=auth(env, "bob"))
    assert other.status_code == 404
    assert c.get("/api/labels/mine", headers=auth(env, "bob")).json() == []
    assert c.get(f"/api/labels/{mine[0]['id']}", headers=auth(env, "alice")).status_code == 200
    # bob cannot overwrite alice's answer through an item he was never served
    r = c.post(f"/api/tasks/{t}/labels", headers=auth(env, "bob"),
               json={"item_id": mine[0]["item_id"], "value": {"choice": "right"}, "idempotency_key": "b" * 16})
    assert r.status_code in (201, 409)
    if r.status_code == 201:  # he was legitimately served it? no: he asked for nothing yet
        pytest.fail("an unserved item was accepted")
    admin_routes = [("get", f"/api/admin/tasks/{t}/labels"), ("get", f"/api/admin/tasks/{t}/qc"),
                    ("get", f"/api/admin/tasks/{t}/export"), ("post", "/api/admin/users"),
                    ("post", "/api/admin/tasks"), ("post", f"/api/admin/tasks/{t}/items"),
                    ("post", "/api/admin/users/alice/tokens"), ("get", "/admin"), ("get", f"/admin/tasks/{t}")]
    valid = {"/api/admin/users": {"username": "mallory", "password": PASSWORD, "role": "admin"},
             "/api/admin/tasks": {"name": "x", "question_type": "pairwise"},
             f"/api/admin/tasks/{t}/items": [{"prompt": "p", "responses": ["a", "b"]}]}
    for method, path in admin_routes:
        kw = {"json": valid[path]} if path in valid else {}
        r = getattr(c, method)(path, headers=auth(env, "alice"), **kw)
        assert r.status_code == 403, (path, r.status_code)
        r = getattr(c, method)(path, headers=auth(env, "boss"), **kw)
        assert r.status_code in (200, 201), (path, r.status_code, r.text)
    assert len(c.get(f"/api/admin/tasks/{t}/labels", headers=auth(env, "boss")).json()) == 4


def test_authentication_required_everywhere(env):
    c, t = env["client"], env["task"]
    for method, path in [("get", "/api/me"), ("get", "/api/tasks"), ("get", f"/api/tasks/{t}/next"),
                         ("post", f"/api/tasks/{t}/labels"), ("get", "/api/labels/mine"), ("get", "/api/labels/1"),
                         ("get", f"/api/admin/tasks/{t}/qc"), ("get", f"/api/admin/tasks/{t}/export"),
                         ("post", "/api/admin/users"), ("post", "/api/admin/tasks")]:
        body = {"json": {"item_id": 1, "value": {}, "idempotency_key": "x" * 10}} if "labels" in path and method == "post" else {}
        r = getattr(c, method)(path, **body)
        assert r.status_code in (401, 422), (path, r.status_code)
        if r.status_code == 422:  # body validation may run first; with a valid body it must be 401
            pytest.fail(f"{path} validated the body before authenticating")
    assert c.get("/api/me", headers={"Authorization": "Bearer nope"}).status_code == 401
    for path in ("/", f"/tasks/{t}", "/admin", f"/admin/tasks/{t}"):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
    assert c.post(f"/tasks/{t}", data={"item_id": "1"}).status_code == 401


def test_input_validation_clear_4xx(env):
    c, t = env["client"], env["task"]
    item = c.get(f"/api/tasks/{t}/next", headers=auth(env, "alice")).json()

    def post(value, key=None):
        return c.post(f"/api/tasks/{t}/labels", headers=auth(env, "alice"),
                      json={"item_id": item["item_id"], "value": value, "idempotency_key": key or uuid.uuid4().hex})

    r = post({"choice": "maybe"})
    assert r.status_code == 422 and r.json()["field"] == "value.choice"
    r = post({"choice": "left"}, key="short")
    assert r.status_code == 422
    r = c.post(f"/api/tasks/{t}/labels", headers=auth(env, "alice"), json={"value": {}})
    assert r.status_code == 422
    r = c.post(f"/api/tasks/{t}/labels", headers=auth(env, "alice"),
               json={"item_id": 99999, "value": {"choice": "left"}, "idempotency_key": uuid.uuid4().hex})
    assert r.status_code == 404
    assert c.get("/api/tasks/999/next", headers=auth(env, "alice")).status_code == 404
    r = c.post("/api/admin/tasks", headers=auth(env, "boss"), json={"name": "bad", "question_type": "essay"})
    assert r.status_code == 422 and "question_type" in r.json()["detail"]
    r = c.post(f"/api/admin/tasks/{t}/items", headers=auth(env, "boss"), json=[{"prompt": "x", "responses": ["only one"]}])
    assert r.status_code == 422 and r.json()["field"] == "responses" and r.json()["line"] == 1
    r = c.post("/api/admin/users", headers=auth(env, "boss"), json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 409


def _login(c, username):
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r


def test_browser_session_csrf_and_escaping(env):
    c, t = env["client"], env["task"]
    # login itself is CSRF-protected
    c.get("/login")
    assert c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": "forged"}).status_code == 403
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    bad = c.post("/login", data={"username": "alice", "password": "wrong password", "csrf_token": token})
    assert bad.status_code == 401
    _login(c, "alice")
    # label every item through the form; check escaping on the way
    seen_xss = False
    for _ in range(4):
        html = c.get(f"/tasks/{t}").text
        assert "<script>window.__xss" not in html and "<img src=x" not in html
        if "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html:
            seen_xss = True
            assert "&lt;img src=x onerror=&#34;window.__xss=2&#34;&gt;hello" in html
        item_id = re.search(r'name="item_id" value="(\d+)"', html).group(1)
        key = re.search(r'name="idempotency_key" value="([^"]+)"', html).group(1)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
        # a form post without the CSRF token is refused
        assert c.post(f"/tasks/{t}", data={"item_id": item_id, "choice": "left", "idempotency_key": key}).status_code == 403
        r = c.post(f"/tasks/{t}", data={"item_id": item_id, "choice": "left", "idempotency_key": key,
                                        "csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == 303
    assert seen_xss
    assert "Nothing left to label" in c.get(f"/tasks/{t}").text
    r = c.get(f"/tasks/{t}")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    # cookie-authenticated JSON writes need the header token too
    assert c.post("/api/admin/tasks", json={"name": "n", "question_type": "pairwise"}).status_code == 403
    assert c.get("/admin", follow_redirects=False).status_code == 403


def test_passwords_hashed_with_argon2(env):
    from rlhfkit.feedback.models import ApiToken, User

    with env["db"].session() as s:
        user = s.scalar(select(User).where(User.username == "alice"))
        assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
        assert all(len(t.token_hash) == 64 for t in s.scalars(select(ApiToken)))
        assert env["tokens"]["alice"] not in {t.token_hash for t in s.scalars(select(ApiToken))}
    r = env["client"].post("/api/login", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 200 and r.json()["token"].startswith("rk_")
    assert env["client"].post("/api/login", json={"username": "alice", "password": "nope nope"}).status_code == 401


def test_every_question_type_page_renders_and_accepts_its_form(tmp_path):
    url = f"sqlite:///{tmp_path}/pages.db"
    upgrade(url)
    db = Database(url)
    with db.session() as s:
        create_user(s, "ann", PASSWORD)
        ids = {}
        for qt in QUESTION_TYPES:
            task = create_task(s, qt, qt, gold_rate=0.0)
            n = 2 if qt in ("pairwise", "ranking") else 1
            import_records(s, task, [{"prompt": f"{qt} <b>prompt</b>", "responses": [f"r{i} <i>x</i>" for i in range(n)]}])
            ids[qt] = task.id
    forms = {"pairwise": {"choice": "tie"}, "ranking": {"ranking": "1,0"},
             "rating": {f"r0_{d}": "4" for d in DEFAULT_RUBRIC}, "thumbs": {"t0": "up"},
             "critique": {"text": "could be warmer"}, "edit": {"position": "0", "text": "a kinder reply"}}
    with TestClient(create_app(db)) as c:
        _login(c, "ann")
        for qt, fields in forms.items():
            html = c.get(f"/tasks/{ids[qt]}").text
            assert f"{qt} &lt;b&gt;prompt&lt;/b&gt;" in html and "<b>prompt" not in html
            hidden = dict(re.findall(r'name="(csrf_token|item_id|idempotency_key)" value="([^"]+)"', html))
            bad = c.post(f"/tasks/{ids[qt]}", data={**hidden, "choice": "nonsense", "ranking": "9", "text": ""} if qt != "thumbs"
                         else {**hidden, "t0": "sideways"})
            assert bad.status_code == 422 and 'role="alert"' in bad.text, qt
            ok = c.post(f"/tasks/{ids[qt]}", data={**hidden, **fields}, follow_redirects=False)
            assert ok.status_code == 303, (qt, ok.text[:300])
            assert "Nothing left to label" in c.get(f"/tasks/{ids[qt]}").text
    with db.session() as s:
        labels = {s.get(Task, lab.task_id).question_type: lab for lab in s.scalars(select(Label))}
        values = {qt: lab.value for qt, lab in labels.items()}
    # "1,0" = the response shown second is best: stored as original indices via the display order
    order = labels["ranking"].display_order
    assert values["ranking"] == {"ranking": [order[1], order[0]]}
    assert values["rating"] == {"ratings": [{d: 4 for d in DEFAULT_RUBRIC}]}
    assert values["thumbs"] == {"thumbs": [True]} and values["edit"] == {"response": 0, "text": "a kinder reply"}
    db.dispose()
