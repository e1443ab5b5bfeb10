"""Inference engines: turn prompts into streamed text, many requests at once.

This file holds the one engine interface and the one factory every caller uses (`forja serve`,
`generate`, `eval`, the promotion gate, the guard classifier, `forja bench`), so that what is evaluated
is what is served. `scheduler.py` is the backend-neutral continuous-batching scheduler, `sampling.py`
picks tokens from logits, `text.py` renders prompts and streams text; `pytorch.py` and `llamacpp.py` are
the two local backends, `upstream.py` sends requests to an OpenAI-compatible server (vLLM, llama-server,
Ollama, a hosted API) instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from forja.config import ForjaError

if TYPE_CHECKING:
    from forja.config import Settings

log = logging.getLogger("forja.engine")


class GenerationError(ForjaError):
    """A request the engine cannot serve (e.g. a prompt longer than the context); one line for the user."""


@dataclass
class SamplingParams:
    """How to pick tokens (engine/sampling.py applies them); temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # transformers' (>1 discourages tokens of the prompt and the answer)
    frequency_penalty: float = 0.0  # OpenAI's: minus this per earlier use of the token in the answer
    presence_penalty: float = 0.0  # OpenAI's: minus this once the token is in the answer
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: bool = False  # each token's log-probability rides on the deltas
    top_logprobs: int = 0  # with logprobs: this many most likely tokens per step
    grammar: Any = None  # an engine.constrain.Grammar the answer must follow (JSON schema, tool calls)
    # For an engine that constrains its own decoding (an upstream, `Engine.takes_ids` False): what the
    # request asked, in OpenAI's shape, instead of a grammar. Local engines get `grammar` built from them.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # Whether the caller reads the answer as it comes. False: only the whole answer is wanted, so an upstream
    # is asked without streaming (servers that send no usage in a stream, llama-cpp-python's, then give theirs).
    stream: bool = True


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


class ContextLengthExceeded(GenerationError):
    """The prompt plus the tokens asked for do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int):
        self.prompt_tokens, self.max_new_tokens, self.context_length = prompt_tokens, max_new_tokens, context_length
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"together more than the model's context of {context_length} tokens"
        )


class QueueFull(GenerationError):
    """More requests are waiting than the engine's queue holds; the caller should retry later."""


class UpstreamError(GenerationError):
    """An upstream server refused or failed a request: `status` is the HTTP status forja answers with (the
    upstream's own 4xx; 502 for its 5xx or when it cannot be reached; 504 when it took too long)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.status, self.param, self.code = status, param, code
        super().__init__(message)


# A prompt is chat messages (rendered with the model's chat template), raw text, or the token ids of either
# (`Engine.tokenize`): callers that count tokens first submit the ids they counted.
Prompt = str | list[dict[str, str]] | list[int]


@dataclass
class Delta:
    """A piece of streamed text; the last one of a stream carries finish_reason and usage."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    usage: Usage | None = None
    error: str | None = None
    logprobs: list[Any] | None = None  # sampling.TokenLogprob of the tokens since the last delta, when asked
    status: int | None = None  # with an error: the HTTP status it maps to (an upstream's; None = 500)


class Stream(ABC):
    """One submitted request: `async for delta in stream`, or `cancel()` to stop it early."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[Delta]: ...

    @abstractmethod
    def cancel(self) -> None: ...

    async def opened(self) -> None:
        """Wait until the engine has taken the request: at once for a local engine; an upstream has answered
        (its status and headers), so a refusal is an UpstreamError here, before anything is sent to the client."""


class Engine(ABC):
    """Owns a model and serves many requests at once. The server talks only to this interface, so a
    llama.cpp backend or a remote OpenAI-compatible upstream can replace the PyTorch one."""

    name: str
    backend: str  # "pytorch", "llamacpp", "openai": what /health reports
    context_length: int
    tokenizer: Any  # the Hugging Face tokenizer whose ids the engine decodes (grammars and logprobs use it)
    eos_token_ids: set[int]
    # Local engines decode token ids the request path counted (`tokenize`); an upstream takes the messages
    # or text themselves, counts its own tokens and constrains its own decoding (no tokenizer, no grammar).
    takes_ids: bool = True

    @abstractmethod
    def submit(self, prompt: Prompt, params: SamplingParams) -> Stream:
        """Queue a request; raises ContextLengthExceeded or QueueFull at once, before any token."""

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The token ids the engine decodes for `prompt` (the chat template applied to messages)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the engine's workers; pending streams end with finish_reason "cancelled"."""


