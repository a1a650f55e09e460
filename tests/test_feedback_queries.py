"""The hot routes' database work is bounded: the exact number of SQL statements and pool
checkouts of /next and submit, on SQLite and PostgreSQL, so that a change adding a round trip
to every request shows here. And a connection the database dropped is answered 503 once,
after which the pool reconnects (the PostgreSQL pool does not ping before each checkout)."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import Task
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service import assign, fastpath
from rlhfkit.feedback.service.accounts import create_user, find_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.labels import submit_lookup_statement
from rlhfkit.feedback.service.tasks import add_member, create_task

use_test_hasher()
PASSWORD = "correct horse battery"
TX_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")

# statements per request once the task's settings are cached, after authentication (token +
# user, one statement). SQLite, in one transaction: for /next the open-assignment-or-expired
# probe, the candidates, the claim (UPDATE ... RETURNING the item) and the assignment INSERT;
# for submit the lookup of item, assignment and prior labels, the assignment UPDATE and the
# label INSERT. PostgreSQL, in autocommit: for /next one SELECT (probe and candidates) and one
# statement that claims the item and inserts the assignment; for submit the lookup and one
# statement that completes the assignment and inserts the label.
COUNTS = {  # backend: (new /next, /next of the open assignment again, submit, replayed submit)
    "sqlite": (5, 4, 4, 2),
    # serving the open assignment again leaves the single-statement path after its SELECT
    "postgresql": (3, 5, 3, 2),
}
CHECKOUTS = 2  # one for authentication, one for the route


class Counter:
    def __init__(self, db: Database):
        self.statements: list[str] = []
        self.checkouts = 0
        event.listen(db.engine, "before_cursor_execute", self._statement)
        event.listen(db.engine.pool, "checkout", self._checkout)

    def _statement(self, conn, cursor, statement, params, context, executemany):  # noqa: ANN001
        if not statement.lstrip().upper().startswith(TX_CONTROL):  # SQLite's BEGIN [IMMEDIATE]
            self.statements.append(statement)

    def _checkout(self, *args) -> None:  # noqa: ANN002
        self.checkouts += 1

    def reset(self) -> None:
        self.statements.clear()
        self.checkouts = 0


@pytest.fixture
def env(db_url):
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    with db.session() as s:
        user = create_user(s, "alice", PASSWORD)
        token = create_api_token(s, user)
        task = create_task(s, "pairs", "pairwise", overlap=2, gold_rate=0.0)
        import_records(s, task, [{"prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(5)])
        task_id = task.id
    client = TestClient(create_app(db))
    yield db, client, {"Authorization": f"Bearer {token}"}, task_id
    client.close()
    db.dispose()


def test_hot_routes_issue_a_fixed_number_of_statements(env):
    db, client, headers, task_id = env
    next_new, next_again, submit, submit_replay = COUNTS[db.backend]
    counter = Counter(db)
    seen = []
    for round_ in range(3):
        counter.reset()
        r = client.get(f"/api/tasks/{task_id}/next", headers=headers)
        assert r.status_code == 200, r.text
        # the first request reads the task's settings once; later ones use the cached copy
        assert len(counter.statements) == next_new + (round_ == 0), counter.statements
        assert counter.checkouts == CHECKOUTS
        item = r.json()
        seen.append(item["item_id"])

        counter.reset()
        r = client.get(f"/api/tasks/{task_id}/next", headers=headers)
        assert r.status_code == 200 and r.json()["item_id"] == item["item_id"]
        assert len(counter.statements) == next_again, counter.statements

        body = {"item_id": item["item_id"], "value": {"choice": "left"}, "idempotency_key": uuid.uuid4().hex}
        counter.reset()
        r = client.post(f"/api/tasks/{task_id}/labels", headers=headers, json=body)
        assert r.status_code == 201, r.text
        assert len(counter.statements) == submit, counter.statements
        assert counter.checkouts == CHECKOUTS

        counter.reset()
        r = client.post(f"/api/tasks/{task_id}/labels", headers=headers, json=body)
        assert r.status_code == 200 and r.json()["replayed"], r.text
        assert len(counter.statements) == submit_replay, counter.statements
    assert len(set(seen)) == 3
    # what the statements wrote: every item still in its task, each assignment and label naming
    # its own item, user and task (a parameter named like a column of an UPDATE's table would
    # also have set that column)
    from sqlalchemy import select

    from rlhfkit.feedback.models import Assignment, Item, Label

    with db.read_session() as s:
        user_id = find_user(s, "alice").id
        assert {i.task_id for i in s.scalars(select(Item))} == {task_id}
        assignments = {a.item_id: a for a in s.scalars(select(Assignment))}
        labels = {lab.item_id: lab for lab in s.scalars(select(Label))}
        assert sorted(assignments) == sorted(labels) == sorted(seen)
        for item_id in seen:
            a, lab = assignments[item_id], labels[item_id]
            assert (a.task_id, a.user_id, a.completed, a.released) == (task_id, user_id, True, False)
            # "left" was the response shown first; the label stores it by its place in the file
            left = "ab"[lab.display_order[0]]
            assert (lab.task_id, lab.user_id, lab.value, lab.version) == (task_id, user_id, {"choice": left}, 1)
            assert lab.display_order == a.display_order
            assert s.get(Item, item_id).slots_taken == 1


def test_statements_built_once_take_only_prefixed_parameters():
    """The statements of the PostgreSQL fast path are built once with bound parameters; each
    required one is named b_*, so none can be taken for a column of an UPDATE or INSERT."""
    from sqlalchemy.dialects import postgresql

    built = [fastpath.state_statement, fastpath.claim_statement, fastpath.label_insert_statement,
             submit_lookup_statement]
    for make in built:
        binds = make().compile(dialect=postgresql.psycopg.dialect()).binds.values()
        required = {b.key for b in binds if b.required}
        assert required and all(k.startswith("b_") for k in required), (make.__name__, required)


def test_cached_task_settings_still_hide_closed_tasks(env):
    """The per-process task cache holds settings only: membership of a closed task is checked
    on every request."""
    db, client, headers, _ = env
    with db.session() as s:
        closed = create_task(s, "closed", "pairwise", gold_rate=0.0, open_to_all=False)
        import_records(s, closed, [{"prompt": "p", "responses": ["a", "b"]}])
        closed_id = closed.id
    assert client.get(f"/api/tasks/{closed_id}/next", headers=headers).status_code == 404
    with db.session() as s:
        add_member(s, s.get(Task, closed_id), find_user(s, "alice"))
    assert client.get(f"/api/tasks/{closed_id}/next", headers=headers).status_code == 200
    assert client.get("/api/tasks/999999/next", headers=headers).status_code == 404


@pytest.mark.postgres
def test_dropped_connections_are_a_503_then_the_pool_reconnects(env):
    db, client, headers, task_id = env
    if db.backend != "postgresql":
        pytest.skip("terminating server connections needs PostgreSQL")
    import psycopg

    from rlhfkit.feedback.testing import PG_ADMIN_URL

    assert client.get(f"/api/tasks/{task_id}/next", headers=headers).status_code == 200
    name = db.engine.url.database
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:  # as a server restart would
        killed = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                              "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]
    assert killed >= 1
    r = client.get(f"/api/tasks/{task_id}/next", headers=headers)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert client.get(f"/api/tasks/{task_id}/next", headers=headers).status_code == 200
    assert client.get(f"/api/tasks/{task_id}/next", headers=headers).status_code == 200


def test_a_deadlock_victim_is_a_503_to_retry(env, monkeypatch):
    """PostgreSQL aborts one transaction of a deadlock (or a serialization conflict): nothing
    was written, so the client is told to retry (503, Retry-After) instead of getting a 500."""
    import psycopg
    from sqlalchemy import exc as sa_exc

    db, client, headers, task_id = env

    def victim(*args, **kwargs):
        raise sa_exc.OperationalError("UPDATE items ...", {}, psycopg.errors.DeadlockDetected("deadlock detected"))

    monkeypatch.setattr(assign, "next_assignment", victim)
    monkeypatch.setattr(fastpath, "next_assignment", victim)
    r = client.get(f"/api/tasks/{task_id}/next", headers=headers)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "retry" in r.json()["detail"]
    monkeypatch.undo()
    assert client.get(f"/api/tasks/{task_id}/next", headers=headers).status_code == 200
