"""Turn your files into Forja's training data: conversations as {"messages": [...]}, documents as {"text": ...},
ratings as {"prompt": [...], "chosen", "rejected"} pairs or {"prompt": [...], "completion", "label"} rows.

`forja data inspect PATH...` shows what Forja finds in your files; `forja data prepare PATH... --out FILE.jsonl`
writes FILE.jsonl (training rows), FILE.val.jsonl (validation rows) and FILE.meta.json (counts, sources, hash).
Here: reading files (encodings, CSV dialects), detecting formats by name, rows into conversations, reports,
chunks and the split; beside it `mapping` (--map, --guess), `chats` (WhatsApp, Telegram), `hub` (hf: datasets)
and `documents` (HTML, PowerPoint, EPUB).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forja.config import ForjaError
from forja.models import with_system

DIALOGUE = "dialogue"
KNOWLEDGE = "knowledge"
PREFERENCE = "preference"  # a prompt with a better and a worse answer, or with one answer rated good or bad

DEFAULT_CHUNK_TOKENS = 512
# Conversations longer than this are reported by `inspect` (the CLI passes train.max_seq_length: what
# training keeps; a longer conversation is left out of the run).
DEFAULT_CONTEXT = 512
# Up to this many rows nothing is held out by default: in a small FAQ every row is an answer the model
# must learn (train.small_data_rows decides the same for the training goal).
SMALL_DATA_ROWS = 300
DEFAULT_VAL_FRACTION = 0.1
# Each knowledge chunk repeats up to this share of the end of the chunk before it, so a fact that
# straddles a boundary still appears whole in one chunk.
CHUNK_OVERLAP = 1 / 8
# Without a tokenizer we count whitespace words and scale up: subword tokenizers give about 1.3 tokens
# per English word and more per Spanish one, and erring high keeps chunks under the limit.
TOKENS_PER_WORD = 4 / 3
# Upper bounds of the length histogram's bars, doubling like the usual maximum sequence lengths.
LENGTH_BINS = (32, 64, 128, 256, 512, 1024, 2048)

CONTAINERS = {
    ".csv": "CSV", ".tsv": "TSV", ".json": "JSON", ".jsonl": "JSONL", ".xlsx": "Excel", ".parquet": "Parquet",
    ".txt": "text", ".md": "Markdown", ".pdf": "PDF", ".docx": "Word",
    ".html": "HTML", ".htm": "HTML", ".pptx": "PowerPoint", ".epub": "EPUB",
}
# Documents read as blocks with headings (forja.data.documents); every one of them is knowledge.
BLOCK_DOCUMENTS = (".html", ".htm", ".pptx", ".epub")


@dataclass(frozen=True)
class Format:
    """A shape of rows recognised by its columns (tables) or fields (JSON)."""

    name: str
    kind: str
    keys: tuple[str, ...]  # all present (case-insensitive) means the row has this format


COLUMN_FORMATS = (
    Format("messages", DIALOGUE, ("messages",)),  # OpenAI: [{"role", "content"}]
    Format("sharegpt", DIALOGUE, ("conversations",)),  # ShareGPT: [{"from", "value"}]
    Format("alpaca", DIALOGUE, ("instruction", "output")),  # plus an optional "input"
    Format("prompt/response", DIALOGUE, ("prompt", "response")),
    Format("prompt/completion", DIALOGUE, ("prompt", "completion")),
    Format("question/answer", DIALOGUE, ("question", "answer")),
    Format("pregunta/respuesta", DIALOGUE, ("pregunta", "respuesta")),
    Format("text", KNOWLEDGE, ("text",)),
    Format("texto", KNOWLEDGE, ("texto",)),
    # preference data (forja.train_prefs): pairs for DPO and ORPO, TRL's and OpenAI's shapes, and KTO's
    # unpaired rows (a thumbs-up or -down alone); the prompt is text or a list of chat messages
    Format("chosen/rejected", PREFERENCE, ("prompt", "chosen", "rejected")),
    Format("openai preference", PREFERENCE, ("input", "preferred_output", "non_preferred_output")),
    Format("completion/label", PREFERENCE, ("prompt", "completion", "label")),
)
# What a "label" may say, in JSON, a CSV cell or a spreadsheet.
LABELS = {"true": True, "1": True, "yes": True, "up": True, "good": True,
          "false": False, "0": False, "no": False, "down": False, "bad": False}
TRANSCRIPT = "transcript"  # a .txt/.md of User:/Assistant: turns
DOCUMENT = "document"  # any other .txt/.md, or a .pdf/.docx/.html/.pptx/.epub

ACCEPTED = (
    "accepted: " + " ".join(CONTAINERS) + "; tables and JSON with columns or fields "
    + " | ".join("+".join(f.keys) for f in COLUMN_FORMATS)
    + ' (alpaca may add input); text files of "User:"/"Assistant:" ("Usuario:"/"Asistente:") turns are dialogue, '
    "other text, .pdf .docx .html .pptx and .epub are knowledge; WhatsApp .txt (or .zip) and Telegram result.json exports are dialogue "
    "(with --assistant NAME); other columns with --map"
)

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}  # OpenAI's messages
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SPEAKERS = {
    "system": "system", "sistema": "system", "user": "user", "usuario": "user",
    "assistant": "assistant", "asistente": "assistant",
}
# A transcript turn starts with its speaker at the very start of a line; lines up to the next speaker
# belong to the same turn. A line of three or more dashes ends a conversation and starts the next.
SPEAKER_LINE = re.compile(r"(" + "|".join(SPEAKERS) + r")[ \t]*:[ \t]?(.*)", re.IGNORECASE)
SEPARATOR_LINE = re.compile(r"-{3,}[ \t]*")
# PDF and Word exports carry these; they are invisible and only waste tokens.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
# Byte order marks, longest first (UTF-32's LE mark starts with UTF-16's), with what `inspect` calls them.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8 with BOM"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE"), (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE"),
)
# The single-byte encodings charset-normalizer chooses among (its names), and what `inspect` calls them.
SINGLE_BYTE_ENCODINGS = {
    "cp1252": "Windows-1252", "latin_1": "Latin-1", "iso8859_15": "Latin-9", "cp850": "DOS Latin-1 (cp850)",
    "mac_roman": "Mac Roman",
}
ENCODING_NAMES = {  # codecs' names of forced encodings
    "utf-8": "UTF-8", "utf-16": "UTF-16", "utf-16-le": "UTF-16 LE", "utf-16-be": "UTF-16 BE", "cp1252": "Windows-1252",
    "latin-1": "Latin-1", "iso8859-1": "Latin-1", "iso8859-15": "Latin-9", "cp850": "DOS Latin-1 (cp850)",
    "mac-roman": "Mac Roman",
}
CSV_DELIMITERS = (",", ";", "\t", "|")
# What a PDF of page images (a scan) is told; `forja knowledge add` says the same.
NO_TEXT_LAYER = ("has no text layer (a scanned PDF?) and OCR found none; install Tesseract (apt-get install "
                 "tesseract-ocr tesseract-ocr-spa) or OCR it first (e.g. ocrmypdf FILE.pdf OUT.pdf)")
CSV_SNIFF_LINES = 20  # the sniffer reads this many lines


@dataclass(frozen=True)
class ReadOptions:
    """How to read a source where detection alone is not enough: the flags of `forja data`, or a source's
    options in the config (`data.sources`)."""

    map: dict[str, str] = field(default_factory=dict)  # field → the file's column: {"question": "Consulta"}
    guess: bool = False  # no known format and no map: guess the mapping from names and contents
    encoding: str | None = None  # None: detected
    assistant: str | None = None  # chat exports: the participant who is the assistant
    gap_hours: float | None = None  # chat exports: a longer pause starts a new conversation
    split: str | None = None  # hf: datasets
    subset: str | None = None


@dataclass(frozen=True)
class Source:
    """A path (file, folder or hf:owner/name) with the options to read it."""

    path: str
    options: ReadOptions = field(default_factory=ReadOptions)


def sources(paths: Iterable[str | Path], configured: Iterable[Any] = (), **flags: Any) -> list[Source]:
    """The sources `forja data` reads: each path with the options of the configured source it lies in
    (`data.sources`: objects with path, map, encoding, ...), overridden by the flags that are not None;
    with no paths, every configured source."""
    from forja.data.mapping import check_map

    configured = list(configured)
    flags = {k: v for k, v in flags.items() if v is not None and v != {} and v is not False}
    if "map" in flags:
        check_map(flags["map"])

    def options(entry: Any) -> ReadOptions:
        given = {name: getattr(entry, name) for name in ReadOptions.__dataclass_fields__} if entry else {}
        given = {k: v for k, v in given.items() if v is not None}
        check_map(given.get("map", {}))
        return ReadOptions(**{**given, **flags})

    paths = [str(p) for p in paths]
    if not paths:
        if not configured:
            raise DataError("no files given: name files or folders, or list them under data.sources in forja.yaml")
        return [Source(entry.path, options(entry)) for entry in configured]
    chosen = []
    for path in paths:
        entry = next((e for e in configured if _inside(path, e.path)), None)
        chosen.append(Source(path, options(entry)))
    return chosen


def _inside(path: str, source: str) -> bool:
    if path.startswith("hf:") or source.startswith("hf:"):
        return path == source
    path_, source_ = Path(path).resolve(), Path(source).resolve()
    return path_ == source_ or source_ in path_.parents


class DataError(ForjaError):
    """A problem with the user's files, in one line naming the file, the row and the field."""


