"""Collections in one SQLite file, FORJA_HOME/knowledge/knowledge.db: files (by content hash), their chunks
with float32 vectors, and an FTS5 keyword index; `search` fuses the vector and keyword rankings by
reciprocal rank fusion. Each file is written in one transaction, so an interrupted `add` leaves every file
indexed whole or not at all, and running it again finishes the job."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from forja import data
from forja.config import ForjaError, Settings
from forja.knowledge.chunks import SUFFIXES, Document, embedding_text, read_document

DB_NAME = "knowledge.db"
COLLECTION_NAME = re.compile(r"[\w.-]+")
# Accents are folded on both sides, so "cafe" finds "café" and "educacion" finds "educación".
FTS_TOKENIZER = "unicode61 remove_diacritics 2"
WORD = re.compile(r"\w+")


class KnowledgeError(ForjaError):
    """A collection or path that `forja knowledge` cannot use."""


class UnknownCollection(KnowledgeError):
    """No collection has this name."""


@dataclass(frozen=True)
class Hit:
    """A chunk found by `search`, with where it comes from: `text == source text[start:end]`."""

    chunk_id: int
    text: str
    score: float  # reciprocal rank fusion: sum of 1 / (rrf_k + rank) over the retrievers that found it
    source: str  # the file's absolute path
    page: int | None
    headings: tuple[str, ...]
    start: int
    end: int
    similarity: float = 0.0  # cosine between the query's vector and the chunk's (what retrieval.min_score limits)
    collection: str = ""
    rerank_score: float | None = None  # the cross-encoder's 0-1 relevance, when knowledge.reranker re-ranked it

    @property
    def filename(self) -> str:
        return Path(self.source).name


@dataclass
class FileInfo:
    path: str
    sha256: str
    chunks: int
    tokens: int
    indexed_at: float


@dataclass
class Collection:
    name: str
    embedding_model: str
    created_at: float
    files: list[FileInfo] = field(default_factory=list)

    @property
    def chunks(self) -> int:
        return sum(f.chunks for f in self.files)

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    @property
    def indexed_at(self) -> float | None:
        return max((f.indexed_at for f in self.files), default=None)


@dataclass
class FileResult:
    """What `add` did with one file: "added", "replaced", "unchanged", "no text" or "removed" (gone from its folder)."""

    path: str
    status: str
    chunks: int = 0
    tokens: int = 0
    note: str = ""  # why a file gave no text, where forja can tell: a PDF without a text layer


# --- The database -------------------------------------------------------------------------------------


def _m001_initial(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE collections (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, embedding_model TEXT NOT NULL,
        dimensions INTEGER NOT NULL, created_at REAL NOT NULL)""")
    db.execute("""CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
        path TEXT NOT NULL, sha256 TEXT NOT NULL, chunking TEXT NOT NULL,
        chunks INTEGER NOT NULL, tokens INTEGER NOT NULL, indexed_at REAL NOT NULL,
        UNIQUE (collection_id, path))""")
    db.execute("""CREATE TABLE chunks (
        id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
        page INTEGER, headings TEXT NOT NULL, tokens INTEGER NOT NULL, vector BLOB NOT NULL)""")
    db.execute("CREATE INDEX chunks_file ON chunks(file_id)")
    # rowid = chunks.id; kept in step by the trigger, which also fires for rows deleted by the cascade.
    db.execute(f"CREATE VIRTUAL TABLE chunks_fts USING fts5(body, tokenize='{FTS_TOKENIZER}')")
    db.execute("CREATE TRIGGER chunks_deleted AFTER DELETE ON chunks BEGIN "
               "DELETE FROM chunks_fts WHERE rowid = old.id; END")


# Ordered, named, append-only, as store.py's: each applied once and recorded in schema_migrations.
MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [("m001_initial", _m001_initial)]


def db_path(settings: Settings) -> Path:
    return settings.knowledge_dir / DB_NAME


