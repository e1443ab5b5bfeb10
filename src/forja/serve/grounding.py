"""Knowledge in the request path: a persona with `knowledge` retrieves chunks for the user's question,
keeps out those the rails call an injection, puts the rest into the system prompt as numbered documents,
and each answer carries them as citations (OpenAI's `annotations` of type `file_citation`, with forja's
fields: the source's page, headings, span and the quoted text).

When nothing relevant is found (no chunk as similar as `retrieval.min_score`) the persona says so without
asking the model (`retrieval.when_none: say_unknown`), or answers without documents (`answer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forja.config import RetrievalSettings
from forja.guard import Finding
from forja.knowledge import Hit, KnowledgeError, retrieve
from forja.serve.deps import ApiError

if TYPE_CHECKING:
    from forja.guard import Guard
    from forja.serve.deps import ServerState, Target

QUOTE_CHARS = 400  # of a chunk, in a citation (the whole chunk is in the stored record)
WORD = re.compile(r"\w+")


@dataclass
class Grounding:
    """What one prompt was given from the persona's knowledge."""

    query: str
    hits: list[Hit] = field(default_factory=list)  # in the prompt, numbered from 1
    dropped: list[tuple[Hit, list[str]]] = field(default_factory=list)  # kept out by the rails, with their rules
    findings: list[Finding] = field(default_factory=list)

    def citations(self, answer: str = "") -> list[dict[str, Any]]:
        """The chunks given to the model, as OpenAI annotations; `cited` says whether the answer names [n]."""
        return [citation(number, hit, f"[{number}]" in answer) for number, hit in enumerate(self.hits, 1)]

    def record(self) -> dict[str, Any]:
        """For the stored exchange: the query and every chunk retrieved, with what the rails did."""
        return {"query": self.query,
                "chunks": [_stored(h) for h in self.hits],
                "dropped": [{**_stored(h), "rules": rules} for h, rules in self.dropped]}


def retrieval_settings(state: "ServerState", target: "Target") -> RetrievalSettings | None:
    """The persona's retrieval settings over the config's, or None when it answers without knowledge."""
    persona = target.persona
    if persona is None or not persona.knowledge:
        return None
    settings = state.settings.knowledge.retrieval
    if persona.retrieval is not None:
        settings = settings.model_copy(update=persona.retrieval.model_dump(exclude_unset=True))
    return settings if settings.mode != "off" else None


def query_of(messages: list[dict[str, Any]], follow_up_words: int) -> str:
    """The user's last message; a short one (a follow-up) with the user message before it."""
    said = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    if not said:
        return ""
    if len(said) > 1 and len(WORD.findall(said[-1])) < follow_up_words:
        return f"{said[-2]}\n{said[-1]}"
    return said[-1]


def ground(state: "ServerState", target: "Target", messages: list[dict[str, Any]], guard: "Guard",
           settings: RetrievalSettings) -> Grounding:
    """Retrieve for one conversation (blocking: run it off the event loop)."""
    grounding = Grounding(query_of(messages, settings.follow_up_words))
    if not grounding.query.strip():
        return grounding
    assert target.persona is not None
    try:
        hits = retrieve(state.settings, target.persona.knowledge, grounding.query, settings.top_k, settings.min_score)
    except KnowledgeError as exc:  # the persona names a collection that is not there: the server's config
        raise ApiError(503, f"persona {target.persona.name!r} cannot read its knowledge: {exc}", type="server_error",
                       code="knowledge_unavailable") from None
    for hit in hits:
        found = guard.check_document(hit.text)
        grounding.findings += found
        if any(f.action == "block" for f in found):
            grounding.dropped.append((hit, [f.rule for f in found]))
        else:
            grounding.hits.append(hit)
    return grounding


def with_documents(messages: list[dict[str, Any]], grounding: Grounding, settings: RetrievalSettings) -> list[dict[str, Any]]:
    """The conversation with the numbered chunks added to its system prompt (one is put first if none)."""
    documents = "\n\n".join(f"[{n}] ({_where(hit)})\n{hit.text}" for n, hit in enumerate(grounding.hits, 1))
    text = settings.template.replace("{documents}", documents)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def not_found(settings: RetrievalSettings, language: str) -> str:
    return settings.not_found.get(language) or settings.not_found.get("en") or next(iter(settings.not_found.values()), "")


def citation(number: int, hit: Hit, cited: bool) -> dict[str, Any]:
    quote = hit.text if len(hit.text) <= QUOTE_CHARS else hit.text[:QUOTE_CHARS].rsplit(" ", 1)[0] + " …"
    return {"type": "file_citation",
            "file_citation": {"index": number, "filename": hit.filename, "collection": hit.collection,
                              "chunk_id": hit.chunk_id, "page": hit.page, "headings": list(hit.headings),
                              "start": hit.start, "end": hit.end, "quote": quote, "score": round(hit.score, 6),
                              "similarity": round(hit.similarity, 4), "cited": cited}}


def _where(hit: Hit) -> str:
    parts = [hit.filename]
    if hit.page is not None:
        parts.append(f"p. {hit.page}")
    if hit.headings:
        parts.append(" > ".join(hit.headings))
    return ", ".join(parts)


def _stored(hit: Hit) -> dict[str, Any]:
    return {"collection": hit.collection, "chunk_id": hit.chunk_id, "filename": hit.filename, "page": hit.page,
            "headings": list(hit.headings), "start": hit.start, "end": hit.end, "score": round(hit.score, 6),
            "similarity": round(hit.similarity, 4)}
