"""OpenAI-compatible routes: /v1/models, /v1/chat/completions and /v1/completions, streamed as
server-sent events when `stream` is true (`data: {chunk}` ... `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from forja.embeddings import EMBEDDING_DIMENSIONS, EMBEDDING_MODEL
from forja.engine import ContextLengthExceeded, Delta, Prompt, QueueFull, SamplingParams, Stream
from forja.monitor import AnswerTiming
from forja.serve.deps import ApiError, ApiKeyDep, ServerState, StateDep, Target, check_fits_queue, sampling
from forja.serve.rails import RequestRails, allowed_prompts
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
    error_responses,
    generating_responses,
    new_response_id,
    now,
)

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger("forja.serve")
DISCONNECT_POLL_SECONDS = 0.25


@router.get("/models", responses=error_responses(401))
async def list_models(state: StateDep, _: ApiKeyDep) -> ModelList:
    return ModelList(data=model_cards(state))


@router.get("/models/{model_id:path}", responses=error_responses(401, 404, 422))
async def retrieve_model(model_id: str, state: StateDep, _: ApiKeyDep) -> ModelCard:
    """One card of /v1/models; `:path` because model ids can be paths or hub names with a `/`."""
    cards = model_cards(state)
    for card in cards:
        if card.id == model_id:
            return card
    raise ApiError(404, f"the model {model_id!r} does not exist; available: {', '.join(c.id for c in cards)}",
                   param="model", code="model_not_found")


def model_cards(state: ServerState) -> list[ModelCard]:
    created = int(state.started)
    active = state.active
    cards = [ModelCard(id=active, created=created, kind="active", description="answers requests that name no model")]
    if state.base != active:
        cards.append(ModelCard(id=state.base, created=created, kind="base", description="the model loaded at start"))
    cards += [ModelCard(id=p.name, created=created, kind="persona", description=p.description)
              for p in state.settings.serve.personas]
    cards += [ModelCard(id=v, created=created, kind="version", description="trained version")
              for v in state.versions() if v not in (active, state.base)]
    cards.append(ModelCard(id=EMBEDDING_MODEL, created=created, owned_by="sentence-transformers", kind="embedding",
                           description=f"sentence embeddings, {EMBEDDING_DIMENSIONS} dimensions (POST /v1/embeddings)"))
    return cards


@router.post("/chat/completions", response_model=None, responses=generating_responses(ChatCompletion))
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep, _: ApiKeyDep):
    target = await state.target(body.model)
    rails = RequestRails(state, target)
    screened = rails.screen([target.messages([m.as_dict() for m in body.messages])])
    jobs = prepare(state, target, allowed_prompts(screened), body, body.max_completion_tokens or body.max_tokens, "messages")
    rid, created = new_response_id("chatcmpl"), now()
    record = ExchangeRecord(state, request, rid, "chat", target, screened[0][0], jobs, rails)
    streams = rails.streams(screened, body.n, submit(target, jobs))
    if body.stream:
        return sse(chat_chunks(rid, created, target.name, streams, body.n, body.include_usage, record))
    texts, finishes, usage = await collect(streams, request, body.n, record)
    await record.save(texts, finishes, usage)
    return ChatCompletion(
        id=rid, created=created, model=target.name, usage=usage,
        choices=[ChatChoice(index=i, message=ChatChoiceMessage(content=t), finish_reason=f)
                 for i, (t, f) in enumerate(zip(texts, finishes))],
    )


@router.post("/completions", response_model=None, responses=generating_responses(Completion))
async def completions(body: CompletionRequest, request: Request, state: StateDep, _: ApiKeyDep):
    target = await state.target(body.model)
    rails = RequestRails(state, target)
    screened = rails.screen([body.prompt] if isinstance(body.prompt, str) else body.prompt)
    jobs = prepare(state, target, allowed_prompts(screened), body, body.max_tokens, "prompt")
    rid, created = new_response_id("cmpl"), now()
    prompt = screened[0][0] if isinstance(body.prompt, str) else [p for p, _ in screened]
    record = ExchangeRecord(state, request, rid, "completion", target, prompt, jobs, rails)
    streams = rails.streams(screened, body.n, submit(target, jobs))
    if body.stream:
        return sse(completion_chunks(rid, created, target.name, streams, body.n, body.include_usage, record))
    texts, finishes, usage = await collect(streams, request, body.n, record)
    await record.save(texts, finishes, usage)
    return Completion(
        id=rid, created=created, model=target.name, usage=usage,
        choices=[CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, f) in enumerate(zip(texts, finishes))],
    )


# ------------------------------------------------------------------------------------------------
# Shared by every generating route (also /predict)


def prepare(state: ServerState, target: Target, prompts: list[Prompt], body: Any, max_tokens: int | None,
            param: str) -> list[tuple[Prompt, SamplingParams]]:
    """One (prompt, params) job per answer: each prompt `n` times; the i-th copy gets seed + i."""
    limit, n_field = state.settings.serve.max_n, getattr(body, "n_field", "n")  # /predict: num_return_sequences
    if body.n > limit:
        raise ApiError(422, f"{n_field} is {body.n}; this server answers at most {limit} (serve.max_n)", param=n_field,
                       code="invalid_value")
    check_fits_queue(state, len(prompts), body.n, n_field)
    jobs = []
    for prompt in prompts:
        params = sampling(target, state.settings, prompt_tokens=len(target.engine.tokenize(prompt)), max_tokens=max_tokens,
                          temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop, param=param)
        for i in range(body.n):
            jobs.append((prompt, replace(params, seed=None if params.seed is None else params.seed + i)))
    return jobs


def submit(target: Target, jobs: list[tuple[Prompt, SamplingParams]]) -> list[Stream]:
    """Queue every job on the engine (all or none)."""
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


async def merged(streams: list[Stream], timing: AnswerTiming) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of all streams as they come, tagged with the stream's index and timed for the metrics;
    cancels all when left early."""
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
            timing.delta(index, bool(item.text))
            if item.finish_reason is not None:
                open_streams -= 1
            yield index, item
    finally:
        for stream in streams:
            stream.cancel()
        for task in tasks:
            task.cancel()


