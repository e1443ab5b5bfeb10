"""API keys kept in the database (made with `POST /admin/keys` or `forja keys create`; only their SHA-256 is
stored), the usage counted per key and day, and the per-key limits the server enforces.

Keys in the config (`serve.api_keys`) keep working and are listed beside these; a name is one key's.
`KeyRing` is the server's view: it finds the key a request carries (the config's, or the database's, re-read
every RING_SECONDS so a key revoked on another replica stops working within seconds, at once on this one),
and answers 429 with Retry-After past a key's requests per minute or tokens per day.
"""

from __future__ import annotations

import collections
import hashlib
import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from forja.config import ApiKey, ForjaError, KeyLimits, Settings
from forja.store import Store, api_keys, usage

KEY_PREFIX = "fk-"
ANONYMOUS = "(anonymous)"  # usage on a server without keys
RING_SECONDS = 2.0  # how stale the database keys (and the tokens counted today) may be in a server process
SCOPES = ("chat", "train")


class ApiKeyError(ForjaError):
    """A key that cannot be made or revoked as asked."""


class KeyExists(ApiKeyError):
    """A key of this name exists (or existed: a revoked key keeps its name)."""


@dataclass(frozen=True)
class StoredKey:
    id: str
    name: str
    scopes: list[str]
    admin: bool
    limits: KeyLimits
    created_at: float
    revoked_at: float | None
    sha256: str

    def as_api_key(self) -> ApiKey:
        return ApiKey(name=self.name, sha256=self.sha256, admin=self.admin, scopes=self.scopes, limits=self.limits)


def create(settings: Settings, store: Store, name: str, scopes: list[str], admin: bool = False,
           limits: KeyLimits | None = None) -> tuple[StoredKey, str]:
    """A new key: its row and the key itself, which is never stored and cannot be shown again."""
    name = name.strip()
    if not name or len(name) > 200:
        raise ApiKeyError("a key's name is 1 to 200 characters")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ApiKeyError(f"unknown scope {unknown[0]!r}: a key's scopes are {', '.join(SCOPES)} (admin: all of them)")
    if name.startswith("console:"):
        raise ApiKeyError("a key's name may not start with 'console:' (the console's users act under such names)")
    if any(key.name == name for key in settings.serve.api_keys):
        raise KeyExists(f"a key named {name!r} is in the config (serve.api_keys); choose another name")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    limits = limits or KeyLimits()
    stored = StoredKey("key_" + uuid.uuid4().hex[:20], name, sorted(set(scopes)), admin, limits, time.time(), None,
                       hashlib.sha256(secret.encode()).hexdigest())
    try:
        with store.engine.begin() as conn:
            conn.execute(api_keys.insert().values(
                id=stored.id, name=name, sha256=stored.sha256, scopes=stored.scopes, admin=admin,
                requests_per_minute=limits.requests_per_minute, tokens_per_day=limits.tokens_per_day,
                created_at=stored.created_at))
    except sa.exc.IntegrityError:
        raise KeyExists(f"a key named {name!r} exists or existed (a revoked key keeps its name, with its files, "
                          "jobs and usage); choose another name") from None
    return stored, secret


def listing(store: Store, revoked: bool = False) -> list[StoredKey]:
    query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
    if not revoked:
        query = query.where(api_keys.c.revoked_at.is_(None))
    with store.engine.connect() as conn:
        return [_stored(row) for row in conn.execute(query)]


def revoke(store: Store, id_or_name: str) -> StoredKey:
    """Revoke a database key by id or name (its row stays, so its usage keeps its name)."""
    with store.engine.begin() as conn:
        row = conn.execute(sa.select(api_keys).where(sa.or_(api_keys.c.id == id_or_name, api_keys.c.name == id_or_name),
                                                     api_keys.c.revoked_at.is_(None))).first()
        if row is None:
            raise ApiKeyError(f"no key {id_or_name!r} to revoke (forja keys list shows them; a key in the config is "
                            "removed from serve.api_keys)")
        # the name stays taken: files, jobs and usage are kept under it, and a new key must not inherit them
        conn.execute(api_keys.update().where(api_keys.c.id == row.id).values(revoked_at=time.time()))
    return _stored(row)


def count(store: Store, name: str | None, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
    """Add one request's tokens to its key's usage today (UTC)."""
    values = {"key_name": name or ANONYMOUS, "day": time.strftime("%Y-%m-%d", time.gmtime()), "requests": requests,
              "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "last_at": time.time()}
    dialect = store.engine.dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = (sa.dialects.sqlite.insert if dialect == "sqlite" else sa.dialects.postgresql.insert)(usage)
        statement = insert.values(**values).on_conflict_do_update(
            index_elements=[usage.c.key_name, usage.c.day],
            set_={"requests": usage.c.requests + insert.excluded.requests,
                  "prompt_tokens": usage.c.prompt_tokens + insert.excluded.prompt_tokens,
                  "completion_tokens": usage.c.completion_tokens + insert.excluded.completion_tokens,
                  "last_at": insert.excluded.last_at})
        with store.engine.begin() as conn:
            conn.execute(statement)
        return
    with store.engine.begin() as conn:  # any other database: update, else insert
        done = conn.execute(usage.update().where(usage.c.key_name == values["key_name"], usage.c.day == values["day"])
                            .values(requests=usage.c.requests + requests,
                                    prompt_tokens=usage.c.prompt_tokens + prompt_tokens,
                                    completion_tokens=usage.c.completion_tokens + completion_tokens,
                                    last_at=values["last_at"]))
        if done.rowcount == 0:
            conn.execute(usage.insert().values(**values))


def usage_rows(settings: Settings, store: Store, days: int) -> list[dict[str, Any]]:
    """Usage per key per day over the last `days` UTC days (today included), newest day first, with the cost
    a hosted API would have charged at serve.price_per_1k_tokens."""
    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - (days - 1) * 86400))
    price = settings.serve.price_per_1k_tokens
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(usage).where(usage.c.day >= since)
                            .order_by(usage.c.day.desc(), usage.c.key_name)).all()
    return [{"key": r.key_name, "day": r.day, "requests": r.requests, "prompt_tokens": r.prompt_tokens,
             "completion_tokens": r.completion_tokens,
             "estimated_cost": round((r.prompt_tokens + r.completion_tokens) / 1000 * price, 6)} for r in rows]


