"""`/v1/vector_stores` as OpenAI has it, over knowledge collections (forja.knowledge.vector_stores): create,
list, retrieve, rename, delete; attach an uploaded file, or a batch of them (indexed in the background: poll
them, as the openai client's create_and_poll and upload_and_poll do), list, retrieve, detach; search.
With API keys configured, every route needs an admin key."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query, Response

from forja import files
from forja.config import ForjaError
from forja.knowledge import vector_stores
from forja.knowledge.vector_stores import FileBatch, StoreFile, VectorStore
from forja.serve.deps import ApiError, MonitorKeyDep, StateDep
from forja.serve.routes.files import store_of
from forja.serve.schemas_files import (AUTO_CHUNKING, MAX_PAGE, FileBatchCreate, FileBatchObject, FileContentPage,
                                       FileCounts, LastError, SearchContent, SearchPage, SearchRequest, SearchResult,
                                       VectorStoreCreate, VectorStoreDeleted, VectorStoreFileCreate,
                                       VectorStoreFileDeleted, VectorStoreFileList, VectorStoreFileObject,
                                       VectorStoreFileUpdate, VectorStoreList, VectorStoreObject, VectorStoreUpdate,
                                       check_unsupported, cursor_page, responses)

POLL_AFTER_MS = "250"  # the openai client's pollers wait this long between looks at a file in progress
DEFAULT_PAGE = 20

router = APIRouter(prefix="/v1/vector_stores", tags=["vector stores"])


def vector_store_object(found: VectorStore) -> VectorStoreObject:
    return VectorStoreObject(id=found.id, created_at=int(found.created_at), name=found.name, usage_bytes=found.bytes,
                             file_counts=FileCounts(**found.counts()), status=found.status,
                             last_active_at=int(found.last_active_at))


def file_object(found: StoreFile) -> VectorStoreFileObject:
    return VectorStoreFileObject(id=found.id, created_at=int(found.created_at),
                                 vector_store_id=vector_stores.ID_PREFIX + found.collection, status=found.status,
                                 usage_bytes=found.bytes, attributes=found.attributes,
                                 last_error=LastError(**found.last_error) if found.last_error else None)


def batch_object(found: FileBatch) -> FileBatchObject:
    return FileBatchObject(id=found.id, created_at=int(found.created_at),
                           vector_store_id=vector_stores.ID_PREFIX + found.collection, status=found.status,
                           file_counts=FileCounts(**found.counts()))


def file_page(found: list[StoreFile], after: str | None, limit: int, order: str,
              status: str | None) -> VectorStoreFileList:
    found = [f for f in found if status is None or f.status == status]
    page, more = cursor_page(found, [f.id for f in found], after, limit, order)
    data = [file_object(f) for f in page]
    return VectorStoreFileList(data=data, first_id=data[0].id if data else None,
                               last_id=data[-1].id if data else None, has_more=more)


async def run(function, *args):
    """A call into the knowledge and file stores off the event loop, its errors as API errors."""
    try:
        return await asyncio.to_thread(function, *args)
    except vector_stores.UnknownVectorStore as exc:
        raise ApiError(404, str(exc), param="vector_store_id", code="vector_store_not_found") from None
    except vector_stores.UnknownFileBatch as exc:
        raise ApiError(404, str(exc), param="batch_id", code="file_batch_not_found") from None
    except vector_stores.UnknownVectorStoreFile as exc:
        raise ApiError(404, str(exc), param="file_id", code="file_not_found") from None
    except files.UnknownFile as exc:
        raise ApiError(404, str(exc), param="file_id", code="file_not_found") from None
    except vector_stores.VectorStoreBusy as exc:
        raise ApiError(409, str(exc), code="vector_store_busy") from None
    except vector_stores.VectorStoreExists as exc:
        raise ApiError(409, str(exc), param="name", code="vector_store_exists") from None
    except files.FileError as exc:
        raise ApiError(400, str(exc), param="file_id", code="invalid_file") from None
    except vector_stores.BadName as exc:
        raise ApiError(400, str(exc), param="name", code="invalid_value") from None
    except ForjaError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None


@router.post("", responses=responses(400, 401, 403, 404, 409, 413, 422))
async def create_vector_store(body: VectorStoreCreate, state: StateDep, _: MonitorKeyDep) -> VectorStoreObject:
    """A new collection, with `file_ids` indexed into it in the background."""
    check_unsupported(body, metadata=(None, {}), expires_after=(None,), chunking_strategy=AUTO_CHUNKING)
    for position, file_id in enumerate(body.file_ids):
        try:
            await asyncio.to_thread(vector_stores.attachable, state.settings, store_of(state), file_id)
        except files.UnknownFile as exc:
            raise ApiError(404, str(exc), param=f"file_ids.{position}", code="file_not_found") from None
        except files.FileError as exc:
            raise ApiError(400, str(exc), param=f"file_ids.{position}", code="invalid_file") from None
    return vector_store_object(await run(vector_stores.create, state.settings, store_of(state), body.name,
                                         body.file_ids))


@router.get("", responses=responses(400, 401, 403, 409, 422))
async def list_vector_stores(state: StateDep, _: MonitorKeyDep,
                             after: str | None = Query(None, description="The id of the last store of the page "
                                                       "before."),
                             limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
                             order: Literal["asc", "desc"] = Query("desc", description="By creation time.")
                             ) -> VectorStoreList:
    """Every knowledge collection, made here or with forja knowledge add."""
    found = await run(vector_stores.stores, state.settings, store_of(state))
    page, more = cursor_page(found, [v.id for v in found], after, limit, order)
    data = [vector_store_object(v) for v in page]
    return VectorStoreList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                           has_more=more)


@router.get("/{vector_store_id}", responses=responses(401, 403, 404, 409, 422))
async def retrieve_vector_store(vector_store_id: str, state: StateDep, _: MonitorKeyDep) -> VectorStoreObject:
    return vector_store_object(await run(vector_stores.get, state.settings, store_of(state), vector_store_id))


@router.post("/{vector_store_id}", responses=responses(400, 401, 403, 404, 409, 413, 422))
async def modify_vector_store(vector_store_id: str, body: VectorStoreUpdate, state: StateDep,
                              _: MonitorKeyDep) -> VectorStoreObject:
    """Rename: the collection takes the new name, and the id becomes vs_<new name>."""
    check_unsupported(body, metadata=(None, {}), expires_after=(None,))
    settings, store = state.settings, store_of(state)
    if body.name is None:
        return vector_store_object(await run(vector_stores.get, settings, store, vector_store_id))
    return vector_store_object(await run(vector_stores.rename, settings, store, vector_store_id, body.name))


@router.delete("/{vector_store_id}", responses=responses(401, 403, 404, 409, 422))
async def delete_vector_store(vector_store_id: str, state: StateDep, _: MonitorKeyDep) -> VectorStoreDeleted:
    """The collection and its chunks; uploaded files stay in /v1/files."""
    await run(vector_stores.delete, state.settings, store_of(state), vector_store_id)
    return VectorStoreDeleted(id=vector_store_id)


@router.post("/{vector_store_id}/files", responses=responses(400, 401, 403, 404, 409, 413, 422))
async def attach_file(vector_store_id: str, body: VectorStoreFileCreate, response: Response, state: StateDep,
                      _: MonitorKeyDep) -> VectorStoreFileObject:
    """Index an uploaded file into the collection, in the background: poll GET …/files/{file_id}."""
    check_unsupported(body, chunking_strategy=AUTO_CHUNKING)
    found = await run(vector_stores.attach, state.settings, store_of(state), vector_store_id, body.file_id,
                      body.attributes)
    response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return file_object(found)


@router.get("/{vector_store_id}/files", responses=responses(400, 401, 403, 404, 409, 422))
async def list_files(vector_store_id: str, state: StateDep, _: MonitorKeyDep,
                     after: str | None = Query(None, description="The id of the last file of the page before."),
                     limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
                     order: Literal["asc", "desc"] = Query("desc", description="By creation time."),
                     filter: Literal["in_progress", "completed", "failed", "cancelled"] | None = Query(
                         None, description="Only files with this status.")) -> VectorStoreFileList:
    found = await run(vector_stores.get, state.settings, store_of(state), vector_store_id)
    return file_page(found.files, after, limit, order, filter)


@router.get("/{vector_store_id}/files/{file_id}", responses=responses(401, 403, 404, 409, 422))
async def retrieve_file(vector_store_id: str, file_id: str, response: Response, state: StateDep,
                        _: MonitorKeyDep) -> VectorStoreFileObject:
    found = await run(vector_stores.store_file, state.settings, store_of(state), vector_store_id, file_id)
    if found.status == "in_progress":
        response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return file_object(found)


@router.get("/{vector_store_id}/files/{file_id}/content", responses=responses(400, 401, 403, 404, 409, 422))
async def file_content(vector_store_id: str, file_id: str, state: StateDep, _: MonitorKeyDep) -> FileContentPage:
    """The text forja read from the file: the attributes start and end of its search results index into it."""
    text = await run(vector_stores.content, state.settings, store_of(state), vector_store_id, file_id)
    return FileContentPage(data=[SearchContent(text=text)])


@router.post("/{vector_store_id}/files/{file_id}", responses=responses(400, 401, 403, 404, 409, 413, 422))
async def update_file(vector_store_id: str, file_id: str, body: VectorStoreFileUpdate, state: StateDep,
                      _: MonitorKeyDep) -> VectorStoreFileObject:
    """Replace the file's attributes (returned with every search result from it)."""
    return file_object(await run(vector_stores.set_attributes, state.settings, store_of(state), vector_store_id,
                                 file_id, body.attributes or {}))