# ------------------------------------------------------------------------------------------------
# The factory


BACKENDS = ("auto", "llamacpp", "pytorch", "openai")


def pick_backend(settings: "Settings", backend: str | None = None) -> str:
    """`backend`, else serve.backend; auto: llama.cpp when it is installed and there is no GPU for PyTorch."""
    choice = backend or settings.serve.backend
    if choice not in BACKENDS:
        raise ForjaError(f"the backend is auto, llamacpp, pytorch or openai, not {choice!r}")
    if choice != "auto":
        return choice
    import torch

    from forja.engine import llamacpp

    return "llamacpp" if llamacpp.available() and not torch.cuda.is_available() else "pytorch"


def make_engine(model: str, settings: "Settings", *, backend: str | None = None, max_queue: int | None = None,
                max_batch_size: int | None = None, dtype: str | None = None, persona: Any = None) -> Engine:
    """The engine for `model` with the backend `forja serve` would use (serve.backend, or `backend`): a
    trained version is exported to GGUF once for llama.cpp (cached); under auto, a model llama.cpp cannot
    take is served by PyTorch; openai sends it to serve.upstream_url. `dtype` applies to PyTorch only. A
    `persona` with an upstream_url of its own is answered there, whatever the backend."""
    from forja import models

    serve = settings.serve
    batch = max_batch_size or serve.max_batch_size
    queue = max_queue or serve.max_queue
    chosen = backend or serve.backend
    if persona is not None and persona.upstream_url:
        from forja.engine.upstream import UpstreamEngine

        return UpstreamEngine.for_persona(persona, settings)
    if pick_backend(settings, backend) == "openai":
        from forja.engine.upstream import UpstreamEngine

        return UpstreamEngine.from_settings(model, settings)
    if pick_backend(settings, backend) == "llamacpp":
        from forja.engine import llamacpp
        from forja.export import ExportError, served_gguf

        if not llamacpp.available():
            raise models.ModelError("the backend is llamacpp but llama-cpp-python is not installed (make install)")
        try:
            path = served_gguf(settings, model, serve.gguf_quant)
        except ExportError as exc:
            if chosen != "auto":
                raise
            log.warning("running %s with PyTorch: %s", model, exc)
        else:
            return llamacpp.LlamaCppEngine(path, models.load_tokenizer(model, settings), name=model,
                                           max_batch_size=batch, max_queue=queue, kv_tokens=serve.kv_tokens,
                                           threads=settings.threads)
    from forja.engine.pytorch import PyTorchEngine

    return PyTorchEngine(models.load(model, settings, dtype=dtype), max_batch_size=batch, max_queue=queue, name=model,
                         pack=serve.pack_weights)


# ------------------------------------------------------------------------------------------------
# LoRA versions served as adapters on one loaded base


def shared_base(model: str, settings: "Settings") -> str | None:
    """The base `model` is served on as a LoRA adapter (serve.share_base), or None when it is not a LoRA
    version, names no base, or is an adapter PEFT's mixed batches and llama.cpp cannot take as such
    (modules_to_save, DoRA, a base that is itself a LoRA version): those are merged and loaded alone."""
    from forja import models

    share, backend = settings.serve.share_base, pick_backend(settings)
    if share is False or backend == "openai" or (share == "auto" and backend != "llamacpp"):
        return None
    directory = models.version_dir(settings, model)
    if directory is None or not (directory / "adapter_config.json").is_file():
        return None
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        base = models.read_version(directory).get("base")
    except (OSError, ValueError, models.ModelError):
        return None
    if (not base or config.get("peft_type", "LORA") != "LORA" or config.get("modules_to_save")
            or config.get("use_dora")):
        return None
    base_dir = models.version_dir(settings, base)
    if base_dir is not None and (base_dir / "adapter_config.json").is_file():
        return None
    return base