class _Bad(Exception):
    """A row that cannot be used, without its location (the reader adds it)."""

    def __init__(self, what: str, empty: bool = False):
        super().__init__(what)
        self.empty = empty


@dataclass
class BadRow:
    """A row that stops `prepare`, or that it leaves out with skip_bad."""

    message: str  # 'data/faq.csv row 17: column "answer" is empty'
    empty: bool = False  # an empty field, rather than a malformed one
    unit: str = "rows"  # what --skip-bad skips: "rows", or "files" for a document without text

    def error(self) -> DataError:
        return DataError(f"{self.message} (use --skip-bad to skip such {self.unit})")


@dataclass
class _Row:
    label: str  # "row 17", or 'sheet "FAQ" row 17' in a workbook of several sheets
    ref: str  # "17" or "FAQ!17", for the "source" written with the row
    values: dict[str, Any]  # keys lower-cased


@dataclass
class _Table:
    columns: list[str] | None  # the header, for CSV/TSV/Excel/Parquet; None where each JSON row has its own keys
    rows: list[_Row | BadRow]  # in file order, so the first problem reported is the first in the file
    detail: str = ""  # how the bytes were read, for text files: 'cp1252, ";"-separated'


@dataclass
class _Record:
    source: str  # "data/faq.csv:17", written with the training row
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None  # a tool-calling conversation's functions (OpenAI's row "tools")
    preference: dict[str, Any] | None = None  # {"prompt": [...], "chosen", "rejected"} or {"prompt", "completion", "label"}


@dataclass
class _File:
    path: Path | str  # a file, or an "hf:" dataset
    container: str  # "CSV", "Excel", "PDF", ...
    format: str  # a Format name, TRANSCRIPT or DOCUMENT
    kind: str
    records: list[_Record]
    bad: list[BadRow]
    detail: str = ""  # how the bytes were read: 'cp1252, ";"-separated'
    mapping: str = ""  # the --map used, 'question=consulta,answer=contestación'
    notes: list[str] = field(default_factory=list)  # what the user should know: a guessed mapping, ...


# --- Reports ---------------------------------------------------------------------------------------


@dataclass
class FileReport:
    """What one file holds."""

    path: str
    container: str = ""
    format: str = ""
    kind: str = ""
    rows: int = 0  # conversations or documents read
    turns: int = 0  # messages in those conversations
    chunks: int = 0  # knowledge pieces of at most chunk_tokens
    tokens: int = 0  # in the training rows this file gives, duplicates not counted
    lengths: list[int] = field(default_factory=list)  # tokens of each of those training rows
    duplicates: int = 0  # training rows repeating an earlier one, in this file or one read before
    bad_rows: list[str] = field(default_factory=list)  # rows `prepare` refuses (or skips with skip_bad)
    empty_fields: int = 0  # how many of bad_rows are refused for an empty field
    error: str | None = None  # why the file cannot be read at all
    detail: str = ""  # how the bytes were read: 'cp1252, ";"-separated'
    mapping: str = ""  # the --map used
    notes: list[str] = field(default_factory=list)  # a guessed mapping, dropped messages, ...

    def render(self) -> str:
        if self.error:
            return f"ERROR {self.error}"  # the message starts with the path
        if self.kind == DIALOGUE:
            found = f"{self.format} → dialogue: {self.rows} conversations, {self.turns} turns"
        elif self.kind == KNOWLEDGE:
            found = f"{self.format} → knowledge: {self.rows} {'document' if self.format == DOCUMENT else 'rows'}"
            found += f", {self.chunks} chunks"
        elif self.kind == PREFERENCE:
            found = f"{self.format} → preference: {self.rows} rows"
        else:
            found = "no rows"
        container = f"{self.container} ({self.detail})" if self.detail else self.container
        mapped = f" by --map {self.mapping}" if self.mapping else ""
        line = f"{self.path}: {container}, {found.replace(' → ', mapped + ' → ', 1)}, {self.tokens:,} tokens"
        notes = [f"{self.duplicates} duplicates"] if self.duplicates else []
        if self.bad_rows:
            notes.append(f"{len(self.bad_rows)} bad rows ({self.empty_fields} with an empty field)")
        lines = [line + (f" [{', '.join(notes)}]" if notes else "")]
        lines += [f"    {note}" for note in self.notes]
        lines += [f"    {message}" for message in self.bad_rows[:5]]
        if len(self.bad_rows) > 5:
            lines.append(f"    … and {len(self.bad_rows) - 5} more")
        return "\n".join(lines)


def _histogram(lengths: list[int], width: int = 40) -> list[str]:
    """Text bars of how many rows fall under each of LENGTH_BINS, up to the longest row."""
    counts = [0] * (len(LENGTH_BINS) + 1)  # the last bar counts rows longer than every bound
    for n in lengths:
        counts[sum(n > bound for bound in LENGTH_BINS)] += 1
    shown = max((i for i, c in enumerate(counts) if c), default=0) + 1
    labels = [f"≤{bound}" for bound in LENGTH_BINS] + [f">{LENGTH_BINS[-1]}"]
    top = max(counts) or 1
    return [f"  {labels[i]:>6} {'█' * math.ceil(width * counts[i] / top):<{width}} {counts[i]}" for i in range(shown)]


@dataclass
class Report:
    """What `inspect` found, per file and in total."""

    files: list[FileReport]
    token_unit: str  # how tokens were counted: with a tokenizer, or estimated from words
    chunk_tokens: int
    quality: Any = None  # forja.data.quality.Quality of the training rows read

    @property
    def lengths(self) -> list[int]:
        return [n for f in self.files for n in f.lengths]

    @property
    def bad_rows(self) -> list[str]:
        return [m for f in self.files for m in f.bad_rows]

    def total(self, name: str) -> int:
        """Sum of one FileReport counter over all files, e.g. total("tokens")."""
        return sum(getattr(f, name) for f in self.files)

    def render(self) -> str:
        readable = [f for f in self.files if not f.error]
        conversations = sum(f.rows for f in readable if f.kind == DIALOGUE)
        chunks = sum(f.chunks for f in readable if f.kind == KNOWLEDGE)
        preferences = sum(f.rows for f in readable if f.kind == PREFERENCE)
        lines = [f.render() for f in self.files]
        lines += [
            "",
            f"Total: {len(self.files)} files, {conversations} conversations ({self.total('turns')} turns), "
            f"{chunks} knowledge chunks of at most {self.chunk_tokens} tokens, "
            + (f"{preferences} preference rows, " if preferences else "") + f"{self.total('tokens'):,} tokens",
            f"Tokens: {self.token_unit}",
            f"Duplicates: {self.total('duplicates')}, bad rows: {len(self.bad_rows)} "
            f"({self.total('empty_fields')} with an empty field), unreadable files: {len(self.files) - len(readable)}",
            "Tokens per training row:",
            *_histogram(self.lengths),
        ]
        if self.quality is not None:
            lines += self.quality.render()
        return "\n".join(lines)


