"""forja bench knowledge at a tiny size: every figure is a real number and the known answers are found."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from forja.bench_knowledge import parse_sizes, write_catalogues
from forja.cli import app

runner = CliRunner()


def test_the_bench_reports_real_numbers_and_finds_the_known_answers(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "knowledge", "--sizes", "90", "--queries", "20", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "hybrid query p50 / p95" in result.output
    size = json.loads(out.read_text())["sizes"][0]
    for field in ("index_chunks_per_s", "embed_chunks_per_s", "index_over_embed", "index_bytes", "peak_rss_bytes",
                  "cold_query_ms", "query_ms_p50", "query_ms_p95", "embed_ms_p50", "vectors_ms_p50", "keywords_ms_p50"):
        assert isinstance(size[field], (int, float)) and math.isfinite(size[field]) and size[field] > 0, field
    assert size["query_ms_p50"] <= size["query_ms_p95"]
    assert 70 <= size["chunks"] <= 110 and size["queries"] == 20
    assert size["hit_at_5"] >= 0.9 and size["hit_at_1"] <= size["hit_at_5"]


def test_catalogues_are_spanish_and_english_with_one_question_per_fact(tmp_path):
    answers = write_catalogues(tmp_path, 300)
    files = sorted(tmp_path.iterdir())
    assert len(answers) == 300 and len(files) == 3
    assert files[0].read_text(encoding="utf-8").startswith("# Catálogo") and "# Catalogue" in files[1].read_text()
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    assert all(a.fact in text for a in answers)
    assert write_catalogues(tmp_path / "again", 300) == answers  # the same seed writes the same collection


def test_sizes_read_k_and_plain_numbers_and_refuse_words():
    assert parse_sizes("1k, 10k,100000") == [1000, 10000, 100000]
    result = runner.invoke(app, ["bench", "knowledge", "--sizes", "ten"])
    assert result.exit_code == 1 and "'ten' is not a chunk count" in result.output


def test_random_vectors_measure_the_index_and_search_without_an_embedding_alone(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "knowledge", "--sizes", "60", "--queries", "10", "--random-vectors",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "RANDOM chunk vectors" in result.output
    size = json.loads(out.read_text())["sizes"][0]
    assert size["index_over_embed"] is None and size["embed_seconds"] is None
    assert size["query_ms_p95"] > 0 and size["hit_at_5"] >= 0.5  # the keywords alone still find most


def test_sqlite_vec_ranks_the_same_vectors_beside_forjas_index(tmp_path, monkeypatch):
    monkeypatch.setenv("FORJA_KNOWLEDGE__STORE", "sqlite")  # the comparison is with the SQLite index
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "knowledge", "--sizes", "60", "--queries", "10", "--random-vectors",
                                 "--sqlite-vec", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "sqlite-vec beside it" in result.output
    compared = json.loads(out.read_text())["sizes"][0]["sqlite_vec"]
    assert compared["agreement"] == 1.0  # both exact, random vectors have no ties
    assert compared["bytes"] > compared["numpy_matrix_bytes"] > 0
    assert 0 < compared["query_ms_p50"] <= compared["query_ms_p95"] and compared["numpy_ms_p50"] > 0


def test_sqlite_vec_is_refused_in_one_line_beside_a_postgresql_index(monkeypatch):
    monkeypatch.setenv("FORJA_DATABASE_URL", "postgresql://forja@127.0.0.1:1/none")
    monkeypatch.setenv("FORJA_KNOWLEDGE__STORE", "postgresql")
    result = runner.invoke(app, ["bench", "knowledge", "--sizes", "60", "--sqlite-vec"])
    assert result.exit_code == 1 and "--sqlite-vec compares with the SQLite index" in result.output
