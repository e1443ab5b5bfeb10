"""Files → documents → chunks: each chunk a span of the document's text with its page (PDF, a slide's number)
and heading path (Markdown, Word and HTML headings, a slide's title, an EPUB chapter's headings; a table's row
label), cut by tokens of the embedding model on heading,
page and paragraph boundaries first. `forja knowledge add` calls `read_document` for every file."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forja import data
from forja.config import KnowledgeSettings
from forja.data import documents

TEXT_SUFFIXES = (".txt", ".md")
MARKDOWN_SUFFIXES = (".md",)
SUFFIXES = tuple(data.CONTAINERS)  # every file `forja data` reads
MARKDOWN_HEADING = re.compile(r"(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")
FENCE = re.compile(r"(```|~~~)")
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
BLANK_LINES = re.compile(r"\n[^\S\n]*\n\s*")


@dataclass(frozen=True)
class Chunk:
    """A span of a document: `text == document.text[start:end]`."""

    text: str
    start: int
    end: int
    page: int | None  # 1-based: a PDF's page, a presentation's slide
    headings: tuple[str, ...]  # ("Oven", "Lighting"); a table row's label ("row 17")
    tokens: int  # embedding-model tokens, [CLS] and [SEP] not counted


@dataclass
class Document:
    """What forja read from one file: the text every chunk's span slices, and the chunks."""

    path: Path
    text: str
    chunks: list[Chunk]


@dataclass(frozen=True)
class _Block:
    """A paragraph (or heading line, or table row) of the document text."""

    start: int
    end: int
    page: int | None
    headings: tuple[str, ...]
    opens: bool  # starts a section: a heading, a page, a row


ROW_NUMBER = re.compile(r"(?:^| )row \d+$")  # the end of a table row's label: 'row 17', 'sheet "FAQ" row 17'


def embedding_text(chunk: Chunk) -> str:
    """What the vectors and the keyword index see: the heading path, then the chunk, so a chunk deep in a
    section is still found by its section's name. A table row's number is left out (its sheet's name kept): it
    says nothing of the row's meaning, and it moved a FAQ row's vector away from its question (measured with
    the multilingual model on the bench FAQ, by vectors alone: with "row N", 2 of the 4 corrections' rewordings
    found their row first, without it 3)."""
    headings = [h for h in (ROW_NUMBER.sub("", h) for h in chunk.headings) if h]
    return " > ".join(headings) + "\n\n" + chunk.text if headings else chunk.text


def read_document(path: Path, settings: KnowledgeSettings, count: Callable[[list[str]], list[int]]) -> Document:
    """Read a file with `forja data`'s readers and cut it into chunks; `count` gives each text's tokens
    (the embedding model's tokenizer, special tokens included)."""
    text, blocks = _read_blocks(path)
    return Document(path, text, _chunks(text, blocks, settings, count))


def _read_blocks(path: Path) -> tuple[str, list[_Block]]:
    suffix = path.suffix.lower()
    if suffix in MARKDOWN_SUFFIXES:
        text = data.read_text(path)
        return text, _markdown_blocks(text)
    if suffix in TEXT_SUFFIXES:
        text = data.read_text(path)
        return text, _paragraphs(text, 0, len(text), None, (), opens_first=True)
    if suffix == ".pdf":
        pages = data.read_pdf_pages(path)
        text, blocks, offset = "", [], 0
        for number, page in enumerate(pages, 1):
            text += ("\n\n" if number > 1 else "") + page
            offset = len(text) - len(page)
            blocks += _paragraphs(text, offset, len(text), number, (), opens_first=True)
        return text, blocks
    if suffix == ".docx":
        return _joined([documents.Block(text, level) for level, text in data.read_docx_blocks(path)])
    if suffix in (".html", ".htm"):
        return _joined(documents.read_html(path)[0])
    if suffix == ".pptx":
        return _joined(documents.read_pptx(path))
    if suffix == ".epub":
        return _joined(documents.read_epub(path))
    # Tables and JSON: each row is a record of "column: value" lines under its label.
    parts = []
    for label, values in data.read_records(path):
        lines = [f"{key}: {_cell(value)}" for key, value in values.items() if key and _cell(value)]
        if lines:
            parts.append((label, "\n".join(lines)))
    text, blocks = "", []
    for label, part in parts:
        if text:
            text += "\n\n"
        blocks.append(_Block(len(text), len(text) + len(part), None, (label,), True))
        text += part
    return text, blocks


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value).strip()


def _paragraphs(text: str, start: int, end: int, page: int | None, headings: tuple[str, ...],
                opens_first: bool) -> list[_Block]:
    """Paragraphs of text[start:end], separated by blank lines, without surrounding whitespace."""
    blocks = []
    position = start
    for separator in [*BLANK_LINES.finditer(text, start, end), None]:
        stop = separator.start() if separator else end
        piece = text[position:stop]
        left = len(piece) - len(piece.lstrip())
        right = len(piece.rstrip())
        if piece.strip():
            blocks.append(_Block(position + left, position + right, page, headings, opens_first and not blocks))
        if separator:
            position = separator.end()
    return blocks