@dataclass
class Summary:
    """What `prepare` wrote."""

    train_path: Path
    val_path: Path
    meta_path: Path
    train_rows: int
    val_rows: int
    kinds: dict[str, int]  # rows per kind, training and validation together
    duplicates_removed: int
    skipped: list[str]  # bad rows left out with skip_bad, one message each
    files: list[FileReport]
    token_unit: str
    hash: str  # sha256 of the rows without their "source", training then validation
    small_data: bool = False  # nothing held out because the data is small
    redacted: int = 0  # rows whose personal data `redact` replaced


    def render(self) -> str:
        lines = [
            f"Wrote {self.train_rows} training rows to {self.train_path} "
            f"and {self.val_rows} validation rows to {self.val_path}",
            f"  {self.kinds.get(DIALOGUE, 0)} conversations, {self.kinds.get(KNOWLEDGE, 0)} knowledge chunks"
            + (f", {self.kinds[PREFERENCE]} preference rows" if self.kinds.get(PREFERENCE) else "") + " "
            f"from {len(self.files)} files; {self.duplicates_removed} duplicates removed, "
            f"{len(self.skipped)} bad rows skipped",
            f"  hash {self.hash} (details in {self.meta_path})",
        ]
        if self.redacted:
            lines.append(f"  personal data redacted in {self.redacted} rows ([EMAIL], [PHONE], [NATIONAL_ID], ...)")
        if self.small_data:
            lines.append(f"  no row held out for validation: {self.train_rows} rows is small data (at most "
                         f"{SMALL_DATA_ROWS}), every row is trained; training validates on the training rows and "
                         "their rewordings (hold rows out with --val-fraction 0.1)")
        lines += [f"  {f.path}: {note}" for f in self.files for note in f.notes]
        lines += [f"  skipped {message}" for message in self.skipped]
        return "\n".join(lines)


# --- Public functions ------------------------------------------------------------------------------


def inspect(
    paths: Iterable[str | Path | Source] | str | Path | Source,
    tokenizer: Any = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    options: ReadOptions | None = None,
    context: int = DEFAULT_CONTEXT,
    allow: Iterable[str] = (),
) -> Report:
    """Read files and folders and tell what they hold, without writing anything.

    The CLI prints `report.render()`: one line per file (format, kind, rows, turns, tokens, duplicates,
    bad rows with their messages, or why the file can't be read), totals and a length histogram.
    A file that cannot be read is reported, not raised; only a path that does not exist raises DataError.
    `tokenizer` is anything with `encode(text, add_special_tokens=False)`, e.g. a transformers tokenizer;
    without one tokens are estimated from whitespace words and the report says so. `options` (the
    mapping, encoding, ...) apply to every path given as a plain path; a Source carries its own.
    The report ends with the quality report (forja.data.quality): near-duplicate questions, answer lengths,
    languages, personal data (not counting the values in `allow`), conversations over `context` tokens and
    each source's share.
    """
    from forja.data import quality

    count, unit = _token_counter(tokenizer)
    reports: list[FileReport] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path, read in _expand_sources(paths, options):
        try:
            data = _read_file(path, read)
        except DataError as error:
            reports.append(FileReport(str(path), error=str(error)))
            continue
        report, kept = _survey(data, chunk_tokens, count, seen)
        reports.append(report)
        rows += kept
    return Report(reports, unit, chunk_tokens, quality.assess(rows, count, context, reports, allow))


def prepare(
    paths: Iterable[str | Path | Source] | str | Path | Source,
    out: str | Path,
    val_fraction: float | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    tokenizer: Any = None,
    system: str | None = None,
    options: ReadOptions | None = None,
    redact: bool = False,
    allow: Iterable[str] = (),
) -> Summary:
    """Clean files and folders into one training JSONL, a validation JSONL beside it and a meta file.

    Writes OUT (training rows), OUT with suffix .val.jsonl (validation rows) and .meta.json (counts,
    sources, seed, hash). Each row is {"messages": [...], "source": "file:row"} or {"text": ..., "source": ...};
    dialogue and knowledge rows may share the file. Whitespace is normalised, exact duplicates and empty
    system turns dropped; with `system`, each conversation without a system turn gets it first (and the
    meta file records it). The validation rows are, per kind, the val_fraction of rows whose hash with
    `seed` sorts first: the same content and seed always give the same split, whatever the file order.
    `val_fraction` None holds nothing out of small data (at most SMALL_DATA_ROWS rows: a FAQ whose every
    row is an answer to learn) and 0.1 of anything larger; the summary says which.
    Raises DataError (one line, print it as is) on the first bad row unless skip_bad, which leaves such
    rows out and lists them in `summary.skipped`. The CLI prints `summary.render()`. `options` as in `inspect`.
    With `redact`, the personal data the guard's detectors find in every turn and text (but the values in
    `allow`) is replaced by [EMAIL], [PHONE], ... before anything is written.
    """
    out = Path(out)
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be at least 0 and below 1, not {val_fraction}")
    if chunk_tokens < 16:
        raise DataError(f"chunks must allow at least 16 tokens, not {chunk_tokens}")
    if system is not None and not system.strip():
        raise DataError("the system prompt is empty; give one, or leave --system out to keep the chat template's default")
    count, unit = _token_counter(tokenizer)
    # Preparing into a data folder must not read back its own earlier output.
    written = {p.resolve() for p in (out, validation_path(out), meta_path(out))}
    reports: list[FileReport] = []
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for path, read in _expand_sources(paths, options):
        if isinstance(path, Path) and path.resolve() in written:
            continue
        data = _read_file(path, read)
        if data.bad and not skip_bad:
            raise data.bad[0].error()
        skipped += [bad.message for bad in data.bad]
        report, kept = _survey(data, chunk_tokens, count, seen)
        reports.append(report)
        rows += kept
    if not rows:
        raise DataError("no rows to write: " + ("every row was bad" if skipped else "the files are empty"))
    rows = [{**row, "messages": with_system(row["messages"], system)} if "messages" in row
            else {**row, "prompt": with_system(row["prompt"], system)} if "prompt" in row else row for row in rows]
    redacted = 0
    if redact:
        from forja.guard import redact_messages
        from forja.guard import redact as redact_text

        def cleaned_row(row: dict[str, Any]) -> dict[str, Any]:
            if "messages" in row:
                return {**row, "messages": redact_messages(row["messages"], allow)}
            if "prompt" in row:
                return {**row, "prompt": redact_messages(row["prompt"], allow),
                        **{k: redact_text(row[k], allow) for k in ("chosen", "rejected", "completion") if k in row}}
            return {**row, "text": redact_text(row["text"], allow)}

        cleaned = [cleaned_row(row) for row in rows]
        redacted = sum(a != b for a, b in zip(rows, cleaned))
        rows = cleaned

    chosen_split = val_fraction
    if val_fraction is None:
        val_fraction = 0.0 if len(rows) <= SMALL_DATA_ROWS else DEFAULT_VAL_FRACTION
    validation = _validation_rows(rows, val_fraction, seed)
    train = [row for i, row in enumerate(rows) if i not in validation]
    val = [row for i, row in enumerate(rows) if i in validation]
    digest = _content_hash(train, val)
    write_jsonl(out, train)
    write_jsonl(validation_path(out), val)
    kinds = {DIALOGUE: sum("messages" in r for r in rows), KNOWLEDGE: sum("text" in r for r in rows)}
    if any(is_preference(r) for r in rows):
        kinds[PREFERENCE] = sum(is_preference(r) for r in rows)
    summary = Summary(
        train_path=out, val_path=validation_path(out), meta_path=meta_path(out),
        train_rows=len(train), val_rows=len(val), kinds=kinds,
        duplicates_removed=sum(r.duplicates for r in reports), skipped=skipped,
        files=reports, token_unit=unit, hash=digest,
        small_data=chosen_split is None and val_fraction == 0, redacted=redacted,
    )
    meta = {
        "hash": digest,
        "train": {"path": out.name, "rows": len(train)},
        "validation": {"path": validation_path(out).name, "rows": len(val)},
        "kinds": kinds,
        "seed": seed,
        "val_fraction": val_fraction,
        "small_data": summary.small_data,
        "chunk_tokens": chunk_tokens,
        "system": system,
        "tokens": unit,
        "duplicates_removed": summary.duplicates_removed,
        "redacted": redacted if redact else None,
        "skipped": skipped,
        "sources": [
            {"path": r.path, "format": r.format, "kind": r.kind, "rows": r.rows, "training_rows": len(r.lengths),
             **({"read": r.detail} if r.detail else {}), **({"map": r.mapping} if r.mapping else {}),
             **({"notes": r.notes} if r.notes else {})}
            for r in reports
        ],
    }
    meta_path(out).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return summary


def validation_path(out: str | Path) -> Path:
    """Where `prepare` writes the validation rows for OUT: data.jsonl → data.val.jsonl."""
    return Path(out).with_suffix(".val.jsonl")


