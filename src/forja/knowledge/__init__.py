"""Knowledge collections: your files cut into chunks that remember their source, page, headings and span,
found again by meaning (the bundled MiniLM vectors) and by words (SQLite FTS5), the two rankings fused.

`forja knowledge add NAME PATH...` indexes files; `forja knowledge search NAME "query"` ranks chunks.
The server's personas use `retrieve(settings, collections, query, top_k, min_score) -> list[Hit]`.
"""

from forja.knowledge.index import (
    Collection,
    FileInfo,
    FileResult,
    Hit,
    KnowledgeError,
    UnknownCollection,
    add,
    collections,
    remove,
    rename,
    retrieve,
    search,
    show,
)

__all__ = [
    "Collection", "FileInfo", "FileResult", "Hit", "KnowledgeError", "UnknownCollection",
    "add", "collections", "remove", "rename", "retrieve", "search", "show",
]
