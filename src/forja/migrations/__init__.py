"""The store's schema as ordered Alembic revisions (versions/0001_... onwards), applied when the store opens
and by `forja db migrate`; `forja db current` names the revision a database is at.

Each revision spells out its tables and columns: a fresh database and an upgraded one end with the same
schema on SQLite and PostgreSQL. A database made before Alembic (its `schema_migrations` table lists the
steps applied, named 0001_... to 0011_...) is stamped at the matching revision and upgraded in place.
"""

from __future__ import annotations

import functools
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

DIRECTORY = Path(__file__).parent
LEGACY_TABLE = "schema_migrations"
# one key for PostgreSQL's advisory lock: replicas starting together migrate one after the other
LOCK_KEY = 0x666F726A61  # "forja"


def _config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(DIRECTORY))
    config.attributes["connection"] = connection
    return config


@functools.cache  # the revision files are read once per process
def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    return scripts().get_current_head()


def current(conn: sa.Connection) -> str | None:
    """The revision the database is at (None: empty, or made before Alembic and not yet upgraded)."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: sa.Engine, target: str = "head") -> list[str]:
    """Bring the database to `target` in one transaction; returns the revisions applied, oldest first."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        before = current(conn) or _stamp_legacy(conn)
        if before is not None and before not in {s.revision for s in scripts().walk_revisions()}:
            from forja.store import StoreError

            raise StoreError(f"the database is at schema revision {before}, newer than this forja knows (its newest "
                             f"is {head()}): upgrade forja, or open it with the forja that migrated it")
        wanted = head() if target == "head" else target
        if before == wanted:
            return []
        command.upgrade(_config(conn), target)
        after = current(conn)
    return [s.revision for s in reversed(list(scripts().iterate_revisions(after, before)))]


def _stamp_legacy(conn: sa.Connection) -> str | None:
    """A database of forja's own migrations list: record the revision its last step matches, and drop that
    list (Alembic's alembic_version says it from now on)."""
    if not sa.inspect(conn).has_table(LEGACY_TABLE):
        return None
    names = sorted(r[0] for r in conn.execute(sa.text(f"SELECT name FROM {LEGACY_TABLE}")))
    if not names:  # created, nothing applied: an empty database
        conn.execute(sa.text(f"DROP TABLE {LEGACY_TABLE}"))
        return None
    known = {s.revision for s in scripts().walk_revisions()}
    revision = names[-1][:4]
    if revision not in known:
        from forja.store import StoreError

        raise StoreError(f"the database's {LEGACY_TABLE} ends at {names[-1]!r}, which this "
                         "forja does not know: open it with the forja that made it, or a newer one")
    command.stamp(_config(conn), revision)
    conn.execute(sa.text(f"DROP TABLE {LEGACY_TABLE}"))
    return revision
