"""A feedback row may correct one tool call of an agent's answer (the step, the tool, the arguments it should
have had), which trains as that call; JSONB on PostgreSQL, as every JSON column since 0012."""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0014"
down_revision = "0013"


def upgrade() -> None:
    op.add_column("feedback", sa.Column("tool_call", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True))
