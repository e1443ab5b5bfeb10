"""OpenAI-compatible routes: /v1/models, /v1/chat/completions and /v1/completions, streamed as
server-sent events when `stream` is true (`data: {chunk}` ... `data: [DONE]`). Each handler parses its
body into the request path (serve/exchange.py) and renders the answers in its format."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from forja.config import Persona
from forja.embeddings import EMBEDDING_DIMENSIONS, EMBEDDING_MODEL, MULTILINGUAL_DIMENSIONS, MULTILINGUAL_MODEL, served
from forja.engine.text import token_piece
from forja.serve import agent, conversations
from forja.serve.deps import ApiError, ApiKeyDep, Caller, ChatCallerDep, ServerState, StateDep
from forja.serve.exchange import Answer, Exchange, Options
from forja.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    error_responses,
    generating_responses,
    new_response_id,
    now,
)

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger("forja.serve")
DISCONNECT_POLL_SECONDS = 0.25


@router.get("/models", responses=error_responses(401))
async def list_models(state: StateDep, caller: ChatCallerDep) -> ModelList:
    """The personas and the active model; an admin key also sees the base model, every trained version and
    the engines loaded on request (the customers of a shop see its assistants, not its first tries)."""
    return ModelList(data=model_cards(state, caller))


@router.get("/models/{model_id:path}", responses=error_responses(401, 404, 422))
async def retrieve_model(model_id: str, state: StateDep, caller: ChatCallerDep) -> ModelCard:
    """One card of /v1/models, as the caller sees that list; `:path` because model ids can be paths or hub
    names with a `/`."""
    cards = model_cards(state, caller)
    for card in cards:
        if card.id == model_id:
            return card
    raise ApiError(404, f"the model {model_id!r} does not exist; available: {', '.join(c.id for c in cards)}",
                   param="model", code="model_not_found")


def model_cards(state: ServerState, caller: Caller) -> list[ModelCard]:
    """What /v1/models lists to `caller`. Only the listing hides versions: a request naming one is still
    answered by it (ServerState.target)."""
    created = int(state.started)
    active = state.active
    cards = [ModelCard(id=active, created=created, kind="active", description="answers requests that name no model")]
    cards += [ModelCard(id=p.name, created=created, kind="persona", description=p.description)
              for p in state.settings.serve.personas]
    if caller.admin:
        if state.base != active:
            cards.append(ModelCard(id=state.base, created=created, kind="base", description="the model loaded at start"))
        versions = [v for v in state.versions() if v not in (active, state.base)]
        cards += [ModelCard(id=v, created=created, kind="version", description="trained version") for v in versions]
        upstreams = {f"@{p.upstream_url}" for p in state.settings.serve.personas if p.upstream_url}
        cards += [ModelCard(id=name, created=created, kind="loaded", description="loaded on request")
                  for name in state.engines if name not in (active, state.base, *versions)
                  and not any(name.endswith(tail) for tail in upstreams)]  # a persona's own upstream: listed as it
    bundled = {EMBEDDING_MODEL: ("sentence-transformers", f"sentence embeddings, {EMBEDDING_DIMENSIONS} dimensions"),
               MULTILINGUAL_MODEL: ("google", f"multilingual sentence embeddings, {MULTILINGUAL_DIMENSIONS} dimensions")}
    configured = ("sentence-transformers", "sentence embeddings, knowledge.embedding_model")
    cards += [ModelCard(id=name, created=created, owned_by=bundled.get(name, configured)[0], kind="embedding",
                        description=bundled.get(name, configured)[1] + " (POST /v1/embeddings)")
              for name in served(state.settings)]
    return cards


@router.post("/chat/completions", response_model=None, responses=generating_responses(ChatCompletion))
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep, caller: ChatCallerDep):
    rid, created = new_response_id("chatcmpl"), now()
    new = [m.as_dict() for m in body.messages]
    conversation = await kept_conversation(body, request, state, caller, new)
    messages = new if conversation is None else await conversations.fitted(
        state, request, conversation, body.model, new, body.max_completion_tokens or body.max_tokens, options_of(body))
    persona = agent.agent_persona(state, body.model, body.tools)
    if persona is not None:  # the server runs the persona's tools in a loop (serve/agent.py)
        return await agent_reply(body, request, state, persona, rid, created, messages, conversation, new)
    exchange = await Exchange.open(state, request, rid=rid, route="chat", model=body.model,
                                   prompts=[messages], n=body.n, options=options_of(body), param="messages")
    tokenizer = logprob_tokens(exchange, bool(body.logprobs))
    if body.stream:
        chunks = chat_chunks(exchange, created, body.include_usage, tokenizer)
        return sse(chunks if conversation is None else
                   kept_after(chunks, state, conversation, new, lambda: exchange.answers[0].text, exchange.rid, created))
    answers = await exchange.collect(request)
    reply = {"id": rid, "object": "chat.completion", "created": created, "model": exchange.target.name,
             "choices": [chat_choice(a, tokenizer) for a in answers], "usage": exchange.usage()}
    if conversation is not None:
        await asyncio.to_thread(conversations.save, state.store, conversation, new, answers[0].text)
        reply["forja"] = {"conversation": conversation.extension()}
    return reply


async def kept_conversation(body: ChatCompletionRequest, request: Request, state: ServerState, caller: Caller,
                            new: list[dict[str, Any]]) -> conversations.Conversation | None:
    """The conversation the request continues (conversation_id), or None."""
    if body.conversation_id is None:
        return None
    if state.store is None:
        raise ApiError(409, "this server has no database, so it keeps no conversations", param="conversation_id",
                       code="no_database")
    if body.n != 1:
        raise ApiError(400, "n: a conversation kept on the server continues with one answer (n=1)", param="n",
                       code="unsupported_parameter")
    return await asyncio.to_thread(conversations.get, state.store, body.conversation_id, caller)


async def kept_after(chunks: AsyncIterator[dict[str, Any]], state: ServerState, conversation: Any,
                     new: list[dict[str, Any]], answer: Callable[[], str], rid: str, created: int
                     ) -> AsyncIterator[dict[str, Any]]:
    """A stream, then the conversation kept with its answer's text (and a chunk saying so, with no choices)."""
    async for chunk in chunks:
        yield chunk
    await asyncio.to_thread(conversations.save, state.store, conversation, new, answer())
    yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": conversation.id,
           "choices": [], "forja": {"conversation": conversation.extension()}}


