"""Collections of files, by content hash, cut into chunks with vectors and keywords: in one SQLite file
(FORJA_HOME/knowledge/knowledge.db, sqlite_index.py) or in the store's PostgreSQL database with pgvector
(postgresql_index.py), as knowledge.store says. This module reads, chunks and embeds the files and fuses the
vector and keyword rankings by reciprocal rank fusion; the two stores keep and rank what it hands them. Each
file is written in one transaction, so an interrupted `add` leaves every file indexed whole or not at all,
and running it again finishes the job."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from forja import data
from forja.config import Settings
from forja.knowledge.chunks import SUFFIXES, Chunk, embedding_text, read_document
from forja.knowledge.errors import KnowledgeError, UnknownCollection
from forja.knowledge.postgresql_index import PostgreSQLIndex
from forja.knowledge.sqlite_index import SQLiteIndex
from forja.knowledge.words import query_words

DB_NAME = "knowledge.db"
COLLECTION_NAME = re.compile(r"[\w.-]+")
POSTGRESQL_SCHEMES = ("postgresql", "postgres")  # the store's database_url, with or without "+psycopg"

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


# --- Where the index lives ---------------------------------------------------------------------------


def db_path(settings: Settings) -> Path:
    """The SQLite file of the index, when knowledge lives in SQLite."""
    return settings.knowledge_dir / DB_NAME


def open_index(settings: Settings) -> SQLiteIndex | PostgreSQLIndex:
    """The index knowledge.store names, not opened yet: `with open_index(settings) as db:` opens it."""
    store = settings.knowledge.store
    postgresql = settings.database.split(":", 1)[0].split("+", 1)[0] in POSTGRESQL_SCHEMES
    if store == "postgresql" and not postgresql:
        raise KnowledgeError("knowledge.store is postgresql but the store's database is SQLite (database_url is "
                             "not set to a postgresql:// URL); set database_url, or knowledge.store to auto or sqlite")
    if store == "postgresql" or (store == "auto" and postgresql):
        return PostgreSQLIndex(settings.database)
    return SQLiteIndex(db_path(settings))


def store_kind(settings: Settings) -> str:
    """"sqlite" or "postgresql": where knowledge.store puts the collections with these settings."""
    return "postgresql" if isinstance(open_index(settings), PostgreSQLIndex) else "sqlite"


def _collection_row(db: SQLiteIndex | PostgreSQLIndex, name: str) -> tuple[int, str, int, float]:
    """(id, embedding_model, dimensions, created_at) of collection `name`, else the one-line error."""
    row = db.collection(name)
    if row is None:
        known = db.names()
        raise UnknownCollection(f"no knowledge collection named {name!r} "
                                f"({'known: ' + ', '.join(known) if known else 'none yet'}; "
                                "create one with forja knowledge add NAME PATH...)")
    return row


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
        progress: Callable[[FileResult], None] | None = None, model: str | None = None) -> list[FileResult]:
    """Index files into collection `name` (created if new, with embedding model `model`, else
    knowledge.embedding_model): a new file is added, a changed one replaces its chunks, an unchanged one (same
    content hash and chunk sizes) is skipped, and a file indexed from a folder named here that the folder no
    longer holds is removed. An existing collection keeps its model."""
    from forja import embeddings

    if not COLLECTION_NAME.fullmatch(name):
        raise KnowledgeError(f"{name!r}: a collection name is letters, digits, _ . and - only")
    files = files_to_index(paths)
    chunking = json.dumps({"chunk_tokens": settings.knowledge.chunk_tokens,
                           "overlap_tokens": settings.knowledge.overlap_tokens})
    results = []
    with open_index(settings) as db:
        known = db.collection(name)
        model = known[1] if known else embeddings.canonical(model or settings.knowledge.embedding_model)
        _check_chunk_size(settings, model)  # before a new collection is made: a refused add leaves nothing
        db.create_collection(name, model, embeddings.dimensions(model))
        collection_id, model, _, _ = _collection_row(db, name)
        count_tokens = partial(embeddings.count_tokens, model=model, kind="document")
        for path in files:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            old = db.file_state(collection_id, str(path))
            if old is not None and (old[0], old[1]) == (digest, chunking):
                result = FileResult(str(path), "unchanged", old[2], old[3])
            else:
                document = read_document(path, settings.knowledge, count_tokens)
                if not document.chunks:
                    note = data.NO_TEXT_LAYER if path.suffix.lower() == ".pdf" else ""
                    result = FileResult(str(path), "no text", note=note)
                else:
                    vectors = embeddings.embed([embedding_text(c) for c in document.chunks], model=model,
                                               kind="document").numpy().astype(np.float32)
                    if not db.write_file(collection_id, name, document, digest, chunking, vectors):
                        raise UnknownCollection(f"collection {name!r} was removed while its files were being added")
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


def _check_chunk_size(settings: Settings, model: str) -> None:
    """A chunk must fit the model's window whole, its two special tokens beside it."""
    from forja import embeddings

    most = embeddings.max_tokens(model) - 2
    if settings.knowledge.chunk_tokens > most:
        raise KnowledgeError(f"knowledge.chunk_tokens is {settings.knowledge.chunk_tokens}; the embedding model "
                             f"{model} reads at most {most} tokens of a chunk: set it to {most} or less")


