"""JSON documents as JSONB on PostgreSQL (SQLite keeps JSON text: it has no other JSON type).

Until now every JSON column was TEXT holding json.dumps; on PostgreSQL they become JSONB, so SQL can read
into them and a malformed document is refused by the database itself."""

from alembic import op

revision = "0012"
down_revision = "0011"

JSON_COLUMNS = {
    "exchanges": ["messages", "answers", "params", "retrieval", "trace"],
    "vector_store_files": ["last_error", "attributes"],
    "vector_store_file_batches": ["file_ids"],
    "jobs": ["request", "result", "error"],
    "job_events": ["data"],
    "api_keys": ["scopes"],
    "conversations": ["messages"],
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in JSON_COLUMNS.items():
        changes = ", ".join(f"ALTER COLUMN {c} TYPE JSONB USING {c}::jsonb" for c in columns)
        op.execute(f"ALTER TABLE {table} {changes}")
