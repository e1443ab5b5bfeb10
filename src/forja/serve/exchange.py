"""The request path: one `Exchange` per request, from the parsed body to the stored record. It resolves the
model or persona, runs the input rails, renders tools and the system prompt, tokenizes once (off the event
loop), builds the sampling and the grammar, submits every answer, and follows each answer's stream behind
the output rails; the routes only parse the body and render the answers in their format.

Used by /v1/chat/completions, /v1/completions, /v1/responses and /predict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastapi import Request

from forja.config import SAMPLERS
from forja.engine import ContextLengthExceeded, Delta, Prompt, QueueFull, SamplingParams, Stream, UpstreamError
from forja.engine.constrain import Grammar, GrammarError
from forja.engine.text import chat_prompt_ids
from forja.knowledge import KnowledgeError
from forja.knowledge.grounding import Grounding, apply_plan, plan
from forja.monitor import AnswerTiming
from forja.serve.deps import ApiError, ServerState, Target, check_fits_queue, count_usage
from forja.serve.rails import CONTENT_FILTER, RequestRails
from forja.chat import ToolFormatError, conversation_text, has_tool_format, native_turn, with_tools_system
from forja.serve.tools import ToolCallStream, parse_tool_calls, response_format_grammar, tool_call_spec

log = logging.getLogger("forja.serve")
DISCONNECT_POLL_SECONDS = 0.25
MAX_LOGIT_BIAS = 300  # entries, as OpenAI


@dataclass
class Options:
    """What a request asks of its answers, in engine terms; None = the persona's, else `generate:`'s."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: list[str] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = True  # the client reads the answers as they come (False lets an upstream answer whole)


@dataclass
class Answer:
    """One answer of an exchange (one of `n` per prompt), as it streams and once done."""

    index: int
    prompt: int  # which of the request's prompts it answers
    stream: Stream
    text: str = ""
    finish_reason: str = "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[Any] = field(default_factory=list)
    error: str | None = None
    status: int | None = None  # the HTTP status of a failed answer (an upstream's; None = 500)
    calls: ToolCallStream | None = None  # when the request has tools: splits the streamed text as it comes
    parsed: tuple[str | None, list[dict[str, Any]]] | None = None  # content and tool calls, once finished
    grounding: Grounding | None = None  # the persona's knowledge this answer was given

    def citations(self) -> list[dict[str, Any]]:
        """The chunks the answer was given, as OpenAI annotations (empty without knowledge)."""
        return self.grounding.citations(self.text) if self.grounding is not None else []

    def sources(self) -> list[dict[str, Any]]:
        """The same citations as flat objects (the Responses API's file_citation shape, /predict's sources)."""
        return [{"type": c["type"], **c["file_citation"]} for c in self.citations()]

    def content_and_calls(self) -> tuple[str | None, list[dict[str, Any]]]:
        """The answer as OpenAI's message holds it: text, and the tool calls it made (if it has tools); parsed
        once, so the calls keep their ids."""
        if self.calls is None:
            return self.text, []
        if self.parsed is None:
            self.parsed = parse_tool_calls(self.text)
        return self.parsed


