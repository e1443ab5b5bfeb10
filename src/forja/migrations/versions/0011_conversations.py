"""Chats kept on the server."""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.create_table("conversations",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("api_key_name", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=True),
        sa.Column("messages", sa.Text(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("compacted", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("ix_conversations_api_key_name", "conversations", ["api_key_name"], unique=False)
