"""Answers grounded in knowledge: a persona with `knowledge` retrieves chunks for the user's question,
keeps out those the rails call an injection, puts the rest into the system prompt as numbered documents,
and each answer carries them as citations (OpenAI's `annotations` of type `file_citation`, with forja's
fields: the source's page, headings, span and the quoted text).

When nothing relevant is found (no chunk as similar as `retrieval.min_score`) the persona says so without
asking the model (`retrieval.when_none: say_unknown`), or answers without documents (`answer`).

The server's request path and `forja eval` both ground here, so what is evaluated is what is served.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forja.config import Persona, RetrievalSettings, Settings
from forja.guard import Finding
from forja.knowledge.index import Hit, retrieve
from forja.knowledge.vector_stores import file_id

if TYPE_CHECKING:
    from forja.guard import Guard

QUOTE_CHARS = 400  # of a chunk, in a citation (the whole chunk is in the stored record)
WORD = re.compile(r"\w+")


@dataclass
class Grounding:
    """What one prompt was given from the persona's knowledge."""

    query: str
    hits: list[Hit] = field(default_factory=list)  # in the prompt, numbered from 1
    dropped: list[tuple[Hit, list[str]]] = field(default_factory=list)  # kept out by the rails, with their rules
    findings: list[Finding] = field(default_factory=list)
    file_ids: dict[str, str] = field(default_factory=dict)  # source path → the file's id over REST

    def documents(self) -> str:
        """The chunks as the model reads them: numbered, each with its source."""
        return "\n\n".join(f"[{n}] ({_where(hit)})\n{hit.text}" for n, hit in enumerate(self.hits, 1))

    def citations(self, answer: str = "") -> list[dict[str, Any]]:
        """The chunks given to the model, as OpenAI annotations; `cited` says whether the answer names [n]."""
        return [citation(number, hit, self.file_ids.get(hit.source), f"[{number}]" in answer)
                for number, hit in enumerate(self.hits, 1)]

    def record(self) -> dict[str, Any]:
        """For the stored exchange: the query and every chunk retrieved, with what the rails did."""
        return {"query": self.query,
                "chunks": [_stored(h) for h in self.hits],
                "dropped": [{**_stored(h), "rules": rules} for h, rules in self.dropped]}


def retrieval_settings(settings: Settings, persona: Persona | None) -> RetrievalSettings | None:
    """The persona's retrieval settings over the config's, or None when it answers without knowledge."""
    if persona is None or not persona.knowledge:
        return None
    retrieval = settings.knowledge.retrieval
    if persona.retrieval is not None:
        retrieval = retrieval.model_copy(update=persona.retrieval.model_dump(exclude_unset=True))
    return retrieval if retrieval.mode != "off" else None


def query_of(messages: list[dict[str, Any]], follow_up_words: int) -> str:
    """The user's last message; a short one (a follow-up) with the user message before it."""
    said = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    if not said:
        return ""
    if len(said) > 1 and len(WORD.findall(said[-1])) < follow_up_words:
        return f"{said[-2]}\n{said[-1]}"
    return said[-1]


def ground(settings: Settings, collections: list[str], messages: list[dict[str, Any]], guard: "Guard",
           retrieval: RetrievalSettings) -> Grounding:
    """Retrieve for one conversation (blocking: a server runs it off the event loop). A collection that does
    not exist raises UnknownCollection."""
    grounding = Grounding(query_of(messages, retrieval.follow_up_words))
    if not grounding.query.strip():
        return grounding
    hits = retrieve(settings, collections, grounding.query, retrieval.top_k, retrieval.min_score)
    for hit in hits:
        found = guard.check_document(hit.text)
        grounding.findings += found
        if any(f.action == "block" for f in found):
            grounding.dropped.append((hit, [f.rule for f in found]))
        else:
            grounding.hits.append(hit)
    grounding.file_ids = {hit.source: file_id(settings, hit.source) for hit in grounding.hits}
    return grounding


def with_documents(messages: list[dict[str, Any]], grounding: Grounding, settings: RetrievalSettings) -> list[dict[str, Any]]:
    """The conversation with the numbered chunks added to its system prompt (one is put first if none)."""
    text = settings.template.replace("{documents}", grounding.documents())
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def not_found(settings: RetrievalSettings, language: str) -> str:
    return settings.not_found.get(language) or settings.not_found.get("en") or next(iter(settings.not_found.values()), "")


def citation(number: int, hit: Hit, file_id: str | None, cited: bool) -> dict[str, Any]:
    quote = hit.text if len(hit.text) <= QUOTE_CHARS else hit.text[:QUOTE_CHARS].rsplit(" ", 1)[0] + " …"
    return {"type": "file_citation",
            "file_citation": {"index": number, "file_id": file_id, "filename": hit.filename, "collection": hit.collection,
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
