"""forja knowledge: files → chunks with sources → hybrid search, through the API and the CLI."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import TEST_DATABASE, pdf_pages_bytes
from typer.testing import CliRunner

from forja.cli import app
from forja.config import KnowledgeSettings, load_settings
from forja.data import read_pdf_pages
from forja.embeddings import count_tokens
from forja.knowledge import UnknownCollection, add, remove, retrieve, search, show
from forja.knowledge.chunks import Chunk, embedding_text, read_document
from forja.knowledge.index import db_path

runner = CliRunner()

FILLER = (
    "Ferrovia Labs designs each part in its workshop by the river, tests it for a season and only then "
    "writes it into this manual, so that what you read here matches what you hold in your hands. "
)

MANUAL = f"""# Zorblat 3000 manual

The Zorblat 3000 is a countertop bread oven made by Ferrovia Labs. {FILLER}

## Setup

### Power

Plug the Zorblat into a 230-volt socket. The green lamp blinks twice when it is ready to bake.

### Water tank

Fill the tank with 400 ml of filtered water before the first bake. {FILLER * 2}

## Cleaning

Descale the steam nozzle every 37 bakes with citric acid, then run one empty cycle.

## Warranty

Ferrovia Labs repairs a faulty Zorblat free of charge for 41 months from the day you purchased it.
{FILLER}
"""


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "manual.md").write_text(MANUAL, encoding="utf-8")
    (folder / "shop.pdf").write_bytes(pdf_pages_bytes(
        ["The Ferrovia Labs shop opens on weekdays from nine to five."],
        ["A spare heating coil for the Zorblat costs 88 euros.", "It ships from the Tarragona depot."],
    ))
    return folder


def index_counts(home: Path) -> dict[str, tuple[int, int, int]]:
    """Per file: (chunks the file row says, chunk rows, keyword rows), read straight from the database the
    suite runs on: the SQLite file, or the store's PostgreSQL (FORJA_TEST_DATABASE=postgresql)."""
    if TEST_DATABASE == "postgresql":
        return postgresql_index_counts(load_settings().database)
    db = sqlite3.connect(home / "knowledge" / "knowledge.db")
    try:
        rows = db.execute(
            "SELECT f.path, f.chunks, count(c.id), "
            "(SELECT count(*) FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE file_id = f.id)) "
            "FROM files f LEFT JOIN chunks c ON c.file_id = f.id GROUP BY f.id").fetchall()
        orphans = db.execute("SELECT count(*) FROM chunks_fts WHERE rowid NOT IN (SELECT id FROM chunks)").fetchone()[0]
        orphans += db.execute("SELECT count(*) FROM chunks WHERE file_id NOT IN (SELECT id FROM files)").fetchone()[0]
    finally:
        db.close()
    assert orphans == 0
    return {Path(path).name: (n, chunks, keywords) for path, n, chunks, keywords in rows}


