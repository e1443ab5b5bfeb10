"""The upstream backend: forja's request path (personas, rails, knowledge, feedback, metrics, eval) in front
of an OpenAI-compatible server that runs the model: vLLM, llama.cpp's llama-server, Ollama, a hosted API.
`serve.backend: openai` with `serve.upstream_url` picks it (`forja serve --backend openai`).

One `UpstreamEngine` holds an `openai.AsyncOpenAI` client (its timeout and its retries with backoff; many
requests at once over one connection pool). Every answer is a streamed upstream request: the messages or
text go as they are (`takes_ids` is False: the upstream counts its own tokens and constrains its own
decoding, so tools and response_format go to it, not to a grammar of ours), its tool calls come back in
the text form the rest of the request path reads, and closing the stream closes the connection, which
cancels the request upstream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from forja.engine import Delta, Engine, Prompt, SamplingParams, Stream, UpstreamError, Usage
from forja.chat import CALL_HEAD, CALL_SEPARATOR, CALL_TAIL, TOOL_CALL_OPEN
from forja.engine.sampling import TokenLogprob

if TYPE_CHECKING:
    from forja.config import Settings

log = logging.getLogger("forja.engine")
PLACEHOLDER_KEY = "no-key"  # the SDK always sends a key; servers started without one ignore it
# forja's sampling settings beyond OpenAI's, with the value that means "off" (not sent when the upstream
# does not take the setting: nothing is lost)
EXTRA_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
FINISH_REASONS = {"tool_calls": "stop", "function_call": "stop"}  # the request path tells calls from text itself


class UpstreamEngine(Engine):
    """Requests for `name` sent to the OpenAI-compatible server at `url` as the model `remote`."""

    backend = "openai"
    takes_ids = False
    tokenizer = None
    eos_token_ids: set[int] = set()
    context_length = 0  # unknown here: the upstream checks its own and answers 400

    def __init__(self, name: str, url: str, remote: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 2, sampling: dict[str, str] | None = None):
        self.name, self.url, self.remote = name, url.rstrip("/"), remote
        self.api_key, self.timeout, self.max_retries = api_key or PLACEHOLDER_KEY, timeout, max_retries
        self.sampling = dict(sampling or {})  # forja's name -> the upstream's, for EXTRA_SAMPLING it takes
        self.running = 0
        # an httpx pool belongs to one event loop; the CLI, eval and the guard run theirs one after another
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    @classmethod
    def from_settings(cls, model: str, settings: "Settings") -> "UpstreamEngine":
        """`model` at serve.upstream_url: under serve.upstream_model, unless it is a trained version or a
        persona's `model` (those the upstream serves under their own names, e.g. vLLM's --lora-modules)."""
        from forja.models import ModelError, version_dir

        serve = settings.serve
        if not serve.upstream_url:
            raise ModelError("the backend is openai but serve.upstream_url is not set (the upstream's base URL, "
                             "e.g. http://127.0.0.1:8080/v1)")
        named = version_dir(settings, model) is not None or any(p.model == model for p in serve.personas)
        remote = model if named or not serve.upstream_model else serve.upstream_model
        return cls(model, serve.upstream_url, remote, api_key=_api_key(serve.upstream_api_key_env, "serve"),
                   timeout=serve.upstream_timeout, max_retries=serve.upstream_max_retries,
                   sampling=serve.upstream_sampling)

    @classmethod
    def for_persona(cls, persona: Any, settings: "Settings") -> "UpstreamEngine":
        """A persona's own upstream (`persona.upstream_url`), its `model` the name there."""
        serve = settings.serve
        env = persona.upstream_api_key_env or serve.upstream_api_key_env
        return cls(persona.model, persona.upstream_url, persona.model,
                   api_key=_api_key(env, f"persona {persona.name}"), timeout=serve.upstream_timeout,
                   max_retries=serve.upstream_max_retries, sampling=serve.upstream_sampling)

    @property
    def where(self) -> str:
        return f"the upstream {self.remote} at {self.url}"

    @property
    def load(self) -> dict[str, int]:
        return {"active": self.running, "waiting": 0}

    def client(self) -> Any:
        import openai

        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = openai.AsyncOpenAI(base_url=self.url, api_key=self.api_key, timeout=self.timeout,
                                                     max_retries=self.max_retries)
        return self._clients[loop]

    def submit(self, prompt: Prompt, params: SamplingParams) -> "UpstreamStream":
        """Checks what the upstream can be asked (a setting it does not take is an UpstreamError 400 at once);
        the request itself starts when the stream is opened or read."""
        if isinstance(prompt, list) and prompt and all(isinstance(item, int) for item in prompt):
            raise UpstreamError(400, f"{self.where} takes messages or text, not token ids",
                                code="unsupported_parameter")
        return UpstreamStream(self, prompt, self.body(prompt, params))

    def body(self, prompt: Prompt, params: SamplingParams) -> dict[str, Any]:
        """The request's fields in OpenAI's terms; forja's other samplers under the upstream's names."""
        chat = isinstance(prompt, list)
        body: dict[str, Any] = {"model": self.remote, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "stream": params.stream}
        if params.stream:
            body["stream_options"] = {"include_usage": True}
        body["messages" if chat else "prompt"] = prompt
        if params.top_p != 1.0:
            body["top_p"] = params.top_p
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(params, name):
                body[name] = getattr(params, name)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        if params.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias.items()}
        if params.logprobs:
            if chat:
                body["logprobs"] = True
                if params.top_logprobs:
                    body["top_logprobs"] = params.top_logprobs
            else:  # the legacy completions field: how many alternatives
                body["logprobs"] = params.top_logprobs
        if chat:
            for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
                if getattr(params, name) is not None:
                    body[name] = getattr(params, name)
        elif params.tools or params.response_format:
            raise UpstreamError(400, "tools and response_format need messages (/v1/chat/completions)",
                                code="unsupported_parameter")
        extra = {}
        for name, off in EXTRA_SAMPLING.items():
            value = getattr(params, name)
            if name in self.sampling:  # sent even when off, so the upstream's own default does not apply instead
                extra[self.sampling[name]] = value
            elif value != off:
                raise UpstreamError(400, f"{name} is {value}, but {self.where} is not configured to take {name} "
                                    f"(serve.upstream_sampling lists the settings beyond OpenAI's it takes): leave it "
                                    f"out of the request (and of the persona), or add it there if the upstream "
                                    f"takes it", param=name, code="unsupported_parameter")
        body.update(extra)
        return body

    def close(self) -> None:
        self._clients.clear()


