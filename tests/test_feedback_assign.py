"""Assignment under concurrency: no item gets more annotators than its overlap, on SQLite and
on PostgreSQL (where writers are not serialised in-process), and a submit for an assignment
that expired and was served to someone else is refused."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import Counter

import pytest
from sqlalchemy import func, select, update

from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import Assignment, Label, Task, User, utcnow
from rlhfkit.feedback.security import use_test_hasher
from rlhfkit.feedback.service import assign
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.assign import (
    ASSIGNMENT_TIMEOUT,
    candidate_ids,
    candidate_query,
    next_assignment,
)
from rlhfkit.feedback.service.errors import Conflict
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.labels import submit_label
from rlhfkit.feedback.service.tasks import create_task

use_test_hasher()
PASSWORD = "correct horse battery"


def setup(db_url, n_users, n_items, overlap):
    upgrade(db_url)
    db = Database(db_url, pool_size=n_users + 2)
    with db.session() as s:
        users = [create_user(s, f"u{i}", PASSWORD).id for i in range(n_users)]
        task = create_task(s, "t", "pairwise", overlap=overlap, gold_rate=0.0)
        import_records(s, task, [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(n_items)])
        return db, users, task.id


def label_until_done(db, user_id, task_id, errors):
    try:
        while True:
            with db.session() as s:
                got = next_assignment(s, s.get(Task, task_id), s.get(User, user_id))
                if got is None:
                    return
                item_id = got[0].id
            with db.session() as s:
                submit_label(s, s.get(Task, task_id), s.get(User, user_id), item_id, {"choice": "left"},
                             uuid.uuid4().hex)
    except Exception as e:  # reported by the test
        errors.append(repr(e))


def run_concurrently(target, arg_tuples) -> list[str]:
    """One thread per argument tuple, each `target(*args, errors)`, all at once; the errors they report."""
    errors: list[str] = []
    threads = [threading.Thread(target=target, args=(*args, errors)) for args in arg_tuples]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("overlap", [1, 2])
def test_concurrent_annotators_never_exceed_overlap(db_url, overlap):
    n_users, n_items = 8, 40
    db, users, task_id = setup(db_url, n_users, n_items, overlap)
    errors = run_concurrently(label_until_done, [(db, u, task_id) for u in users])
    assert errors == []
    with db.read_session() as s:
        per_item = Counter(s.scalars(select(Label.item_id)))
    db.dispose()
    assert max(per_item.values()) == overlap
    assert len(per_item) == n_items and sum(per_item.values()) == n_items * overlap


@pytest.mark.parametrize("overlap", [1, 2])
def test_claims_that_wait_on_locks_do_not_deadlock(db_url, overlap, monkeypatch):
    """Only the last claim round waits for row locks (the others skip locked items). Forced
    into that round at once, 16 annotators deadlocked on PostgreSQL in every trial while
    transactions kept the locks of items they had found full; now only an item with a free
    slot is locked, and its holder takes that slot and commits."""
    monkeypatch.setattr(assign, "CLAIM_ROUNDS", 1)
    n_users, n_items = 16, 60
    db, users, task_id = setup(db_url, n_users, n_items, overlap)
    errors = run_concurrently(label_until_done, [(db, u, task_id) for u in users])
    with db.read_session() as s:
        per_item = Counter(s.scalars(select(Label.item_id)))
    db.dispose()
    assert errors == []
    assert len(per_item) == n_items and set(per_item.values()) == {overlap}


def test_expired_and_reassigned_submit_is_refused(db_url):
    db, (alice, bob), task_id = setup(db_url, 2, 1, overlap=1)
    with db.session() as s:
        item_id = next_assignment(s, s.get(Task, task_id), s.get(User, alice))[0].id
    with db.session() as s:  # alice walked away: her assignment expires
        s.execute(update(Assignment).values(served_at=utcnow() - ASSIGNMENT_TIMEOUT - dt.timedelta(seconds=1)))
    with db.session() as s:
        got = next_assignment(s, s.get(Task, task_id), s.get(User, bob))
        assert got is not None and got[0].id == item_id
    with db.session() as s, pytest.raises(Conflict, match="expired"):
        submit_label(s, s.get(Task, task_id), s.get(User, alice), item_id, {"choice": "left"}, uuid.uuid4().hex)
    with db.session() as s:
        submit_label(s, s.get(Task, task_id), s.get(User, bob), item_id, {"choice": "right"}, uuid.uuid4().hex)
    with db.read_session() as s:
        assert list(s.scalars(select(Label.user_id))) == [bob]
    db.dispose()


def test_expired_but_not_reassigned_submit_is_accepted(db_url):
    db, (alice, _), task_id = setup(db_url, 2, 1, overlap=1)
    with db.session() as s:
        item_id = next_assignment(s, s.get(Task, task_id), s.get(User, alice))[0].id
    with db.session() as s:
        s.execute(update(Assignment).values(served_at=utcnow() - ASSIGNMENT_TIMEOUT - dt.timedelta(seconds=1)))
    with db.session() as s:
        label, _ = submit_label(s, s.get(Task, task_id), s.get(User, alice), item_id, {"choice": "left"},
                                uuid.uuid4().hex)
        assert label.user_id == alice
    db.dispose()


def test_migration_0003_counts_the_slots_of_existing_assignments(db_url):
    """A 0002 database with a completed, an open and an expired-open assignment: after the
    upgrade the items count the first two, the expired one is released, and serving goes on
    from those counts (the expired item is served again, the full ones are not)."""
    from sqlalchemy import text

    upgrade(db_url, "0002")
    db = Database(db_url, pool_size=2)
    now = utcnow()
    old = now - ASSIGNMENT_TIMEOUT - dt.timedelta(minutes=1)
    with db.engine.begin() as conn:
        for uid in (1, 2, 3):  # explicit ids: nothing below inserts users, tasks or items
            conn.execute(text("INSERT INTO users (id, username, username_key, password_hash, role, active, created_at) "
                              "VALUES (:i, :n, :n, 'x', 'annotator', true, :t)"), {"i": uid, "n": f"u{uid}", "t": now})
        conn.execute(text("INSERT INTO tasks (id, name, question_type, instructions, rubric, likert_points, overlap, "
                          "randomize_order, selection, gold_rate, open_to_all, created_at) VALUES "
                          "(1, 't', 'pairwise', '', '[]', 5, 1, false, 'random', 0.0, true, :t)"), {"t": now})
        for iid in (1, 2, 3):
            conn.execute(text("INSERT INTO items (id, task_id, prompt, responses, is_gold, meta, created_at) "
                              "VALUES (:i, 1, 'p', '[\"a\", \"b\"]', false, '{}', :t)"), {"i": iid, "t": now})
        for item, user, served, done in ((1, 1, now, True), (2, 2, now, False), (3, 1, old, False)):
            conn.execute(text("INSERT INTO assignments (item_id, user_id, task_id, display_order, served_at, "
                              "completed) VALUES (:i, :u, 1, '[0, 1]', :s, :d)"),
                         {"i": item, "u": user, "s": served, "d": done})
    db.dispose()
    upgrade(db_url)
    db = Database(db_url, pool_size=2)
    from rlhfkit.feedback.models import Item

    with db.read_session() as s:
        assert dict(s.execute(select(Item.id, Item.slots_taken)).all()) == {1: 1, 2: 1, 3: 0}
        assert dict(s.execute(select(Assignment.item_id, Assignment.released)).all()) == {1: False, 2: False, 3: True}
    with db.session() as s:
        got = next_assignment(s, s.get(Task, 1), s.get(User, 3))
        assert got is not None and got[0].id == 3
    with db.session() as s:
        assert next_assignment(s, s.get(Task, 1), s.get(User, 2)) is not None  # its own open item 2
    with db.session() as s, pytest.raises(Conflict, match="expired"):
        submit_label(s, s.get(Task, 1), s.get(User, 1), 3, {"choice": "left"}, uuid.uuid4().hex)
    db.dispose()


def test_serving_query_walks_the_slot_index(tmp_path):
    """On SQLite the candidate query reads items through ix_items_open_slots in its order (no
    sort of the task's items, no scan of its assignments), so a /next costs about `limit` rows
    whatever the size of the task; and it skips the items the user already has."""
    db, (u0, u1), task_id = setup(f"sqlite:///{tmp_path}/fb.db", 2, 300, overlap=2)
    served = []
    for _ in range(20):
        with db.session() as s:
            served.append(next_assignment(s, s.get(Task, task_id), s.get(User, u0))[0].id)
        with db.session() as s:
            submit_label(s, s.get(Task, task_id), s.get(User, u0), served[-1], {"choice": "left"}, uuid.uuid4().hex)
    with db.read_session() as s:
        task = s.get(Task, task_id)
        # items u0 started come first for u1 (overlap completes before new items open), none for u0
        assert sorted(candidate_ids(s, task, s.get(User, u1), gold=False, limit=20)) == sorted(served)
        assert not set(candidate_ids(s, task, s.get(User, u0), gold=False, limit=300)) & set(served)
        stmt = candidate_query(task, s.get(User, u1), gold=False, limit=8).compile(
            s.get_bind(), compile_kwargs={"literal_binds": True})
        plan = " | ".join(row[-1] for row in s.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {stmt}"))
    db.dispose()
    assert "ix_items_open_slots" in plan and "TEMP B-TREE" not in plan, plan
    assert "SCAN assignments" not in plan, plan


def _api_setup(db_url, n_users, n_items, overlap):
    from fastapi.testclient import TestClient

    from rlhfkit.feedback.app import create_app
    from rlhfkit.feedback.security import create_api_token

    db, users, task_id = setup(db_url, n_users, n_items, overlap)
    with db.session() as s:
        tokens = [create_api_token(s, s.get(User, u)) for u in users]
    return db, TestClient(create_app(db)), tokens, task_id


def _label_via_api(client, token, task_id, errors):
    headers = {"Authorization": f"Bearer {token}"}
    try:
        while True:
            r = client.get(f"/api/tasks/{task_id}/next", headers=headers)
            if r.status_code == 204:
                return
            assert r.status_code == 200, r.text
            body = {"item_id": r.json()["item_id"], "value": {"choice": "left"}, "idempotency_key": uuid.uuid4().hex}
            r = client.post(f"/api/tasks/{task_id}/labels", headers=headers, json=body)
            assert r.status_code == 201, r.text
    except Exception as e:  # reported by the test
        errors.append(repr(e))


@pytest.mark.parametrize("overlap", [1, 3])
def test_concurrent_annotators_through_the_api_never_exceed_overlap(db_url, overlap):
    """The routes' own paths (on PostgreSQL the single-statement claim in autocommit, with the
    transactional path behind it), 8 annotators at once."""
    n_users, n_items = 8, 30
    db, client, tokens, task_id = _api_setup(db_url, n_users, n_items, overlap)
    errors = run_concurrently(_label_via_api, [(client, tok, task_id) for tok in tokens])
    client.close()
    with db.read_session() as s:
        per_item = Counter(s.scalars(select(Label.item_id)))
        from rlhfkit.feedback.models import Item

        slots = dict(s.execute(select(Item.id, Item.slots_taken)).all())
        open_left = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.completed.is_(False)))
    db.dispose()
    assert errors == []
    assert len(per_item) == n_items and set(per_item.values()) == {overlap}
    assert all(slots[i] == per_item[i] for i in slots) and open_left == 0


def test_expired_and_reassigned_submit_is_refused_through_the_api(db_url):
    db, client, (alice, bob), task_id = _api_setup(db_url, 2, 1, overlap=1)
    a, b = ({"Authorization": f"Bearer {t}"} for t in (alice, bob))
    item_id = client.get(f"/api/tasks/{task_id}/next", headers=a).json()["item_id"]
    assert client.get(f"/api/tasks/{task_id}/next", headers=b).status_code == 204  # overlap 1: taken
    with db.session() as s:  # alice walked away: her assignment expires
        s.execute(update(Assignment).values(served_at=utcnow() - ASSIGNMENT_TIMEOUT - dt.timedelta(seconds=1)))
    assert client.get(f"/api/tasks/{task_id}/next", headers=b).json()["item_id"] == item_id
    late = {"item_id": item_id, "value": {"choice": "left"}, "idempotency_key": uuid.uuid4().hex}
    r = client.post(f"/api/tasks/{task_id}/labels", headers=a, json=late)
    assert r.status_code == 409 and "expired" in r.json()["detail"], r.text
    r = client.post(f"/api/tasks/{task_id}/labels", headers=b, json={**late, "idempotency_key": uuid.uuid4().hex})
    assert r.status_code == 201, r.text
    r = client.post(f"/api/tasks/{task_id}/labels", headers=b, json={**late, "idempotency_key": uuid.uuid4().hex})
    assert r.status_code == 409 and "already labelled" in r.json()["detail"], r.text
    client.close()
    with db.read_session() as s:
        assert [lab.user_id for lab in s.scalars(select(Label))] == [s.scalar(select(User.id).where(User.username == "u1"))]
    db.dispose()
