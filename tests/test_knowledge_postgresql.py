"""Knowledge collections in the store's PostgreSQL (knowledge/postgresql_index.py): shared by replicas, ranked by
pgvector's HNSW index, and a server without pgvector named as such. The rest of tests/test_knowledge.py runs on
PostgreSQL in the second pass of `make test`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import DEBIAN_POSTGRES_BIN, new_cluster
from typer.testing import CliRunner

from forja.cli import app
from forja.config import load_settings
from forja.knowledge import KnowledgeError, UnknownCollection, add, collections, remove, rename, search, show
from forja.knowledge.chunks import Chunk, Document
from forja.knowledge.postgresql_index import PostgreSQLIndex
from forja.store import Store


def test_two_replicas_on_one_database_see_the_same_collections_with_accents_folded(postgres, tmp_path):
    url = postgres.create_database()
    one = load_settings(home=tmp_path / "replica-1", database_url=url)
    two = load_settings(home=tmp_path / "replica-2", database_url=url)
    (tmp_path / "escuela.md").write_text(
        "# Escuela\n\nLa educación primaria dura seis años en la escuela Tomillar.\n\n"
        "## Comedor\n\nEl comedor abre a las 13:30 y cierra a las 15:00.", encoding="utf-8")
    assert [r.status for r in add(one, "escuela", [tmp_path / "escuela.md"])] == ["added"]

    assert [c.name for c in collections(two)] == ["escuela"]
    hit = search(two, "escuela", "educacion", top_k=1)[0]  # folded on both sides: "educacion" finds "educación"
    assert "seis años" in hit.text and hit.source == str((tmp_path / "escuela.md").resolve())
    assert "Comedor" in search(two, "escuela", "¿A qué hora abre el COMEDOR?", top_k=1)[0].headings

    rename(two, "escuela", "colegio")
    assert show(one, "colegio").chunks == show(two, "colegio").chunks > 0
    assert remove(one, "colegio") == 1
    with pytest.raises(UnknownCollection):
        show(two, "colegio")
    assert not (one.knowledge_dir / "knowledge.db").exists() and not (two.knowledge_dir / "knowledge.db").exists()


def _write(index: PostgreSQLIndex, name: str, vectors: np.ndarray) -> int:
    """A collection of one file whose chunks have these vectors (no embedding model needed)."""
    index.create_collection(name, "test-vectors", vectors.shape[1])
    collection_id = index.collection(name)[0]
    text = " ".join(f"w{i}" for i in range(len(vectors)))
    chunks, start = [], 0
    for i in range(len(vectors)):
        word = f"w{i}"
        chunks.append(Chunk(word, start, start + len(word), None, (), 1))
        start += len(word) + 1
    assert index.write_file(collection_id, name, Document(Path(f"/{name}.txt"), text, chunks), "sha", "{}", vectors)
    return collection_id


def _unit(rng: np.random.Generator, rows: int, dimensions: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_each_collection_ranks_with_its_own_hnsw_index_whatever_its_dimensions(postgres):
    url = postgres.create_database()
    rng = np.random.default_rng(0)
    with PostgreSQLIndex(url) as index:
        big = _unit(rng, 600, 16)
        small = _unit(rng, 30, 8)  # another model's dimensions, in the same table
        big_id, small_id = _write(index, "big", big), _write(index, "small", small)

        query = _unit(rng, 1, 8)[0]
        found = index.vector_ranking(small_id, query, 50)  # beside a larger collection, all of its own come back
        exact = np.argsort(-(small @ query))
        assert len(found) == 30
        ids = {c: i for i, c in enumerate(sorted(c for c, _ in found))}  # chunk ids are given in the file's order
        assert [ids[c] for c, _ in found] == list(exact)
        assert np.allclose([s for _, s in found], (small @ query)[exact], atol=1e-5)

        query = _unit(rng, 1, 16)[0]
        found = index.vector_ranking(big_id, query, 10)
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True) and len(found) == 10
        assert index.similarities(big_id, query, [found[0][0]]) == pytest.approx({found[0][0]: found[0][1]})

        engine = sa.create_engine(url)
        with engine.connect() as conn:  # the statement vector_ranking runs: the collection's index can serve it
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = "\n".join(conn.exec_driver_sql(
                f"EXPLAIN SELECT id, embedding::vector(16) <#> '{query.tolist()}' AS distance FROM knowledge_chunks "
                f"WHERE collection_id = {big_id} ORDER BY distance LIMIT 10").scalars())
        engine.dispose()
        assert f"Index Scan using knowledge_chunks_vector_{big_id}" in plan

        exact = index.vector_ranking(big_id, query, 10, exact=True)  # every row compared, no index
        assert np.allclose([s for _, s in exact], np.sort(big @ query)[::-1][:10], atol=1e-5)

        index.remove_collection(big_id)
        assert index.names() == ["small"]


def test_the_bench_measures_hnsw_recall_against_an_exact_scan(postgres, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("FORJA_DATABASE_URL", postgres.create_database())
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "knowledge", "--sizes", "60", "--queries", "10", "--random-vectors",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "HNSW recall" in result.output and "index in PostgreSQL" in result.output
    assert 0.5 <= json.loads(out.read_text())["sizes"][0]["hnsw_recall"] <= 1.0


def test_a_postgresql_without_pgvector_says_what_to_install_and_the_store_still_opens(tmp_path):
    if not (DEBIAN_POSTGRES_BIN / "initdb").exists() or Path("/usr/share/postgresql/15/extension/vector.control").exists():
        pytest.skip("needs Debian's PostgreSQL 15 without pgvector")
    cluster = new_cluster(DEBIAN_POSTGRES_BIN)
    try:
        url = cluster.create_database()
        settings = load_settings(home=tmp_path / "home", database_url=url)
        Store.open(settings).close()  # the store's schema needs no pgvector
        assert collections(settings) == []  # nor does listing none
        (tmp_path / "a.md").write_text("# A\n\nSome text.", encoding="utf-8")
        with pytest.raises(KnowledgeError, match="pgvector") as raised:
            add(settings, "kb", [tmp_path / "a.md"])
        assert "postgresql-15-pgvector" in str(raised.value) and "knowledge.store: sqlite" in str(raised.value)

        result = CliRunner().invoke(app, ["knowledge", "search", "kb", "text"],
                                    env={"FORJA_DATABASE_URL": url, "FORJA_HOME": str(tmp_path / "home")})
        assert result.exit_code == 1 and "pgvector" in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

        sqlite = load_settings(home=tmp_path / "home", database_url=url, knowledge={"store": "sqlite"})
        assert [r.status for r in add(sqlite, "kb", [tmp_path / "a.md"])] == ["added"]
    finally:
        cluster.stop()
        shutil.rmtree(cluster.directory, ignore_errors=True)