@router.post("/completions", response_model=None, responses=generating_responses(Completion))
async def completions(body: CompletionRequest, request: Request, state: StateDep, _: ApiKeyDep):
    rid, created = new_response_id("cmpl"), now()
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    exchange = await Exchange.open(state, request, rid=rid, route="completion", model=body.model, prompts=prompts,
                                   n=body.n, options=options_of(body), param="prompt")
    tokenizer = logprob_tokens(exchange, body.logprobs is not None)
    if body.stream:
        return sse(completion_chunks(exchange, created, body.include_usage, tokenizer))
    answers = await exchange.collect(request)
    return {"id": rid, "object": "text_completion", "created": created, "model": exchange.target.name,
            "choices": [{"index": a.index, "text": a.text, "finish_reason": a.finish_reason,
                         "logprobs": completion_logprobs(a.logprobs, tokenizer, 0)} for a in answers],
            "usage": exchange.usage()}


async def agent_reply(body: ChatCompletionRequest, request: Request, state: ServerState, persona: Persona, rid: str,
                      created: int, messages: list[dict[str, Any]], conversation: Any, new: list[dict[str, Any]]):
    options = options_of(body)
    agent.check_request(body.n, options)
    head = {"id": rid, "created": created, "model": persona.name}
    if body.stream:
        chunks = agent_chunks(body, request, state, persona, head, messages, options)
        if conversation is None:
            return sse(chunks)
        final: dict[str, Any] = {}
        return sse(kept_after(collecting(chunks, final), state, conversation, new,
                              lambda: final.get("text", ""), rid, created))
    reply = await agent.run(state, request, rid=rid, persona=persona, messages=messages, options=options)
    choice = chat_choice(reply.answer, logprob_tokens(reply.exchange, bool(body.logprobs)))
    if reply.toolbox is not None and reply.toolbox.grounding is not None:
        choice["message"]["annotations"] = reply.citations()
    extension = reply.extension()
    if conversation is not None:
        await asyncio.to_thread(conversations.save, state.store, conversation, new, reply.answer.text)
        extension["conversation"] = conversation.extension()
    return {**head, "object": "chat.completion", "choices": [choice], "usage": reply.usage(), "forja": extension}


