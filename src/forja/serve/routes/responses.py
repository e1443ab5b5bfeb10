"""`POST /v1/responses`: OpenAI's newer API, stateless: `input` as text or items (messages, function calls
and their outputs), `instructions`, function tools and `text.format`, answered through the same request path
as chat (serve/exchange.py), whole or as Responses server-sent events (`response.created` ...
`response.output_text.delta` ... `response.completed`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from forja.serve.deps import ApiKeyDep, StateDep
from forja.serve.exchange import Answer, Exchange, Options
from forja.serve.schemas import ResponseObject, ResponsesRequest, generating_responses, now

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/responses", response_model=None,
             responses=generating_responses(ResponseObject))
async def create_response(body: ResponsesRequest, request: Request, state: StateDep, _: ApiKeyDep):
    rid, created = f"resp_{uuid.uuid4().hex}", now()
    options = Options(
        max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        response_format=body.response_format(), tools=body.chat_tools(), tool_choice=body.chat_tool_choice(),
        parallel_tool_calls=body.parallel_tool_calls, stream=bool(body.stream))
    exchange = await Exchange.open(state, request, rid=rid, route="responses", model=body.model,
                                   prompts=[body.messages()], n=1, options=options, param="input")
    shape = Shape(body, exchange, created)
    if body.stream:
        return StreamingResponse(events(shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    (answer,) = await exchange.collect(request)
    return shape.response(answer)


class Shape:
    """What every Response object of this request repeats: the request's settings, ids, and the output items."""

    def __init__(self, body: ResponsesRequest, exchange: Exchange, created: int):
        self.body, self.exchange, self.created = body, exchange, created
        self.message_id = f"msg_{uuid.uuid4().hex}"

    def response(self, answer: Answer | None, status: str | None = None) -> dict[str, Any]:
        body = self.body
        output = self.items(answer) if answer is not None else []
        incomplete = answer is not None and answer.finish_reason == "length"
        usage = self.exchange.usage()
        return {
            "id": self.exchange.rid, "object": "response", "created_at": self.created,
            "status": status or ("incomplete" if incomplete else "completed"),
            "model": self.exchange.target.name, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "metadata": body.metadata or {},
            "max_output_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "tools": body.tools or [], "tool_choice": body.tool_choice or "auto",
            "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            "text": body.text or {"format": {"type": "text"}}, "store": False,
            "usage": None if answer is None else {
                "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}},
        }

    def items(self, answer: Answer) -> list[dict[str, Any]]:
        content, calls = answer.content_and_calls()
        items = [self.message(content)] if content or not calls else []
        return items + [function_call(call) for call in calls]

    def message(self, text: str | None, status: str = "completed") -> dict[str, Any]:
        parts = [] if text is None else [self.part(text, self.annotations() if status == "completed" else [])]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": parts}

    @staticmethod
    def part(text: str, annotations: list[dict[str, Any]]) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": annotations}

    def annotations(self) -> list[dict[str, Any]]:
        """The answer's citations as the Responses API puts them: flat file_citation objects."""
        return self.exchange.answers[0].sources()


def function_call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call['id'].removeprefix('call_')}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


async def events(shape: Shape) -> AsyncIterator[str]:
    """The Responses stream: each event as `event: TYPE` and `data: {..., "sequence_number": N}`."""
    number = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal number
        number += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': number - 1, **fields}, ensure_ascii=False)}\n\n"

    yield event("response.created", response=shape.response(None, "in_progress"))
    yield event("response.in_progress", response=shape.response(None, "in_progress"))
    index, text, message_open = 0, "", False

    def open_message() -> list[str]:
        return [event("response.output_item.added", output_index=index, item=shape.message(None, "in_progress")),
                event("response.content_part.added", item_id=shape.message_id, output_index=index, content_index=0,
                      part=shape.part("", []))]

    def close_message() -> list[str]:
        part = shape.part(text, shape.annotations())
        return [event("response.output_text.done", item_id=shape.message_id, output_index=index, content_index=0,
                      text=text),
                event("response.content_part.done", item_id=shape.message_id, output_index=index, content_index=0,
                      part=part),
                event("response.output_item.done", output_index=index, item=shape.message(text))]

    answer = shape.exchange.answers[0]
    async for answer, delta in shape.exchange.events():
        if delta.finish_reason == "error":
            yield event("error", code="generation_failed", message=f"generation failed: {answer.error}", param=None)
            return
        content, calls = (answer.calls.feed(delta.text) if answer.calls is not None
                          else (delta.text, [])) if delta.text else ("", [])
        if delta.finish_reason is not None and answer.calls is not None:
            content += answer.calls.finish()
        if content:
            if not message_open:
                message_open = True
                for line in open_message():
                    yield line
            text += content
            yield event("response.output_text.delta", item_id=shape.message_id, output_index=index, content_index=0,
                        delta=content)
        for call in calls:
            if message_open:
                for line in close_message():
                    yield line
                message_open, index = False, index + 1
            item = function_call(call)
            yield event("response.output_item.added", output_index=index, item={**item, "arguments": "",
                                                                                 "status": "in_progress"})
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=item["arguments"])
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=item["arguments"])
            yield event("response.output_item.done", output_index=index, item=item)
            index += 1
    if message_open or index == 0:
        if not message_open:
            for line in open_message():
                yield line
        for line in close_message():
            yield line
    final = shape.response(answer)
    final["output"] = _streamed_items(shape, answer, text)
    yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)


def _streamed_items(shape: Shape, answer: Answer, text: str) -> list[dict[str, Any]]:
    """The output as it was streamed: the message (when text was sent, or nothing else was), then the calls
    in the order they came."""
    calls = answer.calls.calls if answer.calls is not None else []
    items = [shape.message(text)] if text or not calls else []
    return items + [function_call(call) for call in calls]

