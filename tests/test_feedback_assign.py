"""Assignment under concurrency: no item gets more annotators than its overlap, on SQLite and
on PostgreSQL (where writers are not serialised in-process), and a submit for an assignment
that expired and was served to someone else is refused."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import Counter

import pytest
from sqlalchemy import select, update

from rlhfkit.feedback import service as svc
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import Assignment, Label, Task, User
from rlhfkit.feedback.security import use_test_hasher
from rlhfkit.feedback.testing import postgres_unavailable_reason, temp_postgres_database

use_test_hasher()
_PG_REASON = postgres_unavailable_reason()
PASSWORD = "correct horse battery"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fb.db"
        return
    if _PG_REASON:
        pytest.skip(_PG_REASON)
    with temp_postgres_database() as url:
        yield url


def setup(db_url, n_users, n_items, overlap):
    upgrade(db_url)
    db = Database(db_url, pool_size=n_users + 2)
    with db.session() as s:
        users = [svc.create_user(s, f"u{i}", PASSWORD).id for i in range(n_users)]
        task = svc.create_task(s, "t", "pairwise", overlap=overlap, gold_rate=0.0)
        svc.import_records(s, task, [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(n_items)])
        return db, users, task.id


def label_until_done(db, user_id, task_id, errors):
    try:
        while True:
            with db.session() as s:
                got = svc.next_assignment(s, s.get(Task, task_id), s.get(User, user_id))
                if got is None:
                    return
                item_id = got[0].id
            with db.session() as s:
                svc.submit_label(s, s.get(Task, task_id), s.get(User, user_id), item_id, {"choice": "left"},
                                 uuid.uuid4().hex)
    except Exception as e:  # reported by the test
        errors.append(repr(e))


@pytest.mark.parametrize("overlap", [1, 2])
def test_concurrent_annotators_never_exceed_overlap(db_url, overlap):
    n_users, n_items = 8, 40
    db, users, task_id = setup(db_url, n_users, n_items, overlap)
    errors: list[str] = []
    threads = [threading.Thread(target=label_until_done, args=(db, u, task_id, errors)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.read_session() as s:
        per_item = Counter(s.scalars(select(Label.item_id)))
    db.dispose()
    assert max(per_item.values()) == overlap
    assert len(per_item) == n_items and sum(per_item.values()) == n_items * overlap


def test_expired_and_reassigned_submit_is_refused(db_url):
    db, (alice, bob), task_id = setup(db_url, 2, 1, overlap=1)
    with db.session() as s:
        item_id = svc.next_assignment(s, s.get(Task, task_id), s.get(User, alice))[0].id
    with db.session() as s:  # alice walked away: her assignment expires
        s.execute(update(Assignment).values(served_at=svc.utcnow() - svc.ASSIGNMENT_TIMEOUT - dt.timedelta(seconds=1)))
    with db.session() as s:
        got = svc.next_assignment(s, s.get(Task, task_id), s.get(User, bob))
        assert got is not None and got[0].id == item_id
    with db.session() as s, pytest.raises(svc.Conflict, match="expired"):
        svc.submit_label(s, s.get(Task, task_id), s.get(User, alice), item_id, {"choice": "left"}, uuid.uuid4().hex)
    with db.session() as s:
        svc.submit_label(s, s.get(Task, task_id), s.get(User, bob), item_id, {"choice": "right"}, uuid.uuid4().hex)
    with db.read_session() as s:
        assert list(s.scalars(select(Label.user_id))) == [bob]
    db.dispose()


def test_expired_but_not_reassigned_submit_is_accepted(db_url):
    db, (alice, _), task_id = setup(db_url, 2, 1, overlap=1)
    with db.session() as s:
        item_id = svc.next_assignment(s, s.get(Task, task_id), s.get(User, alice))[0].id
    with db.session() as s:
        s.execute(update(Assignment).values(served_at=svc.utcnow() - svc.ASSIGNMENT_TIMEOUT - dt.timedelta(seconds=1)))
    with db.session() as s:
        label, _ = svc.submit_label(s, s.get(Task, task_id), s.get(User, alice), item_id, {"choice": "left"},
                                    uuid.uuid4().hex)
        assert label.user_id == alice
    db.dispose()