def meta_path(out: str | Path) -> Path:
    """Where `prepare` writes counts, sources and hash for OUT: data.jsonl → data.meta.json."""
    return Path(out).with_suffix(".meta.json")


# --- Finding and reading files ----------------------------------------------------------------------


def expand_paths(paths: Iterable[str | Path] | str | Path) -> list[Path]:
    """Files named, and every file under folders named, sorted by path so runs are reproducible."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            # Hidden files and Office lock files (~$book.xlsx) are not the user's data.
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith((".", "~$")) for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"{path}: the folder holds no files; {ACCEPTED}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def _expand_sources(
    paths: Iterable[str | Path | Source] | str | Path | Source, options: ReadOptions | None
) -> list[tuple[Path | str, ReadOptions]]:
    """Each file (or "hf:" dataset) to read with its options: folders expanded, plain paths given `options`."""
    if isinstance(paths, (str, Path, Source)):
        paths = [paths]
    found = []
    for item in paths:
        source = item if isinstance(item, Source) else Source(str(item), options or ReadOptions())
        if source.path.startswith("hf:"):  # a Hugging Face dataset, read by forja.data.hub
            found.append((source.path, source.options))
        else:
            found += [(path, source.options) for path in expand_paths(source.path)]
    return found


def _read_file(path: Path | str, options: ReadOptions | None = None) -> _File:
    """Read one file (or "hf:" dataset), detect its format (or map its columns) and turn its rows into
    records; bad rows are collected, not raised."""
    options = options or ReadOptions()
    if isinstance(path, str):
        from forja.data import hub

        return _from_table(path, "Hugging Face dataset", hub.read(path, options), "column", options)  # type: ignore[arg-type]
    suffix = path.suffix.lower()
    container = CONTAINERS.get(suffix)
    if suffix == ".zip":  # iOS exports a WhatsApp chat as a zip of _chat.txt and its media
        from forja.data import chats

        return chats.whatsapp_zip(path, options)
    if container is None:
        raise DataError(f"{path}: unknown file type {suffix or '(no extension)'}; {ACCEPTED}")
    if suffix in BLOCK_DOCUMENTS:
        from forja.data import documents

        if suffix in (".html", ".htm"):
            blocks, detail = documents.read_html(path, options.encoding)
        else:
            blocks, detail = (documents.read_pptx(path) if suffix == ".pptx" else documents.read_epub(path)), ""
        return _File(path, container, DOCUMENT, KNOWLEDGE, *_document(path, documents.blocks_text(blocks)), detail)
    if suffix in (".txt", ".md", ".pdf", ".docx"):
        if suffix in (".pdf", ".docx"):
            text, detail = (_read_pdf(path) if suffix == ".pdf" else _read_docx(path)), ""
        else:
            text, detail = decode(path, path.read_bytes(), options.encoding)
        if suffix == ".txt":
            from forja.data import chats

            if chats.is_whatsapp(text):
                return chats.whatsapp(path, text, options, container, detail)
        if suffix in (".txt", ".md") and _is_transcript(text):
            return _File(path, container, TRANSCRIPT, DIALOGUE, *_transcript(path, text), detail)
        return _File(path, container, DOCUMENT, KNOWLEDGE, *_document(path, text), detail)

    if suffix == ".json":
        from forja.data import chats

        value, detail = _json_value(path, options.encoding)
        if chats.is_telegram(value):
            return chats.telegram(path, value, options, container, detail)
        table = _json_table(path, value, detail)
    else:
        table = _TABLE_READERS[suffix](path, options.encoding)
    return _from_table(path, container, table, "field" if suffix in (".json", ".jsonl") else "column", options)


def _from_table(path: Path, container: str, table: _Table, word: str, options: ReadOptions) -> _File:
    """Records of a table: by its detected format, or by the mapping given or guessed (forja.data.mapping)."""
    if table.columns is None and not any(isinstance(row, _Row) for row in table.rows):
        # Nothing to tell the format from: an empty JSON file, or one whose every line is bad.
        return _File(path, container, "", "", [], [row for row in table.rows if isinstance(row, BadRow)], table.detail)
    mapping, notes, names = dict(options.map), [], {}
    fmt = None if mapping else _detect(path, table, word, guessing=options.guess)
    if fmt is None:  # a mapping given, or --guess where no format matched
        from forja.data import mapping as mapped

        if not mapping:
            mapping, reason = mapped.guess(path, table, word)
            notes.append(f"guessed --map {mapped.map_text(mapping)}: {reason} (give --map to change it)")
        resolved = mapped.resolve_map(path, table, mapping, word)
        if resolved is None:  # the mapped columns are not there, but the file has a format of its own
            fmt = _detect(path, table, word)
            notes.append(f"--map {mapped.map_text(mapping)} not applied: no such {word}s, and the file is {fmt.name}")
            mapping = {}
        else:
            table, names = resolved
            fmt = mapped.mapped_format(mapping)
            if fmt is mapped.CONVERSATION_ROWS:
                records, bad = mapped.turn_rows(path, table, names, word, options)
                return _File(path, container, fmt.name, fmt.kind, records, bad, table.detail,
                             mapped.map_text(mapping), notes)
    records, bad = [], []
    for row in table.rows:
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        try:
            records.append(_record(path, row, fmt, word, names))
        except _Bad as problem:
            bad.append(BadRow(f"{path} {row.label}: {problem}", problem.empty))
    return _File(path, container, fmt.name, fmt.kind, records, bad, table.detail,
                 ",".join(f"{k}={v}" for k, v in mapping.items()), notes)


def sort_by_kind(
    paths: Iterable[str | Path | Source] | str | Path | Source, options: ReadOptions | None = None
) -> tuple[list[dict[str, Any]], list[Path]]:
    """The conversations of the dialogue files among `paths` (training rows {"messages", "source"}), and the
    knowledge files, in order; the first bad row raises, as in `prepare`. `forja data synth` reads its
    inputs so."""
    conversations: list[dict[str, Any]] = []
    documents: list[Path] = []
    for path, read in _expand_sources(paths, options):
        found = _read_file(path, read)
        if found.bad:
            raise found.bad[0].error()
        if found.kind == DIALOGUE:
            conversations += [{"messages": r.messages, "source": r.source} for r in found.records]
        elif found.kind == KNOWLEDGE and isinstance(path, Path):
            documents.append(path)
    return conversations, documents


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a table or JSON file as (label, values), label as in messages ('row 17',
    'sheet "FAQ" row 17'); the first bad row raises. `forja knowledge` indexes each row as a record."""
    suffix = path.suffix.lower()
    if suffix not in _TABLE_READERS:
        raise DataError(f"{path}: not a table or JSON file")
    records = []
    for row in _TABLE_READERS[suffix](path, None).rows:
        if isinstance(row, BadRow):
            raise DataError(row.message)
        records.append((row.label, row.values))
    return records


def read_text(path: Path, encoding: str | None = None) -> str:
    """A text file's content with "\n" line ends, in `encoding` or the one detected (see `decode`)."""
    return decode(path, path.read_bytes(), encoding)[0]


def decode(path: Path, data: bytes, encoding: str | None = None) -> tuple[str, str]:
    """The text of `data` with "\n" line ends, and the name of the encoding read ("UTF-8", "Windows-1252").

    A byte order mark decides first, then UTF-8 (what nearly every tool writes today), then UTF-16 without
    a mark (every other byte zero), then charset-normalizer among the Western single-byte encodings a
    Spanish or English spreadsheet is saved in. Left free, it takes Central European ones for short
    Spanish text (ñ is ń in cp1250), so it only chooses among these."""
    if encoding is not None:
        try:
            codec = codecs.lookup(encoding)
        except LookupError:
            raise DataError(f"{path}: unknown encoding {encoding!r}; give one such as utf-8, cp1252, latin-1 or utf-16") from None
        try:
            text = data.decode(codec.name)
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise DataError(
                f"{path} line {line}: not {encoding} text (byte 0x{data[error.start]:02x}); give the file's encoding "
                "with --encoding, or leave it out to detect it"
            ) from None
        return _lines(text.removeprefix("\ufeff")), ENCODING_NAMES.get(codec.name, codec.name)
    for bom, codec_name, name in BOMS:
        if data.startswith(bom):
            try:
                return _lines(data[len(bom):].decode(codec_name)), name
            except UnicodeDecodeError as error:
                raise DataError(f"{path}: starts as {name} but byte {error.start + len(bom)} is not; save it again "
                                "as UTF-8, or give its encoding with --encoding") from None
    try:
        return _lines(data.decode("utf-8")), "UTF-8"
    except UnicodeDecodeError:
        pass
    zeros_even, zeros_odd = data[0::2].count(0), data[1::2].count(0)
    if len(data) >= 4 and max(zeros_even, zeros_odd) > len(data) / 4:
        codec_name = "utf-16-be" if zeros_even > zeros_odd else "utf-16-le"
        try:
            return _lines(data.decode(codec_name)), ENCODING_NAMES[codec_name]
        except UnicodeDecodeError:
            pass
    import charset_normalizer  # here so that only files that are not UTF-8 pay for loading it

    best = charset_normalizer.from_bytes(data, cp_isolation=list(SINGLE_BYTE_ENCODINGS)).best()
    if best is None or b"\x00" in data:
        raise DataError(f"{path}: cannot tell the text encoding (not UTF-8, UTF-16 or a Western one such as "
                        "Windows-1252; binary?); save it as UTF-8, or give its encoding with --encoding")
    return _lines(str(best)), SINGLE_BYTE_ENCODINGS.get(best.encoding, best.encoding)


