"""Tests for the documents forja.data.documents reads (HTML, PowerPoint, EPUB), each built here with the
library that writes it, read by `forja data` and cut into chunks under their headings by `forja knowledge`;
and a scanned PDF named as such."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import pdf_pages_bytes
from test_data import error_of
from typer.testing import CliRunner

from forja.cli import app
from forja.config import KnowledgeSettings
from forja.data import DOCUMENT, KNOWLEDGE, inspect, prepare, read_rows
from forja.embeddings import count_tokens
from forja.knowledge.chunks import read_document

runner = CliRunner()

PAGE = """<!DOCTYPE html>
<html><head><title>Panadería Sol</title><style>body { color: red }</style>
<script>var tracking = "no debe salir";</script></head>
<body>
<nav><a href="/">Inicio</a> <a href="/carta">Carta</a></nav>
<h1>Panadería Sol</h1>
<p>Horneamos pan de centeno <b>los martes</b>.</p>
<h2>Precios</h2>
<p>Una hogaza de centeno cuesta 3 euros.</p>
<table><tr><th>Pan</th><th>Precio</th></tr><tr><td>Barra</td><td>1,20 €</td></tr></table>
<h3>Encargos</h3>
<p>Encargos al <!-- un comentario -->teléfono 976 123 456.<br>Recogida a partir de las 8.</p>
<h2>Dónde estamos</h2>
<ul><li>Calle Mayor 3</li><li>Zaragoza</li></ul>
<script>console.log("tampoco")</script>
</body></html>
"""


def settings() -> KnowledgeSettings:
    return KnowledgeSettings()


def test_an_html_page_is_read_without_scripts_styles_or_menus(tmp_path):
    path = tmp_path / "web.html"
    path.write_text(PAGE, encoding="utf-8")
    (report,) = inspect(path).files
    assert (report.container, report.format, report.kind, report.rows) == ("HTML", DOCUMENT, KNOWLEDGE, 1)
    summary = prepare(path, tmp_path / "out.jsonl")
    (row,) = read_rows(summary.train_path)
    assert row["text"] == (
        "Panadería Sol\n\nHorneamos pan de centeno los martes.\n\nPrecios\n\nUna hogaza de centeno cuesta 3 euros."
        "\n\nPan | Precio\n\nBarra | 1,20 €\n\nEncargos\n\nEncargos al teléfono 976 123 456.\nRecogida a partir de "
        "las 8.\n\nDónde estamos\n\nCalle Mayor 3\n\nZaragoza"
    )
    assert "tracking" not in row["text"] and "Inicio" not in row["text"] and "color" not in row["text"]


def test_html_headings_h1_to_h6_become_the_chunks_heading_path(tmp_path):
    path = tmp_path / "web.htm"
    path.write_text(PAGE, encoding="utf-8")
    document = read_document(path, settings(), count_tokens)
    assert [(c.headings, c.text.split("\n")[0]) for c in document.chunks] == [
        (("Panadería Sol",), "Panadería Sol"),
        (("Panadería Sol", "Precios"), "Precios"),
        (("Panadería Sol", "Precios", "Encargos"), "Encargos"),
        (("Panadería Sol", "Dónde estamos"), "Dónde estamos"),
    ]
    assert all(document.text[c.start:c.end] == c.text for c in document.chunks)
    assert "Barra | 1,20 €" in document.chunks[1].text


def test_a_pptx_slide_is_a_page_with_its_title_as_heading(tmp_path):
    import pptx
    from pptx.util import Inches

    deck = pptx.Presentation()
    for title, lines, notes in (
        ("Horarios", ["Abrimos de lunes a sábado.", "Los domingos, cerrado."], "El festivo local también cerramos."),
        ("Envíos", ["Enviamos a toda la provincia en 24 horas."], ""),
    ):
        slide = deck.slides.add_slide(deck.slide_layouts[1])  # title and content
        slide.shapes.title.text = title
        body = slide.placeholders[1].text_frame
        body.text = lines[0]
        for line in lines[1:]:
            body.add_paragraph().text = line
        if notes:
            slide.notes_slide.notes_text_frame.text = notes
    blank = deck.slides.add_slide(deck.slide_layouts[6])  # no title: its text box still counts
    box = blank.shapes.add_textbox(Inches(1), Inches(1), Inches(4), Inches(1))
    box.text_frame.text = "Gracias por su visita."
    path = tmp_path / "tienda.pptx"
    deck.save(path)

    document = read_document(path, settings(), count_tokens)
    assert [(c.page, c.headings, c.text) for c in document.chunks] == [
        (1, ("Horarios",), "Horarios\n\nAbrimos de lunes a sábado.\n\nLos domingos, cerrado.\n\n"
                           "El festivo local también cerramos."),
        (2, ("Envíos",), "Envíos\n\nEnviamos a toda la provincia en 24 horas."),
        (3, (), "Gracias por su visita."),
    ]
    (report,) = inspect(path).files
    assert (report.container, report.kind, report.rows) == ("PowerPoint", KNOWLEDGE, 1)


def test_an_epub_chapter_opens_a_section_and_keeps_its_headings(tmp_path):
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("forja-test")
    book.set_title("Manual del horno")
    book.set_language("es")
    chapters = []
    for number, body in enumerate((
        "<h1>Encendido</h1><p>Gire el mando a la derecha.</p><h2>Piloto</h2><p>La luz verde parpadea dos veces.</p>",
        "<h1>Limpieza</h1><p>Descalcifique la boquilla cada 37 horneadas.</p>",
    ), 1):
        chapter = epub.EpubHtml(title=f"Capítulo {number}", file_name=f"cap{number}.xhtml", lang="es")
        chapter.content = f"<html><body>{body}</body></html>"
        book.add_item(chapter)
        chapters.append(chapter)
    book.toc = chapters
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = chapters  # the nav page is not in the reading order
    path = tmp_path / "manual.epub"
    epub.write_epub(str(path), book)

    document = read_document(path, settings(), count_tokens)
    assert [(c.headings, c.text) for c in document.chunks] == [
        (("Encendido",), "Encendido\n\nGire el mando a la derecha."),
        (("Encendido", "Piloto"), "Piloto\n\nLa luz verde parpadea dos veces."),
        (("Limpieza",), "Limpieza\n\nDescalcifique la boquilla cada 37 horneadas."),
    ]
    summary = prepare(path, tmp_path / "out.jsonl")
    assert "Descalcifique la boquilla" in read_rows(summary.train_path)[0]["text"]


def test_damaged_documents_fail_in_one_line(tmp_path):
    for name, what in (("rota.pptx", "a PowerPoint .pptx presentation"), ("roto.epub", "an EPUB book")):
        path = tmp_path / name
        path.write_bytes(b"not a zip")
        assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(f"{path}: cannot read as {what} (")
        result = runner.invoke(app, ["data", "prepare", str(path), "--out", str(tmp_path / "out.jsonl")])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert f"{path}: cannot read as {what}" in result.output


def test_a_scanned_pdf_is_named_as_such_by_knowledge_add(tmp_path, forja_home):
    scan = tmp_path / "escaneado.pdf"
    scan.write_bytes(pdf_pages_bytes([], []))  # two pages, no text on them
    result = runner.invoke(app, ["knowledge", "add", "docs", str(scan)])
    assert result.exit_code == 0, result.output
    assert "no text  escaneado.pdf: has no text layer (a scanned PDF?) and OCR found none" in result.output


def test_an_html_page_of_menus_only_has_no_text(tmp_path):
    path = Path(tmp_path / "menu.html")
    path.write_text("<html><body><nav><a>Inicio</a></nav><script>x()</script></body></html>", encoding="utf-8")
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")) == (
        f"{path}: no text found (use --skip-bad to skip such files)")


def scanned_pdf(path: Path, lines: list[str]) -> Path:
    """A PDF whose one page is a picture of the lines (what a scanner makes): no text layer."""
    from PIL import Image, ImageDraw, ImageFont

    try:  # a font with Spanish letters (Debian's fonts-dejavu, which Chromium brings)
        font = ImageFont.truetype("DejaVuSans.ttf", 44)
    except OSError:
        font = ImageFont.load_default(size=44)
    page = Image.new("L", (1654, 2339), 255)  # A4 at 200 dpi
    draw = ImageDraw.Draw(page)
    for number, line in enumerate(lines):
        draw.text((120, 160 + number * 80), line, fill=0, font=font)
    page.save(path, "PDF", resolution=200)
    return path


needs_ocr = pytest.mark.skipif(not __import__("forja.data.ocr", fromlist=["available"]).available(),
                               reason="Tesseract is not installed (make installs tesseract-ocr as root)")


@needs_ocr
def test_a_scanned_pdf_is_read_by_ocr_for_training_data_and_knowledge(tmp_path, forja_home, monkeypatch):
    scan = scanned_pdf(tmp_path / "horario.pdf", ["Horario de la panadería", "Abrimos de lunes a sábado",
                                                  "de 7 a 14 horas.", "Pan de masa madre los viernes."])
    document = read_document(scan, KnowledgeSettings(), count_tokens)
    text = " ".join(c.text for c in document.chunks)
    assert "Abrimos de lunes a" in text and "masa madre" in text and document.chunks[0].page == 1
    try:
        from PIL import ImageFont

        ImageFont.truetype("DejaVuSans.ttf", 10)
        assert "panadería" in text and "sábado" in text  # Spanish letters, read as Spanish
    except OSError:
        pass  # the picture was drawn without them
    summary = prepare(scan, tmp_path / "out.jsonl")
    assert summary.kinds[KNOWLEDGE] == 1
    assert "de 7 a 14 horas" in read_rows(summary.train_path)[0]["text"]
    added = runner.invoke(app, ["knowledge", "add", "scans", str(scan)])
    assert added.exit_code == 0 and "added" in added.output, added.output
    found = runner.invoke(app, ["knowledge", "search", "scans", "¿Qué días abrís?"])
    assert "Abrimos de lunes a" in found.output
    monkeypatch.setenv("FORJA_OCR", "off")  # only the text layer, which a scan does not have
    assert error_of(lambda: prepare(scan, tmp_path / "off.jsonl")).startswith(f"{scan}: has no text layer")