@router.delete("/{vector_store_id}/files/{file_id}", responses=responses(401, 403, 404, 409, 422))
async def detach_file(vector_store_id: str, file_id: str, state: StateDep,
                      _: MonitorKeyDep) -> VectorStoreFileDeleted:
    """Take the file's chunks out of the collection; the uploaded file stays in /v1/files."""
    await run(vector_stores.detach, state.settings, store_of(state), vector_store_id, file_id)
    return VectorStoreFileDeleted(id=file_id)


@router.post("/{vector_store_id}/file_batches", responses=responses(400, 401, 403, 404, 409, 413, 422))
async def create_file_batch(vector_store_id: str, body: FileBatchCreate, response: Response, state: StateDep,
                            _: MonitorKeyDep) -> FileBatchObject:
    """Attach several uploaded files at once (`file_ids`, or `files` each with its attributes); poll the batch."""
    check_unsupported(body, chunking_strategy=AUTO_CHUNKING)
    if (body.file_ids is None) == (body.files is None):
        raise ApiError(400, "send file_ids or files (one of them)", param="file_ids", code="invalid_value")
    if body.file_ids is not None:
        items, field = [(file_id, body.attributes) for file_id in body.file_ids], "file_ids"
    else:
        for one in body.files or []:
            check_unsupported(one, chunking_strategy=AUTO_CHUNKING)
        items, field = [(one.file_id, one.attributes) for one in body.files or []], "files"
    if not items:
        raise ApiError(400, f"{field} is empty; name at least one uploaded file", param=field, code="invalid_value")
    settings, store = state.settings, store_of(state)
    await run(vector_stores.get, settings, store, vector_store_id)
    for position, (file_id, _attributes) in enumerate(items):
        param = f"{field}.{position}" + ("" if field == "file_ids" else ".file_id")
        try:
            await asyncio.to_thread(vector_stores.attachable, settings, store, file_id)
        except files.UnknownFile as exc:
            raise ApiError(404, str(exc), param=param, code="file_not_found") from None
        except files.FileError as exc:
            raise ApiError(400, str(exc), param=param, code="invalid_file") from None
    found = await run(vector_stores.create_batch, settings, store, vector_store_id, items)
    response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return batch_object(found)