class AdapterEngine(Engine):
    """A LoRA version served on another engine's model (`host`): its requests decode there with the adapter
    `name`, in the same batches as the base's and the other adapters' requests. Prompts are rendered with
    the version's own tokenizer (its chat template); closing it leaves the host running."""

    def __init__(self, host: Any, name: str, tokenizer: Any):
        self.host, self.name, self.tokenizer = host, name, tokenizer
        self.backend = host.backend
        self.context_length = host.context_length
        self.eos_token_ids = host.eos_token_ids

    @property
    def load(self) -> dict[str, int]:
        return self.host.load_of(self.name)

    def tokenize(self, prompt: Prompt) -> list[int]:
        from forja.engine.scheduler import prompt_ids

        return prompt_ids(self.tokenizer, prompt)

    def submit(self, prompt: Prompt, params: SamplingParams) -> Stream:
        return self.host.submit(self.tokenize(prompt), params, adapter=self.name)


def adapter_engine(host: Engine, model: str, settings: "Settings") -> AdapterEngine:
    """`model` (a LoRA version whose base `host` runs) as an adapter on `host`: PyTorch loads the PEFT adapter,
    llama.cpp a GGUF LoRA adapter written from it once (cached). Raises ForjaError when it cannot."""
    from forja import models

    directory = models.version_dir(settings, model)
    if directory is None or not hasattr(host, "add_adapter"):
        raise ForjaError(f"{model} cannot be served as an adapter on {host.name}")
    tokenizer = models.load_tokenizer(model, settings)
    if len(tokenizer) != len(host.tokenizer):
        raise ForjaError(f"{model}'s tokenizer has {len(tokenizer)} tokens, its base's {len(host.tokenizer)}")
    if host.backend == "llamacpp":
        from forja.export_lora import served_lora_gguf

        host.add_adapter(model, served_lora_gguf(settings, model))
    else:
        host.add_adapter(model, directory)
    return AdapterEngine(host, model, tokenizer)


# ------------------------------------------------------------------------------------------------
# Whole answers, for callers outside an event loop (the CLI, eval, the gate, the guard classifier)


@dataclass
class Answer:
    text: str
    finish_reason: str
    usage: Usage
    error: str | None = None


async def answer(engine: Engine, prompt: Prompt, params: SamplingParams,
                 on_text: Callable[[str], None] | None = None) -> Answer:
    """One whole answer; `on_text` sees each piece as it streams. A request the engine refuses (too long a
    prompt) is an answer with finish_reason "error"."""
    if on_text is None:
        params = replace(params, stream=False)
    try:
        stream = engine.submit(prompt, params)
        await stream.opened()
    except GenerationError as exc:
        return Answer("", "error", Usage(), str(exc))
    parts: list[str] = []
    last = Delta(finish_reason="error", error="no output")
    async for last in stream:
        if last.text:
            parts.append(last.text)
            if on_text is not None:
                on_text(last.text)
    return Answer("".join(parts), last.finish_reason or "error", last.usage or Usage(), last.error)


def answer_all(engine: Engine, prompts: list[Prompt], params: SamplingParams,
               done: Callable[[int, Answer], None] | None = None) -> list[Answer]:
    """Answers to every prompt, submitted together so the engine batches them; `done(i, answer)` as each ends."""
    results: list[Answer | None] = [None] * len(prompts)

    async def one(i: int) -> tuple[int, Answer]:
        return i, await answer(engine, prompts[i], params)

    async def run_all() -> None:
        for next_done in asyncio.as_completed([one(i) for i in range(len(prompts))]):
            i, result = await next_done
            results[i] = result
            if done is not None:
                done(i, result)

    run_coroutine(run_all)
    return results  # type: ignore[return-value]


def run_coroutine(factory: Callable[[], Any]) -> Any:
    """asyncio.run, also when the caller is itself inside an event loop (then in a worker thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()
