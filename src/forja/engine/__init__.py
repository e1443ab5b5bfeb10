"""Inference engines: turn chat messages into streamed text.

`pytorch.py` decodes with transformers models on CPU or GPU. Every engine takes the same
SamplingParams and yields text deltas that never split a UTF-8 character.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class GenerationError(Exception):
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
