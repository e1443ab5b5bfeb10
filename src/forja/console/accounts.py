"""Console users: passwords hashed with scrypt, sessions (the cookie's token stored only hashed, with the
CSRF token its forms send back) and the lockout after repeated wrong passwords.

`forja users add NAME` creates one (the first is an admin); /console/login opens a session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa

from forja.config import ApiKey, ForjaError
from forja.store import Store, console_sessions, console_users

# scrypt at N=2^15, r=8, p=1: 32 MiB and ~0.1 s per check on one core (OWASP's floor is N=2^17 for
# interactive logins at r=8 p=1 with more cores; raise N here and old hashes still verify, they carry theirs).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
MIN_PASSWORD_CHARS = 10
SESSION_HOURS = 12  # a session ends this long after login (console.session_hours in the config)
MAX_FAILURES = 5  # wrong passwords within FAILURE_WINDOW_SECONDS lock the user out ...
FAILURE_WINDOW_SECONDS = 15 * 60
LOCKOUT_SECONDS = 15 * 60  # ... for this long
USER_SCOPES = ["chat", "train"]  # what a user who is not an admin may do through the API
KEY_PREFIX = "console:"  # a user's calls are recorded as "console:NAME", never mistaken for an API key's


class AccountError(ForjaError):
    """A user that does not exist or cannot be created as asked."""


class LockedOut(AccountError):
    """Too many wrong passwords: no login for `retry_after` seconds."""

    def __init__(self, name: str, retry_after: int):
        super().__init__(f"{name}: too many wrong passwords; try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class User:
    id: int
    name: str
    admin: bool
    created_at: float
    last_login_at: float | None = None

    def api_key(self) -> ApiKey:
        """What the API routes see when this user calls them with a session: admin, or chat + train."""
        return ApiKey(name=KEY_PREFIX + self.name, sha256="0" * 64, admin=self.admin, scopes=USER_SCOPES)


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    expires_at: float


# ------------------------------------------------------------------ passwords


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        return hmac.compare_digest(_scrypt(password, _unb64(salt), int(n), int(r), int(p)), _unb64(digest))
    except ValueError:
        return False


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2 ** 20, dklen=32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


_DUMMY_HASH = hash_password(secrets.token_hex(16))  # checked for unknown names, so they take as long


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"the password is too short: use at least {MIN_PASSWORD_CHARS} characters")


# ------------------------------------------------------------------ users


def _user(row: sa.Row) -> User:
    return User(id=row.id, name=row.name, admin=bool(row.admin), created_at=row.created_at,
                last_login_at=row.last_login_at)


def add_user(store: Store, name: str, password: str, admin: bool | None = None) -> User:
    """A new user; `admin` None makes the first user an admin and the others not."""
    name = name.strip()
    if not name or len(name) > 200 or any(c.isspace() for c in name):
        raise AccountError(f"user name {name!r}: 1 to 200 characters, no spaces")
    check_password_rules(password)
    hashed = hash_password(password)
    with store.engine.begin() as conn:
        if conn.execute(sa.select(console_users.c.id).where(console_users.c.name == name)).first() is not None:
            raise AccountError(f"a user named {name!r} exists already (forja users remove {name} first)")
        if admin is None:
            admin = conn.execute(sa.select(sa.func.count()).select_from(console_users)).scalar_one() == 0
        result = conn.execute(console_users.insert().values(name=name, password_hash=hashed, admin=admin,
                                                            created_at=time.time(), failed_logins=0))
        row = conn.execute(sa.select(console_users).where(console_users.c.id == result.inserted_primary_key[0])).one()
    return _user(row)


def list_users(store: Store) -> list[User]:
    with store.engine.connect() as conn:
        return [_user(r) for r in conn.execute(sa.select(console_users).order_by(console_users.c.name))]


def remove_user(store: Store, name: str) -> None:
    """Delete the user and end their sessions."""
    with store.engine.begin() as conn:
        user_id = _user_id(conn, name)
        conn.execute(console_sessions.delete().where(console_sessions.c.user_id == user_id))
        conn.execute(console_users.delete().where(console_users.c.id == user_id))


def _user_id(conn: sa.Connection, name: str) -> int:
    row = conn.execute(sa.select(console_users.c.id).where(console_users.c.name == name)).first()
    if row is None:
        raise AccountError(f"no user named {name!r} (forja users list)")
    return row.id


def unlock(store: Store, name: str) -> bool:
    """Lift a lockout (and forget the wrong passwords counted); True when the user was locked out."""
    with store.engine.begin() as conn:
        user_id = _user_id(conn, name)
        locked = conn.execute(sa.select(console_users.c.locked_until).where(console_users.c.id == user_id)).scalar()
        conn.execute(console_users.update().where(console_users.c.id == user_id)
                     .values(locked_until=None, failed_logins=0, failing_since=None))
    return bool(locked and locked > time.time())


def set_password(store: Store, name: str, password: str) -> None:
    """A new password (a forgotten one, or one others may know): the user's sessions end, a lockout is lifted."""
    check_password_rules(password)
    hashed = hash_password(password)
    with store.engine.begin() as conn:
        user_id = _user_id(conn, name)
        conn.execute(console_users.update().where(console_users.c.id == user_id).values(
            password_hash=hashed, locked_until=None, failed_logins=0, failing_since=None))
        conn.execute(console_sessions.delete().where(console_sessions.c.user_id == user_id))