def postgresql_index_counts(url: str) -> dict[str, tuple[int, int, int]]:
    """index_counts for knowledge in PostgreSQL: a chunk's keywords are a column of its row, counted when not empty."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT f.path, f.chunks, count(c.id), count(c.id) FILTER (WHERE length(c.keywords) > 0) "
                "FROM knowledge_files f LEFT JOIN knowledge_chunks c ON c.file_id = f.id GROUP BY f.id").all()
            orphans = conn.exec_driver_sql("SELECT count(*) FROM knowledge_chunks c LEFT JOIN knowledge_files f "
                                           "ON f.id = c.file_id WHERE f.id IS NULL OR f.collection_id != c.collection_id"
                                           ).scalar_one()
    finally:
        engine.dispose()
    assert orphans == 0
    return {Path(path).name: (n, chunks, keywords) for path, n, chunks, keywords in rows}


def committed_files() -> int:
    """Files in the index so far, 0 while its tables are still being made (the killed add's poll)."""
    if TEST_DATABASE == "postgresql":
        engine = sa.create_engine(load_settings().database)
        try:
            with engine.connect() as conn:
                if not conn.exec_driver_sql("SELECT to_regclass('knowledge_files') IS NOT NULL").scalar_one():
                    return 0
                return conn.exec_driver_sql("SELECT count(*) FROM knowledge_files").scalar_one()
        finally:
            engine.dispose()
    database = db_path(load_settings())
    if not database.is_file():
        return 0
    try:
        db = sqlite3.connect(database)
        try:
            return db.execute("SELECT count(*) FROM files").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:  # the schema is still being created
        return 0


def test_chunks_slice_the_document_keep_their_headings_and_fit_the_size():
    settings = KnowledgeSettings(chunk_tokens=40, overlap_tokens=10)
    path = Path("manual.md")
    path.write_text(MANUAL, encoding="utf-8")
    document = read_document(path, settings, count_tokens)
    assert len(document.chunks) > 5
    for chunk in document.chunks:
        assert MANUAL[chunk.start:chunk.end] == chunk.text
        assert chunk.tokens <= settings.chunk_tokens
    by_text = {c.text.split("\n")[0]: c.headings for c in document.chunks}
    assert by_text["### Power"] == ("Zorblat 3000 manual", "Setup", "Power")
    assert by_text["## Warranty"] == ("Zorblat 3000 manual", "Warranty")
    # A long section is cut between sentences, and the next chunk repeats the end of the one before.
    tank = [c for c in document.chunks if c.headings[-1] == "Water tank"]
    assert len(tank) > 1 and any(b.start < a.end for a, b in zip(tank, tank[1:]))


def test_docx_headings_and_table_rows_become_sections(tmp_path):
    import docx
    import openpyxl

    document = docx.Document()
    document.add_heading("Bakery", level=1)
    document.add_paragraph("We bake rye on Tuesdays.")
    document.add_heading("Prices", level=2)
    document.add_paragraph("A rye loaf costs 3 euros.")
    document.save(tmp_path / "bakery.docx")
    read = read_document(tmp_path / "bakery.docx", KnowledgeSettings(), count_tokens)
    assert [(c.headings, c.text) for c in read.chunks] == [
        (("Bakery",), "Bakery\n\nWe bake rye on Tuesdays."), (("Bakery", "Prices"), "Prices\n\nA rye loaf costs 3 euros.")]

    book = openpyxl.Workbook()
    book.active.append(["question", "answer"])
    book.active.append(["When is rye baked?", "On Tuesdays."])
    book.active.append(["Price of rye?", "3 euros."])
    book.save(tmp_path / "faq.xlsx")
    read = read_document(tmp_path / "faq.xlsx", KnowledgeSettings(), count_tokens)
    assert [(c.headings, c.text) for c in read.chunks] == [
        (("row 2",), "question: When is rye baked?\nanswer: On Tuesdays."),
        (("row 3",), "question: Price of rye?\nanswer: 3 euros.")]
    assert all(read.text[c.start:c.end] == c.text for c in read.chunks)
    # a row's number is not part of what is embedded and matched; a sheet's name is
    assert embedding_text(read.chunks[0]) == "question: When is rye baked?\nanswer: On Tuesdays."
    named = Chunk("price: 3", 0, 8, None, ('sheet "Precios" row 4',), 3)
    assert embedding_text(named) == 'sheet "Precios"\n\nprice: 3'
    assert embedding_text(Chunk("x", 0, 1, None, ("Oven", "Rowing 12"), 1)) == "Oven > Rowing 12\n\nx"


def test_a_keyword_only_match_ranked_first_does_not_hide_a_relevant_chunk(tmp_path, forja_home):
    """retrieve keeps the chunks at least min_score similar before it takes the top_k: the row that shares the
    question's rare word but not its meaning is fused first, and left out."""
    (tmp_path / "notes.md").write_text("# Opening\n\nThe bakery opens at seven every morning.\n\n"
                                       "# Misc\n\nZyxquor zyxquor 4471 qwv.\n", encoding="utf-8")
    settings = load_settings()
    add(settings, "bakery", [tmp_path / "notes.md"])
    query = "What time do you open, zyxquor?"
    fused = search(settings, "bakery", query, top_k=2)
    assert "Zyxquor" in fused[0].text and fused[0].similarity < fused[1].similarity  # the case itself
    threshold = (fused[0].similarity + fused[1].similarity) / 2
    hits = retrieve(settings, ["bakery"], query, 1, threshold)
    assert [h.text for h in hits] == [fused[1].text] and "opens at seven" in hits[0].text
    assert retrieve(settings, ["bakery"], query, 1, 0.99) == []


def test_search_finds_the_chunk_by_keywords_and_by_paraphrase_with_its_exact_source(docs):
    settings = load_settings()
    results = add(settings, "zorblat", [docs])
    assert sorted(r.status for r in results) == ["added", "added"]
    manual = (docs / "manual.md").resolve()

    hit = search(settings, "zorblat", "citric acid steam nozzle")[0]
    assert (hit.source, hit.headings, hit.page) == (str(manual), ("Zorblat 3000 manual", "Cleaning"), None)
    assert MANUAL[hit.start:hit.end] == hit.text and "37 bakes" in hit.text

    hit = search(settings, "zorblat", "How long is the guarantee valid after buying?")[0]
    assert "41 months" in hit.text and hit.headings[-1] == "Warranty"
    assert MANUAL[hit.start:hit.end] == hit.text

    hit = search(settings, "zorblat", "replacement coil price Tarragona")[0]
    pdf = docs / "shop.pdf"
    assert (hit.source, hit.page) == (str(pdf.resolve()), 2)
    assert "\n\n".join(read_pdf_pages(pdf))[hit.start:hit.end] == hit.text and "88 euros" in hit.text

    # Accents are folded: "calefaccion" finds "calefacción".
    (docs / "nota.md").write_text("La calefacción del Zorblat tarda nueve minutos.", encoding="utf-8")
    add(settings, "zorblat", [docs / "nota.md"])
    assert "nueve" in search(settings, "zorblat", "calefaccion", top_k=1)[0].text


def test_re_adding_skips_unchanged_files_and_replaces_changed_ones(docs, forja_home):
    settings = load_settings()
    add(settings, "zorblat", [docs])
    before = index_counts(forja_home)
    assert [r.status for r in add(settings, "zorblat", [docs])] == ["unchanged", "unchanged"]
    assert index_counts(forja_home) == before

    (docs / "manual.md").write_text(MANUAL.replace("41 months", "52 months"), encoding="utf-8")
    statuses = {Path(r.path).name: r.status for r in add(settings, "zorblat", [docs])}
    assert statuses == {"manual.md": "replaced", "shop.pdf": "unchanged"}
    assert index_counts(forja_home) == before  # same cut, old chunks gone
    texts = [h.text for h in search(settings, "zorblat", "warranty months", top_k=10)]
    assert any("52 months" in t for t in texts) and not any("41 months" in t for t in texts)


def test_re_adding_a_folder_forgets_the_files_it_no_longer_holds(docs, forja_home):
    settings = load_settings()
    add(settings, "zorblat", [docs])
    (docs / "shop.pdf").unlink()
    other = docs.parent / "elsewhere.md"
    other.write_text("# Elsewhere\n\nA note kept outside the folder.", encoding="utf-8")
    add(settings, "zorblat", [other])
    statuses = {Path(r.path).name: r.status for r in add(settings, "zorblat", [docs])}
    assert statuses == {"manual.md": "unchanged", "shop.pdf": "removed"}
    assert set(index_counts(forja_home)) == {"manual.md", "elsewhere.md"}  # a file added by name stays
    assert not any("heating coil" in h.text for h in search(settings, "zorblat", "heating coil price", top_k=10))


def test_remove_a_path_then_the_collection_and_show_counts(docs):
    settings = load_settings()
    add(settings, "zorblat", [docs])
    collection = show(settings, "zorblat")
    assert [Path(f.path).name for f in collection.files] == ["manual.md", "shop.pdf"]
    assert collection.chunks == sum(f.chunks for f in collection.files) and collection.tokens > 0

    assert remove(settings, "zorblat", [docs / "shop.pdf"]) == 1
    assert [Path(f.path).name for f in show(settings, "zorblat").files] == ["manual.md"]
    assert all(h.page is None for h in search(settings, "zorblat", "spare coil Tarragona", top_k=20))

    result = runner.invoke(app, ["knowledge", "show", "zorblat"])
    assert result.exit_code == 0 and "1 files" in result.output and "manual.md" in result.output
    result = runner.invoke(app, ["knowledge", "remove", "zorblat"])
    assert result.exit_code == 0, result.output
    with pytest.raises(UnknownCollection):
        show(settings, "zorblat")


def test_cli_add_list_search(docs):
    result = runner.invoke(app, ["knowledge", "add", "zorblat", str(docs)])
    assert result.exit_code == 0, result.output
    assert "added" in result.output and "manual.md" in result.output
    result = runner.invoke(app, ["knowledge", "list"])
    assert result.output.startswith("zorblat  2 files")
    result = runner.invoke(app, ["knowledge", "search", "zorblat", "citric acid", "-k", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("1. ") and "Cleaning" in result.output.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["knowledge", "search", "nothing", "x"], "no knowledge collection named 'nothing'"),
    (["knowledge", "show", "nothing"], "no knowledge collection named 'nothing'"),
    (["knowledge", "add", "kb", "missing.md"], "missing.md: no such file or folder"),
    (["knowledge", "add", "bad name", "."], "a collection name is letters"),
])
def test_cli_errors_are_one_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_killed_add_leaves_each_file_whole_or_absent_and_a_rerun_completes_it(tmp_path, forja_home):
    folder = tmp_path / "many"
    folder.mkdir()
    for number in range(20):
        (folder / f"note{number:02d}.md").write_text(f"# Note {number}\n\nFact {number}: {FILLER}", encoding="utf-8")
    env = {**os.environ, "FORJA_HOME": str(forja_home),
           "PYTHONPATH": str(Path(__file__).parent.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "forja.cli", "knowledge", "add", "many", str(folder)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not committed_files():
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    counts = index_counts(forja_home)
    assert 1 <= len(counts) < 20, "the add finished before it was killed"
    assert all(n == chunks == keywords and n > 0 for n, chunks, keywords in counts.values())

    results = add(load_settings(), "many", [folder])
    assert sum(r.status == "unchanged" for r in results) == len(counts)
    counts = index_counts(forja_home)
    assert len(counts) == 20 and all(n == chunks == keywords for n, chunks, keywords in counts.values())