@router.get("/{vector_store_id}/file_batches/{batch_id}", responses=responses(401, 403, 404, 409, 422))
async def retrieve_file_batch(vector_store_id: str, batch_id: str, response: Response, state: StateDep,
                              _: MonitorKeyDep) -> FileBatchObject:
    found = await run(vector_stores.batch, state.settings, store_of(state), vector_store_id, batch_id)
    if found.status == "in_progress":
        response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return batch_object(found)


@router.post("/{vector_store_id}/file_batches/{batch_id}/cancel", responses=responses(401, 403, 404, 409, 422))
async def cancel_file_batch(vector_store_id: str, batch_id: str, state: StateDep,
                            _: MonitorKeyDep) -> FileBatchObject:
    """Detach the batch's files not indexed yet; those already indexed stay."""
    return batch_object(await run(vector_stores.cancel_batch, state.settings, store_of(state), vector_store_id,
                                  batch_id))


@router.get("/{vector_store_id}/file_batches/{batch_id}/files", responses=responses(400, 401, 403, 404, 409, 422))
async def list_batch_files(vector_store_id: str, batch_id: str, state: StateDep, _: MonitorKeyDep,
                           after: str | None = Query(None, description="The id of the last file of the page before."),
                           limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
                           order: Literal["asc", "desc"] = Query("desc", description="By creation time."),
                           filter: Literal["in_progress", "completed", "failed", "cancelled"] | None = Query(
                               None, description="Only files with this status.")) -> VectorStoreFileList:
    found = await run(vector_stores.batch, state.settings, store_of(state), vector_store_id, batch_id)
    return file_page(found.files, after, limit, order, filter)


@router.post("/{vector_store_id}/search", responses=responses(400, 401, 403, 404, 409, 413, 422))
async def search(vector_store_id: str, body: SearchRequest, state: StateDep, _: MonitorKeyDep) -> SearchPage:
    """The chunks that best answer `query`: vectors and keywords fused, each with its file's id and name,
    and its page, headings and span (start, end) in `attributes`."""
    check_unsupported(body, filters=(None,), rewrite_query=(None, False))
    queries = [body.query] if isinstance(body.query, str) else body.query
    if not any(q.strip() for q in queries):
        raise ApiError(400, "query is empty; send the text to look for", param="query", code="invalid_value")
    threshold = (body.ranking_options.score_threshold if body.ranking_options else None) or 0.0
    found = await run(vector_stores.search, state.settings, store_of(state), vector_store_id, " ".join(queries),
                      body.max_num_results, threshold)
    return SearchPage(search_query=queries, data=[
        SearchResult(file_id=r.file_id, filename=r.filename, score=r.score, attributes=r.attributes,
                     content=[SearchContent(text=r.text)]) for r in found])
