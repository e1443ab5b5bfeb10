"""OpenAI's vector stores over knowledge collections: a vector store IS a collection, its id the collection's
name after `vs_` (`forja knowledge add manuals ...` is `vs_manuals` over REST, and a store created over REST
is a collection the CLI lists). Attaching an uploaded file indexes it with `knowledge.add` in one worker
thread; the store's `vector_store_files` rows remember attachments in progress or failed, and the client's
attributes. `GET /v1/vector_stores` and its sub-routes (serve/routes/vector_stores.py) call these."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from forja import files
from forja.config import ForjaError, Settings
from forja.knowledge import index
from forja.knowledge.chunks import SUFFIXES
from forja.store import Store, vector_store_file_batches as batches_table, vector_store_files as rows_table

ID_PREFIX = "vs_"
BATCH_PREFIX = "vsfb_"
LOCAL_FILE_PREFIX = "kfile-"  # a file added with `forja knowledge add`, named by the hash of its path
log = logging.getLogger("forja.knowledge")
# One file indexed at a time: embedding takes every core, two at once would only split them.
worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forja-indexing")
_pending: set[tuple[str, str]] = set()  # (collection, file id) queued or being indexed in this process
# what the worker was given, and for which FORJA_HOME: a stopping server drops what it has not begun (only its
# own: two servers in one process, as in the tests, share the worker)
_queued: dict[Future, tuple[tuple[str, str], str]] = {}
_queue_lock = threading.Lock()  # attaching runs in the request threads
_deleted: set[str] = set()  # collections deleted while a file of theirs was being indexed


class UnknownVectorStore(index.KnowledgeError):
    """No collection answers to this vector store id."""


class UnknownVectorStoreFile(index.KnowledgeError):
    """The vector store has no such file."""


class UnknownFileBatch(index.KnowledgeError):
    """The vector store has no such file batch."""


class VectorStoreExists(index.KnowledgeError):
    """A collection has the name asked for already."""


class VectorStoreBusy(index.KnowledgeError):
    """The change must wait until the files being indexed are done."""


class BadName(index.KnowledgeError):
    """A name that cannot be a collection's."""


def _check_name(name: str) -> None:
    if not index.COLLECTION_NAME.fullmatch(name):
        raise BadName(f"{name!r}: a vector store's name is a knowledge collection name: letters, digits, _ . and - "
                      "only")


@dataclass
class StoreFile:
    """A file of a vector store: indexed (completed), being indexed, or failed with `last_error`."""

    id: str
    collection: str
    status: str
    created_at: float
    bytes: int
    filename: str
    last_error: dict[str, str] | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class VectorStore:
    name: str
    created_at: float
    last_active_at: float
    files: list[StoreFile]

    @property
    def id(self) -> str:
        return ID_PREFIX + self.name

    @property
    def status(self) -> str:
        return "in_progress" if any(f.status == "in_progress" for f in self.files) else "completed"

    def counts(self) -> dict[str, int]:
        counts = {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0}
        for f in self.files:
            counts[f.status] += 1
        return {**counts, "total": len(self.files)}

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files if f.status == "completed")


@dataclass
class FileBatch:
    """Files attached together; `files` are those of them the store still has."""

    id: str
    collection: str
    created_at: float
    file_ids: list[str]
    files: list[StoreFile]
    cancelled: bool

    @property
    def status(self) -> str:
        if any(f.status == "in_progress" for f in self.files):
            return "in_progress"
        return "cancelled" if self.cancelled else "completed"

    def counts(self) -> dict[str, int]:
        counts = {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0}
        for f in self.files:
            counts[f.status] += 1
        counts["cancelled"] += len(self.file_ids) - len(self.files)  # detached before they were indexed
        return {**counts, "total": len(self.file_ids)}


@dataclass(frozen=True)
class Result:
    """A chunk found by `search`, named by the file it comes from."""

    file_id: str
    filename: str
    score: float  # the fused rank score scaled to 0..1: 1 = first by both meaning and words
    text: str
    attributes: dict[str, Any]


def collection_of(vector_store_id: str) -> str:
    name = vector_store_id[len(ID_PREFIX):]
    if not vector_store_id.startswith(ID_PREFIX) or not index.COLLECTION_NAME.fullmatch(name):
        raise UnknownVectorStore(f"no vector store with id {vector_store_id!r} (ids are vs_ and a knowledge "
                                 "collection's name; GET /v1/vector_stores lists them)")
    return name


