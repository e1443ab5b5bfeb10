"""The store on SQLite and on PostgreSQL (make test runs this file on both): its schema revisions, the
upgrade of a database made before Alembic, JSON documents, statistics in SQL, and `forja db`."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from forja import migrations
from forja.store import Store, StoreError, UnknownExchange, metadata

# forja's own migrations list before Alembic: what `schema_migrations` of an old database holds
LEGACY_NAMES = ["0001_exchanges_and_feedback", "0002_feedback_used", "0003_guard_events", "0004_feedback_reviews",
                "0005_exchange_retrieval", "0006_files", "0007_jobs", "0008_api_keys", "0009_console_users",
                "0010_exchange_trace", "0011_conversations"]


def schema(url: str) -> dict:
    """Everything the database says about its tables, in a comparable form."""
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        found = {}
        for table in sorted(inspector.get_table_names()):
            if table == "alembic_version":
                continue
            found[table] = {
                "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
                "primary key": inspector.get_pk_constraint(table)["constrained_columns"],
                "foreign keys": sorted((tuple(f["constrained_columns"]), f["referred_table"],
                                        f.get("options", {}).get("ondelete")) for f in inspector.get_foreign_keys(table)),
                "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                                  for i in inspector.get_indexes(table)),
                "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
                "checks": sorted(c["sqltext"] for c in inspector.get_check_constraints(table)),
            }
        return found
    finally:
        engine.dispose()


def revisions() -> list[str]:
    return [s.revision for s in reversed(list(migrations.scripts().walk_revisions()))]


def log(store: Store, id: str, question="¿Hola?", answer="Hola.", model="m1", **more) -> None:
    store.log_exchange(id=id, route="chat", model=model, persona=None, messages=[{"role": "user", "content": question}],
                       answers=[answer], params={"temperature": 0.0}, prompt_tokens=5, completion_tokens=3,
                       latency_ms=10.0, finish_reason="stop", api_key_name=None, **more)


def test_every_past_revision_upgrades_to_the_schema_of_a_fresh_database(new_database):
    fresh = new_database()
    assert Store(fresh).applied == revisions()
    expected = schema(fresh)
    assert set(expected) == set(metadata.tables)  # the tables the code queries are the tables migrated
    for table in metadata.tables.values():
        assert [c[0] for c in expected[table.name]["columns"]] == [c.name for c in table.columns], table.name
        assert [c[2] for c in expected[table.name]["columns"]] == [c.nullable for c in table.columns], table.name
    for revision in revisions()[:-1]:
        url = new_database()
        engine = sa.create_engine(url)
        assert migrations.upgrade(engine, revision)[-1] == revision
        engine.dispose()
        store = Store(url)
        assert store.applied == revisions()[revisions().index(revision) + 1:]
        assert store.revision() == migrations.head() and Store(url).applied == []  # opening again changes nothing
        assert schema(url) == expected, f"upgraded from {revision}"


@pytest.mark.parametrize("last", [1, 4, 11])
def test_a_database_made_before_alembic_is_stamped_and_upgraded_in_place(new_database, last):
    url = new_database()
    engine = sa.create_engine(url)
    migrations.upgrade(engine, f"{last:04d}")  # the same tables as forja's own migrations made
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alembic_version"))
        conn.execute(sa.text("CREATE TABLE schema_migrations (name VARCHAR(200) PRIMARY KEY, applied_at FLOAT NOT NULL)"))
        for name in LEGACY_NAMES[:last]:
            conn.execute(sa.text("INSERT INTO schema_migrations VALUES (:name, 0)"), {"name": name})
        conn.execute(sa.text("INSERT INTO exchanges (id, created_at, route, model, messages, answers, params, "
                             "prompt_tokens, completion_tokens, latency_ms) VALUES ('old', 1, 'chat', 'm0', "
                             "'[{\"role\": \"user\", \"content\": \"¿Sigue aquí?\"}]', '[\"Sí.\"]', '{}', 1, 1, 1)"))
    engine.dispose()
    store = Store(url)
    assert store.applied == revisions()[last:]
    assert schema(url) == schema(_fresh(new_database))  # schema_migrations gone, alembic_version at head
    old = store.exchange("old")  # a row written as JSON text reads back as JSON
    assert old.messages == [{"role": "user", "content": "¿Sigue aquí?"}] and old.answers == ["Sí."]


def test_a_database_of_an_unknown_newer_forja_is_refused_with_its_step(new_database):
    url = new_database()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE schema_migrations (name VARCHAR(200) PRIMARY KEY, applied_at FLOAT NOT NULL)"))
        conn.execute(sa.text("INSERT INTO schema_migrations VALUES ('0099_from_the_future', 0)"))
    engine.dispose()
    with pytest.raises(StoreError, match="0099_from_the_future"):
        Store(url)


def _fresh(new_database) -> str:
    url = new_database()
    Store(url).close()
    return url


def test_json_documents_round_trip_and_none_is_null(database_url):
    store = Store(database_url)
    retrieval = [{"chunk": "Ñandú 🚀", "score": 0.5, "nested": {"a": [1, 2, None]}}]
    log(store, "x1", "¿Qué tal? テスト", "Bien.", retrieval=retrieval)
    log(store, "x2")
    first, second = store.exchange("x1"), store.exchange("x2")
    assert first.messages == [{"role": "user", "content": "¿Qué tal? テスト"}] and first.retrieval == retrieval
    assert first.params == {"temperature": 0.0} and second.retrieval is None and second.trace is None
    with store.engine.connect() as conn:  # stored as SQL NULL, not the JSON document null
        assert conn.execute(sa.text("SELECT count(*) FROM exchanges WHERE retrieval IS NULL")).scalar_one() == 1
        if conn.dialect.name == "postgresql":  # JSONB: SQL reads into it
            assert conn.execute(sa.text("SELECT messages->0->>'content' FROM exchanges WHERE id = 'x1'")).scalar_one() \
                == "¿Qué tal? テスト"


def test_feedback_is_checked_by_the_store_and_by_the_schema(database_url):
    store = Store(database_url)
    log(store, "x1")
    with pytest.raises(UnknownExchange):
        store.add_feedback("nope", rating="up")
    with pytest.raises(StoreError, match="no choice 3"):
        store.add_feedback("x1", rating="up", choice=3)
    row = store.add_feedback("x1", rating="down", correction="Hola, ¿qué tal?")
    assert row["model"] == "m1" and isinstance(row["id"], int)
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:  # rating is up, down or NULL
        conn.execute(sa.text("INSERT INTO feedback (exchange_id, created_at, choice, rating) VALUES ('x1', 0, 0, 'meh')"))


@pytest.mark.sqlite
def test_sqlite_runs_in_wal_mode(database_url):
    store = Store(database_url)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"


SPECIAL = {"rating": "up", "decision": "approved", "action": "promote", "role": "train"}


def fill(store: Store, rows: int = 3) -> dict[str, list[dict]]:
    """`rows` rows in every table, children pointing at their parents, every column set; returns them as read."""
    made: dict[str, list[dict]] = {}
    with store.engine.begin() as conn:
        for table in metadata.sorted_tables:
            serial = [c for c in table.primary_key.columns if isinstance(c.type, sa.Integer) and not c.foreign_keys]
            for i in range(rows):
                values = {}
                for column in table.columns:
                    if column.foreign_keys:
                        target = next(iter(column.foreign_keys)).column
                        values[column.name] = made[target.table.name][i][target.name]
                    elif column not in serial:
                        values[column.name] = _sample(column, i)
                conn.execute(table.insert().values(values))
            made[table.name] = [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(*table.primary_key))]
    return made


def _sample(column: sa.Column, i: int):
    if column.name in SPECIAL:
        return SPECIAL[column.name]
    kind = column.type
    if isinstance(kind, sa.JSON) or isinstance(getattr(kind, "impl", None), sa.JSON):
        return {"i": i, "ñandú": [i, None, "🚀"]}
    if isinstance(kind, sa.Boolean):
        return i % 2 == 0
    if isinstance(kind, sa.Integer):
        return 10 * i + 1
    if isinstance(kind, sa.Float):
        return 1796000000.25 + i
    return f"{column.name}-{i}-ñ"[: getattr(kind, "length", None) or 100]


def read_all(store: Store) -> dict[str, list[dict]]:
    with store.engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key))]
                for t in metadata.sorted_tables}


def test_db_copy_moves_every_row_of_every_table_with_its_ids(tmp_path, database_url):
    from typer.testing import CliRunner

    from forja.cli import app

    source_url = f"sqlite:///{tmp_path / 'old.db'}"
    source = Store(source_url)
    made = fill(source)
    source.close()
    result = CliRunner().invoke(app, ["db", "copy", source_url, database_url])
    assert result.exit_code == 0, result.output
    assert f"copied {3 * len(metadata.tables)} rows" in result.output
    target = Store(database_url)
    assert read_all(target) == made
    log(target, "after-copy")  # new rows get new ids: the sequences moved past the copied ones
    assert target.add_feedback("after-copy", rating="up")["id"] == max(r["id"] for r in made["feedback"]) + 1
    again = CliRunner().invoke(app, ["db", "copy", source_url, database_url])  # never into a database in use
    assert again.exit_code == 1 and "is not empty" in again.output and "Traceback" not in again.output


def test_db_current_and_migrate_name_the_revision(database_url, monkeypatch):
    from typer.testing import CliRunner

    from forja.cli import app

    monkeypatch.setenv("FORJA_DATABASE_URL", database_url)
    engine = sa.create_engine(database_url)
    migrations.upgrade(engine, "0007")
    engine.dispose()
    runner = CliRunner()
    assert f"revision 0007, forja db migrate brings it to {migrations.head()}" in runner.invoke(app, ["db", "current"]).output
    migrated = runner.invoke(app, ["db", "migrate"])
    assert migrated.exit_code == 0 and f"at revision {migrations.head()} (0008, 0009" in migrated.output
    assert "up to date" in runner.invoke(app, ["db", "current"]).output
    assert "nothing to do" in runner.invoke(app, ["db", "migrate"]).output


def test_the_active_version_lives_in_the_database_and_an_old_active_json_moves_there(tiny_model_dir, tmp_path):
    import shutil

    from forja import models
    from forja.config import load_settings

    settings = load_settings(model=str(tiny_model_dir))
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    settings.models_dir.mkdir(parents=True)
    legacy = settings.models_dir / models.ACTIVE_FILE  # as older releases wrote it: one promotion
    legacy.write_text(json.dumps({"stack": [str(other)], "log": [
        {"at": "2026-11-30T10:00:00Z", "action": "promote", "model": str(other), "previous": str(tiny_model_dir),
         "reason": "promoted by hand"}]}))
    first, second = Store.open(settings), Store.open(settings)  # two replicas' stores on one database
    assert models.active_model(settings, first) == str(other)
    assert not legacy.exists() and legacy.with_suffix(".json.moved-to-database").exists()
    assert models.activation_log(settings, second)[0]["at"] == "2026-11-30T10:00:00Z"
    mark = second.registry_mark()
    assert models.rollback(settings, store=first) == str(tiny_model_dir)
    assert second.registry_mark() != mark and models.active_model(settings, second) == str(tiny_model_dir)
    with pytest.raises(models.ModelError, match="already the active model"):
        models.promote(settings, str(tiny_model_dir), store=second)
    assert [e["action"] for e in models.activation_log(settings)] == ["promote", "rollback"]


def reference_traffic(rows: list[dict], since: float, bucket_seconds: float, count: int) -> tuple[list, dict]:
    """What /dashboard's figures are, computed in Python from every row: the SQL must give the same."""
    import math

    def summary(group):
        latencies = sorted(r["latency_ms"] for r in group)
        seconds = sum(latencies) / 1000
        pick = lambda p: latencies[max(0, math.ceil(len(latencies) * p / 100) - 1)] if latencies else None  # noqa: E731
        return {"requests": len(group), "blocked": sum(r["finish_reason"] == "content_filter" for r in group),
                "p50_ms": pick(50), "p95_ms": pick(95),
                "tokens_per_s": round(sum(r["completion_tokens"] for r in group) / seconds, 2) if seconds else None}

    grouped = [[] for _ in range(count)]
    for row in rows:
        grouped[min(int((row["created_at"] - since) // bucket_seconds), count - 1)].append(row)
    answered = [r for r in rows if r["finish_reason"] != "content_filter" or r["completion_tokens"]]
    totals = {**summary(rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
              "completion_tokens": sum(r["completion_tokens"] for r in rows),
              "tokens_per_call": round(sum(r["completion_tokens"] for r in answered) / len(answered), 1)
              if answered else None}
    return [summary(g) for g in grouped], totals


def test_traffic_counted_in_sql_equals_counting_every_row(database_url):
    import random

    store = Store(database_url)
    chance = random.Random(7)
    since = 1_796_000_000.0
    rows = []
    with store.engine.begin() as conn:
        for i in range(400):
            row = {"id": f"x{i}", "created_at": since + chance.uniform(0, 3600), "route": "chat",
                   "model": chance.choice(["v1", "v2"]), "messages": "q", "answers": ["a"], "params": {},
                   "prompt_tokens": chance.randint(1, 50), "completion_tokens": chance.choice([0, 3, 17, 40]),
                   "latency_ms": round(chance.uniform(5, 2000), 1),
                   "finish_reason": chance.choice(["stop", "length", "content_filter", None])}
            rows.append(row)
        conn.execute(sa.insert(metadata.tables["exchanges"]), rows)
    for bucket_seconds in (60, 600, 1234.5):
        stats = store.traffic(since, bucket_seconds, since + 3600)
        buckets, totals = reference_traffic(rows, since, bucket_seconds, len(stats["buckets"]))
        assert [{k: v for k, v in b.items() if k != "start"} for b in stats["buckets"]] == buckets
        assert stats["totals"] == totals
    assert {v["model"]: v["exchanges"] for v in stats["versions"]} == {
        m: sum(r["model"] == m for r in rows) for m in ("v1", "v2")}


def test_a_database_migrated_by_a_newer_forja_is_refused_naming_both_revisions(database_url):
    Store(database_url).close()
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(StoreError, match=f"revision 0099, newer than this forja knows .its newest is {migrations.head()}"):
        Store(database_url)


def test_a_nul_character_a_model_wrote_or_a_client_sent_is_stored_on_both_engines(database_url):
    """PostgreSQL refuses U+0000 in text and JSON: it is kept as U+FFFD there (SQLite keeps it), and a
    backslash followed by "u0000" typed as text stays as it was."""
    store = Store(database_url)
    log(store, "nul", "a\x00b and a typed \\u0000", "answer\x00", retrieval=[{"chunk": "\x00"}])
    exchange = store.exchange("nul")
    nul = "\ufffd" if store.engine.dialect.name == "postgresql" else "\x00"
    assert exchange.messages[0]["content"] == f"a{nul}b and a typed \\u0000"
    assert exchange.answers == [f"answer{nul}"] and exchange.retrieval == [{"chunk": nul}]
    row = store.add_feedback("nul", rating="down", correction="bien\x00")
    assert next(r for r in store.feedback_rows() if r["id"] == row["id"])["correction"] == f"bien{nul}"
    store.close()