def _forget_gone(db: SQLiteIndex | PostgreSQLIndex, collection_id: int, paths: Iterable[str | Path],
                 found: set[str]) -> list[FileResult]:
    """A folder added again is its current content: files indexed from under it that it no longer holds (deleted,
    renamed) leave the collection, each in its own transaction."""
    gone = []
    for folder in (Path(p).resolve() for p in paths):
        if not folder.is_dir():
            continue
        for file_id, path in db.files_under(collection_id, str(folder).rstrip("/") + "/"):
            if path not in found:
                db.delete_file(file_id)
                gone.append(FileResult(path, "removed"))
    return gone


def remove(settings: Settings, name: str, paths: Iterable[str | Path] | None = None) -> int:
    """Remove the whole collection (no paths; returns its file count) or the files at or under `paths`."""
    with open_index(settings) as db:
        collection_id = _collection_row(db, name)[0]
        if paths is None:
            return db.remove_collection(collection_id)
        paths = list(paths)
        counts = db.remove_files(collection_id, [str(Path(p).resolve()) for p in paths])
        for path, count in zip(paths, counts):
            if count == 0:
                raise KnowledgeError(f"{path}: no file of collection {name!r} is at or under this path "
                                     f"(forja knowledge show {name} lists them)")
        return sum(counts)


def rename(settings: Settings, name: str, new_name: str) -> None:
    """Give collection `name` another name; its files and chunks stay as they are."""
    if not COLLECTION_NAME.fullmatch(new_name):
        raise KnowledgeError(f"{new_name!r}: a collection name is letters, digits, _ . and - only")
    with open_index(settings) as db:
        if not db.rename(_collection_row(db, name)[0], new_name):
            raise KnowledgeError(f"a knowledge collection named {new_name!r} exists already")


# --- Reading ------------------------------------------------------------------------------------------


def collections(settings: Settings) -> list[Collection]:
    """Every collection with its files, by name (none, and nothing created, where no index exists yet)."""
    index = open_index(settings)
    if not index.exists():
        return []
    with index as db:
        return [_collection(db, n) for n in db.names()]


def show(settings: Settings, name: str) -> Collection:
    """One collection with its files."""
    with open_index(settings) as db:
        return _collection(db, name)


def _collection(db: SQLiteIndex | PostgreSQLIndex, name: str) -> Collection:
    collection_id, model, _, created = _collection_row(db, name)
    return Collection(name, model, created, [FileInfo(*row) for row in db.files(collection_id)])


def file_chunks(settings: Settings, name: str, path: str | Path) -> list[Chunk]:
    """The chunks of one file of collection `name`, in order (none when it holds no such file)."""
    with open_index(settings) as db:
        return db.file_chunks(_collection_row(db, name)[0], str(Path(path).resolve()))


def index_bytes(settings: Settings) -> int:
    """The index's size on disk: the SQLite file, or the knowledge tables with their indexes on PostgreSQL."""
    with open_index(settings) as db:
        return db.size_bytes()


