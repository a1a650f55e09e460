"""Served traffic and feedback from real use (rlhfkit.serving.tables): served_responses, one row
per request to the policy server (arm, model version, sampling settings, token counts, latency,
safety score), and use_feedback, thumbs / ratings / edits / comments / pairwise picks on them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_responses",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("response_id", sa.String(64), nullable=False, unique=True),
        sa.Column("experiment", sa.String(128), nullable=True),
        sa.Column("arm", sa.String(64), nullable=True),
        sa.Column("model_version", sa.String(255), nullable=False),
        sa.Column("user_key", sa.String(64), nullable=True),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("sampling", sa.JSON(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("safety_score", sa.Float(), nullable=True),
        sa.Column("safety_flag", sa.Boolean(), nullable=True),
        sa.Column("safety_judge", sa.String(128), nullable=True),
    )
    op.create_index("ix_served_experiment_arm", "served_responses", ["experiment", "arm", "created_at"])
    op.create_index("ix_served_responses_user_key", "served_responses", ["user_key"])
    op.create_index("ix_served_responses_created_at", "served_responses", ["created_at"])
    op.create_table(
        "use_feedback",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("response_id", sa.String(64), sa.ForeignKey("served_responses.response_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("other_response_id", sa.String(64),
                  sa.ForeignKey("served_responses.response_id", ondelete="CASCADE"), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("user_key", sa.String(64), nullable=True),
        sa.Column("idempotency_key", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("response_id", "idempotency_key", name="uq_use_feedback_key"),
    )
    op.create_index("ix_use_feedback_response_id", "use_feedback", ["response_id"])
    op.create_index("ix_use_feedback_other_response_id", "use_feedback", ["other_response_id"])
    op.create_index("ix_use_feedback_created_at", "use_feedback", ["created_at"])


def downgrade() -> None:
    op.drop_table("use_feedback")
    op.drop_table("served_responses")
