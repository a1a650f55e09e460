"""users.lookalike_key: a unique key equal for user names that look alike (confusable
skeleton of the case-folded name, see rlhfkit.feedback.names).

Existing accounts get their key in id order; an account that looks like an older one keeps
working with no key (NULL, which the unique constraint allows on both databases), and no new
account can take a name that looks like either.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from rlhfkit.feedback.names import lookalike_key

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


# A unique index rather than a constraint, and no batch mode: on SQLite, adding a constraint
# rebuilds the table, and dropping the old `users` with foreign keys on would cascade to every
# row that refers to a user (assignments, labels, tokens).


def upgrade() -> None:
    op.add_column("users", sa.Column("lookalike_key", sa.String(255), nullable=True))
    conn = op.get_bind()
    taken: set[str] = set()
    for uid, name in conn.execute(sa.text("SELECT id, username FROM users ORDER BY id")).all():
        key = lookalike_key(name)
        if key in taken or len(key) > 255:
            continue
        taken.add(key)
        conn.execute(sa.text("UPDATE users SET lookalike_key = :k WHERE id = :i"), {"k": key, "i": uid})
    op.create_index("uq_users_lookalike_key", "users", ["lookalike_key"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_users_lookalike_key", table_name="users")
    op.drop_column("users", "lookalike_key")