async def collect(streams: list[Stream], request: Request, n: int,
                  record: "ExchangeRecord") -> tuple[list[str], list[str], Usage]:
    """Whole answers; stops generating when the client goes away while waiting."""
    texts = [""] * len(streams)
    finishes = [""] * len(streams)
    usage = UsageSum(n)

    async def consume() -> None:
        async for index, delta in merged(streams, record.timing):
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
                include_usage: bool, record: "ExchangeRecord") -> AsyncIterator[dict[str, Any]]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

    opening = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None, "logprobs": None}]} for i in range(len(streams))]
    return stream_events(head, streams, n, include_usage, choice, opening, record)


def completion_chunks(rid: str, created: int, model: str, streams: list[Stream], n: int,
                      include_usage: bool, record: "ExchangeRecord") -> AsyncIterator[dict[str, Any]]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}

    def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}

    return stream_events(head, streams, n, include_usage, choice, [], record)


async def stream_events(head: dict[str, Any], streams: list[Stream], n: int, include_usage: bool, choice: Any,
                        opening: list[dict[str, Any]], record: "ExchangeRecord") -> AsyncIterator[dict[str, Any]]:
    """Chunks for every delta, a finish chunk per choice and, when asked, a last chunk with the usage.
    A failed generation becomes an `error` event (the OpenAI client raises it). The exchange is stored
    before the last chunk, so feedback sent as soon as the stream ends finds it."""
    for event in opening:
        yield event
    usage = UsageSum(n)
    texts, finishes = [""] * len(streams), ["cancelled"] * len(streams)
    try:
        async for index, delta in merged(streams, record.timing):
            if delta.finish_reason == "error":
                finishes[index] = "error"
                yield {"error": {"message": f"generation failed: {delta.error}", "type": "server_error",
                                 "param": None, "code": "generation_failed"}}
                return
            texts[index] += delta.text
            if delta.text:
                yield {**head, "choices": [choice(index, delta.text, None)]}
            if delta.finish_reason is not None:
                usage.add(index, delta)
                finishes[index] = delta.finish_reason
                if all(f != "cancelled" for f in finishes):
                    await record.save(texts, finishes, usage.total())
                yield {**head, "choices": [choice(index, None, delta.finish_reason)]}
        if include_usage:
            yield {**head, "choices": [], "usage": usage.total().model_dump()}
    finally:
        record.save_now(texts, finishes, usage.total())  # a client that left early: keep what it was sent


