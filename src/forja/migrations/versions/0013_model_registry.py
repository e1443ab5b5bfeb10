"""The active model version in the database (it was FORJA_HOME/models/active.json), so every replica
sharing the database follows one promotion; and indexes for the statistics read by time."""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    op.create_table(
        "model_registry",  # append-only: promote pushes a version, rollback pops one; the last row is the newest
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("action", sa.String(length=10), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("previous", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.CheckConstraint("action IN ('promote', 'rollback')", name="action_promote_or_rollback"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_exchanges_created_at", "exchanges", ["created_at"], unique=False)
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"], unique=False)
