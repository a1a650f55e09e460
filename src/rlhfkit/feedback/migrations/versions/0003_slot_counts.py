"""Per-item slot counts for bounded serving: items.slots_taken (assignments holding an overlap
slot), assignments.released (expired and its slot given back), and the indexes serving reads.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# the service's ASSIGNMENT_TIMEOUT when this revision was written (a migration must not change
# with later code)
TIMEOUT = dt.timedelta(minutes=30)


def upgrade() -> None:
    with op.batch_alter_table("items") as b:
        b.add_column(sa.Column("slots_taken", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("assignments") as b:
        b.add_column(sa.Column("released", sa.Boolean(), nullable=False, server_default=sa.false()))
    conn = op.get_bind()
    cutoff = dt.datetime.now(dt.UTC).replace(tzinfo=None) - TIMEOUT
    # open assignments already past their time give their slot back now; the rest count
    conn.execute(sa.text("UPDATE assignments SET released = :t WHERE completed = :f AND served_at <= :c"),
                 {"t": True, "f": False, "c": cutoff})
    conn.execute(sa.text("UPDATE items SET slots_taken = (SELECT count(*) FROM assignments a "
                         "WHERE a.item_id = items.id AND a.released = :f)"), {"f": False})
    op.create_index("ix_items_open_slots", "items",
                    [sa.column("task_id"), sa.column("is_gold"), sa.column("slots_taken").desc(), sa.column("id")])
    op.create_index("ix_assignments_user_open", "assignments", ["user_id", "task_id", "completed"])
    op.create_index("ix_assignments_expiry", "assignments", ["task_id", "completed", "released", "served_at"])


def downgrade() -> None:
    op.drop_index("ix_assignments_expiry", "assignments")
    op.drop_index("ix_assignments_user_open", "assignments")
    op.drop_index("ix_items_open_slots", "items")
    with op.batch_alter_table("assignments") as b:
        b.drop_column("released")
    with op.batch_alter_table("items") as b:
        b.drop_column("slots_taken")