class ExchangeRecord:
    """One exchange for the store (the id the API returned is its id) with its guardrail decisions, and, when
    `log_prompts` is on, the log. PII is redacted from both (guard.redact_logs)."""

    def __init__(self, state: ServerState, request: Request, rid: str, route: str, target: Target, prompt: Any,
                 jobs: list[tuple[Prompt, SamplingParams]], rails: RequestRails):
        self.state, self.rid, self.route, self.target, self.rails = state, rid, route, target, rails
        self.prompt = rails.guard.redact(prompt)
        self.params = asdict(jobs[0][1]) if jobs else {}
        if self.params.get("stop"):
            self.params["stop"] = rails.guard.redact(self.params["stop"])
        self.key_name = getattr(request.state, "api_key_name", None)
        self.started = time.perf_counter()
        self.timing = AnswerTiming(state.metrics, target.engine.name, self.started)
        request.state.model = target.engine.name  # for the request counter
        self.saved = state.store is None
        if state.settings.serve.log_prompts:
            log.info("%s prompt %s", rid, json.dumps(self.prompt, ensure_ascii=False))

    def _row(self, texts: list[str], finishes: list[str], usage: Usage) -> dict[str, Any]:
        return dict(id=self.rid, route=self.route, model=self.target.engine.name,
                    persona=self.target.persona.name if self.target.persona else None, messages=self.prompt,
                    answers=self.rails.guard.redact(texts), params=self.params, prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    latency_ms=round((time.perf_counter() - self.started) * 1000, 1),
                    finish_reason=finishes[0] if finishes else None, api_key_name=self.key_name)

    async def save(self, texts: list[str], finishes: list[str], usage: Usage) -> None:
        self.timing.finish(usage.prompt_tokens, usage.completion_tokens)
        if self.state.settings.serve.log_prompts:
            log.info("%s answer %s", self.rid, json.dumps(self.rails.guard.redact(texts), ensure_ascii=False))
        if not self.saved:
            self.saved = True
            await asyncio.to_thread(self._write, self._row(texts, finishes, usage))

    def save_now(self, texts: list[str], finishes: list[str], usage: Usage) -> None:
        """From a `finally` where awaiting is not possible (the client went away)."""
        self.timing.finish(usage.prompt_tokens, usage.completion_tokens)
        if not self.saved:
            self.saved = True
            self._write(self._row(texts, finishes, usage))

    def _write(self, row: dict[str, Any]) -> None:
        """The exchange (unless serve.log_exchanges is off) and its guardrail decisions, in one transaction."""
        events = [{**f.as_dict(), "request_id": self.rid, "model": row["model"], "persona": row["persona"],
                   "route": self.route} for f in self.rails.findings]
        try:
            if self.state.settings.serve.log_exchanges:
                self.state.store.log_exchange(**row, guard_events=events)  # type: ignore[union-attr]
            elif events:
                self.state.store.log_guard_events(events)  # type: ignore[union-attr]
        except Exception as exc:  # the answer was given; a broken store must not turn it into an error
            log.error("cannot store exchange %s: %s", self.rid, exc)