def _local_id(path: str) -> str:
    return LOCAL_FILE_PREFIX + hashlib.sha256(path.encode()).hexdigest()[:24]


def file_id(settings: Settings, path: str) -> str:
    """The id a collection's file has over REST: its upload's, else one made from its path."""
    return files.id_of_path(settings, path) or _local_id(path)


_id_of = file_id  # for the functions whose parameter is named file_id


# --- Reading ------------------------------------------------------------------------------------------


def stores(settings: Settings, store: Store) -> list[VectorStore]:
    """Every collection as a vector store, oldest first."""
    pending = set(_pending)  # in this order (see _vector_store): what is indexing, the rows, the index
    uploads = {f.id: f for f in files.listing(store)}
    rows = _rows(store)
    found = [_vector_store(settings, c, rows, uploads, pending) for c in index.collections(settings)]
    return sorted(found, key=lambda v: (v.created_at, v.name))


def get(settings: Settings, store: Store, vector_store_id: str) -> VectorStore:
    name = collection_of(vector_store_id)
    pending = set(_pending)  # in this order (see _vector_store): what is indexing, the rows, the index
    rows = _rows(store, name)
    try:
        collection = index.show(settings, name)
    except index.UnknownCollection:
        raise UnknownVectorStore(f"no vector store with id {vector_store_id!r} "
                                 "(GET /v1/vector_stores lists them)") from None
    return _vector_store(settings, collection, rows, {f.id: f for f in files.listing(store)}, pending)


def store_file(settings: Settings, store: Store, vector_store_id: str, file_id: str) -> StoreFile:
    for found in get(settings, store, vector_store_id).files:
        if found.id == file_id:
            return found
    raise UnknownVectorStoreFile(f"vector store {vector_store_id!r} has no file {file_id!r} "
                                 f"(GET /v1/vector_stores/{vector_store_id}/files lists them)")


def _rows(store: Store, collection: str | None = None) -> dict[str, dict[str, Any]]:
    """The store's attachment rows by (collection, file id)."""
    query = sa.select(rows_table)
    if collection is not None:
        query = query.where(rows_table.c.collection == collection)
    with store.engine.connect() as conn:
        return {(r.collection, r.file_id): dict(r._mapping) for r in conn.execute(query)}


def _vector_store(settings: Settings, collection: index.Collection, rows: dict, uploads: dict,
                  pending: set[tuple[str, str]]) -> VectorStore:
    """The collection as a vector store. Read while the worker indexes: `pending` was taken before the rows and
    the rows before the collection, so a row still in progress whose file is not pending was left by a server
    that stopped (the worker writes a file's end before it leaves `_pending`), and a file indexed meanwhile is
    in the collection read after its row (a reader that looked the other way round saw a finished file
    "stopped", or not at all)."""
    name, found = collection.name, []
    rows = {file_id: row for (owner, file_id), row in rows.items() if owner == name}
    for info in collection.files:  # indexed: completed, whatever a row says
        file_id = files.id_of_path(settings, info.path)
        upload = uploads.get(file_id)
        row = rows.pop(file_id, None) if file_id else None
        if upload is None:  # added with the CLI (or an upload's leftover): named by its path
            file_id = file_id or _local_id(info.path)
            path = Path(info.path)
            size, filename = (path.stat().st_size if path.is_file() else 0), path.name
        else:
            size, filename = upload.bytes, upload.filename
        found.append(StoreFile(file_id, name, "completed", row["created_at"] if row else info.indexed_at, size,
                               filename, attributes=row["attributes"] if row else {}))
    for file_id, row in rows.items():
        if row["status"] == "completed" or file_id not in uploads:
            continue  # its chunks were taken out with `forja knowledge remove`
        status = row["status"]
        error = row["last_error"] or None
        if status == "in_progress" and (name, file_id) not in pending:
            status, error = "failed", {"code": "server_error", "message": "indexing stopped before it finished "
                                       "(the server was stopped or restarted); attach the file again"}
        found.append(StoreFile(file_id, name, status, row["created_at"], uploads[file_id].bytes,
                               uploads[file_id].filename, error, row["attributes"]))
    found.sort(key=lambda f: (f.created_at, f.id))
    return VectorStore(name, collection.created_at, collection.indexed_at or collection.created_at, found)


# --- Changing -----------------------------------------------------------------------------------------


