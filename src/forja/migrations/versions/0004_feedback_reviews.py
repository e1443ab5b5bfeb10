"""An operator"s decision on a feedback row before it trains anything."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table("feedback_reviews",
        sa.Column("feedback_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("reviewer", sa.String(length=200), nullable=True),
        sa.Column("reviewed_at", sa.Float(), nullable=False),
        sa.CheckConstraint("decision IN ('approved', 'rejected')", name="decision_approved_or_rejected"),
        sa.ForeignKeyConstraint(["feedback_id"], ["feedback.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("feedback_id")
    )
