"""A label's preference strength and comment (labels.strength, labels.comment), and skipped
assignments (assignments.skipped: the annotator passed on the item, which goes to someone else).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMNs: SQLite adds them in place (no table rebuild)
    op.add_column("labels", sa.Column("strength", sa.String(16), nullable=True))
    op.add_column("labels", sa.Column("comment", sa.Text(), nullable=True))
    op.add_column("assignments", sa.Column("skipped", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("assignments") as b:
        b.drop_column("skipped")
    with op.batch_alter_table("labels") as b:
        b.drop_column("comment")
        b.drop_column("strength")