def _api_key(env: str | None, owner: str) -> str | None:
    """The key in the environment variable `env` (None: no variable named, no key)."""
    from forja.models import ModelError

    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise ModelError(f"{owner}: upstream_api_key_env names {env}, which is not set in the environment: export "
                         "it with the upstream's API key")
    return key


class UpstreamStream(Stream):
    """One answer from the upstream: `opened()` sends the request and waits for its headers; reading streams
    its chunks as Deltas; `cancel()` (or leaving the loop) closes the connection."""

    def __init__(self, engine: UpstreamEngine, prompt: Prompt, body: dict[str, Any]):
        self.engine, self.prompt, self.body = engine, prompt, body
        self.response: Any = None
        self.cancelled = False
        self.failure: UpstreamError | None = None

    async def opened(self) -> None:
        if self.response is None:
            if self.failure is None:
                try:
                    self.response = await self._create()
                except UpstreamError as exc:
                    self.failure = exc
            if self.failure is not None:
                raise self.failure

    async def _create(self) -> Any:
        import openai

        client = self.engine.client()
        body = dict(self.body)
        known = _CHAT_FIELDS if "messages" in body else _COMPLETION_FIELDS
        extra = {k: body.pop(k) for k in list(body) if k not in known}
        create = client.chat.completions.create if "messages" in body else client.completions.create
        try:
            return await create(**body, extra_body=extra or None)
        except openai.OpenAIError as exc:
            raise self.engine_error(exc) from None

    def engine_error(self, exc: BaseException) -> UpstreamError:
        """An SDK or network error as the status forja answers with: the upstream's own 4xx and message, 502 for
        its 5xx or when it cannot be reached, 504 when it took longer than serve.upstream_timeout."""
        import openai

        engine = self.engine
        if isinstance(exc, openai.APITimeoutError) or "timeout" in type(exc).__name__.lower():
            return UpstreamError(504, f"{engine.where} did not answer within {engine.timeout:g} s "
                                 f"(serve.upstream_timeout, tried {engine.max_retries + 1} times)")
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, dict) else {}
            message = body.get("message") or body.get("detail") or exc.message
            if not isinstance(message, str):
                message = json.dumps(message, ensure_ascii=False)
            if exc.status_code >= 500:
                return UpstreamError(502, f"{engine.where} failed ({exc.status_code}): {message}")
            return UpstreamError(exc.status_code, f"{engine.where} refused the request: {message}",
                                 param=body.get("param") if isinstance(body.get("param"), str) else None)
        cause = exc.__cause__ or exc.__context__ or exc
        return UpstreamError(502, f"{engine.where} cannot be reached ({type(cause).__name__}: {cause}); is it "
                             "running? (serve.upstream_url)")

    async def __aiter__(self) -> AsyncIterator[Delta]:  # type: ignore[override]
        self.engine.running += 1
        usage: Usage | None = None
        pieces = 0
        finish = "stop"
        calls: dict[int, dict[str, str]] = {}
        try:
            try:
                await self.opened()
            except UpstreamError as exc:
                yield Delta(finish_reason="error", error=str(exc), usage=Usage(), status=exc.status)
                return
            try:
                async for chunk in self._chunks():
                    if chunk.usage is not None:
                        usage = Usage(chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0)
                    for choice in chunk.choices:
                        text, logprobs = _chunk_text(choice, calls)
                        if text or logprobs or getattr(getattr(choice, "delta", None), "tool_calls", None):
                            pieces += 1  # a token, for an upstream that sends no usage
                        if choice.finish_reason:
                            finish = FINISH_REASONS.get(choice.finish_reason, choice.finish_reason)
                        if text or logprobs:
                            yield Delta(text, logprobs=logprobs)
                    if self.cancelled:
                        break
            except Exception as exc:  # the connection broke, or timed out, mid-answer
                if not self.cancelled:
                    error = self.engine_error(exc)
                    log.warning("%s", error)
                    yield Delta(finish_reason="error", error=str(error), status=error.status,
                                usage=usage or Usage(completion_tokens=pieces))
                    return
            if self.cancelled:
                finish = "cancelled"
            # the upstream's usage, when it sends one (llama-cpp-python's server does not in a stream: then
            # each chunk counts as a token, and the prompt's tokens are unknown)
            yield Delta(_calls_text(calls), finish_reason=finish, usage=usage or Usage(completion_tokens=pieces))
        finally:
            self.engine.running -= 1
            await self._close()

    async def _chunks(self) -> AsyncIterator[Any]:
        """The stream's chunks; a whole answer (not streamed) is its one chunk."""
        if self.body["stream"]:
            async for chunk in self.response:
                yield chunk
        else:
            yield self.response

    async def _close(self) -> None:
        if self.body["stream"] and self.response is not None:
            try:
                await self.response.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        try:  # close now: the upstream stops generating, and a stalled read ends
            asyncio.get_running_loop().create_task(self._close())
        except RuntimeError:
            pass


