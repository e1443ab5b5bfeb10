"""A multipart/form-data body read as it arrives: text fields into memory (small), the one file part
straight to disk, stopped with a 413 the moment it passes the limit. The body is split by python-multipart's
streaming MultipartParser (the parser Starlette's own form reading uses): its callbacks hand over each part's
bytes as they arrive, so the file is written as it comes and refused at the limit. Starlette's `request.form()`
would read the whole body (to a spooled temp file) before a route sees a byte of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from pathlib import Path
from typing import BinaryIO, Callable

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from python_multipart.exceptions import FormParserError
from starlette.requests import ClientDisconnect

from forja.serve.deps import ApiError

MAX_FIELD_BYTES = 64 * 1024  # a text field (purpose)
MAX_HEADER_BYTES = 16 * 1024  # the headers of one part
MAX_HEADER_COUNT = 64  # headers in one part (a client sends two: Content-Disposition and Content-Type)
MAX_PARTS = 16
MAX_DRAIN_BYTES = 4 * 1024 * 1024  # what is read past a file over the limit before the connection is dropped


@dataclass
class Upload:
    """What a form carried: its text fields, and the file part (its name as sent, where it was written, size)."""

    fields: dict[str, str] = field(default_factory=dict)
    file_field: str | None = None
    filename: str | None = None
    path: Path | None = None
    size: int = 0


def bad_form(message: str) -> ApiError:
    return ApiError(400, f"{message} (send multipart/form-data with the fields purpose and file, as the openai "
                    "client's files.create does)", code="invalid_form")


async def read_upload(request: Request, file_field: str, destination: Callable[[str], Path], max_bytes: int,
                      limit_name: str) -> Upload:
    """Read a multipart body; the part named `file_field` is written to `destination(filename)` (a path
    whose folder this creates). More than `max_bytes` in it → 413 naming `limit_name`."""
    content_type = request.headers.get("content-type", "")
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise bad_form(f"the body is {content_type.split(';')[0] or 'not typed'}, not multipart/form-data")
    boundary = options.get(b"boundary")
    if not boundary:
        raise bad_form("the content-type names no multipart boundary")
    too_big = ApiError(413, f"the file is larger than {max_bytes} bytes ({limit_name})", param=file_field,
                       code="file_too_large")
    parser = _Parser(boundary, file_field, destination, max_bytes, too_big)
    try:
        async for chunk in request.stream():
            parser.feed(chunk)
        parser.finish()
    except ClientDisconnect:
        raise bad_form("the client went away before the body ended") from None
    except ApiError as error:
        if error.status == 413:
            await _drain(request)
        raise
    finally:
        parser.close()  # a file left half-written is removed by the caller (files.discard of its folder)
    return parser.upload


async def _drain(request: Request) -> None:
    """Read (and drop) some more of a body that is refused, so the client gets to read the answer."""
    drained = 0
    try:
        async for chunk in request.stream():
            drained += len(chunk)
            if drained > MAX_DRAIN_BYTES:
                return
    except (RuntimeError, ClientDisconnect):  # the body had ended, or the client gave up
        return


def _text(value: bytes | None) -> str | None:
    """A Content-Disposition parameter: parse_options_header reads the header as Latin-1, so the bytes come
    back as sent; clients (httpx, browsers) send non-ASCII names as raw UTF-8."""
    return None if value is None else value.decode("utf-8", "replace")


def _extended_filename(disposition: bytes) -> str | None:
    """filename*= (RFC 5987/2231: UTF-8''na%C3%AFve.md, Latin-1 or any charset Python knows, continuations
    too), read with the standard library's email parameters. python-multipart drops it, as RFC 7578 asks of
    form-data, but some clients still send it (urllib3 1.x sent only it); with both, filename*= wins."""
    if b"filename*" not in disposition.lower():
        return None
    header = Message()
    header["content-disposition"] = disposition.decode("latin-1")
    for key, value in header.get_params(failobj=[], header="content-disposition")[1:]:
        if key == "filename" and isinstance(value, tuple) and value[0]:  # (charset, language, text)
            return collapse_rfc2231_value(value, errors="replace")
    return None


class _Parser:
    """python-multipart's MultipartParser, its callbacks keeping the text fields and writing the file part."""

    def __init__(self, boundary: bytes, file_field: str, destination: Callable[[str], Path], max_bytes: int,
                 too_big: ApiError):
        self.file_field, self.destination, self.max_bytes, self.too_big = file_field, destination, max_bytes, too_big
        self.upload = Upload()
        self.parts = 0
        self.ended = False
        self.name: str | None = None
        self.value = bytearray()
        self.stream: BinaryIO | None = None
        self.headers: dict[bytes, bytes] = {}
        self.header_field, self.header_value = bytearray(), bytearray()
        self.header_bytes = 0
        try:
            self.parser = MultipartParser(boundary, {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._begin,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_end": self._ended,
            }, max_header_count=MAX_HEADER_COUNT, max_header_size=MAX_HEADER_BYTES)
        except FormParserError as error:  # a boundary longer than 256 bytes
            raise bad_form(f"the multipart boundary is not usable: {error}") from None

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError as error:  # what the callbacks raise (ApiError) goes through as it is
            raise bad_form(f"the multipart body is malformed: {error}") from None

    def finish(self) -> None:
        self.parser.finalize()  # checks nothing (python-multipart 0.0.34): whether it ended is on_end's
        if not self.ended:
            raise bad_form("the multipart body ends before its closing boundary")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    # ---------------------------------------------------------------------------------------- callbacks

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise bad_form(f"the form has more than {MAX_PARTS} parts")
        self.headers, self.header_bytes, self.name = {}, 0, None

    def _count_header(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > MAX_HEADER_BYTES:
            raise bad_form(f"the headers of a form part are longer than {MAX_HEADER_BYTES} bytes")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_value += data[start:end]

    def _header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field, self.header_value = bytearray(), bytearray()

    def _begin(self) -> None:
        disposition = self.headers.get(b"content-disposition", b"")
        kind, params = parse_options_header(disposition)
        if kind != b"form-data":
            raise bad_form("a form part has no Content-Disposition: form-data header")
        self.name = _text(params.get(b"name"))
        if not self.name:
            raise bad_form("a form part has no name")
        if self.name == self.file_field:
            if self.upload.path is not None:
                raise bad_form(f"the form has more than one {self.file_field!r} part")
            filename = _extended_filename(disposition) or _text(params.get(b"filename"))
            if filename is None:
                raise bad_form(f"the {self.file_field!r} part is not a file (it has no filename)")
            self.upload.file_field, self.upload.filename = self.name, filename
            self.upload.path = self.destination(filename)
            self.upload.path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = self.upload.path.open("wb")
        else:
            self.value = bytearray()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if start >= end:
            return
        if self.stream is not None:
            self.upload.size += end - start
            if self.upload.size > self.max_bytes:
                raise self.too_big
            self.stream.write(memoryview(data)[start:end])
        else:
            self.value += data[start:end]
            if len(self.value) > MAX_FIELD_BYTES:
                raise bad_form(f"the form field {self.name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        elif self.name is not None:
            try:
                self.upload.fields[self.name] = bytes(self.value).decode("utf-8")
            except UnicodeDecodeError:
                raise bad_form(f"the form field {self.name!r} is not UTF-8 text") from None

    def _ended(self) -> None:
        self.ended = True
