"""Conversations kept on the server: a chat request that names a `conversation_id` sends only its new turns;
the server puts the stored ones before them and, once answered, keeps the new turns and the answer. When
the whole no longer fits the model's context (with the answer's max_tokens), the oldest turns are taken out:
summarised by the model into one note that stands for them (serve.conversation_overflow: summarize) or
dropped (drop); the reply says how many (`forja.conversation`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from fastapi import Request

from forja.serve.deps import ApiError, Caller, ServerState
from forja.store import Store, conversations

ID_PREFIX = "conv_"
SUMMARY_PROMPT = "Summarise the conversation so far: the facts, names and numbers to remember."
SUMMARY_TOKENS = 200
TEMPLATE_BYTES = 32  # what a chat template adds around a turn, counted generously (role markers, newlines)
KEEP_TURNS = 2  # the newest exchange is taken out last (the context of the question being answered)


@dataclass
class Conversation:
    id: str
    owner: str | None
    created_at: float
    updated_at: float
    title: str | None
    messages: list[dict[str, Any]]
    summary: str | None = None
    compacted: int = 0
    taken_out: dict[str, int] = field(default_factory=dict)  # this request's: {"summarized": n} or {"dropped": n}

    def prompt(self, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What the model reads: the note for older turns, the kept turns, the new ones (a system turn sent
        now replaces a stored one)."""
        system = [m for m in new if m["role"] == "system"][:1] or [m for m in self.messages if m["role"] == "system"][:1]
        turns = [m for m in self.messages if m["role"] != "system"] + [m for m in new if m["role"] != "system"]
        note = [{"role": "system", "content": f"Earlier in this conversation (summary): {self.summary}"}] \
            if self.summary else []
        if system and note:
            return [{"role": "system", "content": f"{system[0]['content']}\n\n{note[0]['content']}"}, *turns]
        return system + note + turns

    def extension(self) -> dict[str, Any]:
        return {"id": self.id, "turns": len(self.messages), "compacted": self.compacted, **self.taken_out}


def first_question(messages: list[dict[str, Any]]) -> str | None:
    """A conversation's title until it is given one: the start of its first question."""
    first = next((m["content"] for m in messages if m["role"] == "user" and isinstance(m.get("content"), str)), None)
    return first[:80] if first else None


def create(store: Store, owner: str | None, title: str | None = None,
           messages: list[dict[str, Any]] | None = None) -> Conversation:
    now = time.time()
    messages = list(messages or [])
    conversation = Conversation(ID_PREFIX + uuid.uuid4().hex[:24], owner, now, now, title or first_question(messages),
                                messages)
    with store.engine.begin() as conn:
        conn.execute(conversations.insert().values(id=conversation.id, api_key_name=owner, created_at=now,
                                                   updated_at=now, title=conversation.title,
                                                   messages=conversation.messages, compacted=0))
    return conversation


