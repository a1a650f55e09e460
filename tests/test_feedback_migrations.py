"""Upgrading an old database keeps every row. On SQLite, Alembic's batch mode rebuilds a table
(copy, DROP, rename) to add a constraint; with foreign keys on, dropping the old `users` used to
cascade-delete every token, assignment and label that referred to a user."""

from __future__ import annotations

from sqlalchemy import func, select, text

from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import ApiToken, Item, Task, User


def test_upgrading_a_0001_database_keeps_the_rows_that_refer_to_users(db_url):
    upgrade(db_url, "0001")
    db = Database(db_url, pool_size=1)
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, username, password_hash, role, active, created_at) "
                          "VALUES (1, 'ann', 'x', 'annotator', true, CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO api_tokens (user_id, token_hash, name, revoked, created_at) "
                          "VALUES (1, 'h1', 'cli', false, CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO tasks (id, name, question_type, instructions, rubric, likert_points, overlap, "
                          "randomize_order, selection, gold_rate, created_at) VALUES "
                          "(1, 't', 'pairwise', '', '[]', 5, 1, false, 'random', 0.0, CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO items (id, task_id, prompt, responses, is_gold, meta, created_at) "
                          "VALUES (1, 1, 'p', '[\"a\", \"b\"]', false, '{}', CURRENT_TIMESTAMP)"))
    db.dispose()
    upgrade(db_url)
    db = Database(db_url, pool_size=1)
    with db.read_session() as s:
        counts = [s.scalar(select(func.count()).select_from(m)) for m in (User, ApiToken, Task, Item)]
    db.dispose()
    assert counts == [1, 1, 1, 1]
