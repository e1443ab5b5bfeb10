"""Uploaded files: the bytes in FORJA_HOME/files/<id>/<filename>, a row in the store's `files` table.
`POST /v1/files` writes an upload under `incoming_dir`, `check`s it for its purpose with forja's own
readers and `keep`s it; fine-tuning and batch jobs read them back with `get` and `path_of`."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import sqlalchemy as sa

from forja import data
from forja.config import ForjaError, Settings
from forja.store import Store, files

PURPOSES = ("fine-tune", "batch", "assistants", "evals")  # what a client may upload
OUTPUT_PURPOSE = "batch_output"  # what forja writes: a batch's answers and errors, a job's report or export
ID_PREFIX = "file-"
MAX_FILENAME_CHARS = 200
INCOMING = ".incoming"  # uploads still arriving or being checked; a folder `forja data` never lists
STALE_UPLOAD_SECONDS = 24 * 3600  # an upload folder this old in INCOMING was left by a killed server


class FileError(ForjaError):
    """A file that cannot be used for its purpose; the message names it by its uploaded name."""


class UnknownFile(FileError):
    """No uploaded file has this id."""


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    sha256: str
    owner: str | None = None  # the name of the API key that uploaded it (None: a server without keys)


def new_file_id() -> str:
    return ID_PREFIX + uuid.uuid4().hex[:24]


def safe_filename(name: str) -> str:
    """The last part of a client's filename (no folders, no control characters), as a file on disk."""
    base = PureWindowsPath(PurePosixPath(name).name).name  # "C:\\docs\\a.md" and "../a.md" are both "a.md"
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip().strip(".")
    if len(base) > MAX_FILENAME_CHARS:
        suffix = Path(base).suffix[:20]
        base = base[: MAX_FILENAME_CHARS - len(suffix)] + suffix
    return base or "upload"


def incoming_dir(settings: Settings, file_id: str) -> Path:
    """Where an upload is written while it arrives; `keep` moves it into place, `discard` removes it."""
    return settings.files_dir / INCOMING / file_id


def file_dir(settings: Settings, file_id: str) -> Path:
    return settings.files_dir / file_id


def path_of(settings: Settings, stored: StoredFile) -> Path:
    return file_dir(settings, stored.id) / safe_filename(stored.filename)


def id_of_path(settings: Settings, path: str | Path) -> str | None:
    """The upload a path on disk belongs to (FORJA_HOME/files/<id>/<name>), or None."""
    path = Path(path)
    if path.parent.parent == settings.files_dir.resolve() and path.parent.name.startswith(ID_PREFIX):
        return path.parent.name
    return None


def check(path: Path, purpose: str, filename: str) -> None:
    """Refuse a file its purpose cannot use, with the messages `forja data inspect` gives, naming the file
    by `filename` (what the client sent) rather than where it lies on disk."""
    def named(message: str) -> str:
        return message.replace(str(path), filename)

    if purpose == "fine-tune":
        report = data.inspect([path]).files[0]
        if report.error:
            raise FileError(named(report.error))
        if report.bad_rows:
            more = f" (and {len(report.bad_rows) - 1} more bad rows)" if len(report.bad_rows) > 1 else ""
            raise FileError(named(report.bad_rows[0]) + more + " (forja data inspect lists every problem of a file)")
        if not report.rows:
            raise FileError(f"{filename}: no training rows in this file; {data.ACCEPTED}")
    elif purpose == "assistants":
        from forja.knowledge.chunks import SUFFIXES

        if path.suffix.lower() not in SUFFIXES:
            raise FileError(f"{filename}: unknown file type {path.suffix or '(no extension)'}; "
                            f"forja knowledge reads {' '.join(SUFFIXES)}")
    elif purpose == "evals":  # a test set for the console's comparisons, read as `forja eval` reads it
        from forja.evaluate import EvalError, load_testset

        try:
            load_testset(path)
        except EvalError as exc:
            raise FileError(named(str(exc))) from None
    elif purpose == "batch":
        if path.suffix.lower() != ".jsonl":
            raise FileError(f"{filename}: a batch file is JSONL (.jsonl), one request per line")
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise FileError(f"{filename} line {number}: invalid JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise FileError(f"{filename} line {number}: a request is a JSON object, "
                                    f"not {type(row).__name__}")
    else:
        raise FileError(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")


def keep(settings: Settings, store: Store, file_id: str, filename: str, purpose: str,
         api_key_name: str | None = None) -> StoredFile:
    """Move a checked upload from its incoming folder into place and record it."""
    source = incoming_dir(settings, file_id) / safe_filename(filename)
    digest = hashlib.sha256()
    with source.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    stored = StoredFile(file_id, filename, purpose, source.stat().st_size, time.time(), digest.hexdigest(),
                        api_key_name)
    target = file_dir(settings, file_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    source.parent.rename(target)
    try:
        with store.engine.begin() as conn:
            conn.execute(files.insert().values(id=stored.id, created_at=stored.created_at, filename=filename,
                                               purpose=purpose, bytes=stored.bytes, sha256=stored.sha256,
                                               api_key_name=api_key_name))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return stored


def discard(settings: Settings, file_id: str) -> None:
    shutil.rmtree(incoming_dir(settings, file_id), ignore_errors=True)


def sweep_incoming(settings: Settings, older_than: float = STALE_UPLOAD_SECONDS) -> None:
    """Remove what uploads left half-written when the server was killed in the middle of one."""
    folder = settings.files_dir / INCOMING
    if folder.is_dir():
        for entry in folder.iterdir():
            try:
                stale = time.time() - entry.stat().st_mtime > older_than
            except OSError:  # removed meanwhile by its own upload
                continue
            if stale:
                shutil.rmtree(entry, ignore_errors=True)


def get(store: Store, file_id: str) -> StoredFile:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(files).where(files.c.id == file_id)).first()
    if row is None:
        raise UnknownFile(f"no file with id {file_id!r} (GET /v1/files lists them)")
    return _stored(row)


def listing(store: Store, purpose: str | None = None, owner: str | None = None,
            everyone: bool = True) -> list[StoredFile]:
    """Every uploaded file (or, unless `everyone`, those `owner` uploaded), oldest first."""
    query = sa.select(files).order_by(files.c.created_at, files.c.id)
    if purpose:
        query = query.where(files.c.purpose == purpose)
    if not everyone:
        query = query.where(files.c.api_key_name == owner)
    with store.engine.connect() as conn:
        return [_stored(row) for row in conn.execute(query)]


def delete(settings: Settings, store: Store, file_id: str) -> None:
    """The row, then the bytes (a file half deleted is one nobody lists)."""
    with store.engine.begin() as conn:
        if conn.execute(files.delete().where(files.c.id == file_id)).rowcount == 0:
            raise UnknownFile(f"no file with id {file_id!r} (GET /v1/files lists them)")
    shutil.rmtree(file_dir(settings, file_id), ignore_errors=True)


def _stored(row: sa.Row) -> StoredFile:
    return StoredFile(row.id, row.filename, row.purpose, row.bytes, row.created_at, row.sha256, row.api_key_name)
