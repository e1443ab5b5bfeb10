"""Alembic's entry: forja.migrations.upgrade hands over the connection (there is no alembic.ini)."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
