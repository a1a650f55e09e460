"""Property test: random JSON thrown at every write route never gives a 500, and the
database holds only valid rows afterwards (text storable, answers in their stored form)."""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.export import kinds_for
from rlhfkit.feedback.guard import LoginGuard
from rlhfkit.feedback.models import Item, Label, Task, User
from rlhfkit.feedback.schemas import json_text_problem, name_problem, text_problem
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.tasks import create_task
from rlhfkit.feedback.testing import postgres_unavailable_reason, temp_postgres_database

use_test_hasher()

PASSWORD = "correct horse battery"
QTYPES = ("pairwise", "ranking", "rating", "thumbs", "critique", "edit")
_PG_REASON = postgres_unavailable_reason()

# text with the characters that used to break things: NUL, lone surrogates, controls, non-ASCII
nasty = st.text(alphabet=st.sampled_from(["a", "b", " ", "\x00", "\ud800", "\udfff", "\x07", "\n", "é", "ｌ", "✓"]),
                max_size=8)
text = st.one_of(nasty, st.text(max_size=8), st.sampled_from(["left", "right", "tie", "both_bad", "helpful"]))
ints = st.one_of(st.integers(-3, 4), st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([2**31, 2**63]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True), text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(text, inner, max_size=4)), max_leaves=12)
answer_keys = st.sampled_from(["choice", "ranking", "ratings", "thumbs", "text", "position", "question_type"])
answers = st.one_of(json_values, st.dictionaries(answer_keys, json_values, max_size=3))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request, tmp_path_factory):
    if request.param == "sqlite":
        ctx = None
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/fb.db"
    else:
        if _PG_REASON:
            pytest.skip(_PG_REASON)
        ctx = temp_postgres_database()
        url = ctx.__enter__()
    upgrade(url)
    db = Database(url, pool_size=4)
    tasks = {}
    with db.session() as s:
        admin = create_user(s, "boss", PASSWORD, "admin")
        ann = create_user(s, "ann", PASSWORD)
        tokens = {"boss": create_api_token(s, admin), "ann": create_api_token(s, ann)}
        for qt in QTYPES:
            task = create_task(s, f"t-{qt}", qt, gold_rate=0.0, overlap=100)
            k = 2 if qt == "pairwise" else 3
            import_records(s, task, [{"prompt": f"p{i}", "responses": [f"r{j}" for j in range(k)]}
                                     for i in range(40)])
            tasks[qt] = task.id
    # no rate limits here: the fuzzer logs in far more often than a person would
    client = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="")),
                        raise_server_exceptions=False)
    yield {"db": db, "c": client, "tokens": tokens, "tasks": tasks}
    client.close()
    db.dispose()
    if ctx is not None:
        ctx.__exit__(None, None, None)


def H(env, who):
    return {"Authorization": f"Bearer {env['tokens'][who]}", "Content-Type": "application/json"}


def post(env, path, body, who="boss"):
    r = env["c"].post(path, headers=H(env, who), content=json.dumps(body).encode())
    assert r.status_code < 500, (path, body, r.status_code, r.text)
    return r


def valid_stored_answer(task: Task, k: int, v: dict) -> bool:
    qt = task.question_type
    if qt == "pairwise":
        return set(v) == {"choice"} and v["choice"] in ("a", "b", "tie", "both_bad")
    if qt == "ranking":
        return set(v) == {"ranking"} and all(type(x) is int for x in v["ranking"]) and sorted(v["ranking"]) == list(range(k))
    if qt == "rating":
        return (set(v) == {"ratings"} and len(v["ratings"]) == k and all(
            set(r) == set(task.rubric) and all(type(x) is int and 1 <= x <= task.likert_points for x in r.values())
            for r in v["ratings"]))
    if qt == "thumbs":
        return set(v) == {"thumbs"} and len(v["thumbs"]) == k and all(type(x) is bool for x in v["thumbs"])
    if qt == "critique":
        return set(v) == {"text"} and isinstance(v["text"], str) and v["text"].strip() != ""
    return (set(v) == {"response", "text"} and type(v["response"]) is int and 0 <= v["response"] < k
            and isinstance(v["text"], str) and v["text"].strip() != "")


