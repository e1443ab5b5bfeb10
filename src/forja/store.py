"""The database: every served exchange, the feedback people leave on it, and which feedback went into
which model version.

SQLAlchemy Core over SQLite by default (FORJA_HOME/forja.db, WAL journal, foreign keys on, every commit
synced to disk); `database_url` in the config points it at another database such as PostgreSQL.
The schema changes only through the Alembic revisions of forja.migrations, applied when the store opens
(and by `forja db migrate`), so an old database is brought up to date in place.
"""

from __future__ import annotations

import collections
import json
import re
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine

from forja.config import ForjaError, Settings


class StoreError(ForjaError):
    """The database cannot be opened, or a row cannot be stored as asked."""


class UnknownExchange(StoreError):
    """Feedback names an exchange id the store does not have."""


class DatabaseAway(ForjaError):
    """The database does not answer (and, for new requests, the exchanges waiting for it fill the backlog);
    the server answers 503."""


log = logging.getLogger("forja.store")
# While the database is away (a restart, a failover) answered exchanges wait in memory, in order, and are
# written when it is back: at most this many; past it the server answers 503 before generating anything.
BACKLOG_LIMIT = 10_000
RETRY_SECONDS = 1.0  # how often the backlog tries the database again


metadata = sa.MetaData()

# JSON documents: JSONB on PostgreSQL (queried and indexed in SQL), JSON text on SQLite; callers hand over and
# get back Python values. A Python None is SQL NULL. Times are float seconds since the epoch (UTC) on both
# engines, as the OpenAI API reports them (`created`), so a row reads back exactly as it was written.
JSON = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

