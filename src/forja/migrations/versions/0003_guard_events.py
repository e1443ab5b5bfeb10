"""The guardrails" audit log: what was decided, never the text."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table("guard_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("route", sa.String(length=40), nullable=True),
        sa.Column("stage", sa.String(length=10), nullable=False),
        sa.Column("rule", sa.String(length=80), nullable=False),
        sa.Column("category", sa.String(length=40), nullable=False),
        sa.Column("action", sa.String(length=10), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("persona", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("ix_guard_events_created_at", "guard_events", ["created_at"], unique=False)
    op.create_index("ix_guard_events_request_id", "guard_events", ["request_id"], unique=False)