def assert_database_valid(env, tasks_read=()):
    with env["db"].read_session() as s:
        for u in s.scalars(select(User)):
            assert name_problem(u.username) is None
        tasks = {t.id: t for t in s.scalars(select(Task))}
        for t in tasks.values():
            assert name_problem(t.name) is None and text_problem(t.instructions) is None
        items = {i.id: i for i in s.scalars(select(Item))}
        for i in items.values():
            assert json_text_problem([i.prompt, i.responses, i.meta, i.external_id]) is None
        for lab in s.scalars(select(Label)):
            item = items[lab.item_id]
            assert valid_stored_answer(tasks[lab.task_id], len(item.responses), lab.value), lab.value
    # reads that broke for everyone after one bad row
    c = env["c"]
    assert c.get("/api/labels/mine", headers=H(env, "ann")).status_code == 200
    for qt in tasks_read:
        t = env["tasks"][qt]
        for path in (f"/api/admin/tasks/{t}/labels", f"/api/admin/tasks/{t}/export?kind={kinds_for(qt)[0]}"):
            r = c.get(path, headers=H(env, "boss"))
            assert r.status_code == 200, (path, r.text)


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@FUZZ
@given(qt=st.sampled_from(QTYPES), value=answers, item=st.one_of(ints, st.just("served"), json_values),
       key=st.one_of(st.just("uuid"), text, ints), extra=st.dictionaries(text, json_values, max_size=2))
def test_label_route_never_500_and_stores_only_valid_answers(env, qt, value, item, key, extra):
    t = env["tasks"][qt]
    if item == "served":
        r = env["c"].get(f"/api/tasks/{t}/next", headers=H(env, "ann"))
        assert r.status_code in (200, 204)
        item = r.json()["item_id"] if r.status_code == 200 else 1
    body = {**extra, "item_id": item, "value": value, "idempotency_key": uuid.uuid4().hex if key == "uuid" else key}
    post(env, f"/api/tasks/{t}/labels", body, who="ann")
    post(env, f"/api/tasks/{t}/labels", value, who="ann")  # not even an object of the right shape
    assert_database_valid(env, [qt])


@FUZZ
@given(name=text, password=st.one_of(text, st.just(PASSWORD)), role=st.one_of(text, st.just("annotator")),
       body=json_values)
def test_user_and_login_routes_never_500(env, name, password, role, body):
    post(env, "/api/admin/users", {"username": name, "password": password, "role": role})
    post(env, "/api/admin/users", body)
    post(env, "/api/login", {"username": name, "password": password})
    post(env, "/api/login", body)
    path_name = json.dumps(name)[1:-1].replace("/", "%2F").replace("\\", "%5C").replace("?", "%3F").replace("#", "%23")
    if path_name.isprintable():
        post(env, f"/api/admin/users/{path_name}/tokens", {})
    assert_database_valid(env)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(["name", "question_type", "overlap", "instructions", "rubric",
                                               "likert_points", "randomize_order", "selection", "gold_rate"]),
                              json_values, max_size=6),
       records=st.one_of(json_values, st.lists(st.dictionaries(
           st.sampled_from(["prompt", "responses", "response", "chosen", "rejected", "id", "gold", "meta"]),
           json_values, max_size=5), max_size=3)),
       qt=st.sampled_from(QTYPES), tid=ints)
def test_task_and_import_routes_never_500(env, fields, records, qt, tid):
    post(env, "/api/admin/tasks", {"question_type": qt, **fields})
    post(env, f"/api/admin/tasks/{env['tasks'][qt]}/items", records)
    post(env, f"/api/admin/tasks/{tid}/items", records)
    assert_database_valid(env)


form_text = st.one_of(st.text(max_size=12), st.sampled_from(["left", "right", "0,1", "1,0,2", "up", "down", "3"]),
                      st.integers(-(2**70), 2**70).map(str))


@FUZZ
@given(qt=st.sampled_from(QTYPES), fields=st.dictionaries(
    st.sampled_from(["item_id", "choice", "ranking", "text", "position", "t0", "t1", "t2", "r0_helpful",
                     "idempotency_key"]), form_text, max_size=6), served=st.booleans())
def test_label_form_never_500(env, qt, fields, served):
    """The browser form route (cookie session, CSRF) with random field values."""
    import re

    c = env["c"]
    if "csrf" not in env:
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        r = c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": token}, follow_redirects=False)
        assert r.status_code == 303
        page = c.get(f"/tasks/{env['tasks'][qt]}")
        env["csrf"] = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    t = env["tasks"][qt]
    if served:
        page = c.get(f"/tasks/{t}")
        assert page.status_code == 200
        m = re.search(r'name="item_id" value="(\d+)"', page.text)
        if m:
            fields = {**fields, "item_id": m.group(1)}
    r = c.post(f"/tasks/{t}", data={**fields, "csrf_token": env["csrf"]}, follow_redirects=False)
    assert r.status_code in (303, 404, 409, 422), (fields, r.status_code, r.text[:300])
    assert_database_valid(env, [qt])
