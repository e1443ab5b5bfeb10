"""Request and response bodies of the API. Requests follow OpenAI's chat/completions contract (unknown
fields are accepted and ignored, so unchanged OpenAI and LangChain clients work); /predict keeps the
classic {"prompt", "max_length", "num_return_sequences"} body."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 64


def new_response_id(kind: Literal["chatcmpl", "cmpl", "pred"] = "chatcmpl") -> str:
    """The one place response ids are made; the feedback store keys exchanges on them."""
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Model or persona name; default: the served model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens per answer.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="Answers per prompt.")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer OpenAI name of max_tokens.")


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(..., description="Raw text continued as is (no chat template).")

    @field_validator("prompt")
    @classmethod
    def _not_empty_list(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("the list of prompts is empty")
        return value


class PredictRequest(BaseModel):
    """The classic body of older web clients; the prompt is answered as one user message."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1)
    max_length: int = Field(50, ge=1, description="Most new tokens in the answer.")
    num_return_sequences: int = Field(1, ge=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = None


class PredictResponse(BaseModel):
    generated_text: str
    id: str
    finish_reason: str | None = Field(None, description="content_filter when the guardrails refused (else left out).")


MAX_FEEDBACK_CHARS = 20_000


class FeedbackRequest(BaseModel):
    """A rating and/or a corrected answer for an exchange; the classic `{"text": ...}` is a comment."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=80, description="The `id` the API returned with the answer.")
    rating: Literal["up", "down"] | None = None
    correction: str | None = Field(None, max_length=MAX_FEEDBACK_CHARS, description="What the answer should have been.")
    comment: str | None = Field(None, max_length=MAX_FEEDBACK_CHARS)
    text: str | None = Field(None, max_length=MAX_FEEDBACK_CHARS, description="Classic free-text feedback; kept as a comment.")
    choice: int | None = Field(None, ge=0, description="Which answer of an `n` > 1 request (default 0).")

    @field_validator("correction", "comment", "text")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        value = value.strip() if value is not None else None
        return value or None

    @model_validator(mode="after")
    def _something(self) -> "FeedbackRequest":
        if self.rating is None and self.correction is None and self.comment is None and self.text is None:
            raise ValueError("give a rating ('up' or 'down'), a correction or a comment")
        return self


class FeedbackRow(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: int
    exchange_id: str
    created_at: float
    choice: int
    rating: str | None
    correction: str | None
    comment: str | None
    sender: str | None


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="The trained version (or other model) to make active.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "forja"
    kind: Literal["active", "base", "version", "persona", "embedding"]
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ------------------------------------------------------------------------------------------------
# /v1/embeddings (OpenAI's contract; the limits are checked in routes/embeddings.py)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str | int | list[int]] = Field(
        ..., description="A text or a list of texts (token-id arrays are refused: ids belong to one tokenizer).")
    model: str | None = Field(None, description="The embedding model's id; default: the only one, all-MiniLM-L6-v2.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as the base64 of its little-endian float32 bytes.")
    dimensions: int | None = Field(None, description="Must be the model's own size (384) when given.")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
