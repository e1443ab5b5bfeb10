"""Documents as blocks of text with their heading level: HTML (lxml), PowerPoint .pptx (python-pptx) and EPUB
(ebooklib). `forja data` joins the blocks into a document's text; `forja knowledge add` cuts them into chunks
under their heading path, a slide or a chapter opening a section of its own."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from forja.config import ForjaError

# What a reader of the page never sees as its content: code, styling, menus, the <head>.
DROPPED_TAGS = {"script", "style", "nav", "noscript", "template", "head", "svg", "iframe", "object"}
# Elements that end the paragraph before them and start one of their own.
BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "body", "dd", "details", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "header", "hr", "html", "li", "main", "ol", "p", "section",
    "summary", "table", "tbody", "thead", "tfoot", "ul", "caption",
}
HEADING_TAG = re.compile(r"h([1-6])")
XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")


@dataclass(frozen=True)
class Block:
    """A paragraph, heading or table row. `level` 1-6 is a heading, 0 body text; `part` counts slides or
    chapters (a new part starts its own heading path); `page` is the slide number of a presentation."""

    text: str
    level: int = 0
    part: int = 0
    page: int | None = None


def _error(path: Path, what: str, error: Exception) -> ForjaError:
    from forja.data import DataError, _reason

    return DataError(f"{path}: cannot read as {what} ({_reason(error)})")


def html_blocks(markup: str, part: int = 0) -> list[Block]:
    """The blocks of an HTML (or XHTML) page in reading order: h1-h6 as headings, table rows as "a | b",
    <pre> as written, scripts, styles and <nav> menus dropped."""
    import lxml.etree
    import lxml.html

    markup = XML_DECLARATION.sub("", markup, count=1)  # lxml refuses a str that declares its encoding
    if not markup.strip():
        return []
    root = lxml.html.document_fromstring(markup)
    blocks: list[Block] = []
    current: list[str] = []

    def flush() -> None:
        lines = (" ".join(line.split()) for line in "".join(current).split("\n"))
        text = "\n".join(line for line in lines if line)
        if text:
            blocks.append(Block(text, 0, part))
        current.clear()

    def walk(element: lxml.etree._Element) -> None:
        tag = element.tag.lower() if isinstance(element.tag, str) else ""  # comments have a function as tag
        if not tag or tag in DROPPED_TAGS:
            pass
        elif heading := HEADING_TAG.fullmatch(tag):
            flush()
            text = " ".join(element.text_content().split())
            if text:
                blocks.append(Block(text, int(heading.group(1)), part))
        elif tag == "tr":
            flush()
            cells = [" ".join(c.text_content().split()) for c in element if isinstance(c.tag, str)]
            if any(cells):
                blocks.append(Block(" | ".join(cells), 0, part))
        elif tag == "pre":
            flush()
            text = element.text_content().strip("\n")
            if text.strip():
                blocks.append(Block(text, 0, part))
        elif tag == "br":
            current.append("\n")
        else:
            block = tag in BLOCK_TAGS
            if block:
                flush()
            current.append(element.text or "")
            for child in element:
                walk(child)
            if block:
                flush()
        current.append(element.tail or "")

    walk(root)
    flush()
    return blocks


def read_html(path: Path, encoding: str | None = None) -> tuple[list[Block], str]:
    """The blocks of an .html file, and the encoding read (see forja.data.decode)."""
    from forja.data import decode

    text, detail = decode(path, path.read_bytes(), encoding)
    try:
        return html_blocks(text), detail
    except Exception as error:  # lxml's parser errors on markup it cannot recover
        raise _error(path, "HTML", error) from None


def read_pptx(path: Path) -> list[Block]:
    """One part per slide, its page the slide number: the title as a heading, then the text of every other
    shape (groups and tables included) in the order they were placed, then the speaker notes."""
    import pptx
    from pptx.enum.shapes import MSO_SHAPE_TYPE

    try:
        presentation = pptx.Presentation(str(path))
    except Exception as error:  # not a zip, or a zip without PowerPoint's parts
        raise _error(path, "a PowerPoint .pptx presentation", error) from None
    blocks: list[Block] = []

    def shape_texts(shapes, title_id: int | None) -> list[str]:
        texts = []
        for shape in shapes:
            if shape.shape_id == title_id:
                continue
            if shape.shape_type == MSO_SHAPE_TYPE.GROUP:
                texts += shape_texts(shape.shapes, title_id)
            elif getattr(shape, "has_table", False) and shape.has_table:
                texts += [" | ".join(cell.text.strip() for cell in row.cells) for row in shape.table.rows]
            elif shape.has_text_frame:
                texts += [p for p in (_paragraph_text(p) for p in shape.text_frame.paragraphs) if p]
        return texts

    for number, slide in enumerate(presentation.slides, 1):
        title_shape = slide.shapes.title
        title = " ".join(title_shape.text_frame.text.split()) if title_shape is not None else ""
        if title:
            blocks.append(Block(title, 1, number, number))
        texts = shape_texts(slide.shapes, title_shape.shape_id if title_shape is not None else None)
        if slide.has_notes_slide and slide.notes_slide.notes_text_frame is not None:
            texts += [p for p in (_paragraph_text(p) for p in slide.notes_slide.notes_text_frame.paragraphs) if p]
        blocks += [Block(text, 0, number, number) for text in texts if text.strip()]
    return blocks


def _paragraph_text(paragraph) -> str:
    return " ".join("".join(run.text for run in paragraph.runs).split()) or " ".join(paragraph.text.split())


def read_epub(path: Path) -> list[Block]:
    """One part per chapter (each XHTML document of the spine, in reading order), its headings as in HTML."""
    import ebooklib
    from ebooklib import epub

    try:
        book = epub.read_epub(str(path), options={"ignore_ncx": True})
    except Exception as error:  # a damaged zip, a missing container.xml or OPF
        raise _error(path, "an EPUB book", error) from None
    blocks: list[Block] = []
    for number, (idref, _) in enumerate(book.spine, 1):
        item = book.get_item_with_id(idref)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
            continue
        content = item.get_content()
        try:
            text = content.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = content.decode("utf-16")  # EPUB allows only UTF-8 and UTF-16
        try:
            blocks += html_blocks(text, number)
        except Exception as error:
            raise _error(path, f"an EPUB book (chapter {item.get_name()})", error) from None
    return blocks


def blocks_text(blocks: list[Block]) -> str:
    """The document's text: its blocks joined by blank lines."""
    return "\n\n".join(b.text for b in blocks)