_CHAT_FIELDS = {"model", "messages", "max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty",
                "seed", "stop", "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice",
                "parallel_tool_calls", "response_format", "stream", "stream_options"}
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "frequency_penalty",
                      "presence_penalty", "seed", "stop", "logit_bias", "logprobs", "stream", "stream_options"}


def _chunk_text(choice: Any, calls: dict[int, dict[str, str]]) -> tuple[str, list[TokenLogprob] | None]:
    """A chunk's text and logprobs (chat or legacy completion); tool-call pieces are gathered into `calls`."""
    delta = getattr(choice, "delta", None) or getattr(choice, "message", None)  # streamed or whole
    if delta is None:  # /v1/completions
        lp = choice.logprobs
        logprobs = None
        if lp is not None and lp.tokens:
            tops = lp.top_logprobs or [{}] * len(lp.tokens)
            logprobs = [TokenLogprob(token, logprob if logprob is not None else float("-inf"),
                                     list((top or {}).items()))
                        for token, logprob, top in zip(lp.tokens, lp.token_logprobs or [], tops)]
        return choice.text or "", logprobs
    for position, call in enumerate(delta.tool_calls or []):
        index = getattr(call, "index", None)  # a stream's pieces say which call they belong to
        entry = calls.setdefault(position if index is None else index, {"name": "", "arguments": ""})
        if call.function is not None:
            # the name comes whole in a call's first piece (llama-cpp-python repeats it in every piece)
            entry["name"] = entry["name"] or call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    logprobs = None
    if choice.logprobs is not None and choice.logprobs.content:
        logprobs = [TokenLogprob(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs or []])
                    for e in choice.logprobs.content]
    return delta.content or "", logprobs


def _calls_text(calls: dict[int, dict[str, str]]) -> str:
    """The upstream's tool calls written as forja's models write them (engine/constrain.py's format), which the
    request path parses into OpenAI's tool_calls; arguments that are not JSON stay text, as they came."""
    texts = []
    for index in sorted(calls):
        call = calls[index]
        try:
            arguments = json.dumps(json.loads(call["arguments"] or "{}"), ensure_ascii=False)
        except json.JSONDecodeError:
            arguments = call["arguments"]
        texts.append(f"{TOOL_CALL_OPEN}{CALL_HEAD}{json.dumps(call['name'], ensure_ascii=False)}, "
                     f"\"arguments\": {arguments}{CALL_TAIL}")
    return CALL_SEPARATOR.join(texts)
