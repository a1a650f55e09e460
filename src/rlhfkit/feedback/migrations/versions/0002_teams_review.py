"""Teams and review: owner role, case-folded unique user names, token expiry, task members,
label versions and review state, audit log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _key(name: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())[:64]


def upgrade() -> None:
    with op.batch_alter_table("users") as b:
        b.add_column(sa.Column("username_key", sa.String(64), nullable=True))
    conn = op.get_bind()
    seen: set[str] = set()
    for uid, name in conn.execute(sa.text("SELECT id, username FROM users ORDER BY id")).all():
        key = _key(name)
        if key in seen:  # two old accounts that now count as one name: keep both, distinguishable
            key = f"{key[:50]}#{uid}"
        seen.add(key)
        conn.execute(sa.text("UPDATE users SET username_key = :k WHERE id = :i"), {"k": key, "i": uid})
    with op.batch_alter_table("users") as b:
        b.alter_column("username_key", existing_type=sa.String(64), nullable=False)
        b.create_unique_constraint("uq_users_username_key", ["username_key"])
    with op.batch_alter_table("api_tokens") as b:
        b.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("tasks") as b:
        b.add_column(sa.Column("open_to_all", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.create_table(
        "task_members",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("task_id", sa.Integer(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.UniqueConstraint("task_id", "user_id", name="uq_task_member"),
    )
    op.create_index("ix_task_members_task_id", "task_members", ["task_id"])
    op.create_index("ix_task_members_user_id", "task_members", ["user_id"])
    with op.batch_alter_table("labels") as b:
        b.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        b.add_column(sa.Column("review_status", sa.String(16), nullable=False, server_default="pending"))
        b.add_column(sa.Column("reviewed_by", sa.Integer(), nullable=True))
        b.add_column(sa.Column("reviewed_at", sa.DateTime(), nullable=True))
        b.add_column(sa.Column("review_reason", sa.Text(), nullable=True))
        b.create_foreign_key("fk_labels_reviewed_by", "users", ["reviewed_by"], ["id"], ondelete="SET NULL")
    op.create_table(
        "label_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("label_id", sa.Integer(), sa.ForeignKey("labels.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("label_id", "version", name="uq_label_version"),
    )
    op.create_index("ix_label_versions_label_id", "label_versions", ["label_id"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="SET NULL"), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("label_versions")
    with op.batch_alter_table("labels") as b:
        b.drop_constraint("fk_labels_reviewed_by", type_="foreignkey")
        for col in ("review_reason", "reviewed_at", "reviewed_by", "review_status", "version"):
            b.drop_column(col)
    op.drop_table("task_members")
    with op.batch_alter_table("tasks") as b:
        b.drop_column("open_to_all")
    with op.batch_alter_table("api_tokens") as b:
        b.drop_column("expires_at")
    with op.batch_alter_table("users") as b:
        b.drop_constraint("uq_users_username_key", type_="unique")
        b.drop_column("username_key")