def get(store: Store, conversation_id: str, caller: Caller, param: str = "conversation_id") -> Conversation:
    """The conversation, when it is the caller's (an admin's key sees all); else a 404 naming `param`."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(conversations).where(conversations.c.id == conversation_id)).first()
    if row is None or not caller.owns(row.api_key_name):
        raise ApiError(404, f"no conversation with id {conversation_id!r} (POST /v1/conversations makes one)",
                       param=param, code="conversation_not_found")
    return Conversation(row.id, row.api_key_name, row.created_at, row.updated_at, row.title,
                        row.messages, row.summary, row.compacted)


def listing(store: Store, caller: Caller, limit: int) -> list[Conversation]:
    query = sa.select(conversations).order_by(conversations.c.updated_at.desc()).limit(limit)
    if not caller.admin:
        query = query.where(conversations.c.api_key_name == caller.name)
    with store.engine.connect() as conn:
        return [Conversation(r.id, r.api_key_name, r.created_at, r.updated_at, r.title, r.messages,
                             r.summary, r.compacted) for r in conn.execute(query)]


def update(store: Store, conversation: Conversation, title: str | None = None,
           messages: list[dict[str, Any]] | None = None) -> Conversation:
    """A new title, or the turns as the client now has them (an answer corrected in the page): the summary of
    the turns taken out goes with them."""
    if messages is not None:
        conversation.messages, conversation.summary, conversation.compacted = list(messages), None, 0
    conversation.title = title or conversation.title or first_question(conversation.messages)
    conversation.updated_at = time.time()
    with store.engine.begin() as conn:
        conn.execute(conversations.update().where(conversations.c.id == conversation.id).values(
            title=conversation.title, messages=conversation.messages, summary=conversation.summary,
            compacted=conversation.compacted, updated_at=conversation.updated_at))
    return conversation


def delete(store: Store, conversation: Conversation) -> None:
    with store.engine.begin() as conn:
        conn.execute(conversations.delete().where(conversations.c.id == conversation.id))


def save(store: Store, conversation: Conversation, new: list[dict[str, Any]], answer: str | None) -> None:
    """The new turns and the answer kept after the stored ones (and what was taken out, with its summary)."""
    kept = [m for m in new if m["role"] != "system" or not any(s["role"] == "system" for s in conversation.messages)]
    conversation.messages += kept + ([{"role": "assistant", "content": answer}] if answer is not None else [])
    conversation.updated_at = time.time()
    conversation.title = conversation.title or first_question(conversation.messages)
    with store.engine.begin() as conn:
        conn.execute(conversations.update().where(conversations.c.id == conversation.id).values(
            messages=conversation.messages, summary=conversation.summary,
            compacted=conversation.compacted, updated_at=conversation.updated_at, title=conversation.title))


async def fitted(state: ServerState, request: Request, conversation: Conversation, model: str | None,
                 new: list[dict[str, Any]], max_tokens: int | None, options: Any) -> list[dict[str, Any]]:
    """The prompt for this turn, older turns taken out (summarised or dropped) until it fits the context."""
    target = await state.target(model)
    engine = target.engine
    if not engine.takes_ids:  # an upstream counts its own tokens and says when a prompt is too long
        return conversation.prompt(new)
    room = engine.context_length - (max_tokens or state.settings.generate.max_new_tokens)
    while True:
        prompt = conversation.prompt(new)
        # a token holds at least a byte: a conversation this short fits without tokenizing it here as well
        # (Exchange.open tokenizes the prompt it decodes anyway)
        if sum(len(str(m.get("content") or "").encode()) + TEMPLATE_BYTES for m in target.messages(prompt)) <= room:
            return prompt
        tokens = len(await asyncio.to_thread(engine.tokenize, target.messages(prompt)))
        turns = [m for m in conversation.messages if m["role"] != "system"]
        if tokens <= room or not turns:  # (the new turn itself is never taken out: the context check says so)
            return prompt
        # the older half, whole exchanges; the newest exchange stays while it fits with the new turn, and goes
        # too (summarised) when it does not: a long pasted text must not end the conversation
        cut = max(2, (len(turns) - KEEP_TURNS) // 2 * 2) if len(turns) > KEEP_TURNS else len(turns)
        summarized = None
        while state.settings.serve.conversation_overflow == "summarize":
            try:
                summarized = await _summary(state, request, model, conversation.summary, turns[:cut], options,
                                            max(16, min(SUMMARY_TOKENS, engine.context_length // 4)))
                break
            except ApiError as exc:  # the old turns do not fit a summary's prompt: fewer, else dropped
                if exc.code != "context_length_exceeded":
                    raise
                if cut <= 2:
                    break
                cut = max(2, cut // 4 * 2)
        old, keep = turns[:cut], turns[cut:]
        if summarized is not None:
            conversation.summary = summarized
            conversation.taken_out["summarized"] = conversation.taken_out.get("summarized", 0) + len(old)
        else:
            conversation.taken_out["dropped"] = conversation.taken_out.get("dropped", 0) + len(old)
        conversation.compacted += len(old)
        conversation.messages = [m for m in conversation.messages if m["role"] == "system"] + keep


async def _summary(state: ServerState, request: Request, model: str | None, earlier: str | None,
                   turns: list[dict[str, Any]], options: Any, tokens: int) -> str:
    """The model's summary of `turns` (and of the summary before them)."""
    from forja.serve.exchange import Exchange

    context = ([{"role": "system", "content": f"Earlier in this conversation (summary): {earlier}"}] if earlier
               else [])
    prompt = context + turns + [{"role": "user", "content": SUMMARY_PROMPT}]
    exchange = await Exchange.open(state, request, rid=f"sum-{uuid.uuid4().hex[:16]}", route="chat", model=model,
                                   prompts=[prompt], n=1, param="messages", record=False,
                                   options=replace(options, max_tokens=tokens, tools=None, tool_choice=None,
                                                   response_format=None, logprobs=False, top_logprobs=0,
                                                   stream=False, temperature=0.0))
    answer = (await exchange.collect(request))[0]
    return answer.text.strip() or (earlier or "")
