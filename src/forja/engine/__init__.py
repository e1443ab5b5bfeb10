"""Inference engines: turn chat messages into streamed text.

`pytorch.py` decodes one sequence with transformers models on CPU or GPU; `batching.py` holds the
continuous-batching scheduler and its PyTorch backend, `llamacpp.py` its llama.cpp backend (GGUF
files). Every engine takes the same SamplingParams and yields text deltas that never split a UTF-8
character.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from forja.config import ForjaError


class GenerationError(ForjaError):
    """A request the engine cannot serve (e.g. a prompt longer than the context); one line for the user."""


@dataclass
class SamplingParams:
    """How to pick tokens; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


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


# A prompt is either chat messages (rendered with the model's chat template) or raw text.
Prompt = str | list[dict[str, str]]


@dataclass
class Delta:
    """A piece of streamed text; the last one of a stream carries finish_reason and usage."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    usage: Usage | None = None
    error: str | None = None


class Stream(ABC):
    """One submitted request: `async for delta in stream`, or `cancel()` to stop it early."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[Delta]: ...

    @abstractmethod
    def cancel(self) -> None: ...


class Engine(ABC):
    """Owns a model and serves many requests at once. The server talks only to this interface, so a
    llama.cpp backend or a remote OpenAI-compatible upstream can replace the PyTorch one."""

    name: str
    backend: str  # "pytorch", "llamacpp": what /health reports
    context_length: int

    @abstractmethod
    def submit(self, prompt: Prompt, params: SamplingParams) -> Stream:
        """Queue a request; raises ContextLengthExceeded or QueueFull at once, before any token."""

    def count_tokens(self, prompt: Prompt) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the engine's workers; pending streams end with finish_reason "cancelled"."""
