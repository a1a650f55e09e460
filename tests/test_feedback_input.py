"""Bad input on every write route is a 4xx with a clear message and is never stored.

Each class of input below gave a 500 before (and a lone surrogate in a critique was committed
first, after which the task's export, the admin label list and the annotator's history
answered 500 for everyone). Runs on SQLite and on the PostgreSQL server.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import Item, Label, Task, User
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.tasks import create_task

use_test_hasher()

PASSWORD = "correct horse battery"
BAD_TEXTS = ["nul \x00 inside", "lone \ud800 surrogate", "\udfff"]
BIG_IDS = [2**31, 2**63, 2**64 + 5, -(2**63) - 1]


@pytest.fixture
def env(db_url):
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    tasks = {}
    with db.session() as s:
        admin = create_user(s, "boss", PASSWORD, "admin")
        ann = create_user(s, "ann", PASSWORD)
        tokens = {"boss": create_api_token(s, admin), "ann": create_api_token(s, ann)}
        for qt in ("pairwise", "ranking", "rating", "thumbs", "critique", "edit"):
            task = create_task(s, f"t-{qt}", qt, gold_rate=0.0, randomize_order=False)
            import_records(s, task, [{"prompt": f"p{i}", "responses": ["one", "two", "three"][:2 if qt == "pairwise" else 3]}
                                     for i in range(3)])
            tasks[qt] = task.id
    client = TestClient(create_app(db), raise_server_exceptions=False)
    yield {"db": db, "c": client, "tokens": tokens, "tasks": tasks}
    client.close()
    db.dispose()


def H(env, who="ann"):
    return {"Authorization": f"Bearer {env['tokens'][who]}", "Content-Type": "application/json"}


def raw_json(obj) -> bytes:
    # json.dumps writes lone surrogates as \ud800 escapes: the server decodes them itself
    return json.dumps(obj).encode()


def submit(env, qt, value, item_id=None):
    c, t = env["c"], env["tasks"][qt]
    if item_id is None:
        r = c.get(f"/api/tasks/{t}/next", headers=H(env))
        assert r.status_code == 200, r.text
        item_id = r.json()["item_id"]
    return c.post(f"/api/tasks/{t}/labels", headers=H(env),
                  content=raw_json({"item_id": item_id, "value": value, "idempotency_key": uuid.uuid4().hex}))


def assert_nothing_stored_and_reads_work(env):
    with env["db"].read_session() as s:
        assert s.scalar(select(Label.id).limit(1)) is None
    c = env["c"]
    assert c.get("/api/labels/mine", headers=H(env)).status_code == 200
    for t in env["tasks"].values():
        assert c.get(f"/api/admin/tasks/{t}/labels", headers=H(env, "boss")).status_code == 200
        assert c.get(f"/api/admin/tasks/{t}/qc", headers=H(env, "boss")).status_code == 200


@pytest.mark.parametrize("text", BAD_TEXTS)
def test_bad_text_in_answers_is_422_and_not_stored(env, text):
    for qt, value in (("critique", {"text": text}), ("edit", {"position": 0, "text": text}),
                      ("pairwise", {"choice": text})):
        r = submit(env, qt, value)
        assert r.status_code == 422, (qt, r.status_code, r.text)
        assert r.json()["field"].startswith("value"), r.json()
    assert_nothing_stored_and_reads_work(env)


@pytest.mark.parametrize("qt,value", [
    ("pairwise", {"choice": ["left"]}), ("pairwise", {"choice": {"a": 1}}), ("pairwise", {"choice": 1}),
    ("ranking", {"ranking": [0.0, 1.0, 2.0]}), ("ranking", {"ranking": [True, False, 2]}),
    ("ranking", {"ranking": "012"}), ("rating", {"ratings": [{"helpful": 2.0, "harmless": 1, "honest": 1}] * 3}),
    ("rating", {"ratings": [[1, 2, 3]] * 3}), ("thumbs", {"thumbs": [1, 0, 1]}),
    ("critique", {"text": ["x"]}), ("edit", {"position": 0.0, "text": "x"}), ("edit", {"position": "0", "text": "x"}),
    ("edit", {"position": 2**70, "text": "x"}), ("critique", {"text": "x", "extra": "field"}),
])
def test_wrong_json_types_are_422(env, qt, value):
    r = submit(env, qt, value)
    assert r.status_code == 422, (r.status_code, r.text)
    assert r.json()["field"].startswith("value"), r.json()
    assert_nothing_stored_and_reads_work(env)


@pytest.mark.parametrize("big", BIG_IDS)
def test_ids_outside_integer_range_are_4xx(env, big):
    c, t = env["c"], env["tasks"]["pairwise"]
    assert c.get(f"/api/tasks/{big}/next", headers=H(env)).status_code == 422
    assert c.get(f"/api/labels/{big}", headers=H(env)).status_code == 422
    assert c.get(f"/api/labels/mine?task_id={big}", headers=H(env)).status_code == 422
    assert c.get(f"/api/admin/tasks/{big}/export", headers=H(env, "boss")).status_code == 422
    r = c.post(f"/api/tasks/{t}/labels", headers=H(env),
               content=raw_json({"item_id": big, "value": {"choice": "left"}, "idempotency_key": uuid.uuid4().hex}))
    assert r.status_code == 422 and "item_id" in r.text
    r = c.post("/api/admin/tasks", headers=H(env, "boss"),
               content=raw_json({"name": "n", "question_type": "pairwise", "overlap": big}))
    assert r.status_code == 422
    r = c.post(f"/api/admin/tasks/{big}/items", headers=H(env, "boss"), content=raw_json([]))
    assert r.status_code == 422
    assert_nothing_stored_and_reads_work(env)


@pytest.mark.parametrize("text", BAD_TEXTS + ["ctrl\x07char", "new\nline"])
def test_bad_names_and_imports_are_422(env, text):
    c = env["c"]
    r = c.post("/api/admin/users", headers=H(env, "boss"), content=raw_json({"username": text, "password": PASSWORD}))
    assert r.status_code == 422, r.text
    r = c.post("/api/admin/tasks", headers=H(env, "boss"), content=raw_json({"name": text, "question_type": "pairwise"}))
    assert r.status_code == 422, r.text
    r = c.post(f"/api/admin/users/{quote(text.encode('utf-8', 'surrogatepass'), safe='')}/tokens", headers=H(env, "boss"))
    assert r.status_code in (404, 422), r.text
    r = c.post("/api/login", content=raw_json({"username": text, "password": PASSWORD}))
    assert r.status_code in (401, 422), r.text
    if "\n" in text or "\x07" in text:
        return  # control characters are fine inside prompts and instructions
    r = c.post("/api/admin/tasks", headers=H(env, "boss"),
               content=raw_json({"name": "ok", "question_type": "pairwise", "instructions": text}))
    assert r.status_code == 422, r.text
    t = env["tasks"]["pairwise"]
    for rec in ({"prompt": text, "responses": ["a", "b"]}, {"prompt": "p", "responses": [text, "b"]},
                {"prompt": "p", "responses": ["a", "b"], "meta": {"k": [text]}},
                {"prompt": "p", "responses": ["a", "b"], "id": text}):
        r = c.post(f"/api/admin/tasks/{t}/items", headers=H(env, "boss"), content=raw_json([rec]))
        assert r.status_code == 422 and r.json()["line"] == 1, r.text
    with env["db"].read_session() as s:
        assert sorted(s.scalars(select(User.username))) == ["ann", "boss"]
        assert [n for n in s.scalars(select(Task.name)) if not n.startswith("t-")] == []
        assert len(list(s.scalars(select(Item.id).where(Item.task_id == t)))) == 3


def test_export_of_unicode_task_name_sets_rfc5987_filename(env):
    c = env["c"]
    r = c.post("/api/admin/tasks", headers=H(env, "boss"), json={"name": "Präferenz ✓ \"q\"", "question_type": "pairwise"})
    assert r.status_code == 201, r.text
    r = c.get(f"/api/admin/tasks/{r.json()['id']}/export", headers=H(env, "boss"))
    assert r.status_code == 200, r.text
    cd = r.headers["content-disposition"]
    assert cd.isascii()
    assert "filename*=UTF-8''Pr%C3%A4ferenz%20%E2%9C%93%20%22q%22-preferences.jsonl" in cd


def test_cli_import_rejects_bad_text_with_file_and_line(db_url, tmp_path, capsys):
    from rlhfkit.feedback.cli import cli

    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"prompt": "fine", "responses": ["a", "b"]}\n'
                     b'{"prompt": "bad \\u0000", "responses": ["a", "b"]}\n')
    assert cli(["import", "--db", db_url, "--task", "x", "--type", "pairwise", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "prompt" in err and len(err.strip().splitlines()) == 1
    path.write_bytes(b'{"prompt": "fine", "responses": ["a", "b"]}\n{"prompt": "\xff\xfe", "responses": ["a", "b"]}\n')
    assert cli(["import", "--db", db_url, "--task", "x", "--type", "pairwise", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "UTF-8" in err
    path.write_bytes(b'{"prompt": "lone \\ud83d", "responses": ["a", "b"]}\n')
    assert cli(["import", "--db", db_url, "--task", "x", "--type", "pairwise", str(path)]) == 2
    db = Database(db_url, pool_size=1)
    with db.read_session() as s:
        assert s.scalar(select(Item.id).limit(1)) is None
    db.dispose()
