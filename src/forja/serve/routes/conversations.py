"""`/v1/conversations`: conversations kept on the server for chat requests that name a `conversation_id`
(an extension of /v1/chat/completions; the shape follows OpenAI's conversations object). Made, read, listed
(an extension), renamed or given new turns (`POST /v1/conversations/ID` with `title` and `messages`, an
extension) and deleted by the key that owns them (an admin key sees all)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query
from pydantic import ConfigDict, Field

from forja.serve import conversations
from forja.serve.deps import ApiError, ChatCallerDep, ServerState, StateDep
from forja.serve.schemas import ChatMessage, _Body, error_responses

router = APIRouter(prefix="/v1", tags=["conversations"])


class ConversationCreate(_Body):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=200)
    messages: list[ChatMessage] = Field(default_factory=list, max_length=1000,
                                        description="Turns to start from (a system prompt, earlier turns).")
    metadata: dict[str, str] | None = None


@router.post("/conversations", responses=error_responses(400, 401, 403, 409, 413, 422))
async def create_conversation(body: ConversationCreate, state: StateDep, caller: ChatCallerDep) -> dict:
    no_metadata(body.metadata)
    made = await asyncio.to_thread(conversations.create, _store(state), caller.name, body.title,
                                   [m.as_dict() for m in body.messages])
    return conversation_object(made)


class ConversationUpdate(_Body):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, min_length=1, max_length=200)
    messages: list[ChatMessage] | None = Field(None, max_length=1000, description="Every turn, as the client now "
                                               "has it (replaces the stored ones and their summary).")
    metadata: dict[str, str] | None = None


def no_metadata(metadata: dict[str, str] | None) -> None:
    if metadata:
        raise ApiError(400, "metadata: forja keeps a conversation's title and turns, not metadata; leave it out",
                       param="metadata", code="unsupported_parameter")


@router.post("/conversations/{conversation_id}", responses=error_responses(400, 401, 403, 404, 409, 413, 422))
async def update_conversation(conversation_id: str, body: ConversationUpdate, state: StateDep,
                              caller: ChatCallerDep) -> dict:
    no_metadata(body.metadata)
    if body.title is None and body.messages is None:
        raise ApiError(400, "nothing to change: send a title, messages or both", param="title",
                       code="invalid_value")
    store = _store(state)
    found = await asyncio.to_thread(conversations.get, store, conversation_id, caller, "conversation_id")
    messages = None if body.messages is None else [m.as_dict() for m in body.messages]
    return conversation_object(await asyncio.to_thread(conversations.update, store, found, body.title, messages))


@router.get("/conversations", responses=error_responses(401, 403, 409, 422))
async def list_conversations(state: StateDep, caller: ChatCallerDep,
                             limit: int = Query(20, ge=1, le=100)) -> dict:
    """This key's conversations, the most recently used first (an extension)."""
    found = await asyncio.to_thread(conversations.listing, _store(state), caller, limit)
    return {"object": "list", "data": [conversation_object(c, turns=False) for c in found]}


@router.get("/conversations/{conversation_id}", responses=error_responses(401, 403, 404, 409, 422))
async def retrieve_conversation(conversation_id: str, state: StateDep, caller: ChatCallerDep) -> dict:
    found = await asyncio.to_thread(conversations.get, _store(state), conversation_id, caller, "conversation_id")
    return conversation_object(found)


@router.delete("/conversations/{conversation_id}", responses=error_responses(401, 403, 404, 409, 422))
async def delete_conversation(conversation_id: str, state: StateDep, caller: ChatCallerDep) -> dict:
    store = _store(state)
    found = await asyncio.to_thread(conversations.get, store, conversation_id, caller, "conversation_id")
    await asyncio.to_thread(conversations.delete, store, found)
    return {"id": found.id, "object": "conversation.deleted", "deleted": True}


def conversation_object(conversation: conversations.Conversation, turns: bool = True) -> dict[str, Any]:
    forja: dict[str, Any] = {"title": conversation.title, "updated_at": int(conversation.updated_at),
                             "turns": len(conversation.messages), "compacted": conversation.compacted}
    if turns:
        forja.update(messages=conversation.messages, summary=conversation.summary)
    return {"id": conversation.id, "object": "conversation", "created_at": int(conversation.created_at),
            "metadata": {}, "forja": forja}


def _store(state: ServerState):
    if state.store is None:
        raise ApiError(409, "this server has no database, so it keeps no conversations", code="no_database")
    return state.store