@contextmanager
def _open(settings: Settings) -> Iterator[sqlite3.Connection]:
    path = db_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; each write below says BEGIN and COMMIT itself.
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")  # a search reads while an add writes
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        applied = {row[0] for row in db.execute("SELECT name FROM schema_migrations")}
        for name, step in MIGRATIONS:
            if name not in applied:
                with _transaction(db):
                    step(db)
                    db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, time.time()))
        yield db
    finally:
        db.close()


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _collection_id(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT id FROM collections WHERE name = ?", (name,)).fetchone()
    if row is None:
        known = [r[0] for r in db.execute("SELECT name FROM collections ORDER BY name")]
        raise UnknownCollection(f"no knowledge collection named {name!r} "
                                f"({'known: ' + ', '.join(known) if known else 'none yet'}; "
                                "create one with forja knowledge add NAME PATH...)")
    return row[0]


# --- Adding and removing files ----------------------------------------------------------------------


def files_to_index(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and the files of a type `forja data` reads under folders named (others in a folder are
    left out, a file named with another type is refused); every path is checked before anything is read."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [p for p in data.expand_paths(path) if p.suffix.lower() in SUFFIXES]
        elif path.is_file() and path.suffix.lower() not in SUFFIXES:
            raise KnowledgeError(f"{path}: unknown file type {path.suffix or '(no extension)'}; "
                                 f"forja knowledge reads {' '.join(SUFFIXES)}")
        else:
            files += data.expand_paths(path)  # a file, or the one-line error for a missing path
    unique = {p.resolve(): None for p in files}
    return list(unique)


def add(settings: Settings, name: str, paths: Iterable[str | Path],
        progress: Callable[[FileResult], None] | None = None) -> list[FileResult]:
    """Index files into collection `name` (created if new): a new file is added, a changed one replaces its
    chunks, an unchanged one (same content hash and chunk sizes) is skipped, and a file indexed from a folder
    named here that the folder no longer holds is removed."""
    from forja import embeddings

    if not COLLECTION_NAME.fullmatch(name):
        raise KnowledgeError(f"{name!r}: a collection name is letters, digits, _ . and - only")
    files = files_to_index(paths)
    chunking = json.dumps({"chunk_tokens": settings.knowledge.chunk_tokens,
                           "overlap_tokens": settings.knowledge.overlap_tokens})
    results = []
    with _open(settings) as db:
        model = _recorded_model(db, name) or embeddings.canonical(settings.knowledge.embedding_model)
        _check_chunk_size(settings, model)  # before a new collection is made: a refused add leaves nothing
        with _transaction(db):
            db.execute("INSERT OR IGNORE INTO collections (name, embedding_model, dimensions, created_at) "
                       "VALUES (?, ?, ?, ?)", (name, model, embeddings.dimensions(model), time.time()))
        collection_id, model = db.execute(
            "SELECT id, embedding_model FROM collections WHERE name = ?", (name,)).fetchone()
        count_tokens = partial(embeddings.count_tokens, model=model, kind="document")
        for path in files:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            old = db.execute("SELECT id, sha256, chunking, chunks, tokens FROM files "
                             "WHERE collection_id = ? AND path = ?", (collection_id, str(path))).fetchone()
            if old is not None and (old[1], old[2]) == (digest, chunking):
                result = FileResult(str(path), "unchanged", old[3], old[4])
            else:
                document = read_document(path, settings.knowledge, count_tokens)
                if not document.chunks:
                    note = data.NO_TEXT_LAYER if path.suffix.lower() == ".pdf" else ""
                    result = FileResult(str(path), "no text", note=note)
                else:
                    vectors = embeddings.embed([embedding_text(c) for c in document.chunks], model=model,
                                               kind="document").numpy().astype(np.float32)
                    _write_file(db, name, collection_id, document, digest, chunking, vectors)
                    result = FileResult(str(path), "added" if old is None else "replaced",
                                        len(document.chunks), sum(c.tokens for c in document.chunks))
            results.append(result)
            if progress is not None:
                progress(result)
        for result in _forget_gone(db, collection_id, paths, {str(p) for p in files}):
            results.append(result)
            if progress is not None:
                progress(result)
    return results


def _recorded_model(db: sqlite3.Connection, name: str) -> str | None:
    """The embedding model collection `name` was made with (None: no such collection yet)."""
    row = db.execute("SELECT embedding_model FROM collections WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def _check_chunk_size(settings: Settings, model: str) -> None:
    """A chunk must fit the model's window whole, its two special tokens beside it."""
    from forja import embeddings

    most = embeddings.max_tokens(model) - 2
    if settings.knowledge.chunk_tokens > most:
        raise KnowledgeError(f"knowledge.chunk_tokens is {settings.knowledge.chunk_tokens}; the embedding model "
                             f"{model} reads at most {most} tokens of a chunk: set it to {most} or less")


def _forget_gone(db: sqlite3.Connection, collection_id: int, paths: Iterable[str | Path], found: set[str]) -> list[FileResult]:
    """A folder added again is its current content: files indexed from under it that it no longer holds (deleted,
    renamed) leave the collection, each in its own transaction."""
    gone = []
    for folder in (Path(p).resolve() for p in paths):
        if not folder.is_dir():
            continue
        prefix = str(folder).rstrip("/") + "/"
        for file_id, path in db.execute("SELECT id, path FROM files WHERE collection_id = ? AND substr(path, 1, ?) = ?",
                                        (collection_id, len(prefix), prefix)).fetchall():
            if path not in found:
                with _transaction(db):
                    db.execute("DELETE FROM files WHERE id = ?", (file_id,))
                gone.append(FileResult(path, "removed"))
    return gone


def _write_file(db: sqlite3.Connection, name: str, collection_id: int, document: Document, digest: str,
                chunking: str, vectors: np.ndarray) -> None:
    """One transaction: the file's old chunks out, the new ones in, or (if interrupted) nothing changed."""
    with _transaction(db):
        # A collection removed while its files were read must stay removed; its id may even be another's now.
        if db.execute("SELECT name FROM collections WHERE id = ?", (collection_id,)).fetchone() != (name,):
            raise UnknownCollection(f"collection {name!r} was removed while its files were being added")
        db.execute("DELETE FROM files WHERE collection_id = ? AND path = ?", (collection_id, str(document.path)))
        file_id = db.execute(
            "INSERT INTO files (collection_id, path, sha256, chunking, chunks, tokens, indexed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (collection_id, str(document.path), digest, chunking, len(document.chunks),
             sum(c.tokens for c in document.chunks), time.time()),
        ).lastrowid
        for seq, (chunk, vector) in enumerate(zip(document.chunks, vectors)):
            chunk_id = db.execute(
                'INSERT INTO chunks (file_id, seq, text, start, "end", page, headings, tokens, vector) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (file_id, seq, chunk.text, chunk.start, chunk.end, chunk.page,
                 json.dumps(chunk.headings, ensure_ascii=False), chunk.tokens, vector.tobytes()),
            ).lastrowid
            db.execute("INSERT INTO chunks_fts (rowid, body) VALUES (?, ?)", (chunk_id, embedding_text(chunk)))


def remove(settings: Settings, name: str, paths: Iterable[str | Path] | None = None) -> int:
    """Remove the whole collection (no paths; returns its file count) or the files at or under `paths`."""
    with _open(settings) as db:
        collection_id = _collection_id(db, name)
        with _transaction(db):
            if paths is None:
                removed = db.execute("SELECT count(*) FROM files WHERE collection_id = ?", (collection_id,)).fetchone()[0]
                db.execute("DELETE FROM collections WHERE id = ?", (collection_id,))
                return removed
            removed = 0
            for path in paths:
                target = str(Path(path).resolve())
                cursor = db.execute(
                    "DELETE FROM files WHERE collection_id = ? AND (path = ? OR substr(path, 1, ?) = ?)",
                    (collection_id, target, len(target) + 1, target.rstrip("/") + "/"),
                )
                if cursor.rowcount == 0:
                    raise KnowledgeError(f"{path}: no file of collection {name!r} is at or under this path "
                                         f"(forja knowledge show {name} lists them)")
                removed += cursor.rowcount
            return removed


def rename(settings: Settings, name: str, new_name: str) -> None:
    """Give collection `name` another name; its files and chunks stay as they are."""
    if not COLLECTION_NAME.fullmatch(new_name):
        raise KnowledgeError(f"{new_name!r}: a collection name is letters, digits, _ . and - only")
    with _open(settings) as db:
        collection_id = _collection_id(db, name)
        with _transaction(db):
            if db.execute("SELECT 1 FROM collections WHERE name = ? AND id != ?", (new_name, collection_id)).fetchone():
                raise KnowledgeError(f"a knowledge collection named {new_name!r} exists already")
            db.execute("UPDATE collections SET name = ? WHERE id = ?", (new_name, collection_id))


# --- Reading ------------------------------------------------------------------------------------------


def collections(settings: Settings) -> list[Collection]:
    """Every collection with its files, by name."""
    if not db_path(settings).is_file():
        return []
    with _open(settings) as db:
        names = [r[0] for r in db.execute("SELECT name FROM collections ORDER BY name")]
        return [_collection(db, n) for n in names]


def show(settings: Settings, name: str) -> Collection:
    """One collection with its files."""
    with _open(settings) as db:
        return _collection(db, name)


def _collection(db: sqlite3.Connection, name: str) -> Collection:
    collection_id = _collection_id(db, name)
    model, created = db.execute("SELECT embedding_model, created_at FROM collections WHERE id = ?",
                                (collection_id,)).fetchone()
    files = [FileInfo(*row) for row in db.execute(
        "SELECT path, sha256, chunks, tokens, indexed_at FROM files WHERE collection_id = ? ORDER BY path",
        (collection_id,))]
    return Collection(name, model, created, files)


def search(settings: Settings, collection: str, query: str, top_k: int | None = None, *,
           timings: dict[str, float] | None = None, vector: np.ndarray | None = None) -> list[Hit]:
    """The chunks of `collection` that best answer `query`, best first: vector and keyword rankings fused.
    `timings`, when given, gets the milliseconds spent embedding the query, ranking the vectors (reading them
    first when they are not cached) and ranking the keywords. `vector`: the query's, already embedded."""
    from forja.embeddings import embed
    from forja.knowledge import rerank

    clock = time.perf_counter

    knowledge = settings.knowledge
    top_k = top_k or knowledge.top_k
    with _open(settings) as db:
        collection_id = _collection_id(db, collection)
        model = db.execute("SELECT embedding_model FROM collections WHERE id = ?", (collection_id,)).fetchone()[0]
        started = clock()
        ids, matrix = _vectors(db, settings, collection_id)
        if not len(ids):
            return []
        read = clock()
        if vector is None:
            vector = embed([query], model=model, kind="query").numpy()[0].astype(np.float32)
        embedded = clock()
        # einsum's own loop, on this thread: `matrix @ vector` goes to OpenBLAS, whose second thread waits
        # for a core whenever another job holds one (at 100k chunks on 2 shared cores, p95 34 ms against 17).
        similarity = np.einsum("ij,j->i", matrix, vector)
        best = np.argpartition(-similarity, min(knowledge.candidates, len(ids)) - 1)[: knowledge.candidates]
        best = best[np.argsort(-similarity[best])]
        ranked = clock()
        rankings = [[int(ids[i]) for i in best], _keyword_ranking(db, collection_id, query, knowledge.candidates)]
        if timings is not None:
            timings.update(embed_ms=(embedded - read) * 1000, vectors_ms=(read - started + ranked - embedded) * 1000,
                           keywords_ms=(clock() - ranked) * 1000)
        scores: dict[int, float] = {}
        for ranking in rankings:
            for rank, chunk_id in enumerate(ranking, 1):
                scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (knowledge.rrf_k + rank)
        # With a reranker, it re-scores the best rerank_candidates and the top_k come out of those.
        wanted = max(top_k, knowledge.rerank_candidates) if knowledge.reranker else top_k
        chosen = sorted(scores, key=lambda c: (-scores[c], c))[:wanted]
        found = {
            row[0]: row for row in db.execute(
                f'SELECT c.id, c.text, f.path, c.page, c.headings, c.start, c."end" FROM chunks c '
                f"JOIN files f ON f.id = c.file_id WHERE c.id IN ({','.join('?' * len(chosen))})", chosen)
        }
    at = {int(ids[i]): int(i) for i in best}  # a chunk found by its words alone is looked up in ids
    similar = {c: float(similarity[at[c] if c in at else np.flatnonzero(ids == c)[0]]) for c in chosen}
    hits = [Hit(c, found[c][1], scores[c], found[c][2], found[c][3], tuple(json.loads(found[c][4])),
                found[c][5], found[c][6], similar[c], collection) for c in chosen]
    if knowledge.reranker:
        reranking = clock()
        hits = rerank.rerank(knowledge.reranker, query, hits)
        if timings is not None:
            timings["rerank_ms"] = (clock() - reranking) * 1000
    return hits[:top_k]


def retrieve(settings: Settings, names: Iterable[str], query: str, top_k: int, min_score: float) -> list[Hit]:
    """The `top_k` chunks of all of `names` that best answer `query` (fused scores, which share one scale, or
    the reranker's), leaving out those whose vector is less similar to the query's than `min_score`."""
    from forja.embeddings import embed

    names = list(names)
    with _open(settings) as db:
        models = {name: _recorded_model(db, name) for name in names}
    vectors = {}  # the query embedded once per model the collections share
    for model in {m for m in models.values() if m is not None and list(models.values()).count(m) > 1}:
        vectors[model] = embed([query], model=model, kind="query").numpy()[0].astype(np.float32)
    hits = [hit for name in names for hit in search(settings, name, query, top_k, vector=vectors.get(models[name]))
            if hit.similarity >= min_score]
    return sorted(hits, key=lambda h: -(h.score if h.rerank_score is None else h.rerank_score))[:top_k]


def _folded(word: str) -> str:
    """Lower case without accents, as the keyword index's tokenizer sees a word."""
    return "".join(c for c in unicodedata.normalize("NFKD", word.casefold()) if not unicodedata.combining(c))


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    text = (Path(__file__).parent / "stopwords.txt").read_text(encoding="utf-8")
    return frozenset(w for line in text.splitlines() if not line.startswith("#") for w in line.split())


# Per collection: (what its files were when read, chunk ids, vectors). Reading 10k vectors from SQLite takes
# longer than ranking them, and a server searches the same collections again and again.
_vector_cache: dict[tuple[str, int], tuple[tuple, np.ndarray, np.ndarray]] = {}


VECTOR_READ_ROWS = 4096  # vectors read from SQLite per step into the cache's matrix


def _vectors(db: sqlite3.Connection, settings: Settings, collection_id: int) -> tuple[np.ndarray, np.ndarray]:
    key = (str(db_path(settings)), collection_id)
    cached = _vector_cache.get(key)
    db.execute("BEGIN")  # one snapshot: the version, the count and the rows agree while an add writes
    try:
        # Every write of a file gives it a new indexed_at, so this changes whenever the chunks do.
        version = db.execute("SELECT count(*), total(indexed_at), max(id), total(chunks) FROM files "
                             "WHERE collection_id = ?", (collection_id,)).fetchone()
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        dimensions = db.execute("SELECT dimensions FROM collections WHERE id = ?", (collection_id,)).fetchone()[0]
        # Filled step by step into the final arrays: holding every row and then their joined bytes as well
        # took 3x the matrix (100k chunks: 800 MiB peak RSS for a 147 MiB matrix).
        count = int(version[3])
        ids = np.empty(count, dtype=np.int64)
        matrix = np.empty((count, dimensions), dtype=np.float32)
        cursor = db.execute("SELECT c.id, c.vector FROM chunks c JOIN files f ON f.id = c.file_id "
                            "WHERE f.collection_id = ?", (collection_id,))
        done = 0
        while rows := cursor.fetchmany(VECTOR_READ_ROWS):
            ids[done:done + len(rows)] = [r[0] for r in rows]
            matrix[done:done + len(rows)] = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(
                len(rows), dimensions)
            done += len(rows)
    finally:
        db.execute("COMMIT")
    _vector_cache[key] = (version, ids, matrix)
    return ids, matrix


def _keyword_ranking(db: sqlite3.Connection, collection_id: int, query: str, limit: int) -> list[int]:
    """Chunk ids by BM25 for any of the query's words but the stopwords (quoted, so FTS5 syntax in a query
    is just text)."""
    words = [w for w in WORD.findall(query) if _folded(w) not in _stopwords()]
    if not words:
        return []
    match = " OR ".join('"' + w + '"' for w in words)
    return [r[0] for r in db.execute(
        "SELECT chunks_fts.rowid FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid "
        "JOIN files f ON f.id = c.file_id WHERE chunks_fts MATCH ? AND f.collection_id = ? "
        "ORDER BY bm25(chunks_fts) LIMIT ?", (match, collection_id, limit))]