def _lines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _sniff(path: Path, text: str, delimiter: str) -> csv.Dialect | type[csv.Dialect]:
    """The dialect of a CSV: the standard sniffer on its first lines, among , ; tab and |; where it cannot
    tell, or picks a separator the header lacks, the one the header holds most of (`delimiter` on a tie)."""
    sample = "\n".join(text.split("\n", CSV_SNIFF_LINES)[:CSV_SNIFF_LINES])
    header = sample.split("\n", 1)[0]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters="".join(CSV_DELIMITERS))
    except csv.Error:
        dialect = None
    if dialect is None or dialect.delimiter not in header:
        best = max(CSV_DELIMITERS, key=lambda d: (header.count(d), d == delimiter))
        chosen = best if header.count(best) else delimiter

        class Counted(csv.excel):
            delimiter = chosen

        return Counted
    # The sniffer says doublequote False when its sample has no "" in it; files escape quotes that way anyway.
    dialect.doublequote = True
    if dialect.quotechar not in "\"'":
        dialect.quotechar = '"'
    return dialect


def _read_csv(path: Path, delimiter: str, encoding: str | None = None) -> _Table:
    """A CSV (its dialect sniffed, `delimiter` preferred on a tie) or, with delimiter tab, a TSV."""
    text, encoding_name = decode(path, path.read_bytes(), encoding)
    # Spreadsheets set to Spanish and other European locales save CSV with semicolons.
    dialect = _sniff(path, text, delimiter) if delimiter != "\t" else csv.excel_tab
    delimiter = dialect.delimiter
    shown = "tab" if delimiter == "\t" else f'"{delimiter}"'
    detail = f"{encoding_name}, {shown}-separated" + (", quoted with '" if dialect.quotechar == "'" else "")
    csv.field_size_limit(2**31 - 1)  # a whole document in a "text" cell outgrows the 128 KiB default
    reader = csv.reader(io.StringIO(text, newline=""), dialect, strict=True)
    start = 1
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: the first line must be the header (the column names)")
        columns = [name.strip().lower() for name in header]
        rows: list[_Row | BadRow] = []
        start = reader.line_num + 1
        for cells in reader:
            # A quoted cell may span lines: the row is numbered by the line it starts on.
            number, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) > len(columns):
                rows.append(BadRow(
                    f"{path} row {number}: {len(cells)} cells but the header has {len(columns)} columns "
                    f"(put cells containing {delimiter!r} in double quotes)"
                ))
                continue
            cells += [""] * (len(columns) - len(cells))
            rows.append(_Row(f"row {number}", str(number), dict(zip(columns, cells))))
    except csv.Error as error:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"{path} row {start}: cannot read as {kind} ({error})") from None
    return _Table(columns, rows, detail)


def _read_jsonl(path: Path, encoding: str | None = None) -> _Table:
    rows: list[_Row | BadRow] = []
    # Split on "\n" only: JSON strings may hold other characters that str.splitlines() breaks on.
    text, encoding_name = decode(path, path.read_bytes(), encoding)
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            rows.append(BadRow(f"{path} row {number}: invalid JSON ({error.msg} at column {error.colno})"))
            continue
        rows.append(_json_row(path, number, value))
    return _Table(None, rows, encoding_name)


def _read_json(path: Path, encoding: str | None = None) -> _Table:
    return _json_table(path, *_json_value(path, encoding))