def create(settings: Settings, store: Store, name: str | None, file_ids: list[str]) -> VectorStore:
    """A new, empty collection (named `store-<hex>` when no name is given), then each file attached."""
    name = name or f"store-{uuid.uuid4().hex[:8]}"
    _check_name(name)
    if any(c.name == name for c in index.collections(settings)):
        raise VectorStoreExists(f"a vector store named {name!r} exists already ({ID_PREFIX}{name}); attach files "
                                "to it or pick another name")
    for file_id in file_ids:
        attachable(settings, store, file_id)
    _deleted.discard(name)
    index.add(settings, name, [])
    with store.engine.begin() as conn:  # rows left by a collection of this name removed with the CLI
        conn.execute(rows_table.delete().where(rows_table.c.collection == name))
        conn.execute(batches_table.delete().where(batches_table.c.collection == name))
    for file_id in file_ids:
        attach(settings, store, ID_PREFIX + name, file_id)
    return get(settings, store, ID_PREFIX + name)


def rename(settings: Settings, store: Store, vector_store_id: str, new_name: str) -> VectorStore:
    """The collection gets the new name, so the vector store's id changes with it (vs_<new name>)."""
    name = collection_of(vector_store_id)
    get(settings, store, vector_store_id)
    if new_name != name:
        _check_name(new_name)
        if any(owner == name for owner, _ in list(_pending)):  # the worker writes under the old name
            raise VectorStoreBusy(f"vector store {vector_store_id!r} has files being indexed; rename it once its "
                                  "status is completed")
        if any(c.name == new_name for c in index.collections(settings)):
            raise VectorStoreExists(f"a vector store named {new_name!r} exists already ({ID_PREFIX}{new_name})")
        index.rename(settings, name, new_name)
        with store.engine.begin() as conn:
            conn.execute(rows_table.delete().where(rows_table.c.collection == new_name))
            conn.execute(rows_table.update().where(rows_table.c.collection == name).values(collection=new_name))
            conn.execute(batches_table.delete().where(batches_table.c.collection == new_name))
            conn.execute(batches_table.update().where(batches_table.c.collection == name).values(collection=new_name))
    return get(settings, store, ID_PREFIX + new_name)


def delete(settings: Settings, store: Store, vector_store_id: str) -> None:
    """The collection with all its chunks (the uploaded files themselves stay in /v1/files)."""
    name = collection_of(vector_store_id)
    get(settings, store, vector_store_id)
    if any(owner == name for owner, _ in list(_pending)):
        _deleted.add(name)  # knowledge.add would make it again: the worker removes it once it is done
    with store.engine.begin() as conn:
        conn.execute(rows_table.delete().where(rows_table.c.collection == name))
        conn.execute(batches_table.delete().where(batches_table.c.collection == name))
    index.remove(settings, name)