def _markdown_blocks(text: str) -> list[_Block]:
    """Paragraphs under the heading path in effect; a heading line is a block that opens a section.
    Lines starting with # inside ``` or ~~~ fences are code, not headings."""
    blocks: list[_Block] = []
    stack: list[tuple[int, str]] = []
    fence: str | None = None
    paragraph: int | None = None  # start of the lines gathered since the last blank line or heading
    offset = 0

    def close(stop: int) -> None:
        nonlocal paragraph
        if paragraph is not None:
            blocks.extend(_paragraphs(text, paragraph, stop, None, tuple(t for _, t in stack), opens_first=False))
            paragraph = None

    for line in text.split("\n"):
        heading = MARKDOWN_HEADING.fullmatch(line) if fence is None else None
        opener = FENCE.match(line.lstrip())
        if heading:
            close(offset)
            level = len(heading.group(1))
            stack = [(lv, t) for lv, t in stack if lv < level] + [(level, heading.group(2))]
            blocks.append(_Block(offset, offset + len(line.rstrip()), None, tuple(t for _, t in stack), True))
        elif not line.strip() and fence is None:
            close(offset)
        elif paragraph is None:
            paragraph = offset
        if opener:
            fence = None if fence == opener.group(1) else fence or opener.group(1)
        offset += len(line) + 1
    close(len(text))
    return blocks


def _joined(parts: list[documents.Block]) -> tuple[str, list[_Block]]:
    """Paragraphs (Word's, a page's, a slide's) joined by blank lines; a heading opens a section under its
    path, and so does a new slide or chapter, whose path starts afresh."""
    text, blocks = "", []
    stack: list[tuple[int, str]] = []
    part_number = None
    for part in parts:
        if not part.text.strip():
            continue
        if text:
            text += "\n\n"
        opens = bool(part.level) or part.part != part_number
        if part.part != part_number:
            stack, part_number = [], part.part
        if part.level:
            stack = [(lv, t) for lv, t in stack if lv < part.level] + [(part.level, part.text.strip())]
        blocks.append(_Block(len(text), len(text) + len(part.text), part.page, tuple(t for _, t in stack), opens))
        text += part.text
    return text, blocks


def _chunks(text: str, blocks: list[_Block], settings: KnowledgeSettings,
            count: Callable[[list[str]], list[int]]) -> list[Chunk]:
    sections: list[list[_Block]] = []
    for block in blocks:
        if not sections or block.opens or (block.page, block.headings) != (sections[-1][-1].page,
                                                                           sections[-1][-1].headings):
            sections.append([])
        sections[-1].append(block)
    chunks = []
    for section in sections:
        units = _units(text, section, settings.chunk_tokens, count)
        for start, end in _pack(units, settings.chunk_tokens, settings.overlap_tokens):
            chunks.append((start, end, section[0].page, section[-1].headings))
    tokens = [n - 2 for n in count([text[s:e] for s, e, _, _ in chunks])]
    return [Chunk(text[s:e], s, e, page, headings, n) for (s, e, page, headings), n in zip(chunks, tokens)]


def _units(text: str, section: list[_Block], limit: int,
           count: Callable[[list[str]], list[int]]) -> list[tuple[int, int, int, bool]]:
    """(start, end, tokens, starts a paragraph): paragraphs, or the sentences of a paragraph over `limit`,
    or the words of a sentence over it (a single word longer than that stays whole)."""
    def spans(start: int, end: int, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
        out, position = [], start
        for match in [*pattern.finditer(text, start, end), None]:
            stop = match.start() if match else end
            if stop > position:
                out.append((position, stop))
            if match:
                position = match.end()
        return out

    units = []
    paragraphs = [(b.start, b.end) for b in section]
    for (start, end), tokens in zip(paragraphs, _count(text, paragraphs, count)):
        if tokens <= limit:
            units.append((start, end, tokens, True))
            continue
        sentences = spans(start, end, SENTENCE_END)
        for index, ((s, e), n) in enumerate(zip(sentences, _count(text, sentences, count))):
            if n <= limit:
                units.append((s, e, n, index == 0))
                continue
            words = spans(s, e, re.compile(r"\s+"))
            units += [(ws, we, wn, index == 0 and k == 0)
                      for k, ((ws, we), wn) in enumerate(zip(words, _count(text, words, count)))]
    return units


def _count(text: str, spans: list[tuple[int, int]], count: Callable[[list[str]], list[int]]) -> list[int]:
    return [n - 2 for n in count([text[s:e] for s, e in spans])]  # less [CLS] and [SEP]


def _pack(units: list[tuple[int, int, int, bool]], limit: int, overlap: int) -> list[tuple[int, int]]:
    """Greedy chunks of whole units up to `limit` tokens. A chunk ends at a paragraph break where that keeps
    it at least half full; else between sentences, and the next chunk repeats up to `overlap` tokens."""
    def size(part: list[tuple[int, int, int, bool]]) -> int:
        return sum(u[2] for u in part) + len(part) - 1  # a token per separator errs on the safe side

    chunks: list[tuple[int, int]] = []
    current: list[tuple[int, int, int, bool]] = []
    for unit in units:
        if current and size(current + [unit]) > limit:
            cut = next((k for k in range(len(current) - 1, 0, -1)
                        if current[k][3] and size(current[:k]) >= limit // 2 and size(current[k:] + [unit]) <= limit),
                       None)
            if cut is not None:
                chunks.append((current[0][0], current[cut - 1][1]))
                current = current[cut:]
            else:
                chunks.append((current[0][0], current[-1][1]))
                carry: list[tuple[int, int, int, bool]] = []
                for previous in reversed(current):
                    if size([previous] + carry) > overlap or size([previous] + carry + [unit]) > limit:
                        break
                    carry.insert(0, previous)
                current = carry
        current.append(unit)
    if current:
        chunks.append((current[0][0], current[-1][1]))
    return chunks
