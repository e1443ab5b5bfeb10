"""Answers grounded in knowledge: a persona with `knowledge` retrieves chunks for the user's question,
keeps out those the rails call an injection, puts the rest into the system prompt as numbered documents,
and each answer carries them as citations (OpenAI's `annotations` of type `file_citation`, with forja's
fields: the source's page, headings, span and the quoted text).

When nothing relevant is found (no chunk as similar as `retrieval.min_score`) the persona says so without
asking the model (`retrieval.when_none: say_unknown`), or answers without documents (`answer`).

A version trained on a small FAQ (train.faq_retrieval) answers from its own rows the same way: it is
trained with the nearest row in the prompt (`grounded_rows`) and served, evaluated and gated so (`plan`).
The server's request path, `forja eval`, the gate and `forja generate` all ground here, so what is
evaluated is what is served.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forja.config import Persona, RetrievalSettings, Settings
from forja.embeddings import canonical
from forja.guard import Finding
from forja.knowledge.index import Hit, UnknownCollection, add, remove, retrieve, show
from forja.knowledge.vector_stores import file_id
from forja.models import KNOWLEDGE_FILE, read_version, version_dir

if TYPE_CHECKING:
    from forja.guard import Guard

QUOTE_CHARS = 400  # of a chunk, in a citation (the whole chunk is in the stored record)
WORD = re.compile(r"\w+")


@dataclass
class Grounding:
    """What one prompt was given from a persona's knowledge or a version's FAQ."""

    query: str
    hits: list[Hit] = field(default_factory=list)  # in the prompt, numbered from 1
    dropped: list[tuple[Hit, list[str]]] = field(default_factory=list)  # kept out by the rails, with their rules
    findings: list[Finding] = field(default_factory=list)
    file_ids: dict[str, str] = field(default_factory=dict)  # source path → the file's id over REST

    def documents(self, first: int = 1) -> str:
        """The chunks as the model reads them (from number `first` on): numbered, each with its source."""
        return "\n\n".join(f"[{n}] ({_where(hit)})\n{hit.text}"
                            for n, hit in enumerate(self.hits[first - 1:], first))

    def citations(self, answer: str = "") -> list[dict[str, Any]]:
        """The chunks given to the model, as OpenAI annotations; `cited` says whether the answer names [n]."""
        return [citation(number, hit, self.file_ids.get(hit.source), f"[{number}]" in answer)
                for number, hit in enumerate(self.hits, 1)]

    def record(self) -> dict[str, Any]:
        """For the stored exchange: the query and every chunk retrieved, with what the rails did."""
        return {"query": self.query,
                "chunks": [_stored(h) for h in self.hits],
                "dropped": [{**_stored(h), "rules": rules} for h, rules in self.dropped]}


@dataclass(frozen=True)
class Plan:
    """What a model or persona answers from: its collections, and how to retrieve from them."""

    collections: tuple[str, ...]
    retrieval: RetrievalSettings


VERSION_COLLECTION = "version.{name}"  # the collection holding a version's FAQ rows
# (knowledge dir, database: where the index is, whichever knowledge.store picks; collection) → the FAQ file's
# (mtime, size)
_indexed: dict[tuple[str, str, str], tuple[int, int]] = {}


def plan(settings: Settings, persona: Persona | None, model: str) -> Plan | None:
    """A persona's knowledge, else the FAQ of the version it runs on, else None (blocking: indexes a version's
    FAQ the first time, a few seconds for a few hundred rows)."""
    if persona is not None and persona.knowledge and "knowledge_search" not in persona.tools:
        retrieval = retrieval_settings(settings, persona)
        return Plan(tuple(persona.knowledge), retrieval) if retrieval is not None else None
    return version_plan(settings, model)  # (a persona with knowledge_search retrieves when its model asks)


def prompt_for(settings: Settings, persona: Persona | None, model: str, messages: list[dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], Grounding | None, str | None]:
    """The conversation a model answers, with the documents the server would give it (a persona's knowledge,
    else its version's FAQ), the grounding, and the fixed answer when the server would not ask the model
    (nothing relevant, say_unknown). For callers outside the server: `forja eval`, the gate, `forja generate`."""
    from forja.guard import Guard, merged_rails

    answers_from = plan(settings, persona, model)
    if answers_from is None:
        return messages, None, None
    return apply_plan(settings, answers_from, messages, Guard(merged_rails(settings, persona)))


def apply_plan(settings: Settings, answers_from: Plan, messages: list[dict[str, Any]], guard: "Guard"
               ) -> tuple[list[dict[str, Any]], Grounding, str | None]:
    """One conversation grounded by `answers_from` (blocking): the messages with the documents, the grounding,
    and the fixed answer when nothing is relevant and the plan says so. The server passes its request's rails."""
    retrieval = answers_from.retrieval
    messages = without_documents(messages, retrieval)  # a stored exchange asked again (the gate's cases)
    grounding = ground(settings, list(answers_from.collections), messages, guard, retrieval)
    if grounding.hits:
        return with_documents(messages, grounding, retrieval), grounding, None
    if retrieval.when_none == "say_unknown":
        return messages, grounding, not_found(retrieval, guard.language(grounding.query))
    return messages, grounding, None


def version_plan(settings: Settings, model: str) -> Plan | None:
    """A version trained on a small FAQ (train.faq_retrieval) answers from its rows: they are indexed into the
    collection version.NAME when first needed, and again when the file changes, with the embedding model it
    was trained with (a collection of that name left by an earlier version with another model is made anew)."""
    directory = version_dir(settings, model)
    path = directory / KNOWLEDGE_FILE if directory is not None else None
    if path is None or not path.is_file():
        return None
    name = VERSION_COLLECTION.format(name=directory.name)
    stat = path.stat()
    key = (str(settings.knowledge_dir), settings.database, name)
    if _indexed.get(key) != (stat.st_mtime_ns, stat.st_size):
        faq_model = canonical(trained_faq_model(settings, directory))
        try:
            stale = show(settings, name).embedding_model != faq_model
        except UnknownCollection:
            stale = False
        if stale:
            remove(settings, name)
        add(settings, name, [path], model=faq_model)
        _indexed[key] = (stat.st_mtime_ns, stat.st_size)
    return Plan((name,), settings.knowledge.version_retrieval)


def trained_faq_model(settings: Settings, directory: Path) -> str:
    """The embedding model a version's FAQ rows were found with in training (its train.faq_embedding_model); a
    version trained before that setting existed found them with knowledge.embedding_model."""
    config = read_version(directory).get("config") or {}
    return config.get("faq_embedding_model") or settings.knowledge.embedding_model


def grounded_rows(settings: Settings, faq: Path, name: str, tables: list[list[dict[str, Any]]],
                  faq_model: str) -> list[list[dict[str, Any]]]:
    """Training rows prompted as the version will be served (train.faq_retrieval): `faq` is indexed into the
    collection `name` for the run with the embedding model `faq_model` (train.faq_embedding_model), and each
    chat row's conversation, without documents an earlier grounding put in it (a correction's exchange), is
    grounded as `apply_plan` grounds a served one (the rails on the rows included) before its last answer."""
    from forja.guard import Guard, merged_rails

    answers_from = Plan((name,), settings.knowledge.version_retrieval)
    guard = Guard(merged_rails(settings))
    add(settings, name, [faq], model=faq_model)
    try:
        grounded = []
        for rows in tables:
            out = []
            for row in rows:
                messages = row.get("messages")
                if not messages or messages[-1].get("role") != "assistant":
                    out.append(row)
                    continue
                conversation, _, _ = apply_plan(settings, answers_from, messages[:-1], guard)
                out.append({**row, "messages": [*conversation, messages[-1]]})
            grounded.append(out)
        return grounded
    finally:
        remove(settings, name)


def without_documents(messages: list[dict[str, Any]], retrieval: RetrievalSettings) -> list[dict[str, Any]]:
    """The conversation as it was before `with_documents` (its system prompt without the documents)."""
    lead = retrieval.template.split("{documents}")[0]
    if not messages or messages[0].get("role") != "system" or not isinstance(messages[0].get("content"), str):
        return messages
    content = messages[0]["content"]
    if content.startswith(lead):
        return messages[1:]
    cut = content.find("\n\n" + lead)
    return [{**messages[0], "content": content[:cut]}, *messages[1:]] if cut >= 0 else messages


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
    """The conversation with the numbered chunks added to its system prompt (one is put first if none), in
    place of documents a grounding had put there before (a stored exchange asked again, a correction's row)."""
    messages = without_documents(messages, settings)
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
                              "similarity": round(hit.similarity, 4), "rerank_score": hit.rerank_score,
                              "cited": cited}}


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
            "similarity": round(hit.similarity, 4), "rerank_score": hit.rerank_score}
