"""`/v1/files` as OpenAI has it: upload (multipart, purpose fine-tune | batch | assistants | evals), list, retrieve,
content, delete. An upload is written to disk as it arrives (at most files.max_bytes), checked with forja's
readers for its purpose (a fine-tune file as `forja data inspect` reads it) and kept under FORJA_HOME/files.
With API keys configured, every route needs a key with the `train` scope; a client sees its own files (an
admin key everyone's)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from forja import files
from forja.knowledge import vector_stores
from forja.serve.deps import ApiError, Caller, StateDep, ServerState, TrainKeyDep
from forja.serve.schemas_files import MAX_PAGE, FileDeleted, FileList, FileObject, cursor_page, responses
from forja.serve.uploads import read_upload
from forja.store import Store

# The form's own bytes around the file (boundaries, part headers, the purpose field): a body this much
# longer than files.max_bytes is refused before a byte of it is read.
MULTIPART_SLACK = 64 * 1024

router = APIRouter(prefix="/v1", tags=["files"])

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "The file, with its filename"},
                   "purpose": {"type": "string", "enum": list(files.PURPOSES)}}}}}}}


def store_of(state: ServerState) -> Store:
    if state.store is None:
        raise ApiError(409, "this server has no database, so it keeps no files", code="no_database")
    return state.store


def file_object(stored: files.StoredFile) -> FileObject:
    return FileObject(id=stored.id, bytes=stored.bytes, created_at=int(stored.created_at), filename=stored.filename,
                      purpose=stored.purpose)


@router.post("/files", openapi_extra=UPLOAD_BODY, responses=responses(400, 401, 403, 409, 413))
async def upload_file(request: Request, state: StateDep, caller: TrainKeyDep) -> FileObject:
    """Upload a file (multipart: `file`, `purpose`); a file its purpose cannot use is refused naming the
    row and field."""
    settings, store = state.settings, store_of(state)
    limit = settings.files.max_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + MULTIPART_SLACK:
        raise ApiError(413, f"the file is larger than {limit} bytes (files.max_bytes)", param="file",
                       code="file_too_large")
    await asyncio.to_thread(files.sweep_incoming, settings)
    file_id = files.new_file_id()
    try:
        upload = await read_upload(request, "file", lambda name: files.incoming_dir(settings, file_id) /
                                   files.safe_filename(name), limit, "files.max_bytes")
        purpose = upload.fields.get("purpose")
        if not purpose:
            raise ApiError(400, f"purpose is missing: send one of {', '.join(files.PURPOSES)}", param="purpose",
                           code="missing_required_parameter")
        if purpose not in files.PURPOSES:
            raise ApiError(400, f"purpose: {purpose!r} is not one of {', '.join(files.PURPOSES)}", param="purpose",
                           code="invalid_value")
        if upload.path is None or upload.filename is None:
            raise ApiError(400, "file is missing: send the file as the form part named 'file'", param="file",
                           code="missing_required_parameter")
        filename = files.safe_filename(upload.filename)  # "C:\\docs\\faq.csv" and "../faq.csv" are "faq.csv"
        await asyncio.to_thread(files.check, upload.path, purpose, filename)
        stored = await asyncio.to_thread(files.keep, settings, store, file_id, filename, purpose, caller.name)
    except files.FileError as exc:
        raise ApiError(400, str(exc), param="file", code="invalid_file") from None
    finally:
        await asyncio.to_thread(files.discard, settings, file_id)
    return file_object(stored)


@router.get("/files", responses=responses(400, 401, 403, 409, 422))
async def list_files(state: StateDep, caller: TrainKeyDep,
                     purpose: str | None = Query(None, description="Only files of this purpose."),
                     after: str | None = Query(None, description="The id of the last file of the page before."),
                     limit: int = Query(MAX_PAGE, ge=1, le=10_000),
                     order: Literal["asc", "desc"] = Query("desc", description="By creation time.")) -> FileList:
    stored = await asyncio.to_thread(files.listing, store_of(state), purpose, caller.name, caller.admin)
    page, more = cursor_page(stored, [f.id for f in stored], after, limit, order)
    data = [file_object(f) for f in page]
    return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                    has_more=more)


@router.get("/files/{file_id}", responses=responses(401, 403, 404, 409, 422))
async def retrieve_file(file_id: str, state: StateDep, caller: TrainKeyDep) -> FileObject:
    return file_object(await asyncio.to_thread(found, state, file_id, caller))


@router.get("/files/{file_id}/content", response_class=FileResponse, responses={
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "description": "The file's bytes, as uploaded"}, **responses(401, 403, 404, 409, 422)})
async def file_content(file_id: str, state: StateDep, caller: TrainKeyDep) -> FileResponse:
    stored = await asyncio.to_thread(found, state, file_id, caller)
    path = files.path_of(state.settings, stored)
    if not path.is_file():
        raise ApiError(404, f"the bytes of file {file_id!r} are no longer in {state.settings.files_dir.name}/; "
                       "upload it again", param="file_id", code="file_not_found")
    return FileResponse(path, media_type="application/octet-stream", filename=stored.filename)


@router.delete("/files/{file_id}", responses=responses(401, 403, 404, 409, 422))
async def delete_file(file_id: str, state: StateDep, caller: TrainKeyDep) -> FileDeleted:
    """Delete the file and take it out of every vector store."""
    await asyncio.to_thread(found, state, file_id, caller)
    try:
        await asyncio.to_thread(vector_stores.delete_upload, state.settings, store_of(state), file_id)
    except files.UnknownFile as exc:
        raise ApiError(404, str(exc), param="file_id", code="file_not_found") from None
    return FileDeleted(id=file_id)


def found(state: ServerState, file_id: str, caller: Caller | None = None, param: str = "file_id",
          status: int = 404) -> files.StoredFile:
    """The file, when this caller may see it (another client's file is answered as one that does not exist)."""
    try:
        stored = files.get(store_of(state), file_id)
        if caller is not None and not caller.owns(stored.owner):
            raise files.UnknownFile(f"no file with id {file_id!r} (GET /v1/files lists them)")
        return stored
    except files.UnknownFile as exc:
        named = str(exc) if param == "file_id" else f"{param}: {exc}"
        raise ApiError(status, named, param=param, code="file_not_found") from None