async def collecting(chunks: AsyncIterator[dict[str, Any]], final: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The chunks as they are, noting the answer's text in `final`."""
    async for chunk in chunks:
        for choice in chunk.get("choices", []):
            final["text"] = final.get("text", "") + (choice.get("delta", {}).get("content") or "")
        yield chunk


async def agent_chunks(body: ChatCompletionRequest, request: Request, state: ServerState, persona: Persona,
                       head: dict[str, Any], messages: list[dict[str, Any]], options: Options
                       ) -> AsyncIterator[dict[str, Any]]:
    """Each tool step as a chunk with no choices and `forja.step` (a plain client skips it), then the answer:
    its role, its text, its finish (with citations) and, when asked, the usage."""
    head = {**head, "object": "chat.completion.chunk"}
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                "logprobs": None}]}
    steps = agent.stream_steps(state, request, rid=head["id"], persona=persona, messages=messages, options=options)
    try:
        async for item in steps:
            if isinstance(item, dict):
                yield {**head, "choices": [], "forja": {"step": item}}
                continue
            reply = item
    except ApiError as exc:  # the stream has begun: the error is its last event (the OpenAI client raises it)
        yield exc.body()
        return
    answer = reply.answer
    tokenizer = logprob_tokens(reply.exchange, bool(body.logprobs))
    yield {**head, "choices": [{"index": 0, "delta": {"content": answer.text}, "finish_reason": None,
                                "logprobs": chat_logprobs(answer.logprobs, tokenizer) if tokenizer else None}]}
    finish: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": answer.finish_reason, "logprobs": None}
    if reply.toolbox is not None and reply.toolbox.grounding is not None:
        finish["delta"] = {"annotations": reply.citations()}
    yield {**head, "choices": [finish], "forja": reply.extension()}
    if body.include_usage:
        yield {**head, "choices": [], "usage": reply.usage()}


def logprob_tokens(exchange: Exchange, asked: bool) -> Any:
    """What the logprobs' tokens are rendered with (None: none asked): the engine's tokenizer, or True for an
    upstream, whose tokens come as text (engine.text.token_piece takes them as they are)."""
    if not asked:
        return None
    return exchange.target.engine.tokenizer if exchange.target.engine.takes_ids else True