def tokens_today(store: Store, name: str) -> int:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(usage.c.prompt_tokens + usage.c.completion_tokens)
                           .where(usage.c.key_name == name, usage.c.day == time.strftime("%Y-%m-%d", time.gmtime()))
                           ).first()
    return int(row[0]) if row else 0


class Limited(Exception):
    """A key past one of its limits: the message and how many seconds until it may try again."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class KeyRing:
    """The keys a server accepts (the config's and the database's) and their limits, for one server process."""

    def __init__(self, settings: Settings, store: Store | None):
        self.settings, self.store = settings, store
        self._lock = threading.Lock()
        self._stored: dict[str, ApiKey] = {}
        self._ever = False  # any key ever made in the database
        self._loaded = -math.inf
        self._recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._tokens: dict[str, tuple[float, int]] = {}

    @property
    def configured(self) -> bool:
        """Whether the server wants keys at all: config keys, or any key ever made in the database (revoking
        the last one leaves the server closed, never open to anyone)."""
        if self.settings.serve.api_keys:
            return True
        self._database_keys()
        return self._ever

    def find(self, digest: str) -> ApiKey | None:
        """The key with this SHA-256 (comparing every config key in constant time), or None."""
        holder = None
        for key in self.settings.serve.api_keys:
            if secrets.compare_digest(digest, key.digest):
                holder = key
        return holder or self._database_keys().get(digest)

    def named(self, name: str | None) -> ApiKey | None:
        """The database key of this name (a batch runs as its owner's key)."""
        return next((k for k in self._database_keys().values() if k.name == name), None)

    def refresh(self) -> None:
        """Re-read the database keys now (after a key is made or revoked in this process)."""
        self._loaded = -math.inf

    def _database_keys(self) -> dict[str, ApiKey]:
        if self.store is None:
            return {}
        with self._lock:
            if time.monotonic() - self._loaded > RING_SECONDS:
                try:
                    every = listing(self.store, revoked=True)
                    self._stored = {k.sha256: k.as_api_key() for k in every if k.revoked_at is None}
                    self._ever = bool(every)
                except sa.exc.SQLAlchemyError:  # the database is away: keep the keys known a moment ago, and
                    if self._loaded == -math.inf:  # never read yet: closed (no key is let in), never open
                        self._ever = True
                self._loaded = time.monotonic()
            return self._stored

    def check(self, key: ApiKey, per_minute: bool = True) -> None:
        """Raise Limited when `key` is past its requests per minute (unless not `per_minute`: a batch's lines,
        sent as fast as the engine takes them) or tokens per day; counts the request."""
        limits, now = key.limits, time.monotonic()
        if limits.tokens_per_day is not None and self.store is not None:
            used = self.tokens_today(key.name)
            if used >= limits.tokens_per_day:
                midnight = (time.time() // 86400 + 1) * 86400
                raise Limited(f"the API key {key.name!r} has used its {limits.tokens_per_day} tokens for today "
                              f"({used} used); the count starts again at 00:00 UTC", max(1, math.ceil(midnight - time.time())))
        if per_minute and limits.requests_per_minute is not None:
            with self._lock:
                recent = self._recent[key.name]
                while recent and now - recent[0] >= 60:
                    recent.popleft()
                if len(recent) >= limits.requests_per_minute:
                    raise Limited(f"the API key {key.name!r} may make {limits.requests_per_minute} requests a minute",
                                  max(1, math.ceil(60 - (now - recent[0]))))
                recent.append(now)

    def tokens_today(self, name: str) -> int:
        with self._lock:
            at, used = self._tokens.get(name, (-math.inf, 0))
        if time.monotonic() - at > RING_SECONDS:
            used = tokens_today(self.store, name)
            with self._lock:
                self._tokens[name] = (time.monotonic(), used)
        return used

    def counted(self, name: str | None, tokens: int) -> None:
        """This process answered `tokens` for `name`: its count today goes up at once (the database later)."""
        if name is None:
            return
        with self._lock:
            at, used = self._tokens.get(name, (-math.inf, 0))
            if at != -math.inf:
                self._tokens[name] = (at, used + tokens)


def _stored(row: Any) -> StoredKey:
    return StoredKey(row.id, row.name, row.scopes, bool(row.admin),
                     KeyLimits(requests_per_minute=row.requests_per_minute, tokens_per_day=row.tokens_per_day),
                     row.created_at, row.revoked_at, row.sha256)