# ------------------------------------------------------------------ logins and sessions


_LOGINS = threading.Lock()  # one password check at a time: parallel guesses cannot all pass the lockout check
# before the first failure is counted, and a flood of logins takes one core, not the server's thread pool


def login(store: Store, name: str, password: str, now: float | None = None) -> User | None:
    """The user when the password is right; None when the name or the password is wrong. Raises LockedOut
    while the user is locked out (even with the right password: an attacker learns nothing then)."""
    with _LOGINS:
        return _login(store, name, password, time.time() if now is None else now)


def _login(store: Store, name: str, password: str, now: float) -> User | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(console_users).where(console_users.c.name == name)).first()
    if row is None:
        verify_password(password, _DUMMY_HASH)
        return None
    if row.locked_until and row.locked_until > now:
        raise LockedOut(name, max(1, int(row.locked_until - now + 0.999)))
    if verify_password(password, row.password_hash):
        with store.engine.begin() as conn:
            conn.execute(console_users.update().where(console_users.c.id == row.id).values(
                failed_logins=0, failing_since=None, locked_until=None, last_login_at=now))
        return _user(row)
    with store.engine.begin() as conn:  # counted in the database: every replica sees the same count
        current = conn.execute(sa.select(console_users).where(console_users.c.id == row.id)).one()
        fresh = current.failing_since is None or now - current.failing_since > FAILURE_WINDOW_SECONDS
        failures = 1 if fresh else current.failed_logins + 1
        values = {"failed_logins": failures, "failing_since": now if fresh else current.failing_since}
        if failures >= MAX_FAILURES:
            values.update(locked_until=now + LOCKOUT_SECONDS, failed_logins=0, failing_since=None)
        conn.execute(console_users.update().where(console_users.c.id == row.id).values(**values))
    return None


def _token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(store: Store, user: User, hours: float = SESSION_HOURS) -> tuple[str, Session]:
    """A new session for `user`: the cookie's token (only its hash is stored) and the session."""
    token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
    expires = now + hours * 3600
    with store.engine.begin() as conn:
        conn.execute(console_sessions.delete().where(console_sessions.c.expires_at < now))
        conn.execute(console_sessions.insert().values(id=_token_id(token), user_id=user.id, csrf=csrf,
                                                      created_at=now, expires_at=expires))
    return token, Session(user, csrf, expires)


def session_of(store: Store, token: str) -> Session | None:
    """The live session of a cookie's token, or None."""
    if not token or len(token) > 200:
        return None
    query = (sa.select(console_sessions.c.csrf, console_sessions.c.expires_at, console_users)
             .join(console_users, console_sessions.c.user_id == console_users.c.id)
             .where(console_sessions.c.id == _token_id(token), console_sessions.c.expires_at > time.time()))
    with store.engine.connect() as conn:
        row = conn.execute(query).first()
    return Session(_user(row), row.csrf, row.expires_at) if row is not None else None


def close_session(store: Store, token: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(console_sessions.delete().where(console_sessions.c.id == _token_id(token)))
