"""Bodies of /v1/files and /v1/vector_stores, in OpenAI's shapes (the `openai` client's files and
vector_stores resources read them), and the cursor pages their lists answer (`after`, `limit`, `order`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field

from forja.serve.deps import ApiError
from forja.serve.schemas import ERROR_STATUSES, ErrorResponse, StrictInt, _Body

MAX_PAGE = 100  # items in one page of a list, as OpenAI
MAX_SEARCH_RESULTS = 50  # as OpenAI's max_num_results

STATUSES = {**ERROR_STATUSES,
            400: "A field is missing or has a value forja cannot use (its name in `param`), or a file its purpose "
                 "cannot use (the row and field named, as forja data inspect names them)",
            403: "The route needs an admin API key (when API keys are configured)",
            404: "No file or vector store with this id",
            409: "A vector store with this name exists already, or this server has no database",
            413: "The file is larger than files.max_bytes (or the body than serve.max_body_bytes)"}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": STATUSES[status]} for status in statuses}


def check_unsupported(body: BaseModel, **defaults: tuple[Any, ...]) -> None:
    """400 naming a field whose value would change what OpenAI does and that forja does not do."""
    for name, allowed in defaults.items():
        value = getattr(body, name)
        if value not in allowed:
            raise ApiError(400, f"{name}: forja does not support {value!r} here ({UNSUPPORTED_HELP[name]})",
                           param=name, code="unsupported_parameter")


UNSUPPORTED_HELP = {
    "metadata": "metadata is not stored; leave it out",
    "expires_after": "vector stores never expire; leave it out",
    "chunking_strategy": "chunks are cut by knowledge.chunk_tokens and knowledge.overlap_tokens in the config; "
                         'send {"type": "auto"} or leave it out',
    "filters": "attribute filters are not supported yet; leave them out",
    "rewrite_query": "queries are searched as written",
}
AUTO_CHUNKING = (None, {"type": "auto"})


# --------------------------------------------------------------------------------------------- files


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"  # checked when uploaded: there is nothing left to process
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --------------------------------------------------------------------------------------------- vector stores


class FileCounts(BaseModel):
    in_progress: int
    completed: int
    failed: int
    cancelled: int
    total: int


class VectorStoreObject(BaseModel):
    id: str = Field(..., description="vs_ and the knowledge collection's name")
    object: Literal["vector_store"] = "vector_store"
    created_at: int
    name: str
    usage_bytes: int
    file_counts: FileCounts
    status: Literal["in_progress", "completed"]
    last_active_at: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    expires_after: None = None
    expires_at: None = None


class VectorStoreList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorStoreObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VectorStoreDeleted(BaseModel):
    id: str
    object: Literal["vector_store.deleted"] = "vector_store.deleted"
    deleted: bool = True


class VectorStoreCreate(_Body):
    name: str | None = Field(None, description="The collection's name (letters, digits, _ . -); default store-<hex>.")
    file_ids: list[str] = Field(default_factory=list, description="Uploaded files to index into it.")
    metadata: dict[str, Any] | None = None
    expires_after: dict[str, Any] | None = None
    chunking_strategy: dict[str, Any] | None = None
    description: str | None = None


class VectorStoreUpdate(_Body):
    name: str | None = Field(None, description="A new name: the id becomes vs_<new name>.")
    metadata: dict[str, Any] | None = None
    expires_after: dict[str, Any] | None = None


class LastError(BaseModel):
    code: Literal["server_error", "unsupported_file", "invalid_file"]
    message: str


class VectorStoreFileObject(BaseModel):
    id: str = Field(..., description="The uploaded file's id (kfile-… for a file added with forja knowledge add)")
    object: Literal["vector_store.file"] = "vector_store.file"
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "failed", "cancelled"]
    usage_bytes: int
    last_error: LastError | None = None
    attributes: dict[str, str | bool | int | float] = Field(default_factory=dict)
    chunking_strategy: dict[str, Any] = Field(default_factory=lambda: {"type": "other"})


class VectorStoreFileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorStoreFileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VectorStoreFileDeleted(BaseModel):
    id: str
    object: Literal["vector_store.file.deleted"] = "vector_store.file.deleted"
    deleted: bool = True


Attributes = Annotated[dict[Annotated[str, Field(max_length=64)], str | bool | int | float],
                       Field(max_length=16, description="Yours (at most 16, as OpenAI); returned with search "
                             "results, beside the chunk's page, headings, start and end.")]


class VectorStoreFileCreate(_Body):
    file_id: str = Field(..., description="An uploaded file (POST /v1/files).")
    attributes: Attributes | None = None
    chunking_strategy: dict[str, Any] | None = None


class VectorStoreFileUpdate(_Body):
    attributes: Attributes | None = None


class FileBatchObject(BaseModel):
    id: str
    object: Literal["vector_store.files_batch"] = "vector_store.files_batch"
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    file_counts: FileCounts


class BatchFile(_Body):
    file_id: str
    attributes: Attributes | None = None
    chunking_strategy: dict[str, Any] | None = None


class FileBatchCreate(_Body):
    file_ids: list[str] | None = Field(None, description="Uploaded files to index, with `attributes` for each.")
    files: list[BatchFile] | None = Field(None, description="Or each file with its own attributes.")
    attributes: Attributes | None = None
    chunking_strategy: dict[str, Any] | None = None


class RankingOptions(_Body):
    ranker: str | None = None
    score_threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)


class SearchRequest(_Body):
    query: str | list[str] = Field(..., description="What to look for (several texts are searched as one).")
    max_num_results: StrictInt = Field(10, ge=1, le=MAX_SEARCH_RESULTS)
    ranking_options: RankingOptions | None = None
    filters: dict[str, Any] | None = None
    rewrite_query: bool | None = None


class SearchContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class FileContentPage(BaseModel):
    object: Literal["vector_store.file_content.page"] = "vector_store.file_content.page"
    data: list[SearchContent]
    has_more: bool = False
    next_page: str | None = None


class SearchResult(BaseModel):
    file_id: str
    filename: str
    score: float = Field(..., description="1 = ranked first both by meaning and by words")
    attributes: dict[str, str | bool | int | float]
    content: list[SearchContent]


class SearchPage(BaseModel):
    object: Literal["vector_store.search_results.page"] = "vector_store.search_results.page"
    search_query: list[str]
    data: list[SearchResult]
    has_more: bool = False
    next_page: str | None = None


# --------------------------------------------------------------------------------------------- pages

Item = TypeVar("Item")


def cursor_page(items: list[Item], ids: list[str], after: str | None, limit: int,
                order: str) -> tuple[list[Item], bool]:
    """One page of `items` (oldest first, with their `ids`) in `order`, after the item with id `after`."""
    pairs = list(zip(ids, items))
    if order == "desc":
        pairs.reverse()
    start = 0
    if after is not None:
        where = [i for i, (item_id, _) in enumerate(pairs) if item_id == after]
        if not where:
            raise ApiError(400, f"after: {after!r} is not the id of an item of this list", param="after",
                           code="invalid_value")
        start = where[0] + 1
    page = pairs[start:start + limit]
    return [item for _, item in page], start + limit < len(pairs)
