"""A persona with `tools` answers through a loop (ReAct): the model, held to the tool-call grammar, proposes
calls; forja runs them (agents.Toolbox) and feeds each result back as a `tool` message; until the model
answers in text or `max_steps` steps made calls (a step may make several), when it must answer with what it has
(tool_choice none).
Each step is an Exchange of the one request path, not stored on its own; the last one is stored as the
request's record, with the whole conversation and every step (`trace`). A repeated call (same tool, same
arguments) is not run again: the model is told to answer. /v1/chat/completions renders the reply; a stream
shows each step as it happens (a chunk with no choices and `forja.step`), then the answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import Request

from forja import files
from forja.agents import Observation, Toolbox, arguments_of
from forja.chat import TOOL_CALL_OPEN, with_answer_turns
from forja.config import Persona
from forja.serve.deps import ApiError, ServerState
from forja.serve.exchange import Answer, Exchange, Options
from forja.serve.rails import RequestRails


CALL_TOKENS = 256  # the least a step that may call a tool may write: a call with its arguments
DISCONNECT_POLL_SECONDS = 0.25  # how often a running tool looks whether its client is still there


@dataclass
class AgentReply:
    answer: Answer
    exchange: Exchange
    steps: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stopped: str | None = None  # "max_steps" or "repeated_call" when the loop was cut, else None
    toolbox: Toolbox | None = None

    def citations(self) -> list[dict[str, Any]]:
        grounding = self.toolbox.grounding if self.toolbox is not None else None
        return grounding.citations(self.answer.text) if grounding is not None else []

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def extension(self) -> dict[str, Any]:
        extension: dict[str, Any] = {"steps": self.steps, "stopped": self.stopped}
        if self.toolbox is not None and self.toolbox.unavailable:
            extension["unavailable"] = self.toolbox.unavailable
        return extension


def agent_persona(state: ServerState, model: str | None, client_tools: Any) -> Persona | None:
    """The persona a request names when it runs the server's tool loop (its own tools, none of the client's)."""
    persona = state.personas.get(model or "")
    return persona if persona is not None and persona.tools and not client_tools else None


def check_request(n: int, options: Options) -> None:
    if n != 1:
        raise ApiError(400, "n: a persona that uses tools gives one answer per request (n=1)", param="n",
                       code="unsupported_parameter")
    if options.response_format is not None:
        raise ApiError(400, "response_format: a persona that uses tools answers in text; structured output is "
                       "not available with its tool loop", param="response_format", code="unsupported_parameter")


async def run(state: ServerState, request: Request, *, rid: str, persona: Persona, messages: list[dict[str, Any]],
              options: Options, on_step: Callable[[dict[str, Any]], None] | None = None) -> AgentReply:
    """The loop, to the final answer (stored as the request's exchange)."""
    target = await state.target(persona.name)
    toolbox = Toolbox(state.settings, persona, RequestRails(state, target, None).guard, state.mcp,
                      persona_files(state, persona))
    conversation = list(messages)
    steps: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    prompt_tokens = completion_tokens = 0
    stopped = None
    must_answer = False
    for step in range(persona.max_steps + 1):
        last = must_answer or step == persona.max_steps
        choice = ("none" if last else
                  "required" if step == 0 and persona.first_tool_choice == "required" else "auto")
        # a step that may call gets room for the call; an answer is held to the client's max_tokens below
        asked = options.max_tokens or state.settings.generate.max_new_tokens
        room = asked if last else max(asked, CALL_TOKENS)
        prompt = with_answer_turns(conversation)  # after results, the answer-now turn, as training writes it
        exchange = await Exchange.open(
            state, request, rid=rid, route="chat", model=persona.name, prompts=[prompt], n=1,
            options=replace(options, tools=toolbox.specs() or None, tool_choice=choice if toolbox.specs() else None,
                            parallel_tool_calls=True, stream=False, max_tokens=room),
            param="messages", record=False)
        answer = (await exchange.collect(request))[0]
        prompt_tokens += answer.prompt_tokens
        completion_tokens += answer.completion_tokens
        content, calls = answer.content_and_calls()
        if not calls and not last and TOOL_CALL_OPEN in answer.text:  # a call cut off at `room` tokens
            must_answer, stopped = True, "call_too_long"
            continue
        if not calls:
            if step == persona.max_steps and steps and stopped is None:
                stopped = "max_steps"
            if answer.finish_reason == "tool_calls":
                answer.finish_reason = "stop"
            if room > asked:  # an answer written with a call's room is cut to what the client asked for
                _cut(exchange, answer, asked)
            reply = AgentReply(answer, exchange, steps, prompt_tokens, completion_tokens, stopped, toolbox)
            await exchange.keep(steps, prompt_tokens, completion_tokens, conversation, toolbox.specs())
            return reply
        conversation.append({"role": "assistant", "content": content, "tool_calls": calls})
        for call in calls:
            name, arguments = call["function"]["name"], arguments_of(call)
            key = (name, json.dumps(arguments, sort_keys=True, ensure_ascii=False))
            if key in seen:
                observation = Observation(f"{name} was already called with these arguments and its result is "
                                          "above; answer the user now", False)
                must_answer, stopped = True, "repeated_call"
            else:
                seen.add(key)
                observation = await _unless_gone(request, toolbox.call(name, arguments))
            conversation.append({"role": "tool", "tool_call_id": call["id"], "content": observation.text})
            record = {"step": len(steps) + 1, "tool": name, "arguments": arguments, "result": observation.text,
                      "ok": observation.ok, "seconds": observation.seconds}
            if observation.withheld:
                record["withheld"] = observation.withheld
            steps.append(record)
            if on_step is not None:
                on_step(record)
        if step + 1 == persona.max_steps and not must_answer:
            stopped = "max_steps"
    raise AssertionError("the loop always ends with an answer")  # pragma: no cover


async def _unless_gone(request: Request, call: Any) -> Observation:
    """A tool's result; a client that leaves meanwhile cancels the tool (a python run is killed) and the loop."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, "client closed the request", code="client_closed")
    finally:
        task.cancel()


def _cut(exchange: Exchange, answer: Answer, limit: int) -> None:
    """The answer cut to `limit` tokens (finish_reason length), as if it had been generated with that limit."""
    engine = exchange.target.engine
    if not engine.takes_ids or answer.completion_tokens <= limit:
        return
    ids = engine.tokenizer(answer.text, add_special_tokens=False)["input_ids"]
    if len(ids) > limit:
        answer.text = engine.tokenizer.decode(ids[:limit])
        answer.logprobs = answer.logprobs[:limit]
        answer.finish_reason = "length"


def persona_files(state: ServerState, persona: Persona) -> list[Path]:
    """The files a persona's python tool works on: uploads by id, or paths."""
    found = []
    for name in persona.files:
        if name.startswith(files.ID_PREFIX) and state.store is not None:
            try:
                found.append(files.path_of(state.settings, files.get(state.store, name)))
            except files.UnknownFile:
                raise ApiError(503, f"persona {persona.name!r}: its file {name} is not uploaded (GET /v1/files)",
                               type="server_error", code="tool_unavailable") from None
        else:
            found.append(Path(name).expanduser())
    return found


async def stream_steps(state: ServerState, request: Request, *, rid: str, persona: Persona,
                       messages: list[dict[str, Any]], options: Options) -> AsyncIterator[dict[str, Any] | AgentReply]:
    """Each step as it is made, then the reply."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(run(state, request, rid=rid, persona=persona, messages=messages, options=options,
                                   on_step=queue.put_nowait))
    try:
        while not task.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
        yield task.result()
    finally:
        task.cancel()