def _json_value(path: Path, encoding: str | None) -> tuple[Any, str]:
    text, encoding_name = decode(path, path.read_bytes(), encoding)
    try:
        return json.loads(text), encoding_name
    except json.JSONDecodeError as error:
        raise DataError(f"{path} line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None


def _json_table(path: Path, value: Any, encoding_name: str) -> _Table:
    if isinstance(value, dict):
        value = [value]  # a file holding one conversation
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list of objects, found {type(value).__name__}")
    return _Table(None, [_json_row(path, number, item) for number, item in enumerate(value, 1)], encoding_name)


def _json_row(path: Path, number: int, value: Any) -> _Row | BadRow:
    if not isinstance(value, dict):
        return BadRow(f"{path} row {number}: expected an object with fields, found {type(value).__name__}")
    return _Row(f"row {number}", str(number), {str(k).strip().lower(): v for k, v in value.items()})


def _read_xlsx(path: Path) -> _Table:
    import openpyxl  # here rather than at the top so that `forja` starts fast and only Excel files pay for it

    try:
        book = openpyxl.load_workbook(path, data_only=True)
    except Exception as error:  # a damaged file surfaces as zip, XML or key errors alike
        raise DataError(f"{path}: cannot read as an Excel .xlsx workbook ({_reason(error)})") from None
    sheets = []
    for sheet in book.worksheets:
        values = list(sheet.iter_rows(values_only=True))  # from row 1, so index + 1 is the sheet's row number
        top = next((i for i, cells in enumerate(values) if any(_filled(v) for v in cells)), None)
        if top is not None:
            sheets.append((sheet.title, top, values))
    if not sheets:
        raise DataError(f"{path}: the workbook is empty")
    rows: list[_Row | BadRow] = []
    for title, top, values in sheets:
        columns = ["" if v is None else str(v).strip().lower() for v in values[top]]
        for index in range(top + 1, len(values)):
            if not any(_filled(v) for v in values[index]):
                continue
            number = index + 1
            label, ref = (f"row {number}", str(number)) if len(sheets) == 1 else (
                f'sheet "{title}" row {number}', f"{title}!{number}"
            )
            rows.append(_Row(label, ref, dict(zip(columns, values[index]))))
    # Each sheet has its own header: with several, the format is detected from the rows, as in JSON.
    return _Table(columns if len(sheets) == 1 else None, rows)


def _read_parquet(path: Path) -> _Table:
    import pyarrow.parquet  # here so that only Parquet files pay for loading Arrow

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as error:  # Arrow raises its own error types for damaged files
        raise DataError(f"{path}: cannot read as Parquet ({_reason(error)})") from None
    columns = [name.strip().lower() for name in table.column_names]
    rows: list[_Row | BadRow] = [
        _Row(f"row {number}", str(number), dict(zip(columns, record.values())))
        for number, record in enumerate(table.to_pylist(), 1)
    ]
    return _Table(columns, rows)


_TABLE_READERS: dict[str, Callable[[Path, str | None], _Table]] = {
    ".csv": lambda p, e: _read_csv(p, ",", e), ".tsv": lambda p, e: _read_csv(p, "\t", e),
    ".json": lambda p, e: _read_json(p, e), ".jsonl": lambda p, e: _read_jsonl(p, e),
    ".xlsx": lambda p, e: _read_xlsx(p), ".parquet": lambda p, e: _read_parquet(p),
}


def _read_pdf(path: Path) -> str:
    return "\n\n".join(read_pdf_pages(path))


def read_pdf_pages(path: Path) -> list[str]:
    """The text of each page, in order; a page without a text layer is read by OCR when Tesseract is
    installed (data/ocr.py), else gives ""."""
    import pypdf

    from forja.data import ocr

    try:
        pages = [page.extract_text() or "" for page in pypdf.PdfReader(path).pages]
    except Exception as error:  # pypdf raises many error types for damaged or encrypted files
        raise DataError(f"{path}: cannot read as PDF ({_reason(error)})") from None
    scanned = [number for number, text in enumerate(pages) if not text.strip()]
    if scanned and ocr.available():
        try:
            for number, text in ocr.read_pages(path, scanned).items():
                pages[number] = text
        except Exception as error:  # noqa: BLE001 - pdfium or Tesseract refusing a page: say which file
            raise DataError(f"{path}: OCR of its scanned pages failed ({_reason(error)}); FORJA_OCR=off reads "
                            "only its text layer") from None
    return pages


def _read_docx(path: Path) -> str:
    return "\n\n".join(text for _, text in read_docx_blocks(path))


def read_docx_blocks(path: Path) -> list[tuple[int, str]]:
    """Paragraphs and table rows in reading order as (heading level, text); level 0 is body text,
    1-9 Word's "Heading N" styles ("Title" counts as 1)."""
    import docx

    try:
        document = docx.Document(str(path))
    except Exception as error:  # not a zip, or a zip without Word's parts
        raise DataError(f"{path}: cannot read as a Word .docx document ({_reason(error)})") from None
    blocks: list[tuple[int, str]] = []
    for block in document.iter_inner_content():  # paragraphs and tables in reading order
        if isinstance(block, docx.table.Table):
            blocks += [(0, " | ".join(cell.text for cell in row.cells)) for row in block.rows]
        else:
            style = block.style.name if block.style is not None else ""
            heading = re.fullmatch(r"Heading ([1-9])", style)
            blocks.append((int(heading.group(1)) if heading else 1 if style == "Title" else 0, block.text))
    return blocks


def _reason(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _filled(value: Any) -> bool:
    return value is not None and str(value).strip() != ""


# --- Formats and rows --------------------------------------------------------------------------------


def _matching(keys: Iterable[str]) -> list[Format]:
    """The formats whose keys are all there; a format whose keys another match holds too gives way to it
    (prompt+completion+label is KTO's row, not a prompt/completion pair with a stray column)."""
    keys = set(keys)
    found = [f for f in COLUMN_FORMATS if keys.issuperset(f.keys)]
    return [f for f in found if not any(set(f.keys) < set(other.keys) for other in found)]


def _detect(path: Path, table: _Table, word: str, guessing: bool = False) -> Format | None:
    """The one format of a table (by its header) or of a JSON file (by its rows' fields); None where none
    matches and `guessing` (the caller guesses a mapping)."""
    if table.columns is not None:
        candidates = [("header", table.columns)]
    else:
        candidates = [(row.label, list(row.values)) for row in table.rows if isinstance(row, _Row)]
    found: dict[str, tuple[Format, str]] = {}
    for label, keys in candidates:
        matches = _matching(keys)
        if len(matches) > 1:
            names = ", ".join(f.name for f in matches)
            raise DataError(f"{path} {label}: the {word}s fit several formats ({names}); keep the {word}s of one")
        if matches:
            found.setdefault(matches[0].name, (matches[0], label))
    if len(found) > 1:
        (first, where), (second, where_second) = list(found.values())[:2]
        raise DataError(
            f"{path}: mixed formats ({where} is {first.name}, {where_second} is {second.name}); "
            "put each format in its own file"
        )
    if not found:
        if guessing:
            return None
        keys = ", ".join(k for k in _keys(table) if k) or "none"
        from forja.data.mapping import guess, map_text

        try:
            mapping, _ = guess(path, table, word)
            hint = f"try --map {map_text(mapping)} (or --guess to read it so)"
        except DataError:
            hint = f"name yours with --map question={word.upper()},answer={word.upper()}"
        raise DataError(f"{path}: {word}s {keys} match no known format; {hint}; {ACCEPTED}")
    return next(iter(found.values()))[0]


def _keys(table: _Table) -> list[str]:
    """A table's header, or every field found in its JSON rows, in order of appearance."""
    if table.columns is not None:
        return table.columns
    return list(dict.fromkeys(k for row in table.rows if isinstance(row, _Row) for k in row.values))


def _fold(text: str) -> str:
    """Lower case without accents: "Contestación" → "contestacion"."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))


def _record(path: Path, row: _Row, fmt: Format, word: str, names: dict[str, str] | None = None) -> _Record:
    """A row of a known format as a record; `names` are the user's names of mapped fields, for messages."""
    values, names = row.values, names or {}
    source = f"{path}:{row.ref}"
    if isinstance(values.get("source"), str) and values["source"].strip():
        # a row that says where it came from (`forja data synth`, an earlier `prepare`) keeps saying it
        source += f" from {values['source'].strip()}"
    if fmt.kind == KNOWLEDGE:
        return _Record(source, text=_required(values, fmt.keys[0], word, names))
    if fmt.kind == PREFERENCE:
        return _Record(source, preference=_preference(values, fmt, word, names))
    if fmt.name in ("messages", "sharegpt") and fmt.keys[0] not in values:  # a JSON row of other fields
        default = f'{word} "{fmt.keys[0]}"'
        raise _Bad(f"{names.get(fmt.keys[0], default)} is missing")
    if fmt.name == "messages":
        messages = _turns(values["messages"], "messages", "role", "content", ROLES)
    elif fmt.name == "sharegpt":
        messages = _turns(values["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    elif fmt.name == "alpaca":
        prompt = _required(values, "instruction", word)
        extra = _clean(_as_text(values.get("input"), f'{word} "input"'))
        messages = [
            {"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
            {"role": "assistant", "content": _required(values, "output", word)},
        ]
    else:
        ask, answer = fmt.keys
        prompt = _required(values, ask, word, names)
        # A context column (a passage the question is about) comes before the question, as a reader meets it.
        context = _clean(_as_text(values.get("context"), names.get("context", f'{word} "context"')))
        messages = [
            {"role": "user", "content": f"{context}\n\n{prompt}" if context else prompt},
            {"role": "assistant", "content": _required(values, answer, word, names)},
        ]
    system = _clean(_as_text(values.get("system"), names.get("system", f'{word} "system"')))
    if system and messages[0]["role"] != "system":  # a system column: that row's system prompt
        messages.insert(0, {"role": "system", "content": system})
    tools = _tools(values.get("tools")) if fmt.name == "messages" else None
    if tools is None and any(m.get("tool_calls") for m in messages):
        raise _Bad('"tools" is missing: a conversation with tool calls lists its functions in "tools", as '
                   "OpenAI's fine-tuning format does (the model is trained to read them as it is served)")
    return _Record(source, messages=messages, tools=tools)


def _preference(values: dict[str, Any], fmt: Format, word: str, names: dict[str, str]) -> dict[str, Any]:
    """A preference row as {"prompt": messages, "chosen", "rejected"} or {"prompt", "completion", "label"}:
    the prompt a conversation ending with the user's turn (text is one user turn), each answer one text."""
    name = lambda key: names.get(key, f'{word} "{key}"')  # noqa: E731
    if fmt.name == "openai preference":  # {"input": {"messages": [...]}, "preferred_output": [assistant turn]}
        given = _json_cell(values["input"], name("input"))
        if not isinstance(given, dict) or "messages" not in given:
            raise _Bad(f'{name("input")} must be an object with "messages" (OpenAI\'s preference format)')
        if given.get("tools"):
            raise _Bad(f'{name("input")}: "tools" in preference rows are not supported; leave them out')
        prompt = _prompt(given["messages"], "input.messages", f'{word} "input.messages"')
        return {"prompt": prompt, "chosen": _answer(values, "preferred_output", name),
                "rejected": _answer(values, "non_preferred_output", name)}
    prompt = _prompt(values["prompt"], "prompt", name("prompt"))
    if fmt.name == "chosen/rejected":
        row = {"prompt": prompt, "chosen": _answer(values, "chosen", name), "rejected": _answer(values, "rejected", name)}
    else:
        label = values["label"]
        found = LABELS.get(str(label).strip().lower()) if not isinstance(label, bool) else label
        if isinstance(label, float) and label in (0.0, 1.0):  # a spreadsheet's 1 or 0
            found = bool(label)
        if found is None:
            shown = json.dumps(label, ensure_ascii=False) if not isinstance(label, float) else repr(label)
            raise _Bad(f'{name("label")} is {shown}; expected true (a good answer) or false (a bad one)',
                       empty=not _filled(label))
        row = {"prompt": prompt, "completion": _answer(values, "completion", name), "label": found}
    if row.get("chosen") is not None and row["chosen"] == row.get("rejected"):
        raise _Bad(f'{name("chosen")} and {name("rejected")} are the same answer; the pair teaches nothing')
    return row


def _json_cell(value: Any, name: str) -> Any:
    """A list or object, or a table cell holding one as JSON."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise _Bad(f"{name} is not valid JSON") from None
    return value


def _prompt(value: Any, key: str, name: str) -> list[dict[str, Any]]:
    """A preference row's prompt as chat messages ending with the user's turn."""
    value = _json_cell(value, name)
    if not isinstance(value, list):
        text = _clean(_as_text(value, name))
        if not text:
            raise _Bad(f"{name} is empty", empty=True)
        return [{"role": "user", "content": text}]
    return _turns(value, key, "role", "content", ROLES, prompt=True)


def _answer(values: dict[str, Any], key: str, name: Callable[[str], str]) -> str:
    """One answer of a preference row: text, or a list holding one assistant turn (TRL's and OpenAI's shape)."""
    value = _json_cell(values.get(key), name(key))
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role", "assistant") != "assistant":
            raise _Bad(f'{name(key)} must be text or a list of one {{"role": "assistant", "content": ...}} turn')
        value = value[0].get("content")
    text = _clean(_as_text(value, name(key)))
    if not text:
        raise _Bad(f"{name(key)} is empty", empty=True)
    return text


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """A row's "tools" (OpenAI's function specs), checked as the server checks a request's."""
    from forja.chat import ToolFormatError, functions

    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Bad('"tools" is not a JSON list of functions') from None
    if not isinstance(value, list) or not value:
        raise _Bad('"tools" must be a non-empty list of {"type": "function", "function": {...}}')
    try:
        functions(value)
    except ToolFormatError as exc:
        raise _Bad(f'"tools": {exc}') from None
    return value


def _required(values: dict[str, Any], key: str, word: str, names: dict[str, str] | None = None) -> str:
    name = (names or {}).get(key, f'{word} "{key}"')
    if key not in values:
        raise _Bad(f"{name} is missing")
    text = _clean(_as_text(values[key], name))
    if not text:
        raise _Bad(f"{name} is empty", empty=True)
    return text


def _as_text(value: Any, name: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # NaN: an empty Parquet cell
        return ""
    if isinstance(value, (dict, list)):
        raise _Bad(f"{name} is {type(value).__name__}, not text")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # spreadsheets store 12 as 12.0
    return str(value)


def _turns(
    value: Any, name: str, role_key: str, content_key: str, roles: dict[str, str] | Callable[[Any], str | None],
    fold_keys: bool = False, prompt: bool = False,
) -> list[dict[str, str]]:
    """Chat turns checked for a chat template; a `prompt` (of a preference row) ends with the user's turn."""
    if isinstance(value, str):  # a CSV or Excel cell holding the list as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Bad(f'"{name}" is not a JSON list of turns') from None
    if not isinstance(value, list):
        raise _Bad(f'"{name}" must be a list of turns, found {type(value).__name__}')
    messages, labels = [], []
    for number, turn in enumerate(value, 1):
        label = f'"{name}" turn {number}'
        if not isinstance(turn, dict):
            raise _Bad(f'{label} must be an object with "{role_key}" and "{content_key}"')
        if fold_keys:  # mapped keys match whatever their case
            wanted = {_fold(role_key): role_key, _fold(content_key): content_key}
            turn = {wanted.get(_fold(str(k)), k): v for k, v in turn.items()}
        role = roles(turn.get(role_key)) if callable(roles) else roles.get(str(turn.get(role_key, "")).strip().lower())
        if role is None:
            found = json.dumps(turn[role_key], ensure_ascii=False) if role_key in turn else "missing"
            expected = "user, assistant or system (or name the assistant with --assistant)" if callable(roles) else (
                "one of " + ", ".join(roles))
            raise _Bad(f'{label}: "{role_key}" is {found}, expected {expected}')
        content = turn.get(content_key)
        calls = _calls(turn.get("tool_calls"), label) if role == "assistant" and turn.get("tool_calls") else None
        if calls is not None and content in (None, ""):
            content = ""  # an assistant turn that only calls tools
        if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
            if any(not isinstance(p, dict) or p.get("type", "text") != "text" for p in content):
                raise _Bad(f'{label}: "{content_key}" has a part that is not text; only text is supported')
            content = "".join(str(p.get("text", "")) for p in content)
        text = _clean(_as_text(content, f'{label} "{content_key}"'))
        if not text and calls is None:
            if role == "system":
                continue  # an empty system prompt says nothing; drop it rather than refuse the row
            raise _Bad(f'{label}: "{content_key}" is empty', empty=True)
        message: dict[str, Any] = {"role": role, "content": text}
        if calls is not None:
            message["tool_calls"] = calls
        if role == "tool" and turn.get("tool_call_id"):
            message["tool_call_id"] = str(turn["tool_call_id"])
        if "weight" in turn:  # OpenAI's fine-tuning format: weight 0 = context only, not learned
            if role != "assistant" or turn["weight"] not in (0, 1):
                raise _Bad(f'{label}: "weight" must be 0 or 1 and only on assistant turns')
            if turn["weight"] == 0:
                message["weight"] = 0
        messages.append(message)
        labels.append(label)
    if prompt:
        if messages and messages[-1]["role"] != "user":
            raise _Bad(f"{labels[-1]}: a prompt ends with the user's turn, not the {messages[-1]['role']}'s "
                       "(the answers to compare come after it)")
        _check_turns([*messages, {"role": "assistant", "content": "-"}], [*labels, f'"{name}"'], f'"{name}"')
        return messages
    _check_turns(messages, labels, f'"{name}"')
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise _Bad(f'"{name}": every assistant turn has weight 0; the row teaches nothing')
    return messages


def _check_turns(messages: list[dict[str, Any]], labels: list[str], name: str) -> None:
    """Chat templates need an optional system turn, then user and assistant in turn, ending with the assistant;
    an assistant turn that calls tools is followed by their results (`tool` turns, one per call), then the
    assistant again, unless it is the last turn (a step's call to learn)."""
    roles = [m["role"] for m in messages]
    first = 1 if roles[:1] == ["system"] else 0
    if not roles[first:]:
        raise _Bad(f"{name} has no user or assistant turn")
    expected, pending = "user", set()
    for message, label in zip(messages[first:], labels[first:]):
        role = message["role"]
        if role == "tool" and expected == "tool":
            answered = message.get("tool_call_id")
            if answered is not None and answered not in pending:
                raise _Bad(f'{label}: "tool_call_id" {answered!r} answers no call of the assistant turn before it')
            if answered is not None:
                pending.discard(answered)
            else:  # a result without the id of its call answers the next one
                pending.pop()
            expected = "tool" if pending else "assistant"
            continue
        if role != expected:
            raise _Bad(
                f"{label}: {role} turn where the {expected}'s belongs "
                "(turns alternate user, assistant; a system turn may only come first; a tool turn follows the "
                "assistant turn whose call it answers)"
            )
        if role == "assistant" and message.get("tool_calls"):
            pending = {call["id"] for call in message["tool_calls"]}
            expected = "tool"
        else:
            expected = "assistant" if expected == "user" else "user"
    if roles[-1] != "assistant":
        raise _Bad(f"{labels[-1]}: the last turn is the {roles[-1]}'s; it must be the assistant's, which the model "
                   "learns")
    # (it may end with a turn that calls tools, as OpenAI's fine-tuning format allows: the call is learned)


def _calls(value: Any, label: str) -> list[dict[str, Any]]:
    """An assistant turn's `tool_calls` in OpenAI's shape, each with an id and its arguments as a JSON string."""
    if not isinstance(value, list) or not value:
        raise _Bad(f'{label}: "tool_calls" must be a list of calls')
    calls = []
    for number, call in enumerate(value, 1):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise _Bad(f'{label}: tool call {number} needs "function": {{"name", "arguments"}}')
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise _Bad(f'{label}: tool call {number} ({function["name"]}): "arguments" is not JSON') from None
        else:
            parsed = arguments
        if not isinstance(parsed, dict):
            raise _Bad(f'{label}: tool call {number} ({function["name"]}): "arguments" must be a JSON object')
        calls.append({"id": str(call.get("id") or f"call_{number}"), "type": "function",
                      "function": {"name": function["name"], "arguments": json.dumps(parsed, ensure_ascii=False)}})
    return calls


def _is_transcript(text: str) -> bool:
    """A transcript's first line, past blank and "#" lines, is a speaker's turn."""
    for line in text.split("\n"):
        if line.strip() and not line.startswith("#"):
            return SPEAKER_LINE.fullmatch(line.rstrip()) is not None
    return False


def _transcript(path: Path, text: str) -> tuple[list[_Record], list[BadRow]]:
    conversations: list[list[tuple[str, int, list[str]]]] = []
    current: list[tuple[str, int, list[str]]] | None = None
    bad: list[BadRow] = []
    for number, line in enumerate(text.split("\n"), 1):
        speaker = SPEAKER_LINE.fullmatch(line.rstrip())
        if SEPARATOR_LINE.fullmatch(line):
            current = None
        elif speaker:
            if current is None:
                current = []
                conversations.append(current)
            current.append((SPEAKERS[speaker[1].lower()], number, [speaker[2]]))
        elif current:
            current[-1][2].append(line)  # a turn runs on until the next speaker
        elif line.strip() and not line.startswith("#"):
            bad.append(BadRow(
                f'{path} line {number}: text outside a turn; start each turn with "User:" or "Assistant:" '
                '("Usuario:" or "Asistente:")'
            ))
    records = []
    for turns in conversations:
        start = turns[0][1]
        try:
            messages, labels = [], []
            for role, number, lines in turns:
                content = _clean("\n".join(lines))
                if not content:
                    if role == "system":
                        continue
                    raise _Bad(f"line {number}: the {role} turn is empty", empty=True)
                messages.append({"role": role, "content": content})
                labels.append(f"line {number}")
            _check_turns(messages, labels, f"line {start}: the conversation")
        except _Bad as problem:
            bad.append(BadRow(f"{path} {problem}", problem.empty))
            continue
        records.append(_Record(f"{path}:{start}", messages=messages))
    return records, bad


def _document(path: Path, text: str) -> tuple[list[_Record], list[BadRow]]:
    text = _clean(text)
    if not text:
        found = f"{path}: " + (NO_TEXT_LAYER if path.suffix.lower() == ".pdf" else "no text found")
        return [], [BadRow(found, empty=True, unit="files")]
    return [_Record(str(path), text=text)], []


def _clean(text: str) -> str:
    """Normalise Unicode and whitespace: one space inside lines, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text).translate(INVISIBLE).replace("\r\n", "\n").replace("\r", "\n")
    # Runs of spaces inside a line become one; indentation stays, as it means something in lists and code.
    text = re.sub(r"(?<=\S)[^\S\n]+(?=\S)", " ", text)
    text = re.sub(r"[^\S\n]+\n", "\n", text)
    text = re.sub(r"\n(?:[^\S\n]*\n)+", "\n\n", text)
    return text.strip()


# --- Training rows, tokens and chunks ----------------------------------------------------------------


def _token_counter(tokenizer: Any) -> tuple[Callable[[str], int], str]:
    if tokenizer is None:
        return (
            lambda text: math.ceil(len(text.split()) * TOKENS_PER_WORD),
            f"estimated as {TOKENS_PER_WORD:.2f} per whitespace word (no tokenizer given; real counts differ)",
        )
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False)), f"counted with the {name} tokenizer"


def _survey(
    data: _File, chunk_tokens: int, count: Callable[[str], int], seen: set[str]
) -> tuple[FileReport, list[dict[str, Any]]]:
    """A file's report and its training rows, less those already in `seen` (which it extends)."""
    report = FileReport(
        str(data.path), data.container, data.format, data.kind, detail=data.detail, mapping=data.mapping,
        notes=data.notes,
        rows=len(data.records),
        turns=sum(len(r.messages or ()) for r in data.records),
        bad_rows=[b.message for b in data.bad],
        empty_fields=sum(b.empty for b in data.bad),
    )
    kept = []
    for row in _training_rows(data.records, chunk_tokens, count):
        key = _content_key(row)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        kept.append(row)
        report.lengths.append(sum(count(text) for text in row_texts(row)))
    report.chunks = sum("text" in row for row in kept)
    report.tokens = sum(report.lengths)
    return report, kept


def _training_rows(records: list[_Record], chunk_tokens: int, count: Callable[[str], int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for record in records:
        if record.preference is not None:
            rows.append({**record.preference, "source": record.source})
            continue
        if record.messages is not None:
            rows.append({"messages": record.messages, "source": record.source}
                        | ({"tools": record.tools} if record.tools else {}))
            continue
        chunks = _chunk(record.text or "", chunk_tokens, count)
        for number, chunk in enumerate(chunks, 1):
            # "manual.md#2": the second chunk of a document cut in several
            rows.append({"text": chunk, "source": f"{record.source}#{number}" if len(chunks) > 1 else record.source})
    return rows


def _chunk(text: str, limit: int, count: Callable[[str], int]) -> list[str]:
    """Cut text into pieces of at most `limit` tokens, between paragraphs where that keeps pieces at least
    half full, else between sentences or lines, and between words only in a sentence longer than `limit`
    (a single word longer than that stays whole)."""
    if count(text) <= limit:
        return [text]
    # Units are (separator before, text, tokens); a "\n\n" separator starts a paragraph.
    pieces = re.split(r"(\n\n|\n|(?<=[.!?…]) )", text)
    units: list[tuple[str, str, int]] = []
    for separator, piece in zip([""] + pieces[1::2], pieces[0::2]):
        if count(piece) <= limit:
            units.append((separator, piece, count(piece)))
        else:  # a sentence longer than a chunk: cut it between words
            words = piece.split(" ")
            units += [(separator if i == 0 else " ", w, count(w)) for i, w in enumerate(words)]

    def size(part: list[tuple[str, str, int]]) -> int:
        return sum(u[2] for u in part) + len(part) - 1  # a token per separator errs on the safe side

    chunks: list[str] = []
    current: list[tuple[str, str, int]] = []
    for unit in units:
        if current and size(current + [unit]) > limit:
            paragraph_starts = [k for k in range(1, len(current)) if current[k][0] == "\n\n"]
            cut = next(
                (k for k in reversed(paragraph_starts)
                 if size(current[:k]) >= limit // 2 and size(current[k:] + [unit]) <= limit),
                None,
            )
            if cut is not None:  # end at the author's paragraph break
                chunks.append(_join(current[:cut]))
                current = current[cut:]
            else:  # end between sentences and repeat the last few in the next chunk
                chunks.append(_join(current))
                carry: list[tuple[str, str, int]] = []
                for previous in reversed(current):
                    if size([previous] + carry) > limit * CHUNK_OVERLAP:
                        break
                    carry.insert(0, previous)
                while carry and size(carry + [unit]) > limit:
                    carry.pop(0)
                current = carry
        current.append(unit)
    chunks.append(_join(current))
    return chunks


def _join(units: list[tuple[str, str, int]]) -> str:
    return units[0][1] + "".join(separator + piece for separator, piece, _ in units[1:])


# --- Split, hash and output --------------------------------------------------------------------------


def _content_key(row: dict[str, Any]) -> str:
    """The row as canonical JSON without its "source": what duplicates, the split and the hash look at."""
    return json.dumps({k: v for k, v in row.items() if k != "source"}, ensure_ascii=False, sort_keys=True)


def _validation_rows(rows: list[dict[str, Any]], val_fraction: float, seed: int) -> set[int]:
    """Indices of validation rows: per kind, the share whose hash with the seed sorts first.

    Hashing content rather than shuffling positions keeps a row on the same side when files are
    reordered or rows added, so validation losses stay comparable between runs."""
    chosen: set[int] = set()
    for key in ("messages", "text", "chosen", "label"):
        indices = [i for i, row in enumerate(rows) if key in row]
        ranked = sorted(indices, key=lambda i: hashlib.sha256(f"{seed}\n{_content_key(rows[i])}".encode()).digest())
        chosen.update(ranked[: round(len(indices) * val_fraction)])
    return chosen


def _content_hash(train: list[dict[str, Any]], val: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for split, rows in (("train", train), ("validation", val)):
        for row in rows:
            digest.update(f"{split}\t{_content_key(row)}\n".encode())
    return digest.hexdigest()


def row_texts(row: dict[str, Any]) -> list[str]:
    """Every text a training row holds: its turns, its text, or a preference row's prompt and answers."""
    if "text" in row:
        return [row["text"]]
    turns = [m["content"] for m in row.get("messages") or row.get("prompt") or []]
    return turns + [row[key] for key in ("chosen", "rejected", "completion") if key in row]


def is_preference(row: dict[str, Any]) -> bool:
    """A preference row (a pair, or one rated answer) rather than a conversation or a text."""
    return "prompt" in row and ("chosen" in row or "label" in row)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL written by `prepare` or `write_jsonl`; none when the file is missing."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line, UTF-8 (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