def attachable(settings: Settings, store: Store, file_id: str) -> files.StoredFile:
    """The uploaded file, if forja knowledge reads its type (UnknownFile, FileError otherwise)."""
    upload = files.get(store, file_id)
    suffix = Path(upload.filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise files.FileError(f"{upload.filename}: forja knowledge reads {' '.join(SUFFIXES)}, "
                              f"not {suffix or 'a file without an extension'}")
    return upload


def attach(settings: Settings, store: Store, vector_store_id: str, file_id: str,
           attributes: dict[str, Any] | None = None) -> StoreFile:
    """Queue an uploaded file for indexing into the collection; returns it in progress."""
    name = collection_of(vector_store_id)
    get(settings, store, vector_store_id)
    upload = attachable(settings, store, file_id)
    _deleted.discard(name)  # a store of this name exists again
    row = {"collection": name, "file_id": file_id, "created_at": time.time(), "status": "in_progress",
           "last_error": None, "attributes": attributes or {}}
    with store.engine.begin() as conn:
        conn.execute(rows_table.delete().where(rows_table.c.collection == name, rows_table.c.file_id == file_id))
        conn.execute(rows_table.insert().values(**row))
    _pending.add((name, file_id))
    with _queue_lock:
        for done in [f for f in _queued if f.done()]:
            del _queued[done]
        _queued[worker.submit(_index, settings, store, name, file_id)] = ((name, file_id), str(settings.home))
    return StoreFile(file_id, name, "in_progress", row["created_at"], upload.bytes, upload.filename,
                     attributes=attributes or {})


def _index(settings: Settings, store: Store, name: str, file_id: str) -> None:
    """In the worker: index one file whole (knowledge.add writes a file in one transaction) or not at all."""
    path = None
    try:
        upload = files.get(store, file_id)
        path = files.path_of(settings, upload)
        if name in _deleted or not _still_attached(store, name, file_id):
            return  # the vector store was deleted, or the file detached (a batch cancelled), while it waited
        result = index.add(settings, name, [path])[0]
        if name in _deleted:  # the store was deleted while the file was indexed
            index.remove(settings, name)
            return
        if not _still_attached(store, name, file_id):  # detached while it was indexed
            index.remove(settings, name, [path])
            return
        if result.status == "no text":
            _finish(store, name, file_id, "failed", {"code": "invalid_file",
                                                     "message": f"{upload.filename}: there is no text to index"})
        else:
            _finish(store, name, file_id, "completed", None)
    except ForjaError as exc:
        message = str(exc).replace(str(path), upload.filename) if path is not None else str(exc)
        _finish(store, name, file_id, "failed", {"code": "invalid_file", "message": message})
    except Exception as exc:  # reported on the file, never lost in a thread
        log.exception("indexing %s into %s failed", file_id, name)
        _finish(store, name, file_id, "failed", {"code": "server_error", "message": f"{type(exc).__name__}: {exc}"})
    finally:
        _pending.discard((name, file_id))
        if not any(owner == name for owner, _ in list(_pending)):
            _deleted.discard(name)


def drop_queued(settings: Settings) -> None:
    """When the server stops: files not begun are left in progress (read as failed once it is back, to be
    attached again) instead of keeping the process alive until all of them are indexed."""
    with _queue_lock:
        for future, (key, home) in list(_queued.items()):
            if home == str(settings.home):
                if future.cancel():
                    _pending.discard(key)
                del _queued[future]


def _still_attached(store: Store, name: str, file_id: str) -> bool:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(rows_table.c.file_id).where(
            rows_table.c.collection == name, rows_table.c.file_id == file_id)).first() is not None


def _finish(store: Store, name: str, file_id: str, status: str, error: dict[str, str] | None) -> None:
    with store.engine.begin() as conn:
        conn.execute(rows_table.update().where(rows_table.c.collection == name, rows_table.c.file_id == file_id)
                     .values(status=status, last_error=error or None))


def content(settings: Settings, store: Store, vector_store_id: str, file_id: str) -> str:
    """The text forja read from an indexed file (what its chunks' start and end index into)."""
    from forja.embeddings import count_tokens
    from forja.knowledge.chunks import read_document

    found = store_file(settings, store, vector_store_id, file_id)
    for info in index.show(settings, found.collection).files:
        if _id_of(settings, info.path) == file_id and Path(info.path).is_file():
            return read_document(Path(info.path), settings.knowledge, count_tokens).text
    if found.status != "completed":
        raise UnknownVectorStoreFile(f"file {file_id!r} of vector store {vector_store_id!r} is {found.status}: "
                                     "it has no indexed content to show")
    raise UnknownVectorStoreFile(f"the bytes of file {file_id!r} are no longer on disk")


def set_attributes(settings: Settings, store: Store, vector_store_id: str, file_id: str,
                   attributes: dict[str, Any]) -> StoreFile:
    """Replace the client's attributes of an attached upload (a file added with the CLI has none to set)."""
    name = collection_of(vector_store_id)
    found = store_file(settings, store, vector_store_id, file_id)
    if found.id.startswith(LOCAL_FILE_PREFIX):
        raise files.FileError(f"{found.filename} was added with forja knowledge add, not uploaded: it has no "
                              "attributes to set")
    values = attributes
    with store.engine.begin() as conn:
        changed = conn.execute(rows_table.update().where(rows_table.c.collection == name,
                                                         rows_table.c.file_id == file_id).values(attributes=values))
        if changed.rowcount == 0:  # indexed, its row gone (attached before the row was kept): keep one now
            conn.execute(rows_table.insert().values(collection=name, file_id=file_id, created_at=found.created_at,
                                                    status="completed", last_error=None, attributes=values))
    return store_file(settings, store, vector_store_id, file_id)


def detach(settings: Settings, store: Store, vector_store_id: str, file_id: str) -> None:
    """Take a file's chunks out of the collection (the uploaded file stays in /v1/files)."""
    name = collection_of(vector_store_id)
    found = store_file(settings, store, vector_store_id, file_id)
    with store.engine.begin() as conn:
        conn.execute(rows_table.delete().where(rows_table.c.collection == name, rows_table.c.file_id == file_id))
    if found.status == "completed":
        for info in index.show(settings, name).files:
            if _id_of(settings, info.path) == file_id:
                index.remove(settings, name, [info.path])