def options_of(body: ChatCompletionRequest | CompletionRequest) -> Options:
    """The request's fields as the request path takes them."""
    chat = isinstance(body, ChatCompletionRequest)
    logprobs = bool(body.logprobs) if chat else body.logprobs is not None
    top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
    return Options(
        max_tokens=(body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty, logit_bias=body.logit_bias, seed=body.seed, stop=body.stop,
        logprobs=logprobs, top_logprobs=top,
        response_format=body.response_format.as_dict() if chat and body.response_format else None,
        tools=body.tools if chat else None, tool_choice=body.tool_choice if chat else None,
        parallel_tool_calls=body.parallel_tool_calls if chat else None, stream=bool(body.stream),
    )


# ------------------------------------------------------------------------------------------------ rendering


def chat_choice(answer: Answer, tokenizer: Any) -> dict[str, Any]:
    content, calls = answer.content_and_calls()
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    if answer.grounding is not None:
        message["annotations"] = answer.citations()
    return {"index": answer.index, "message": message, "finish_reason": answer.finish_reason,
            "logprobs": chat_logprobs(answer.logprobs, tokenizer)}


LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for log(0): JSON has no -Infinity


def _logprob(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(entries: list[Any], tokenizer: Any) -> dict[str, Any] | None:
    if tokenizer is None:
        return None

    def piece(token: int, logprob: float) -> dict[str, Any]:
        text, raw = token_piece(tokenizer, token)
        return {"token": text, "logprob": _logprob(logprob), "bytes": raw}

    return {"content": [{**piece(e.token, e.logprob), "top_logprobs": [piece(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[Any], tokenizer: Any, offset: int) -> dict[str, Any] | None:
    """The legacy completions shape: tokens, their logprobs, the top alternatives as {token: logprob}, and
    each token's character offset in the text (counted from `offset`)."""
    if tokenizer is None:
        return None
    tokens, offsets = [], []
    for entry in entries:
        offsets.append(offset)
        text = token_piece(tokenizer, entry.token)[0]
        tokens.append(text)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [_logprob(e.logprob) for e in entries],
            "top_logprobs": [{token_piece(tokenizer, t)[0]: _logprob(lp) for t, lp in e.top} for e in entries],
            "text_offset": offsets}


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def failure(answer: Answer) -> dict[str, Any]:
    """A failed generation mid-stream: an `error` event (the OpenAI client raises it)."""
    return {"error": {"message": f"generation failed: {answer.error}", "type": "server_error", "param": None,
                      "code": "generation_failed"}}


async def chat_chunks(exchange: Exchange, created: int, include_usage: bool,
                      tokenizer: Any) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's chat chunks: a role chunk per choice, content deltas, tool calls as OpenAI streams them (each
    call with its index, id, name and arguments, handed out when the model has written it whole), a finish
    chunk per choice (with the citations of a persona with knowledge) and, when asked, a last chunk with
    the usage."""
    head = {"id": exchange.rid, "object": "chat.completion.chunk", "created": created, "model": exchange.target.name}

    def chunk(answer: Answer, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": answer.index, "delta": delta, "finish_reason": finish,
                                     "logprobs": chat_logprobs(logprobs, tokenizer) if logprobs else None}]}

    for answer in exchange.answers:
        yield chunk(answer, {"role": "assistant", "content": ""})
    sent_calls = {a.index: 0 for a in exchange.answers}
    async for answer, delta in exchange.events():
        if delta.finish_reason == "error":
            yield failure(answer)
            return
        pieces: list[dict[str, Any]] = []
        if answer.calls is None:
            if delta.text:
                pieces.append({"content": delta.text})
        else:
            content, calls = answer.calls.feed(delta.text) if delta.text else ("", [])
            if delta.finish_reason is not None:
                content += answer.calls.finish()
            if content:
                pieces.append({"content": content})
            for call in calls:
                pieces.append({"tool_calls": [{"index": sent_calls[answer.index], **call}]})
                sent_calls[answer.index] += 1
        for i, piece in enumerate(pieces):
            yield chunk(answer, piece, logprobs=delta.logprobs if i == 0 else None)
        if not pieces and delta.logprobs:
            yield chunk(answer, {}, logprobs=delta.logprobs)
        if delta.finish_reason is not None:  # the citations come last: they say which [n] the answer cites
            yield chunk(answer, {"annotations": answer.citations()} if answer.grounding is not None else {},
                        delta.finish_reason)
    if include_usage:
        yield {**head, "choices": [], "usage": exchange.usage()}


async def completion_chunks(exchange: Exchange, created: int, include_usage: bool,
                            tokenizer: Any) -> AsyncIterator[dict[str, Any]]:
    head = {"id": exchange.rid, "object": "text_completion", "created": created, "model": exchange.target.name}
    offsets = {a.index: 0 for a in exchange.answers}
    async for answer, delta in exchange.events():
        if delta.finish_reason == "error":
            yield failure(answer)
            return
        if delta.text or delta.finish_reason is not None:
            logprobs = completion_logprobs(delta.logprobs or [], tokenizer, offsets[answer.index])
            offsets[answer.index] += len(delta.text)
            yield {**head, "choices": [{"index": answer.index, "text": delta.text,
                                        "finish_reason": delta.finish_reason, "logprobs": logprobs}]}
    if include_usage:
        yield {**head, "choices": [], "usage": exchange.usage()}