class Exchange:
    """One request: build it with `await Exchange.open(...)`, then `events()` (streaming) or `collect()`."""

    def __init__(self, state: ServerState, request: Request, rid: str, route: str, target: Target,
                 rails: RequestRails, prompts: list[Prompt], options: Options, groundings: list[Grounding | None]):
        self.state, self.rid, self.route, self.target, self.rails = state, rid, route, target, rails
        self.prompts, self.options, self.groundings = prompts, options, groundings
        self.answers: list[Answer] = []
        self.submitted: list[Stream] = []
        self.params: dict[str, Any] = {}
        self.key_name = getattr(request.state, "api_key_name", None)
        self.started = time.perf_counter()
        self.timing = AnswerTiming(state.metrics, target.engine.name, self.started)
        self.saved = state.store is None
        self.record = True  # False: a step of an agent's loop, stored with its final answer (keep())
        self.trace: list[dict[str, Any]] | None = None
        request.state.model = target.engine.name  # for the request counter

    @classmethod
    async def open(cls, state: ServerState, request: Request, *, rid: str, route: str, model: str | None,
                   prompts: list[Prompt], n: int, options: Options, param: str, n_param: str = "n",
                   input_param: str | None = None, record: bool = True) -> "Exchange":
        """Resolve the target, screen the prompts, tokenize, and submit every answer (all or none)."""
        target = await state.target(model)
        limit = state.settings.serve.max_n
        if n > limit:
            raise ApiError(422, f"{n_param} is {n}; this server answers at most {limit} (serve.max_n)", param=n_param,
                           code="invalid_value")
        check_fits_queue(state, len(prompts), n, n_param)
        rails = RequestRails(state, target, input_param)  # the field too long an input is named by
        # an upstream takes the conversation itself (tools and response_format too: it constrains its own
        # decoding); a local engine decodes the ids counted here, held to our grammar
        upstream = not target.engine.takes_ids
        grammar = None if upstream else await _grammar(target, options)
        native = upstream or (bool(options.tools) and options.tool_choice != "none"
                              and has_tool_format(target.engine.tokenizer))
        prompts = [_with_tools(target, p, options, native, upstream) if isinstance(p, list) else p for p in prompts]
        # the input rails: regexes take microseconds; a safety classifier (HTTP or a model) runs off the loop
        if rails.guard.classifier is not None:
            screened = await asyncio.to_thread(rails.screen, prompts)
        else:
            screened = rails.screen(prompts)
        prompts, groundings, fixed = await _grounded(state, target, rails, screened)
        exchange = cls(state, request, rid, route, target, rails, prompts, options, groundings)
        exchange.record = record
        jobs: list[tuple[int, Prompt | None, SamplingParams | None, tuple[str, str] | None]] = []
        for index, prompt in enumerate(prompts):
            if fixed[index] is not None:
                jobs += [(index, None, None, fixed[index])] * n
                continue
            if upstream:  # the upstream counts the tokens (its usage) and checks its own context
                ids, counted = prompt, None
            elif native:  # the template writes the tools its own way (the grammar keeps the calls in ours)
                ids = await asyncio.to_thread(chat_prompt_ids, target.engine.tokenizer, prompt, options.tools)
                counted = len(ids)
            else:  # tokenized once: these ids are the ones decoded
                ids = await asyncio.to_thread(target.engine.tokenize, prompt)
                counted = len(ids)
            params = sampling(target, state, options, prompt_tokens=counted, param=param, grammar=grammar)
            jobs += [(index, ids, replace(params, seed=None if params.seed is None else params.seed + i), None)
                     for i in range(n)]
        exchange._submit(jobs)
        if options.stream:  # a whole answer is collected, and its failure answered, by collect()
            await exchange._opened()
        return exchange

    def _submit(self, jobs: list[tuple[int, Prompt | None, SamplingParams | None, tuple[str, str] | None]]) -> None:
        submitted = self.submitted
        try:
            for index, ids, params, fixed in jobs:
                stream = self.target.engine.submit(ids, params) if ids is not None and params is not None else None
                if stream is not None:
                    submitted.append(stream)
                    self.params = self.params or _stored_params(params, self.rails)
                self.answers.append(Answer(len(self.answers), index, self.rails.answer(index, fixed, stream),
                                           calls=ToolCallStream() if self.options.tools else None,
                                           grounding=self.groundings[index]))
        except QueueFull as exc:
            for stream in submitted:
                stream.cancel()
            raise ApiError(429, f"the server is busy: {exc}", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ContextLengthExceeded as exc:  # normally caught earlier by sampling()
            for stream in submitted:
                stream.cancel()
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        except UpstreamError as exc:  # a setting the upstream does not take
            for stream in submitted:
                stream.cancel()
            raise upstream_error(exc) from None
        if self.state.settings.serve.log_prompts:
            log.info("%s prompt %s", self.rid, json.dumps(self.stored_prompt(), ensure_ascii=False))

    async def _opened(self) -> None:
        """Every submitted answer taken by its engine: an upstream that refuses the request, cannot be reached
        or does not answer in time is the request's error status (all or none), before a stream is sent. (A
        whole answer's request runs inside collect(), which notices a client that leaves.)"""
        results = await asyncio.gather(*(stream.opened() for stream in self.submitted), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for stream in self.submitted:
                stream.cancel()
            if isinstance(failures[0], UpstreamError):
                raise upstream_error(failures[0])
            raise failures[0]

    # ------------------------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[tuple[Answer, Delta]]:
        """Every answer's deltas as they come (the answer's state updated first); a failed generation raises
        nothing here: its delta has finish_reason "error". The exchange is stored once all answers are done,
        before the last delta is handed out, and whatever was sent when the client leaves early."""
        queue: asyncio.Queue[tuple[Answer, Delta | BaseException]] = asyncio.Queue()

        async def pump(answer: Answer) -> None:
            try:
                async for delta in answer.stream:
                    queue.put_nowait((answer, delta))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((answer, exc))

        tasks = [asyncio.create_task(pump(a)) for a in self.answers]
        try:
            open_answers = len(self.answers)
            while open_answers:
                answer, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                self.timing.delta(answer.index, bool(item.text))
                answer.text += item.text
                if item.logprobs:
                    answer.logprobs += item.logprobs
                if item.finish_reason is not None:
                    open_answers -= 1
                    answer.finish_reason, answer.error, answer.status = item.finish_reason, item.error, item.status
                    if item.usage is not None:
                        answer.prompt_tokens, answer.completion_tokens = item.usage.prompt_tokens, item.usage.completion_tokens
                    if answer.calls is not None and answer.content_and_calls()[1] and item.finish_reason == "stop":
                        answer.finish_reason = "tool_calls"
                    if not open_answers:
                        await self.save()
                yield answer, replace(item, finish_reason=answer.finish_reason if item.finish_reason else None)
        finally:
            for answer in self.answers:
                answer.stream.cancel()
            for task in tasks:
                task.cancel()
            if not self.saved:  # the client left early: keep what it was sent, off the event loop
                self._save_later()

    async def collect(self, request: Request) -> list[Answer]:
        """Whole answers; stops generating when the client goes away while waiting. A failed generation is a 500."""

        async def consume() -> None:
            async for answer, delta in self.events():
                if delta.finish_reason == "error":
                    if answer.status is not None:  # an upstream's refusal or failure: its status
                        raise upstream_error(UpstreamError(answer.status, answer.error or "no answer"))
                    raise ApiError(500, f"generation failed: {answer.error}", type="server_error",
                                   code="generation_failed")

        task = asyncio.create_task(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    raise ApiError(499, "client closed the request", code="client_closed")
            task.result()
            return self.answers
        finally:
            task.cancel()

    def usage(self) -> dict[str, int]:
        """Each distinct prompt counted once (not once per `n` copy), completions summed."""
        prompt = sum({a.prompt: a.prompt_tokens for a in self.answers}.values())
        completion = sum(a.completion_tokens for a in self.answers)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ------------------------------------------------------------------------------------------------ the record

    def stored_prompt(self) -> Any:
        prompts = self.rails.guard.redact(self.prompts)
        return prompts[0] if len(prompts) == 1 else prompts

    def _row(self) -> dict[str, Any]:
        usage = self.usage()
        retrieval = [g.record() if g is not None else None for g in self.groundings]
        return dict(id=self.rid, route=self.route, model=self.target.engine.name,
                    persona=self.target.persona.name if self.target.persona else None, messages=self.stored_prompt(),
                    answers=self.rails.guard.redact([a.text for a in self.answers]), params=self.params,
                    prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                    latency_ms=round((time.perf_counter() - self.started) * 1000, 1),
                    finish_reason=self.answers[0].finish_reason if self.answers else None, api_key_name=self.key_name,
                    retrieval=None if not any(retrieval) else retrieval[0] if len(retrieval) == 1 else retrieval,
                    trace=self.trace)

    async def save(self) -> None:
        if self.saved:
            return
        self.saved = True
        usage = self.usage()
        self.timing.finish(usage["prompt_tokens"], usage["completion_tokens"])
        if self.state.settings.serve.log_prompts:
            log.info("%s answer %s", self.rid, json.dumps(self.rails.guard.redact([a.text for a in self.answers]),
                                                          ensure_ascii=False))
        if self.state.store is not None:
            await asyncio.to_thread(self._write, self._row())

    def _save_later(self) -> None:
        self.saved = True
        usage = self.usage()
        self.timing.finish(usage["prompt_tokens"], usage["completion_tokens"])
        if self.state.store is None:
            return
        row = self._row()
        try:
            asyncio.get_running_loop().run_in_executor(None, self._write, row)
        except RuntimeError:  # no loop any more: write here
            self._write(row)

    async def keep(self, trace: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int,
                   conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> None:
        """Store this exchange (an agent's last step, saved without a record) as the request's one record: the
        conversation with its tool turns (as the client and the tools wrote it), the answer, the steps, the
        tools the model was offered (in `params`, so the trace trains as it was prompted) and the tokens of
        every step (each step's tokens were counted when it was saved; the request is counted here)."""
        self.record, self.trace = True, trace
        if tools:
            self.params = {**self.params, "tools": tools}
        count_usage(self.state, self.key_name, 0, 0, requests=1)
        if self.state.store is None or not self.state.settings.serve.log_exchanges:
            return
        messages = self.rails.guard.redact([self.target.messages(conversation)])[0]
        row = {**self._row(), "messages": messages, "prompt_tokens": prompt_tokens,
               "completion_tokens": completion_tokens}
        try:
            await asyncio.to_thread(self.state.store.log_exchange, **row)
        except Exception as exc:  # the answer was given; a broken store must not turn it into an error
            log.error("cannot store exchange %s: %s", self.rid, exc)

    def _write(self, row: dict[str, Any]) -> None:
        """The exchange (unless serve.log_exchanges is off) and its guardrail decisions, in one transaction."""
        events = [{**f.as_dict(), "request_id": self.rid, "model": row["model"], "persona": row["persona"],
                   "route": self.route} for f in self.rails.findings]
        try:
            if self.state.settings.serve.log_exchanges and self.record:
                self.state.store.log_exchange(**row, guard_events=events)  # type: ignore[union-attr]
            elif events:
                self.state.store.log_guard_events(events)  # type: ignore[union-attr]
        except Exception as exc:  # the answer was given; a broken store must not turn it into an error
            log.error("cannot store exchange %s: %s", self.rid, exc)
        # an agent's step counts its tokens; the request itself is counted once, by keep()
        count_usage(self.state, self.key_name, row["prompt_tokens"], row["completion_tokens"],
                    requests=1 if self.record else 0)


# ------------------------------------------------------------------------------------------------ assembling


async def _grounded(state: ServerState, target: Target, rails: RequestRails, screened: list[tuple[Prompt, str | None]]
                    ) -> tuple[list[Prompt], list[Grounding | None], list[tuple[str, str] | None]]:
    """Each screened prompt with the documents of its persona (or of the FAQ its version was trained on),
    retrieved off the event loop, and the fixed answer
    (text, finish_reason) of those the engine does not answer: the input rails' refusal, or "not found"."""
    answers_from = None
    try:  # only chat prompts the rails let through are grounded (a text completion is the client's own prompt)
        if any(refusal is None and isinstance(prompt, list) for prompt, refusal in screened):
            answers_from = await asyncio.to_thread(plan, state.settings, target.persona, target.engine.name)
    except KnowledgeError as exc:  # a version's FAQ that cannot be indexed: the server's side
        raise ApiError(503, f"{target.name!r} cannot read its knowledge: {exc}", type="server_error",
                       code="knowledge_unavailable") from None
    prompts: list[Prompt] = []
    groundings: list[Grounding | None] = []
    fixed: list[tuple[str, str] | None] = []
    for prompt, refusal in screened:
        grounding, answer = None, (refusal, CONTENT_FILTER) if refusal is not None else None
        if answer is None and answers_from is not None and isinstance(prompt, list):
            try:
                prompt, grounding, unknown = await asyncio.to_thread(apply_plan, state.settings, answers_from, prompt,
                                                                     rails.guard)
            except KnowledgeError as exc:  # a collection the persona names is missing: the server's config
                raise ApiError(503, f"{target.name!r} cannot read its knowledge: {exc}", type="server_error",
                               code="knowledge_unavailable") from None
            rails.record(grounding.findings)
            answer = (unknown, "stop") if unknown is not None else None
        prompts.append(prompt)
        groundings.append(grounding)
        fixed.append(answer)
    return prompts, groundings, fixed


def upstream_error(exc: UpstreamError) -> ApiError:
    """An upstream's refusal or failure as this server's error: its 4xx as it is, 502 or 504 as a server error."""
    if exc.status < 500:
        return ApiError(exc.status, str(exc), param=exc.param, code=exc.code or "upstream_refused")
    code = "upstream_timeout" if exc.status == 504 else "upstream_unavailable"
    return ApiError(exc.status, str(exc), type="server_error", code=code)


def sampling(target: Target, state: ServerState, options: Options, *, prompt_tokens: int | None, param: str,
             grammar: Grammar | None = None) -> SamplingParams:
    """Request values, else the persona's, else `generate:`'s; checks the answer fits in the context (unless
    `prompt_tokens` is None: an upstream checks its own, and its 400 is passed on)."""
    defaults, persona = state.settings.generate, target.persona
    context = target.engine.context_length
    max_tokens = options.max_tokens
    if prompt_tokens is None:
        max_tokens = max_tokens or (persona and persona.max_tokens) or defaults.max_new_tokens
    elif max_tokens is None:
        room = context - prompt_tokens
        max_tokens = min((persona and persona.max_tokens) or defaults.max_new_tokens, room)
        if max_tokens < 1:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens, which leaves no room to answer in the "
                           f"model's context of {context} tokens; shorten it", param=param,
                           code="context_length_exceeded")
    elif prompt_tokens + max_tokens > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
                       f"tokens and max_tokens asks for {max_tokens} more ({prompt_tokens + max_tokens} in all); "
                       "shorten the prompt or lower max_tokens", param=param, code="context_length_exceeded")
    chosen = {}
    for name in SAMPLERS:
        value = getattr(options, name)
        if value is None and persona is not None:
            value = getattr(persona, name)
        chosen[name] = value if value is not None else getattr(defaults, name)
    if not target.engine.takes_ids:  # an upstream constrains its own decoding
        chosen.update(tools=options.tools, tool_choice=options.tool_choice,
                      parallel_tool_calls=options.parallel_tool_calls, response_format=options.response_format)
    return SamplingParams(max_new_tokens=max_tokens, seed=options.seed if options.seed is not None else defaults.seed,
                          stop=options.stop or [], logit_bias=_logit_bias(target, options.logit_bias),
                          logprobs=options.logprobs, top_logprobs=options.top_logprobs, grammar=grammar,
                          stream=options.stream, **chosen)


def _logit_bias(target: Target, bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's {"token id": bias} checked against the model's vocabulary."""
    if not bias:
        return {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias",
                       code="invalid_value")
    # an upstream's vocabulary is not known here: it checks the ids itself
    vocabulary = len(target.engine.tokenizer) if target.engine.tokenizer is not None else None
    checked = {}
    for key, value in bias.items():
        if not key.isdigit() or (vocabulary is not None and int(key) >= vocabulary):
            known = f" of this model (0 to {vocabulary - 1})" if vocabulary is not None else ""
            raise ApiError(400, f"logit_bias: {key!r} is not a token id{known}", param="logit_bias",
                           code="invalid_value")
        checked[int(key)] = float(value)
    return checked


async def _grammar(target: Target, options: Options) -> Grammar | None:
    """The grammar the answers follow: the tools' calls, or the response_format; compiled off the event
    loop (the first compile for a tokenizer takes about 0.2 s). A bad schema or tool is a 400."""
    if not options.tools and not options.response_format:
        return None
    engine = target.engine
    try:
        spec = tool_call_spec(options.tools, options.tool_choice, options.parallel_tool_calls)
        if spec is not None and spec.required and (options.response_format or {}).get("type", "text") != "text":
            raise ApiError(400, "tool_choice forces a tool call, which response_format cannot also constrain; "
                           "send one of them", param="response_format", code="invalid_value")
        if spec is not None:
            return await asyncio.to_thread(Grammar.tool_calls, engine.tokenizer, spec,
                                           eos_token_ids=set(engine.eos_token_ids))
        return await asyncio.to_thread(response_format_grammar, engine.tokenizer, options.response_format,
                                       set(engine.eos_token_ids))
    except GrammarError as exc:
        param = "tools" if options.tools else "response_format"
        raise ApiError(400, f"{param}: {exc}", param=param, code="invalid_value") from None


def _with_tools(target: Target, messages: list[dict[str, Any]], options: Options, native: bool,
                upstream: bool = False) -> list[dict[str, Any]]:
    """The conversation the model reads, the system prompt first (the client's, else the persona's or the
    trained one). An upstream takes OpenAI's messages as they are; a chat template with a tool format
    (`native`) takes them with call arguments as objects; otherwise tool turns become text and the tools
    are described in the system prompt (forja.chat, as the trainer writes them)."""
    if upstream:
        return target.messages(messages)
    try:
        if native:
            return target.messages([native_turn(m) for m in messages])
        turns = target.messages(conversation_text(messages))
    except ToolFormatError as exc:
        raise ApiError(400, str(exc), param="messages", code="invalid_value") from None
    if options.tools and options.tool_choice != "none":
        return with_tools_system(turns, options.tools)
    return turns


def _stored_params(params: SamplingParams, rails: RequestRails) -> dict[str, Any]:
    stored = asdict(replace(params, grammar=None))
    stored["grammar"] = params.grammar.name if params.grammar is not None else None
    stored["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    if stored.get("stop"):
        stored["stop"] = rails.guard.redact(stored["stop"])
    return stored
