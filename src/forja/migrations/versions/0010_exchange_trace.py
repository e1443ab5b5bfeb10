"""An agent persona"s steps on an exchange."""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.add_column("exchanges", sa.Column("trace", sa.Text(), nullable=True))
