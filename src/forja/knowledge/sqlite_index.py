"""The knowledge index in one SQLite file (FORJA_HOME/knowledge/knowledge.db by default): files by content
hash, their chunks with float32 vectors, and an FTS5 keyword index. The vectors of a collection are read
once into memory and ranked with numpy there. index.py calls it through the same methods as
postgresql_index.py's; neither embeds anything (index.py hands them the vectors)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from forja.knowledge.chunks import Chunk, Document, embedding_text

# Accents are folded on both sides, so "cafe" finds "café" and "educacion" finds "educación".
FTS_TOKENIZER = "unicode61 remove_diacritics 2"
VECTOR_READ_ROWS = 4096  # vectors read from SQLite per step into the cache's matrix


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

# Per collection: (what its files were when read, chunk ids, vectors). Reading 10k vectors from SQLite takes
# longer than ranking them, and a server searches the same collections again and again.
_vector_cache: dict[tuple[str, int], tuple[tuple, np.ndarray, np.ndarray]] = {}


class SQLiteIndex:
    """`with SQLiteIndex(path) as db:` one connection, the schema brought up to date on opening."""

    def __init__(self, path: Path):
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file()

    def __enter__(self) -> "SQLiteIndex":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; each write below says BEGIN and COMMIT itself.
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")  # a search reads while an add writes
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, "
                            "applied_at REAL NOT NULL)")
            applied = {row[0] for row in self.db.execute("SELECT name FROM schema_migrations")}
            for name, step in MIGRATIONS:
                if name not in applied:
                    with self._transaction():
                        step(self.db)
                        self.db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, time.time()))
        except BaseException:
            self.db.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- collections and files ------------------------------------------------------------------------

    def collection(self, name: str) -> tuple[int, str, int, float] | None:
        """(id, embedding_model, dimensions, created_at) of the collection named `name`."""
        return self.db.execute("SELECT id, embedding_model, dimensions, created_at FROM collections WHERE name = ?",
                               (name,)).fetchone()

    def names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM collections ORDER BY name")]

    def create_collection(self, name: str, embedding_model: str, dimensions: int) -> None:
        """The collection, unless one has that name already."""
        with self._transaction():
            self.db.execute("INSERT OR IGNORE INTO collections (name, embedding_model, dimensions, created_at) "
                            "VALUES (?, ?, ?, ?)", (name, embedding_model, dimensions, time.time()))

    def files(self, collection_id: int) -> list[tuple[str, str, int, int, float]]:
        """(path, sha256, chunks, tokens, indexed_at) of every file, by path."""
        return self.db.execute("SELECT path, sha256, chunks, tokens, indexed_at FROM files WHERE collection_id = ? "
                               "ORDER BY path", (collection_id,)).fetchall()

    def file_state(self, collection_id: int, path: str) -> tuple[str, str, int, int] | None:
        """(sha256, chunking, chunks, tokens) of the file as last indexed."""
        return self.db.execute("SELECT sha256, chunking, chunks, tokens FROM files WHERE collection_id = ? AND path = ?",
                               (collection_id, path)).fetchone()

    def write_file(self, collection_id: int, name: str, document: Document, digest: str, chunking: str,
                   vectors: np.ndarray) -> bool:
        """One transaction: the file's old chunks out, the new ones in, or (if interrupted) nothing changed.
        False, and nothing written, when the collection is no longer `name` (removed while its files were read;
        its id may even be another's now)."""
        with self._transaction():
            if self.db.execute("SELECT name FROM collections WHERE id = ?", (collection_id,)).fetchone() != (name,):
                return False
            self.db.execute("DELETE FROM files WHERE collection_id = ? AND path = ?", (collection_id, str(document.path)))
            file_id = self.db.execute(
                "INSERT INTO files (collection_id, path, sha256, chunking, chunks, tokens, indexed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (collection_id, str(document.path), digest, chunking, len(document.chunks),
                 sum(c.tokens for c in document.chunks), time.time()),
            ).lastrowid
            for seq, (chunk, vector) in enumerate(zip(document.chunks, vectors)):
                chunk_id = self.db.execute(
                    'INSERT INTO chunks (file_id, seq, text, start, "end", page, headings, tokens, vector) '
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (file_id, seq, chunk.text, chunk.start, chunk.end, chunk.page,
                     json.dumps(chunk.headings, ensure_ascii=False), chunk.tokens, vector.tobytes()),
                ).lastrowid
                self.db.execute("INSERT INTO chunks_fts (rowid, body) VALUES (?, ?)", (chunk_id, embedding_text(chunk)))
        return True

    def files_under(self, collection_id: int, prefix: str) -> list[tuple[int, str]]:
        """(id, path) of the files whose path starts with `prefix`."""
        return self.db.execute("SELECT id, path FROM files WHERE collection_id = ? AND substr(path, 1, ?) = ?",
                               (collection_id, len(prefix), prefix)).fetchall()

    def delete_file(self, file_id: int) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def remove_collection(self, collection_id: int) -> int:
        """The collection with its files and chunks; returns how many files it had."""
        with self._transaction():
            removed = self.db.execute("SELECT count(*) FROM files WHERE collection_id = ?", (collection_id,)).fetchone()[0]
            self.db.execute("DELETE FROM collections WHERE id = ?", (collection_id,))
            return removed

    def remove_files(self, collection_id: int, targets: list[str]) -> list[int]:
        """The files at or under each target path, in one transaction; the count per target. All or nothing:
        when a target matches no file nothing is removed (its count is 0)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            counts = [self.db.execute(
                "DELETE FROM files WHERE collection_id = ? AND (path = ? OR substr(path, 1, ?) = ?)",
                (collection_id, target, len(target) + 1, target.rstrip("/") + "/")).rowcount for target in targets]
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("ROLLBACK" if 0 in counts else "COMMIT")
        return counts

    def rename(self, collection_id: int, new_name: str) -> bool:
        """False, and nothing changed, when another collection has `new_name`."""
        with self._transaction():
            if self.db.execute("SELECT 1 FROM collections WHERE name = ? AND id != ?", (new_name, collection_id)).fetchone():
                return False
            self.db.execute("UPDATE collections SET name = ? WHERE id = ?", (new_name, collection_id))
        return True

    # --- searching --------------------------------------------------------------------------------------

    def vector_ranking(self, collection_id: int, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        """The `limit` chunks whose vectors are nearest the query's (all unit length: the dot product is the
        cosine), as (chunk id, similarity), best first."""
        ids, matrix = self.vectors(collection_id)
        if not len(ids):
            return []
        # einsum's own loop, on this thread: `matrix @ vector` goes to OpenBLAS, whose second thread waits
        # for a core whenever another job holds one (at 100k chunks on 2 shared cores, p95 34 ms against 17).
        similarity = np.einsum("ij,j->i", matrix, vector)
        best = np.argpartition(-similarity, min(limit, len(ids)) - 1)[:limit]
        best = best[np.argsort(-similarity[best])]
        return [(int(ids[i]), float(similarity[i])) for i in best]

    def similarities(self, collection_id: int, vector: np.ndarray, chunk_ids: list[int]) -> dict[int, float]:
        """The query's similarity to each of these chunks (found by their words alone, say)."""
        ids, matrix = self.vectors(collection_id)
        found = {c: np.flatnonzero(ids == c) for c in chunk_ids}
        return {c: float(matrix[at[0]] @ vector) for c, at in found.items() if len(at)}

    def keyword_ranking(self, collection_id: int, words: list[str], limit: int) -> list[int]:
        """Chunk ids by BM25 for any of `words` (quoted, so FTS5 syntax in a query is just text)."""
        if not words:
            return []
        match = " OR ".join('"' + w + '"' for w in words)
        return [r[0] for r in self.db.execute(
            "SELECT chunks_fts.rowid FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid "
            "JOIN files f ON f.id = c.file_id WHERE chunks_fts MATCH ? AND f.collection_id = ? "
            "ORDER BY bm25(chunks_fts) LIMIT ?", (match, collection_id, limit))]

    def chunk_rows(self, chunk_ids: list[int]) -> dict[int, tuple[str, str, int | None, str, int, int]]:
        """By id: (text, the file's path, page, headings as JSON, start, end)."""
        if not chunk_ids:
            return {}
        return {row[0]: row[1:] for row in self.db.execute(
            f'SELECT c.id, c.text, f.path, c.page, c.headings, c.start, c."end" FROM chunks c '
            f"JOIN files f ON f.id = c.file_id WHERE c.id IN ({','.join('?' * len(chunk_ids))})", chunk_ids)}

    def file_chunks(self, collection_id: int, path: str) -> list[Chunk]:
        """The chunks of one file, in order."""
        rows = self.db.execute('SELECT c.text, c.start, c."end", c.page, c.headings, c.tokens FROM chunks c '
                               "JOIN files f ON f.id = c.file_id WHERE f.collection_id = ? AND f.path = ? "
                               "ORDER BY c.seq", (collection_id, path)).fetchall()
        return [Chunk(t, s, e, p, tuple(json.loads(h)), n) for t, s, e, p, h, n in rows]

    def size_bytes(self) -> int:
        """The index on disk: the database file with its write-ahead log."""
        return sum(p.stat().st_size for p in self.path.parent.iterdir() if p.name.startswith(self.path.name))

    def vectors(self, collection_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The collection's chunk ids and their vectors as one matrix, read once and kept until its files change."""
        key = (str(self.path), collection_id)
        cached = _vector_cache.get(key)
        self.db.execute("BEGIN")  # one snapshot: the version, the count and the rows agree while an add writes
        try:
            # Every write of a file gives it a new indexed_at, so this changes whenever the chunks do.
            version = self.db.execute("SELECT count(*), total(indexed_at), max(id), total(chunks) FROM files "
                                      "WHERE collection_id = ?", (collection_id,)).fetchone()
            if cached is not None and cached[0] == version:
                return cached[1], cached[2]
            dimensions = self.db.execute("SELECT dimensions FROM collections WHERE id = ?",
                                         (collection_id,)).fetchone()[0]
            # Filled step by step into the final arrays: holding every row and then their joined bytes as well
            # took 3x the matrix (100k chunks: 800 MiB peak RSS for a 147 MiB matrix).
            count = int(version[3])
            ids = np.empty(count, dtype=np.int64)
            matrix = np.empty((count, dimensions), dtype=np.float32)
            cursor = self.db.execute("SELECT c.id, c.vector FROM chunks c JOIN files f ON f.id = c.file_id "
                                     "WHERE f.collection_id = ?", (collection_id,))
            done = 0
            while rows := cursor.fetchmany(VECTOR_READ_ROWS):
                ids[done:done + len(rows)] = [r[0] for r in rows]
                matrix[done:done + len(rows)] = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(
                    len(rows), dimensions)
                done += len(rows)
        finally:
            self.db.execute("COMMIT")
        _vector_cache[key] = (version, ids, matrix)
        return ids, matrix
