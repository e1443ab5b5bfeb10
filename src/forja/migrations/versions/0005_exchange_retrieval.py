"""The knowledge chunks retrieved for an exchange"s prompt."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.add_column("exchanges", sa.Column("retrieval", sa.Text(), nullable=True))