def search(settings: Settings, collection: str, query: str, top_k: int | None = None, *,
           timings: dict[str, float] | None = None, vector: np.ndarray | None = None,
           min_similarity: float | None = None) -> list[Hit]:
    """The chunks of `collection` that best answer `query`, best first: vector and keyword rankings fused.
    `timings`, when given, gets the milliseconds spent embedding the query, ranking the vectors (on SQLite,
    reading them first when they are not cached) and ranking the keywords. `vector`: the query's, already
    embedded. `min_similarity`: only candidates whose vector is at least this similar to the query's, left out
    before the best are taken (a keyword-only match ranked first does not hide a relevant chunk ranked second)."""
    from forja.embeddings import embed
    from forja.knowledge import rerank

    clock = time.perf_counter

    knowledge = settings.knowledge
    top_k = top_k or knowledge.top_k
    with open_index(settings) as db:
        collection_id, model, _, _ = _collection_row(db, collection)
        started = clock()
        if vector is None:
            vector = embed([query], model=model, kind="query").numpy()[0].astype(np.float32)
        embedded = clock()
        nearest = db.vector_ranking(collection_id, vector, knowledge.candidates)
        if not nearest:
            return []  # no chunks (an empty collection, or files without text)
        ranked = clock()
        rankings = [[c for c, _ in nearest], db.keyword_ranking(collection_id, query_words(query), knowledge.candidates)]
        if timings is not None:
            timings.update(embed_ms=(embedded - started) * 1000, vectors_ms=(ranked - embedded) * 1000,
                           keywords_ms=(clock() - ranked) * 1000)
        scores: dict[int, float] = {}
        for ranking in rankings:
            for rank, chunk_id in enumerate(ranking, 1):
                scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (knowledge.rrf_k + rank)
        # With a reranker, it re-scores the best rerank_candidates and the top_k come out of those.
        wanted = max(top_k, knowledge.rerank_candidates) if knowledge.reranker else top_k
        # fused scores tie often (ranks 1 and 5 against 5 and 1): the chunk nearer the query's meaning goes first
        # (a chunk found by keywords alone is farther than every vector candidate)
        similar = dict(nearest)
        ordered = sorted(scores, key=lambda c: (-scores[c], -similar.get(c, -2.0), c))
        if min_similarity is not None:
            similar.update(db.similarities(collection_id, vector, [c for c in ordered if c not in similar]))
            ordered = [c for c in ordered if similar.get(c, -2.0) >= min_similarity]
        chosen = ordered[:wanted]
        similar.update(db.similarities(collection_id, vector, [c for c in chosen if c not in similar]))
        found = db.chunk_rows(chosen)
    # A chunk whose file was replaced between the rankings and this read is left out (PostgreSQL reads each in
    # a transaction of its own; an add may commit between them).
    hits = [Hit(c, found[c][0], scores[c], found[c][1], found[c][2], tuple(json.loads(found[c][3])),
                found[c][4], found[c][5], similar[c], collection) for c in chosen if c in found and c in similar]
    if knowledge.reranker:
        reranking = clock()
        hits = rerank.rerank(knowledge.reranker, query, hits)
        if timings is not None:
            timings["rerank_ms"] = (clock() - reranking) * 1000
    return hits[:top_k]


def retrieve(settings: Settings, names: Iterable[str], query: str, top_k: int, min_score: float) -> list[Hit]:
    """The `top_k` chunks of all of `names` that best answer `query` (fused scores, which share one scale, or
    the reranker's) among those whose vector is at least `min_score` similar to the query's."""
    from forja.embeddings import embed

    names = list(names)
    with open_index(settings) as db:
        models = {name: row[1] if (row := db.collection(name)) else None for name in names}
    shared = [m for m in set(models.values()) if m is not None and list(models.values()).count(m) > 1]
    vectors = {m: embed([query], model=m, kind="query").numpy()[0].astype(np.float32) for m in shared}  # once each
    hits = [hit for name in names for hit in search(settings, name, query, top_k, vector=vectors.get(models[name]),
                                                    min_similarity=min_score)]
    return sorted(hits, key=lambda h: -(h.score if h.rerank_score is None else h.rerank_score))[:top_k]