exchanges = sa.Table(
    "exchanges", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the response id the API returned
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("route", sa.String(40), nullable=False),  # chat, completion, predict
    sa.Column("model", sa.String(200), nullable=False),  # the model or version that answered
    sa.Column("persona", sa.String(200)),
    sa.Column("messages", JSON, nullable=False),  # JSON: chat messages as given to the model, or a prompt string
    sa.Column("answers", JSON, nullable=False),  # JSON list, one per choice
    sa.Column("params", JSON, nullable=False),  # JSON sampling parameters
    sa.Column("prompt_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("completion_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("latency_ms", sa.Float, nullable=False, default=0.0),
    sa.Column("finish_reason", sa.String(20)),
    sa.Column("api_key_name", sa.String(200)),
    sa.Column("retrieval", JSON),  # JSON: the knowledge chunks retrieved for the prompt(s), or NULL
    sa.Column("trace", JSON),  # JSON: an agent persona's steps (tool, arguments, result), or NULL
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("exchange_id", sa.String(64), sa.ForeignKey("exchanges.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("choice", sa.Integer, nullable=False, default=0),
    sa.Column("rating", sa.String(4)),  # "up", "down" or NULL (a comment only)
    sa.Column("correction", sa.Text),
    sa.Column("comment", sa.Text),
    sa.Column("sender", sa.String(200)),  # the API key's name, never the key
    sa.Column("tool_call", JSON),  # JSON: an agent step's call corrected, {"step", "name", "arguments"}, or NULL
    sa.CheckConstraint("rating IN ('up', 'down') OR rating IS NULL", name="rating_up_or_down"),
)

feedback_used = sa.Table(
    "feedback_used", metadata,
    sa.Column("feedback_id", sa.Integer, sa.ForeignKey("feedback.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("version", sa.String(200), primary_key=True),
    sa.Column("role", sa.String(10), nullable=False),  # "train" or "holdout"
    sa.Column("used_at", sa.Float, nullable=False),
)

feedback_reviews = sa.Table(
    "feedback_reviews", metadata,  # an operator's decision on a feedback row before it trains anything
    sa.Column("feedback_id", sa.Integer, sa.ForeignKey("feedback.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("decision", sa.String(10), nullable=False),  # "approved" or "rejected"
    sa.Column("reviewer", sa.String(200)),
    sa.Column("reviewed_at", sa.Float, nullable=False),
    sa.CheckConstraint("decision IN ('approved', 'rejected')", name="decision_approved_or_rejected"),
)


guard_events = sa.Table(
    "guard_events", metadata,  # the audit log of the guardrails: what was decided, never the text
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),  # the exchange's id
    sa.Column("route", sa.String(40)),
    sa.Column("stage", sa.String(10), nullable=False),  # input or output
    sa.Column("rule", sa.String(80), nullable=False),  # pii.email, injection.override, topics, safety, ...
    sa.Column("category", sa.String(40), nullable=False),  # pii, injection, blocklist, S1..S14, ...
    sa.Column("action", sa.String(10), nullable=False),  # block, redact, flag, allow
    sa.Column("model", sa.String(200)),
    sa.Column("persona", sa.String(200)),
)


files = sa.Table(
    "files", metadata,  # uploads of POST /v1/files; the bytes are in FORJA_HOME/files/<id>/<filename>
    sa.Column("id", sa.String(64), primary_key=True),  # file-<hex>, as the API returned it
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("filename", sa.String(500), nullable=False),  # as uploaded
    sa.Column("purpose", sa.String(40), nullable=False, index=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("api_key_name", sa.String(200)),  # who uploaded it, never the key
)

vector_store_files = sa.Table(
    "vector_store_files", metadata,  # a file attached to a knowledge collection through /v1/vector_stores
    sa.Column("collection", sa.String(200), primary_key=True),
    sa.Column("file_id", sa.String(64), sa.ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # in_progress, completed, failed
    sa.Column("last_error", JSON),  # JSON {"code", "message"} when failed
    sa.Column("attributes", JSON, nullable=False, default=dict),  # JSON, the client's own
)

vector_store_file_batches = sa.Table(
    "vector_store_file_batches", metadata,  # files attached together (POST /v1/vector_stores/{id}/file_batches)
    sa.Column("id", sa.String(64), primary_key=True),  # vsfb_<hex>
    sa.Column("collection", sa.String(200), nullable=False, index=True),
    sa.Column("file_ids", JSON, nullable=False),  # JSON list
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("cancelled", sa.Boolean, nullable=False, default=False),
)

jobs = sa.Table(
    "jobs", metadata,  # fine-tuning and batch jobs (forja.jobs): what was asked, where it stands, what it made
    sa.Column("id", sa.String(64), primary_key=True),  # ftjob-<hex> or batch_<hex>, as the API returned it
    sa.Column("kind", sa.String(20), nullable=False, index=True),  # fine_tune or batch
    sa.Column("status", sa.String(20), nullable=False, index=True),  # as OpenAI names them for the kind
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("api_key_name", sa.String(200)),  # whose job it is, never the key
    sa.Column("request", JSON, nullable=False),  # JSON: the job as created (checked)
    sa.Column("result", JSON, nullable=False, default=dict),  # JSON: what it made (model, tokens, files, counts)
    sa.Column("error", JSON),  # JSON {"code", "message", "param"} when failed
    sa.Column("worker", sa.String(200)),  # host:pid:tag of the worker running it; NULL = waiting for one
    sa.Column("heartbeat_at", sa.Float),  # the last time that worker said it is alive
    sa.Column("attempts", sa.Integer, nullable=False, default=0),  # times a worker started (or resumed) it
)

job_events = sa.Table(
    "job_events", metadata,  # a job's progress as OpenAI lists it: messages and metrics, newest first
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("level", sa.String(10), nullable=False),  # info, warn, error
    sa.Column("type", sa.String(20), nullable=False),  # message, metrics, checkpoint
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", JSON),  # JSON: step, losses, tokens/s, ETA; a checkpoint's step and metrics
)

api_keys = sa.Table(
    "api_keys", metadata,  # keys made with POST /admin/keys or forja keys create; only their SHA-256 is kept
    sa.Column("id", sa.String(64), primary_key=True),  # key_<hex>
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("scopes", JSON, nullable=False),  # JSON list: chat, train
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("requests_per_minute", sa.Integer),
    sa.Column("tokens_per_day", sa.Integer),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

usage = sa.Table(
    "usage", metadata,  # requests and tokens per key name per UTC day, counted as answers are made
    sa.Column("key_name", sa.String(200), primary_key=True),  # "(anonymous)" on a server without keys
    sa.Column("day", sa.String(10), primary_key=True),  # YYYY-MM-DD, UTC
    sa.Column("requests", sa.Integer, nullable=False, default=0),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_at", sa.Float, nullable=False),
)


console_users = sa.Table(
    "console_users", metadata,  # people who sign in to /console (forja users add); never an API key
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(400), nullable=False),  # scrypt$N$r$p$salt$hash, never the password
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_login_at", sa.Float),
    sa.Column("failed_logins", sa.Integer, nullable=False, default=0),  # wrong passwords since failing_since
    sa.Column("failing_since", sa.Float),
    sa.Column("locked_until", sa.Float),  # too many wrong passwords: no login before this time
)

console_sessions = sa.Table(
    "console_sessions", metadata,  # a signed-in browser: the cookie's token is only stored hashed
    sa.Column("id", sa.String(64), primary_key=True),  # hex SHA-256 of the cookie's token
    sa.Column("user_id", sa.Integer, sa.ForeignKey("console_users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("csrf", sa.String(64), nullable=False),  # what forms and state-changing calls must send back
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)

conversations = sa.Table(
    "conversations", metadata,  # chats kept on the server (a chat request's conversation_id)
    sa.Column("id", sa.String(64), primary_key=True),  # conv_<hex>
    sa.Column("api_key_name", sa.String(200), index=True),  # whose it is
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("title", sa.String(200)),
    sa.Column("messages", JSON, nullable=False),  # JSON: the turns the model is given, oldest first
    sa.Column("summary", sa.Text),  # the summary that stands for older turns taken out of `messages`
    sa.Column("compacted", sa.Integer, nullable=False, default=0),  # turns summarised or dropped so far
)


model_registry = sa.Table(
    "model_registry", metadata,  # the active version, shared by every replica: promote pushes, rollback pops
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("action", sa.String(10), nullable=False),  # promote or rollback
    sa.Column("model", sa.String(200), nullable=False),  # promoted, or active after the rollback
    sa.Column("previous", sa.String(200), nullable=False),  # active before
    sa.Column("reason", sa.Text, nullable=False),
    sa.CheckConstraint("action IN ('promote', 'rollback')", name="action_promote_or_rollback"),
)


@dataclass
class Exchange:
    id: str
    created_at: float
    route: str
    model: str
    persona: str | None
    messages: Any
    answers: list[str]
    params: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    finish_reason: str | None
    api_key_name: str | None
    retrieval: Any = None
    trace: Any = None

    @property
    def answer(self) -> str:
        return self.answers[0] if self.answers else ""


class Store:
    """One database. Safe to share between threads: every call takes its own connection."""

    def __init__(self, url: str, migrate: bool = True):
        url = driver_url(url)
        self.url = url
        try:
            # pool_pre_ping: a connection the database dropped (a restart) is replaced, not handed out
            # a database host that does not answer at all is given up on after 5 s, not the OS's minutes
            connect = {"connect_timeout": 5} if url.startswith("postgresql") else {}
            postgresql = url.startswith("postgresql")
            self.engine: Engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect,
                                                   json_serializer=_postgresql_json if postgresql else _json_text)
            if self.engine.dialect.name == "sqlite":
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            else:
                sa.event.listen(self.engine, "before_cursor_execute", _without_nul, retval=True)
            self.applied = self.migrate() if migrate else []
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot open the database {safe_url(url)}: {str(exc).splitlines()[0]}") from None

        self.backlog: collections.deque[tuple[float, dict[str, Any] | None, list[dict[str, Any]]]] = collections.deque()
        self.backlog_limit = BACKLOG_LIMIT
        self._backlog_lock = threading.Lock()
        self._retry: threading.Timer | None = None

    @classmethod
    def open(cls, settings: Settings) -> "Store":
        if settings.database_url is None:
            settings.home.mkdir(parents=True, exist_ok=True)
        return cls(settings.database)

    def migrate(self) -> list[str]:
        """Apply the schema revisions this database has not seen, in order; returns them."""
        from forja import migrations

        return migrations.upgrade(self.engine)

    def revision(self) -> str | None:
        from forja import migrations

        with self.engine.connect() as conn:
            return migrations.current(conn)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if not self.flush():
            log.error("the database is away: %d answered exchanges in memory are not stored", len(self.backlog))
        self.engine.dispose()

    @property
    def backlog_full(self) -> bool:
        return len(self.backlog) >= self.backlog_limit

    # ------------------------------------------------------------------ the active model version

    def registry_log(self) -> list[dict[str, Any]]:
        """Every promotion and rollback, oldest first."""
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(model_registry).order_by(model_registry.c.id))]

    def registry_mark(self) -> int | None:
        """The id of the newest change (one index lookup: a server asks on every request whether it moved)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(model_registry.c.id))).scalar_one()

    def registry_change(self, change) -> Any:
        """`change(log)` → (rows to append, result), with the log read and the rows written in one transaction;
        on PostgreSQL a table lock keeps two replicas' promotions from reading the same log."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("LOCK TABLE model_registry IN EXCLUSIVE MODE"))
            log = [dict(r._mapping) for r in conn.execute(sa.select(model_registry).order_by(model_registry.c.id))]
            rows, result = change(log)
            if rows:
                conn.execute(model_registry.insert(), [{"at": time.time(), **row} for row in rows])
            return result

    # ------------------------------------------------------------------ exchanges

    def log_exchange(self, *, id: str, route: str, model: str, persona: str | None, messages: Any,
                     answers: list[str], params: dict[str, Any], prompt_tokens: int, completion_tokens: int,
                     latency_ms: float, finish_reason: str | None, api_key_name: str | None,
                     retrieval: Any = None, guard_events: Sequence[dict[str, Any]] = (), trace: Any = None) -> None:
        """One exchange and the guardrail decisions taken on it, in one transaction; kept in the backlog (and
        written in order later) while the database is away, DatabaseAway when the backlog is full."""
        self._write(time.time(), {
            "id": id, "route": route, "model": model, "persona": persona, "messages": messages, "answers": answers,
            "params": params, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "latency_ms": latency_ms, "finish_reason": finish_reason, "api_key_name": api_key_name,
            "retrieval": retrieval, "trace": trace}, list(guard_events))

    def log_guard_events(self, events: list[dict[str, Any]]) -> None:
        """Guardrail decisions alone (a server that does not store exchanges still keeps its audit log)."""
        self._write(time.time(), None, list(events))

    def _write(self, at: float, exchange: dict[str, Any] | None, events: list[dict[str, Any]]) -> None:
        with self._backlog_lock:
            if not self.backlog:
                try:
                    self._insert(at, exchange, events)
                    return
                except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                    log.error("the database is away (%s): answered exchanges wait in memory", str(exc).splitlines()[0])
            if len(self.backlog) >= self.backlog_limit:
                raise DatabaseAway(f"the database {safe_url(self.url)} is unreachable and {len(self.backlog)} "
                                   "answered exchanges wait for it; retry when it is back")
            self.backlog.append((at, exchange, events))
            self._schedule()

    def _insert(self, at: float, exchange: dict[str, Any] | None, events: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            if events:
                conn.execute(guard_events.insert(), [{"created_at": at, **event} for event in events])
            if exchange is not None:
                conn.execute(exchanges.insert().values(created_at=at, **exchange))

    def flush(self) -> bool:
        """Write the backlog, oldest first; False while the database is still away."""
        with self._backlog_lock:
            while self.backlog:
                try:
                    self._insert(*self.backlog[0])
                except (sa.exc.OperationalError, sa.exc.InterfaceError):
                    return False
                self.backlog.popleft()
            return True

    def _schedule(self) -> None:
        if self._retry is None or not self._retry.is_alive():
            self._retry = threading.Timer(RETRY_SECONDS, self._retry_flush)
            self._retry.daemon = True
            self._retry.start()

    def _retry_flush(self) -> None:
        if self.flush():
            log.info("the database is back: the answered exchanges that waited are stored")
        else:
            with self._backlog_lock:
                self._retry = None
                self._schedule()

    def guard_log(self, *, request_id: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Guardrail decisions, newest first."""
        query = sa.select(guard_events).order_by(guard_events.c.created_at.desc(), guard_events.c.id.desc())
        if request_id:
            query = query.where(guard_events.c.request_id == request_id)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def exchange(self, exchange_id: str) -> Exchange | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(exchanges).where(exchanges.c.id == exchange_id)).first()
        return _exchange(row) if row is not None else None

    # ------------------------------------------------------------------ feedback

    def add_feedback(self, exchange_id: str, *, rating: str | None = None, correction: str | None = None,
                     comment: str | None = None, choice: int = 0, sender: str | None = None,
                     tool_call: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store one feedback row and return it (with the model that gave the answer); committed (and
        synced) before this returns. The backlog is written first: an exchange answered while the database
        was away can be rated once it is back."""
        if not self.flush():
            raise DatabaseAway(f"the database {safe_url(self.url)} is unreachable; the exchange cannot be rated "
                               "until it is back")
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(exchanges.c.answers, exchanges.c.model)
                                 .where(exchanges.c.id == exchange_id)).first()
            if found is None:
                raise UnknownExchange(f"no exchange with id {exchange_id!r}")
            if not 0 <= choice < max(len(found.answers), 1):
                raise StoreError(f"exchange {exchange_id!r} has no choice {choice}")
            result = conn.execute(feedback.insert().values(
                exchange_id=exchange_id, created_at=time.time(), choice=choice, rating=rating,
                correction=correction, comment=comment, sender=sender, tool_call=tool_call,
            ))
            row = conn.execute(sa.select(feedback).where(feedback.c.id == result.inserted_primary_key[0])).one()
        return {**row._mapping, "model": found.model}

    def feedback_rows(self, *, rating: str | None = None, limit: int | None = None,
                      unused_only: bool = False) -> list[dict[str, Any]]:
        """Feedback joined with its exchange, newest first."""
        query = (sa.select(feedback, exchanges.c.model, exchanges.c.persona, exchanges.c.messages,
                           exchanges.c.answers, exchanges.c.route, exchanges.c.params, exchanges.c.trace,
                           feedback_reviews.c.decision.label("review"))
                 .join(exchanges, feedback.c.exchange_id == exchanges.c.id)
                 .outerjoin(feedback_reviews, feedback_reviews.c.feedback_id == feedback.c.id)
                 .order_by(feedback.c.created_at.desc(), feedback.c.id.desc()))
        if rating:
            query = query.where(feedback.c.rating == rating)
        if unused_only:
            query = query.where(~feedback.c.id.in_(sa.select(feedback_used.c.feedback_id)))
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
            used: dict[int, list[str]] = {}
            page = query.with_only_columns(feedback.c.id).subquery()  # only the versions of the rows listed
            for r in conn.execute(sa.select(feedback_used.c.feedback_id, feedback_used.c.version)
                                  .where(feedback_used.c.feedback_id.in_(sa.select(page.c.id)))
                                  .order_by(feedback_used.c.used_at, feedback_used.c.version)):
                used.setdefault(r.feedback_id, []).append(r.version)
        for row in rows:
            answers = row.pop("answers")
            row["answer"] = answers[row["choice"]] if row["choice"] < len(answers) else ""
            row["tools"] = (row.pop("params") or {}).get("tools")  # an agent's: the tools it was offered
            row["used_in"] = used.get(row["id"], [])
        return rows

    def edit_correction(self, feedback_id: int, correction: str) -> None:
        """An operator's own wording of a correction, before it is approved (it replaces the sender's)."""
        with self.engine.begin() as conn:
            if conn.execute(feedback.update().where(feedback.c.id == feedback_id)
                            .values(correction=correction)).rowcount == 0:
                raise StoreError(f"no feedback with id {feedback_id} (see forja feedback list)")

    def review(self, feedback_ids: Iterable[int], decision: str, reviewer: str | None = None) -> int:
        """Approve or reject feedback rows (a later decision replaces an earlier one); returns how many.
        A rejected row never trains; with `feedback.trust: reviewed` only approved thumbs-up do."""
        if decision not in ("approved", "rejected"):
            raise StoreError(f"a review is 'approved' or 'rejected', not {decision!r}")
        ids = sorted(set(feedback_ids))
        with self.engine.begin() as conn:
            known = {r.id for r in conn.execute(sa.select(feedback.c.id).where(feedback.c.id.in_(ids)))}
            missing = [i for i in ids if i not in known]
            if missing:
                raise StoreError(f"no feedback with id {', '.join(map(str, missing))} (see forja feedback list)")
            conn.execute(feedback_reviews.delete().where(feedback_reviews.c.feedback_id.in_(ids)))
            conn.execute(feedback_reviews.insert(), [{"feedback_id": i, "decision": decision, "reviewer": reviewer,
                                                      "reviewed_at": time.time()} for i in ids])
        return len(ids)

    def mark_used(self, feedback_ids: Iterable[int], version: str, role: str = "train") -> None:
        now = time.time()
        values = [{"feedback_id": i, "version": version, "role": role, "used_at": now} for i in feedback_ids]
        if values:
            with self.engine.begin() as conn:
                conn.execute(feedback_used.insert(), values)

    def used_by(self, version: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(feedback_used).where(feedback_used.c.version == version)
                                .order_by(feedback_used.c.feedback_id))
            return [dict(r._mapping) for r in rows]

    def stats(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            count = lambda q: conn.execute(q).scalar_one()  # noqa: E731
            calls = dict(conn.execute(sa.select(exchanges.c.model, sa.func.count())
                                      .group_by(exchanges.c.model).order_by(exchanges.c.model)).all())
            ratings = {r.rating or "none": r.n for r in conn.execute(
                sa.select(feedback.c.rating, sa.func.count().label("n")).group_by(feedback.c.rating))}
            models = {row["model"]: {"exchanges": row["exchanges"], "up": row["up"], "down": row["down"],
                                     "approval": row["up_ratio"]} for row in _ratings_by_model(conn, calls)}
            return {
                "exchanges": sum(calls.values()),
                "feedback": sum(ratings.values()),
                "ratings": ratings,
                "corrections": count(sa.select(sa.func.count()).select_from(feedback)
                                     .where(feedback.c.correction.is_not(None) | feedback.c.tool_call.is_not(None))),
                "unused": count(sa.select(sa.func.count()).select_from(feedback)
                                .where(~feedback.c.id.in_(sa.select(feedback_used.c.feedback_id)))),
                "models": models,
            }

    def traffic(self, since: float, bucket_seconds: float, until: float | None = None) -> dict[str, Any]:
        """The exchange log from `since` in buckets of `bucket_seconds`: requests, latency p50/p95, generation
        speed (tokens/s while answering), requests the guardrails refused, thumbs up/down per model version,
        and the guardrails' decisions by category (for /dashboard). Counted in SQL: a few rows per bucket come
        back, however many exchanges there were."""
        until = time.time() if until is None else until
        count = max(1, math.ceil((until - since) / bucket_seconds))
        window = sa.and_(exchanges.c.created_at >= since, exchanges.c.created_at <= until)
        with self.engine.connect() as conn:
            offset = (exchanges.c.created_at - since) / bucket_seconds
            # floor of a number >= 0: SQLite's CAST truncates, PostgreSQL's rounds
            bucket = sa.func.floor(offset) if conn.dialect.name == "postgresql" else sa.cast(offset, sa.Integer)
            bucket = sa.func.least(bucket, count - 1) if conn.dialect.name == "postgresql" \
                else sa.func.min(bucket, count - 1)
            rows = sa.select(bucket.label("bucket"), exchanges.c.latency_ms, exchanges.c.completion_tokens,
                             exchanges.c.prompt_tokens, exchanges.c.finish_reason).where(window).subquery()
            blocked = sa.case((rows.c.finish_reason == "content_filter", 1), else_=0)
            answered = sa.or_(rows.c.finish_reason.is_(None), rows.c.finish_reason != "content_filter",
                              rows.c.completion_tokens > 0)
            sums = (sa.func.count().label("requests"), sa.func.coalesce(sa.func.sum(blocked), 0).label("blocked"),
                    sa.func.coalesce(sa.func.sum(rows.c.latency_ms), 0).label("latency"),
                    sa.func.coalesce(sa.func.sum(rows.c.completion_tokens), 0).label("completion_tokens"),
                    sa.func.coalesce(sa.func.sum(rows.c.prompt_tokens), 0).label("prompt_tokens"),
                    sa.func.count().filter(answered).label("answered"),
                    sa.func.coalesce(sa.func.sum(rows.c.completion_tokens).filter(answered), 0).label("answered_tokens"))
            per_bucket = {r.bucket: r for r in conn.execute(sa.select(rows.c.bucket, *sums).group_by(rows.c.bucket))}
            total = conn.execute(sa.select(*sums)).one()
            percentiles = _percentiles(conn, rows)
            calls = dict(conn.execute(sa.select(exchanges.c.model, sa.func.count()).where(window)
                                      .group_by(exchanges.c.model)).all())
            versions = _ratings_by_model(conn, calls, feedback.c.created_at >= since, feedback.c.created_at <= until)
            guard = conn.execute(
                sa.select(guard_events.c.category, guard_events.c.action, sa.func.count().label("n"))
                .where(guard_events.c.created_at >= since, guard_events.c.created_at <= until)
                .group_by(guard_events.c.category, guard_events.c.action)).all()
        return {
            "since": since, "until": until, "bucket_seconds": bucket_seconds,
            "buckets": [{"start": since + i * bucket_seconds, **_summary(per_bucket.get(i), percentiles.get(i, {}))}
                        for i in range(count)],
            "totals": {**_summary(total, percentiles.get(None, {})), "prompt_tokens": total.prompt_tokens,
                       "completion_tokens": total.completion_tokens,
                       "tokens_per_call": round(total.answered_tokens / total.answered, 1) if total.answered else None},
            "versions": versions,
            "guard": [{"category": c, "action": a, "count": n} for c, a, n in sorted(guard, key=lambda g: (-g.n, g.category))],
        }


def _ratings_by_model(conn: Connection, calls: dict[str, int], *where: Any) -> list[dict[str, Any]]:
    """Per model (those in `calls`, exchanges counted, and any rated): thumbs up and down of the
    feedback matching `where`, in one grouped query, sorted by model."""
    rated = conn.execute(
        sa.select(exchanges.c.model, feedback.c.rating, sa.func.count().label("n"))
        .select_from(feedback.join(exchanges)).where(feedback.c.rating.is_not(None), *where)
        .group_by(exchanges.c.model, feedback.c.rating)).all()
    models = {m: {"model": m, "exchanges": n, "up": 0, "down": 0} for m, n in calls.items()}
    for model, rating, n in rated:
        models.setdefault(model, {"model": model, "exchanges": 0, "up": 0, "down": 0})[rating] = n
    for row in models.values():
        row["up_ratio"] = round(row["up"] / (row["up"] + row["down"]), 3) if row["up"] + row["down"] else None
    return sorted(models.values(), key=lambda row: row["model"])


def _percentiles(conn: Connection, rows: Any) -> dict[int | None, dict[int, float]]:
    """Latency p50 and p95 (nearest rank) per bucket and over all (key None), with window functions: the
    row ranked ceil(n * p / 100) in its bucket, found by the database."""
    ranked = sa.select(
        rows.c.bucket, rows.c.latency_ms,
        sa.func.row_number().over(partition_by=rows.c.bucket, order_by=rows.c.latency_ms).label("rank"),
        sa.func.count().over(partition_by=rows.c.bucket).label("n"),
        sa.func.row_number().over(order_by=rows.c.latency_ms).label("rank_all"),
        sa.func.count().over().label("n_all")).subquery()
    wanted = {p: ((ranked.c.n * p + 99) // 100, (ranked.c.n_all * p + 99) // 100) for p in (50, 95)}
    found: dict[int | None, dict[int, float]] = {}
    picked = sa.select(ranked).where(sa.or_(*(sa.or_(ranked.c.rank == mine, ranked.c.rank_all == every)
                                              for mine, every in wanted.values())))
    for row in conn.execute(picked):
        for p in (50, 95):
            if row.rank == (row.n * p + 99) // 100:
                found.setdefault(row.bucket, {})[p] = row.latency_ms
            if row.rank_all == (row.n_all * p + 99) // 100:
                found.setdefault(None, {})[p] = row.latency_ms
    return found


def _summary(sums: Any, percentiles: dict[int, float]) -> dict[str, Any]:
    """Requests, latency percentiles and generation speed of some exchanges, from their sums."""
    if sums is None or not sums.requests:
        return {"requests": 0, "blocked": 0, "p50_ms": None, "p95_ms": None, "tokens_per_s": None}
    seconds = sums.latency / 1000
    return {"requests": sums.requests, "blocked": sums.blocked, "p50_ms": percentiles.get(50),
            "p95_ms": percentiles.get(95),
            "tokens_per_s": round(sums.completion_tokens / seconds, 2) if seconds else None}


# PostgreSQL stores no U+0000 in text or JSON (SQLite does): a stray NUL a model generated, or one a client
# sent, would fail the write (and stall the backlog behind it). It is kept as U+FFFD there instead.
NUL, REPLACEMENT = "\x00", "\ufffd"
_ESCAPED_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")  # JSON's \u0000, not a backslash then "u0000"


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _postgresql_json(value: Any) -> str:
    return _ESCAPED_NUL.sub(r"\1\\ufffd", _json_text(value))


def _without_nul(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool):
    def clean(params: Any) -> Any:
        if isinstance(params, dict):
            return {k: v.replace(NUL, REPLACEMENT) if isinstance(v, str) and NUL in v else v for k, v in params.items()}
        return params

    if executemany and isinstance(parameters, (list, tuple)):
        return statement, [clean(p) for p in parameters]
    return statement, clean(parameters)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the server's writes
    cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged row survives a crash or power cut
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")  # the CLI and the server may write at the same moment
    cursor.close()


def _exchange(row: Any) -> Exchange:
    return Exchange(**row._mapping)


def driver_url(url: str) -> str:
    """postgresql://... goes through psycopg 3 (the driver forja installs), not SQLAlchemy's default psycopg2."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


COPY_CHUNK = 1000  # rows read and written at a time: memory stays flat whatever the size of a table


def copy(source_url: str, target_url: str) -> dict[str, int]:
    """Every row of every table from one database to another, empty one (`forja db copy`), in one transaction
    on the target: ids as they were, PostgreSQL's sequences moved past them, and each table's count checked.
    Both are brought to the newest schema first. Returns the rows copied per table."""
    source, target = Store(source_url), Store(target_url)
    try:
        with target.engine.connect() as conn:
            filled = [t.name for t in metadata.sorted_tables
                      if conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()]
        if filled:
            raise StoreError(f"{safe_url(target_url)} is not empty (rows in {', '.join(filled)}): copy into a new "
                             "database")
        copied = {}
        with source.engine.connect() as reading, target.engine.begin() as writing:
            for table in metadata.sorted_tables:  # parents before the rows that point at them
                rows = reading.execution_options(stream_results=True).execute(
                    sa.select(table).order_by(*table.primary_key.columns))
                copied[table.name] = 0
                while chunk := rows.fetchmany(COPY_CHUNK):
                    writing.execute(table.insert(), [dict(r._mapping) for r in chunk])
                    copied[table.name] += len(chunk)
                if writing.dialect.name == "postgresql":
                    _move_sequence(writing, table)
            for table in metadata.sorted_tables:
                count = writing.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                if count != copied[table.name]:
                    raise StoreError(f"{table.name}: {copied[table.name]} rows read but {count} written; nothing "
                                     "was copied (the target is left as it was)")
        return copied
    finally:
        source.close()
        target.close()


def _move_sequence(conn: Connection, table: sa.Table) -> None:
    """The next id PostgreSQL hands out comes after the copied ones (inserting explicit ids does not move it)."""
    for column in table.primary_key.columns:
        if column.autoincrement is True or (column.autoincrement == "auto" and isinstance(column.type, sa.Integer)
                                            and len(table.primary_key.columns) == 1):
            conn.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column.name}'), "
                                 f"COALESCE((SELECT MAX({column.name}) FROM {table.name}), 0) + 1, false)"))
