"""OpenAI-compatible routes: /v1/models, /v1/chat/completions and /v1/completions, streamed as
server-sent events when `stream` is true (`data: {chunk}` ... `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from forja.engine import ContextLengthExceeded, Delta, Prompt, QueueFull, SamplingParams, Stream
from forja.serve.deps import ApiError, ApiKeyDep, ServerState, StateDep, Target, sampling
from forja.serve.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    new_response_id,
    now,
)

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger("forja.serve")
DISCONNECT_POLL_SECONDS = 0.25


@router.get("/models")
async def list_models(state: StateDep, _: ApiKeyDep) -> ModelList:
    created = int(state.started)
    cards = [ModelCard(id=state.base, created=created, kind="base", description="the served model")]
    cards += [ModelCard(id=p.name, created=created, kind="persona", description=p.description)
              for p in state.settings.serve.personas]
    cards += [ModelCard(id=v, created=created, kind="version", description="trained version") for v in state.versions()]
    return ModelList(data=cards)


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep, _: ApiKeyDep):
    target = await state.target(body.model)
    messages = target.messages([m.as_dict() for m in body.messages])
    jobs = prepare(state, target, [messages], body, body.max_completion_tokens or body.max_tokens, "messages")
    rid, created = new_response_id("chatcmpl"), now()
    log_prompt(state, rid, messages)
    streams = submit(target, jobs)
    if body.stream:
        return sse(chat_chunks(rid, created, target.name, streams, body.n, body.include_usage))
    texts, finishes, usage = await collect(streams, request, body.n)
    log_answer(state, rid, texts)
    return ChatCompletion(
        id=rid, created=created, model=target.name, usage=usage,
        choices=[ChatChoice(index=i, message=ChatChoiceMessage(content=t), finish_reason=f)
                 for i, (t, f) in enumerate(zip(texts, finishes))],
    )


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: StateDep, _: ApiKeyDep):
    target = await state.target(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    jobs = prepare(state, target, prompts, body, body.max_tokens, "prompt")
    rid, created = new_response_id("cmpl"), now()
    log_prompt(state, rid, prompts)
    streams = submit(target, jobs)
    if body.stream:
        return sse(completion_chunks(rid, created, target.name, streams, body.n, body.include_usage))
    texts, finishes, usage = await collect(streams, request, body.n)
    log_answer(state, rid, texts)
    return Completion(
        id=rid, created=created, model=target.name, usage=usage,
        choices=[CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, f) in enumerate(zip(texts, finishes))],
    )


# ------------------------------------------------------------------------------------------------
# Shared by every generating route (also /predict)


def prepare(state: ServerState, target: Target, prompts: list[Prompt], body: Any, max_tokens: int | None,
            param: str) -> list[tuple[Prompt, SamplingParams]]:
    """One (prompt, params) job per answer: each prompt `n` times; the i-th copy gets seed + i."""
    limit = state.settings.serve.max_n
    if body.n > limit:
        raise ApiError(422, f"n is {body.n}; this server answers at most {limit} (serve.max_n)", param="n",
                       code="invalid_value")
    jobs = []
    for prompt in prompts:
        params = sampling(target, state.settings, prompt_tokens=target.engine.count_tokens(prompt), max_tokens=max_tokens,
                          temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop, param=param)
        for i in range(body.n):
            jobs.append((prompt, replace(params, seed=None if params.seed is None else params.seed + i)))
    return jobs


def submit(target: Target, jobs: list[tuple[Prompt, SamplingParams]]) -> list[Stream]:
    streams: list[Stream] = []
    try:
        for prompt, params in jobs:
            streams.append(target.engine.submit(prompt, params))
    except QueueFull as exc:
        for stream in streams:
            stream.cancel()
        raise ApiError(429, f"the server is busy: {exc}", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except ContextLengthExceeded as exc:  # normally caught earlier by sampling(); kept for other engines
        for stream in streams:
            stream.cancel()
        raise ApiError(400, str(exc), code="context_length_exceeded") from None
    return streams


async def merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of all streams as they come, tagged with the stream's index; cancels all when left early."""
    queue: asyncio.Queue[tuple[int, Delta | BaseException]] = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((index, delta))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                open_streams -= 1
            yield index, item
    finally:
        for stream in streams:
            stream.cancel()
        for task in tasks:
            task.cancel()


async def collect(streams: list[Stream], request: Request, n: int) -> tuple[list[str], list[str], Usage]:
    """Whole answers; stops generating when the client goes away while waiting."""
    texts = [""] * len(streams)
    finishes = [""] * len(streams)
    usage = UsageSum(n)

    async def consume() -> None:
        async for index, delta in merged(streams):
            texts[index] += delta.text
            if delta.finish_reason is not None:
                check_failed(delta)
                finishes[index] = delta.finish_reason
                usage.add(index, delta)

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "client closed the request", code="client_closed")
        return texts, finishes, usage.total()
    finally:
        task.cancel()


def check_failed(delta: Delta) -> None:
    if delta.finish_reason == "error":
        raise ApiError(500, f"generation failed: {delta.error}", type="server_error", code="generation_failed")


class UsageSum:
    """Usage of a request: each distinct prompt counted once (not once per `n` copy), completions summed."""

    def __init__(self, n: int):
        self.n = n
        self.prompt: dict[int, int] = {}
        self.completion = 0

    def add(self, index: int, delta: Delta) -> None:
        if delta.usage is not None:
            self.prompt[index // self.n] = delta.usage.prompt_tokens
            self.completion += delta.usage.completion_tokens

    def total(self) -> Usage:
        prompt = sum(self.prompt.values())
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion, total_tokens=prompt + self.completion)


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def chat_chunks(rid: str, created: int, model: str, streams: list[Stream], n: int,
                include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

    opening = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None, "logprobs": None}]} for i in range(len(streams))]
    return stream_events(head, streams, n, include_usage, choice, opening)


def completion_chunks(rid: str, created: int, model: str, streams: list[Stream], n: int,
                      include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}

    def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}

    return stream_events(head, streams, n, include_usage, choice, [])


async def stream_events(head: dict[str, Any], streams: list[Stream], n: int, include_usage: bool, choice: Any,
                        opening: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Chunks for every delta, a finish chunk per choice and, when asked, a last chunk with the usage.
    A failed generation becomes an `error` event (the OpenAI client raises it)."""
    for event in opening:
        yield event
    usage = UsageSum(n)
    async for index, delta in merged(streams):
        if delta.finish_reason == "error":
            yield {"error": {"message": f"generation failed: {delta.error}", "type": "server_error",
                             "param": None, "code": "generation_failed"}}
            return
        if delta.text:
            yield {**head, "choices": [choice(index, delta.text, None)]}
        if delta.finish_reason is not None:
            usage.add(index, delta)
            yield {**head, "choices": [choice(index, None, delta.finish_reason)]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage.total().model_dump()}


def log_prompt(state: ServerState, rid: str, prompt: Any) -> None:
    if state.settings.serve.log_prompts:
        log.info("%s prompt %s", rid, json.dumps(prompt, ensure_ascii=False))


def log_answer(state: ServerState, rid: str, texts: list[str]) -> None:
    if state.settings.serve.log_prompts:
        log.info("%s answer %s", rid, json.dumps(texts, ensure_ascii=False))
