"""An OpenAI-compatible chat server whose "model" follows a script, for the agent tests that need a model which
knows which tool to use: asked with tools, it calls the one its script names for the first tool offered, with
the script's arguments; given that tool's result, it answers from it. Everything else in the test is forja as it
runs (the loop, the tools, the python sandbox with pandas, retrieval, citations, the store, the page); only the
model's choices are fixed, so a test checks the loop rather than a random model's luck.

It streams as OpenAI does (forja's upstream engine always streams): the call as one `tool_calls` delta and
finish_reason "tool_calls", or the answer in a few content deltas and finish_reason "stop".
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from forja.chat import ANSWER_NOW

# tool name -> (the arguments it is called with, given the user's question; the answer, given the tool's result)
Script = dict[str, tuple[Callable[[str], dict[str, Any]], Callable[[str], str]]]


def scripted_model(script: Script) -> FastAPI:
    app = FastAPI()
    app.state.requests = []  # every request body, for the tests to read

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "guion", "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        messages = body["messages"]
        offered = [t["function"]["name"] for t in body.get("tools") or []]
        tool = next((name for name in offered if name in script), None)
        asked = max(i for i, m in enumerate(messages) if m["role"] == "user" and m["content"] != ANSWER_NOW)
        results = [m for m in messages[asked:] if m["role"] == "tool"]  # (forja asks for the answer after them)
        if results or tool is None or body.get("tool_choice") == "none":
            result = results[-1]["content"] if results else ""
            called = next((m["tool_calls"][0]["function"]["name"] for m in reversed(messages)
                           if m["role"] == "assistant" and m.get("tool_calls")), None)
            text = script[called][1](result) if called in script else "No lo sé."
            delta_list = [{"content": piece} for piece in _pieces(text)]
            finish = "stop"
        else:
            question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            call = {"index": 0, "id": f"call_{uuid.uuid4().hex[:8]}", "type": "function",
                    "function": {"name": tool, "arguments": json.dumps(script[tool][0](question), ensure_ascii=False)}}
            delta_list = [{"tool_calls": [call]}]
            finish = "tool_calls"
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "guion")}
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(d.get("content", "") for d in delta_list) or None}
            if finish == "tool_calls":
                message["tool_calls"] = [{k: v for k, v in delta_list[0]["tool_calls"][0].items() if k != "index"}]
            return JSONResponse({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

        def events():
            yield _event({**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            for delta in delta_list:
                yield _event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            yield _event({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _event({**head, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5,
                                                               "total_tokens": 15}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _pieces(text: str, size: int = 8) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _event(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