def delete_upload(settings: Settings, store: Store, file_id: str) -> None:
    """Delete an uploaded file and take it out of every vector store, as OpenAI's DELETE /v1/files does."""
    files.get(store, file_id)
    for collection in index.collections(settings):
        for info in collection.files:
            if files.id_of_path(settings, info.path) == file_id:
                index.remove(settings, collection.name, [info.path])
    files.delete(settings, store, file_id)  # its attachment rows go with it (ON DELETE CASCADE)


def create_batch(settings: Settings, store: Store, vector_store_id: str,
                 items: list[tuple[str, dict[str, Any] | None]]) -> FileBatch:
    """Attach several uploaded files (file id, attributes) at once; every one is checked before any is queued."""
    name = collection_of(vector_store_id)
    get(settings, store, vector_store_id)
    for file_id, _ in items:
        attachable(settings, store, file_id)
    batch_id = BATCH_PREFIX + uuid.uuid4().hex[:24]
    file_ids = list(dict.fromkeys(file_id for file_id, _ in items))
    with store.engine.begin() as conn:
        conn.execute(batches_table.insert().values(id=batch_id, collection=name, file_ids=file_ids,
                                                   created_at=time.time(), cancelled=False))
    for file_id, attributes in items:
        attach(settings, store, vector_store_id, file_id, attributes)
    return batch(settings, store, vector_store_id, batch_id)


def batch(settings: Settings, store: Store, vector_store_id: str, batch_id: str) -> FileBatch:
    name = collection_of(vector_store_id)
    vector_store = get(settings, store, vector_store_id)
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(batches_table).where(batches_table.c.id == batch_id,
                                                          batches_table.c.collection == name)).first()
    if row is None:
        raise UnknownFileBatch(f"vector store {vector_store_id!r} has no file batch {batch_id!r}")
    file_ids = row.file_ids
    members = [f for f in vector_store.files if f.id in set(file_ids)]
    return FileBatch(row.id, name, row.created_at, file_ids, members, row.cancelled)


def cancel_batch(settings: Settings, store: Store, vector_store_id: str, batch_id: str) -> FileBatch:
    """Detach the batch's files not indexed yet (the one being indexed is taken out once it is done)."""
    found = batch(settings, store, vector_store_id, batch_id)
    waiting = [f.id for f in found.files if f.status == "in_progress"]
    if not waiting:
        return found  # all done already: nothing to cancel
    with store.engine.begin() as conn:
        conn.execute(rows_table.delete().where(rows_table.c.collection == found.collection,
                                               rows_table.c.file_id.in_(waiting)))
        conn.execute(batches_table.update().where(batches_table.c.id == batch_id).values(cancelled=True))
    return batch(settings, store, vector_store_id, batch_id)


# --- Searching ----------------------------------------------------------------------------------------


def search(settings: Settings, store: Store, vector_store_id: str, query: str, max_results: int,
           score_threshold: float = 0.0) -> list[Result]:
    """The best chunks for `query`, each with its file's id and uploaded name, and where in the file it is
    (page, headings, start, end) among the file's attributes."""
    vector_store = get(settings, store, vector_store_id)
    by_path: dict[str, StoreFile] = {}
    uploads = {f.id: f for f in vector_store.files}
    for info in index.show(settings, vector_store.name).files:
        file_id = files.id_of_path(settings, info.path)
        by_path[info.path] = uploads.get(file_id or "") or uploads.get(_local_id(info.path))
    ceiling = 2 / (settings.knowledge.rrf_k + 1)  # first in both rankings
    results = []
    for hit in index.search(settings, vector_store.name, query, top_k=max_results):
        score = round(min(hit.score / ceiling, 1.0) if hit.rerank_score is None else hit.rerank_score, 4)
        if score < score_threshold:
            continue
        owner = by_path.get(hit.source)
        where: dict[str, Any] = {"headings": " > ".join(hit.headings), "start": hit.start, "end": hit.end}
        if hit.page is not None:
            where["page"] = hit.page
        results.append(Result(owner.id if owner else _local_id(hit.source),
                              owner.filename if owner else Path(hit.source).name, score, hit.text,
                              {**(owner.attributes if owner else {}), **where}))
    return results
