"""A multipart/form-data body read as it arrives: text fields into memory (small), the one file part
straight to disk, stopped with a 413 the moment it passes the limit. Starlette's own form parser needs
python-multipart and reads the whole body (to a spooled temp file) before a route sees a byte of it."""

from __future__ import annotations

import re
from urllib.parse import unquote
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from fastapi import Request
from starlette.requests import ClientDisconnect

from forja.serve.deps import ApiError

MAX_FIELD_BYTES = 64 * 1024  # a text field (purpose)
MAX_HEADER_BYTES = 16 * 1024  # the headers of one part
MAX_PARTS = 16
MAX_DRAIN_BYTES = 4 * 1024 * 1024  # what is read past a file over the limit before the connection is dropped
BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,200})"|([^\s;,]{1,200}))', re.IGNORECASE)
PARAM = re.compile(r'''(?:^|;)\s*(name|filename\*?)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))''', re.IGNORECASE)
EXTENDED = re.compile(r"([\w!#$%&+^`{}~-]+)'[^']*'(.*)")  # RFC 5987: UTF-8''na%C3%AFve.md


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
    if not content_type.lower().startswith("multipart/form-data"):
        raise bad_form(f"the body is {content_type.split(';')[0] or 'not typed'}, not multipart/form-data")
    match = BOUNDARY.search(content_type)
    if match is None:
        raise bad_form("the content-type names no multipart boundary")
    too_big = ApiError(413, f"the file is larger than {max_bytes} bytes ({limit_name})", param=file_field,
                       code="file_too_large")
    parser = _Parser(("--" + (match.group(1) or match.group(2))).encode("latin-1"), file_field, destination,
                     max_bytes, too_big)
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
        parser.close()
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


class _Parser:
    """preamble → (headers → body)* → epilogue, fed in chunks of any size."""

    def __init__(self, boundary: bytes, file_field: str, destination: Callable[[str], Path], max_bytes: int,
                 too_big: ApiError):
        self.delimiter = b"\r\n" + boundary  # what ends a part's body
        self.buffer = b"\r\n"  # so the first boundary, at the very start, reads as a delimiter too
        self.state = "preamble"
        self.file_field, self.destination, self.max_bytes, self.too_big = file_field, destination, max_bytes, too_big
        self.upload = Upload()
        self.parts = 0
        self.name: str | None = None
        self.value = bytearray()
        self.stream: BinaryIO | None = None

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while self._step():
            pass

    def _step(self) -> bool:
        """Move on as far as the buffer allows; False when it needs more bytes."""
        if self.state == "preamble":
            at = self.buffer.find(self.delimiter)
            if at < 0:
                self.buffer = self.buffer[-len(self.delimiter):]
                return False
            self.buffer = self.buffer[at + len(self.delimiter):]
            self.state = "after-delimiter"
            return True
        if self.state == "after-delimiter":
            if len(self.buffer) < 2:
                return False
            if self.buffer.startswith(b"--"):
                self.state, self.buffer = "epilogue", b""
                return False
            end = self.buffer.find(b"\r\n")  # transport padding may sit before the line break
            if end < 0:
                if len(self.buffer) > 256:
                    raise bad_form("a multipart boundary line does not end")
                return False
            if self.buffer[:end].strip(b" \t"):
                raise bad_form("a multipart boundary is followed by something other than a line break")
            self.buffer = self.buffer[end + 2:]
            self.state = "headers"
            return True
        if self.state == "headers":
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEADER_BYTES:
                    raise bad_form(f"the headers of a form part are longer than {MAX_HEADER_BYTES} bytes")
                return False
            self._begin(self.buffer[:end])
            self.buffer = self.buffer[end + 4:]
            self.state = "body"
            return True
        if self.state == "body":
            at = self.buffer.find(self.delimiter)
            if at < 0:
                keep = len(self.delimiter) - 1  # the start of a delimiter split across two chunks
                if len(self.buffer) > keep:
                    self._data(self.buffer[:-keep])
                    self.buffer = self.buffer[-keep:]
                return False
            self._data(self.buffer[:at])
            self._end()
            self.buffer = self.buffer[at + len(self.delimiter):]
            self.state = "after-delimiter"
            return True
        self.buffer = b""  # the epilogue is ignored
        return False

    def _begin(self, raw: bytes) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise bad_form(f"the form has more than {MAX_PARTS} parts")
        disposition = ""
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value
        kind, _, params = disposition.strip().partition(";")
        if kind.strip().lower() != "form-data":
            raise bad_form("a form part has no Content-Disposition: form-data header")
        found = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                 for m in PARAM.finditer(";" + params)}
        self.name = found.get("name")
        if not self.name:
            raise bad_form("a form part has no name")
        if self.name == self.file_field:
            if self.upload.path is not None:
                raise bad_form(f"the form has more than one {self.file_field!r} part")
            filename = found.get("filename")
            extended = EXTENDED.fullmatch(found.get("filename*") or "")
            if extended:  # filename*= wins over filename= (RFC 7578 clients send both)
                latin = extended.group(1).lower() in ("iso-8859-1", "latin-1")  # the one other charset RFC 5987 names
                filename = unquote(extended.group(2), encoding="latin-1" if latin else "utf-8", errors="replace")
            if filename is None:
                raise bad_form(f"the {self.file_field!r} part is not a file (it has no filename)")
            self.upload.file_field, self.upload.filename = self.name, filename.replace('\\"', '"')
            self.upload.path = self.destination(self.upload.filename)
            self.upload.path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = self.upload.path.open("wb")
        else:
            self.value = bytearray()

    def _data(self, data: bytes) -> None:
        if not data:
            return
        if self.stream is not None:
            self.upload.size += len(data)
            if self.upload.size > self.max_bytes:
                raise self.too_big
            self.stream.write(data)
        else:
            self.value += data
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

    def finish(self) -> None:
        if self.state != "epilogue":
            raise bad_form("the multipart body ends before its closing boundary")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
