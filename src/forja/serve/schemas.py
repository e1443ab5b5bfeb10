"""Request and response bodies of the API. Requests follow OpenAI's chat/completions contract: unknown
fields are accepted and ignored (so unchanged OpenAI and LangChain clients work), except the OpenAI fields
that would change the answer and that forja does not do yet (`UNSUPPORTED`), which are refused. /predict
keeps the classic {"prompt", "max_length", "num_return_sequences"} body. Numbers and booleans are strict
(`"n": "2"` is refused, not read as 2); text must be real text (no lone UTF-16 surrogate anywhere)."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from forja.config import KeyLimits
from forja.guard import CONTROL_CHARS, refused_characters

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 64
MAX_SEED = 2**63  # exclusive; torch's generator takes 64 bits, and each of `n` answers adds its index
# OpenAI request fields forja does not do yet, with the values that mean "not used" (accepted, as clients
# send them by default). Any other value is answered 400 unsupported_parameter naming the field. When you
# implement one, add it to the request model and delete its line here.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),  # the deprecated form of tools: send tools
    "function_call": (None, "none", "auto"),  # ... and tool_choice
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}
# OpenAI's chat fields that the completions route does not take (they are chat's): refused there by name.
CHAT_ONLY: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True),
    "response_format": (None, {"type": "text"}),
    "top_logprobs": (None, 0),
}
# Validation errors answered 400 (pydantic error type → OpenAI `code`); every other one is 422 invalid_value.
BAD_REQUEST_ERRORS = {"invalid_text": "invalid_value", "string_unicode": "invalid_value",
                      "unsupported_parameter": "unsupported_parameter"}
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON's "\udcff" without its pair: not a character

StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]  # an integer is still a number: 1 is 1.0
StrictBool = Annotated[bool, Strict()]


def new_response_id(kind: Literal["chatcmpl", "cmpl", "pred"] = "chatcmpl") -> str:
    """The one place response ids are made; the feedback store keys exchanges on them."""
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def refused(code: str, param: str, message: str) -> PydanticCustomError:
    """A validation error answered 400 with `code` (see BAD_REQUEST_ERRORS) naming `param`, raised from a
    validator that sees the whole body (its own location would be the body, not the field)."""
    return PydanticCustomError(code, message, {"param": param})


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON body a string (or a key) holds a lone surrogate: `messages.0.content`."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return path or "body"
        found = lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    """`value` is one of `defaults`, type for type (`false` is not the number 0, nor 0 false)."""
    return any(type(value) is type(d) and value == d for d in defaults)


class _Body(BaseModel):
    """Every request body: its text must be text, before any field is read."""

    @model_validator(mode="before")
    @classmethod
    def _real_text(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where is not None:
            raise refused("invalid_text", where, "holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without "
                          "its pair), which is not a character; send valid Unicode text")
        return data


class _Request(_Body):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Model or persona name; default: the served model.")
    max_tokens: StrictInt | None = Field(None, ge=1, description="Most tokens per answer.")
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: StrictInt = Field(1, ge=1, description="Answers per prompt.")
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=0, lt=MAX_SEED)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    top_k: StrictInt | None = Field(None, ge=0, description="Sample among the k most likely tokens (0 = off).")
    min_p: StrictFloat | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                      description="Drop tokens less likely than min_p x the most likely one.")
    repetition_penalty: StrictFloat | None = Field(None, gt=0.0, le=2.0, allow_inf_nan=False,
                                                   description="transformers' rule; 1 = off.")
    frequency_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[StrictFloat, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = Field(
        None, description="Token id (as a string) -> bias added to its logit, -100 to 100.")

    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for field, defaults in cls.unsupported.items():
                if field in data and not is_default(data[field], defaults):
                    raise refused("unsupported_parameter", field,
                                  "forja does not support this parameter yet; leave it out (or send its default)")
        return data

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
        if any(CONTROL_CHARS.search(s) for s in stops):
            raise PydanticCustomError("invalid_text", "a stop string holds a control character (such as NUL)")
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str = Field(..., description="The arguments as a JSON text.")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's calls (its content may be null).")
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers.")

    @model_validator(mode="after")
    def _complete(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (null only for an assistant message with tool_calls)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        return self

    def as_dict(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) or self.content is None else "".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(..., alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
        return self

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="Newer OpenAI name of max_tokens.")
    logprobs: StrictBool | None = Field(None, description="Return each token's log-probability.")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20, description="With logprobs: the most likely tokens per step.")
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    conversation_id: str | None = Field(None, max_length=64, description="A conversation kept on the server (an "
                                        "extension; POST /v1/conversations makes one): send only the new turns.")

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        """Image, audio and file parts are refused by name (a model that reads only text would ignore them)."""
        messages = data.get("messages") if isinstance(data, dict) else None
        for i, message in enumerate(messages if isinstance(messages, list) else []):
            parts = message.get("content") if isinstance(message, dict) else None
            for j, part in enumerate(parts if isinstance(parts, list) else []):
                if isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] != "text":
                    raise refused("unsupported_parameter", f"messages.{i}.content.{j}.type",
                                  "forja reads text only: content parts of type 'text' are supported, no others yet")
        return data

    @model_validator(mode="after")
    def _logprobs_asked(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(..., description="Raw text continued as is (no chat template).")
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description="Log-probabilities of each token and of this "
                                       "many most likely alternatives.")

    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {**UNSUPPORTED, **CHAT_ONLY}

    @field_validator("prompt")
    @classmethod
    def _not_empty_list(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("the list of prompts is empty")
        return value


class PredictRequest(_Body):
    """The classic body of older web clients; the prompt is answered as one user message."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1)
    max_length: StrictInt = Field(50, ge=1, description="Most new tokens in the answer.")
    num_return_sequences: StrictInt = Field(1, ge=1)
    model: str | None = None
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, lt=MAX_SEED)


class PredictResponse(BaseModel):
    generated_text: str
    id: str
    finish_reason: str | None = Field(None, description="content_filter when the guardrails refused (else left out).")
    sources: list[dict[str, Any]] | None = Field(
        None, description="A persona with knowledge: the chunks the answer was given (file_citation objects).")


MAX_FEEDBACK_CHARS = 20_000


class ToolCallCorrection(_Body):
    """The call an agent's step should have made: it trains as that call, after the conversation before it."""

    model_config = ConfigDict(extra="forbid")

    step: StrictInt = Field(..., ge=1, description="The step's number, as in the answer's `forja.steps`.")
    name: str | None = Field(None, min_length=1, max_length=200,
                             description="The tool it should have called (default: the step's own).")
    arguments: dict[str, Any] = Field(..., description="The arguments it should have had (the tool's JSON schema).")

    @field_validator("arguments")
    @classmethod
    def _plain(cls, value: dict[str, Any]) -> dict[str, Any]:
        """They become training data: the characters rail holds for them as for a corrected answer."""
        def texts(item: Any) -> list[str]:  # every key and string in it (json.dumps would escape a control character)
            if isinstance(item, dict):
                return [t for k, v in item.items() for t in [str(k), *texts(v)]]
            if isinstance(item, list):
                return [t for v in item for t in texts(v)]
            return [item] if isinstance(item, str) else []

        refusal = next(filter(None, map(refused_characters, texts(value))), None)
        if refusal is not None:
            raise PydanticCustomError("invalid_text", "holds {what}; send plain text", {"what": refusal})
        return value


class FeedbackRequest(_Body):
    """A rating and/or a corrected answer for an exchange; the classic `{"text": ...}` is a comment. An agent's
    answer may also have one of its tool calls corrected (`tool_call`)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=80, description="The `id` the API returned with the answer.")
    rating: Literal["up", "down"] | None = None
    correction: str | None = Field(None, max_length=MAX_FEEDBACK_CHARS, description="What the answer should have been.")
    comment: str | None = Field(None, max_length=MAX_FEEDBACK_CHARS)
    text: str | None = Field(None, max_length=MAX_FEEDBACK_CHARS, description="Classic free-text feedback; kept as a comment.")
    choice: StrictInt | None = Field(None, ge=0, description="Which answer of an `n` > 1 request (default 0).")
    tool_call: ToolCallCorrection | None = None

    @field_validator("correction", "comment", "text")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        """Corrections become training data: they pass the characters rail chat input passes, always."""
        value = value.strip() if value is not None else None
        refusal = refused_characters(value) if value else None
        if refusal is not None:
            raise PydanticCustomError("invalid_text", "holds {what}; send plain text", {"what": refusal})
        return value or None

    @model_validator(mode="after")
    def _something(self) -> "FeedbackRequest":
        if (self.rating is None and self.correction is None and self.comment is None and self.text is None
                and self.tool_call is None):
            raise ValueError("give a rating ('up' or 'down'), a correction, a corrected tool call or a comment")
        if self.tool_call is not None and self.rating == "up":
            raise ValueError("a corrected tool call rates the answer down, not up")
        return self


class FeedbackRow(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: int
    exchange_id: str
    created_at: float
    choice: int
    rating: str | None
    correction: str | None
    tool_call: dict[str, Any] | None = None
    comment: str | None
    sender: str | None


class ActivateRequest(_Body):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="A model name: a trained version, a bundled model or the "
                       "one the server was started with (never a path).")


class KeyCreate(_Body):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200, description="Who holds the key (shown in usage, never the key).")
    scopes: list[Literal["chat", "train"]] = Field(default_factory=lambda: ["chat"])
    admin: bool = False
    limits: KeyLimits = Field(default_factory=KeyLimits)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


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
    kind: Literal["active", "base", "version", "loaded", "persona", "embedding"]
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
    model: str | None = Field(None, description="The embedding model's id (GET /v1/models lists them); default: "
                              "knowledge.embedding_model, the bundled all-MiniLM-L6-v2 unless configured.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as the base64 of its little-endian float32 bytes.")
    dimensions: int | None = Field(None, description="Must be the model's own size (384 for the bundled one) when given.")
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


ERROR_STATUSES = {
    400: "Invalid JSON, text that is not valid Unicode, an unsupported parameter, or a prompt over the limits",
    401: "Missing or invalid API key",
    403: "The route needs an admin API key",
    404: "No such model, exchange or route",
    409: "This server does not store exchanges (serve.log_exchanges is off, or no database)",
    413: "The request body is larger than serve.max_body_bytes",
    422: "A field has the wrong type or value (its name in `param`)",
    429: "The server is busy (serve.max_queue); retry after Retry-After seconds",
    500: "The model failed to load, or generation failed",
    503: "The model is still loading, or failed to load",
}


GENERATING_ERRORS = (400, 401, 404, 413, 422, 429, 500, 503)  # what a route that generates can answer


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for a route: each status it can answer, with the error body."""
    return {status: {"model": ErrorResponse, "description": ERROR_STATUSES[status]} for status in statuses}


def generating_responses(answer: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that generates: the answer as JSON, or server-sent events when `stream` is true."""
    event = {"type": "object", "required": ["data"], "description": "One server-sent event",
             "properties": {"data": {"type": "string", "description": "A chunk as JSON; the last event is [DONE]"}}}
    streamed = {"text/event-stream": {"schema": event}}
    return {200: {"model": answer, "description": "The answer (server-sent events when `stream` is true)",
                  "content": streamed},
            **error_responses(*GENERATING_ERRORS)}


# ------------------------------------------------------------------------------------------------
# /v1/responses (OpenAI's Responses API, stateless: no previous_response_id, nothing kept to retrieve)

RESPONSES_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "previous_response_id": (None,),  # stateless: send the whole conversation in `input`
    "conversation": (None,),
    "background": (None, False),
    "reasoning": (None, {}),
    "include": (None, []),
    "prompt": (None,),  # stored prompt templates
    "max_tool_calls": (None,),
    "top_logprobs": (None, 0),
    "truncation": (None, "disabled"),
}


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["input_text", "output_text", "text"]
    text: str


class InputItem(BaseModel):
    """A message, a function call the model made, or its output (the items a Responses conversation holds)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputText] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> "InputItem":
        needs = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                 "function_call_output": ("call_id", "output")}[self.type]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(missing)}")
        return self

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class ResponsesRequest(_Body):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[InputItem] = Field(..., description="The user's text, or the conversation as items.")
    instructions: str | None = Field(None, description="A system message put first.")
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, lt=MAX_SEED)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128, description='{"type": "function", "name", '
                                               '"description", "parameters"} (Responses put the function flat).')
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: dict[str, Any] | None = Field(None, description='{"format": {"type": "text" | "json_object" | "json_schema", ...}}')
    stream: StrictBool = False
    store: StrictBool | None = Field(None, description="Accepted; nothing is kept to retrieve (stateless).")
    metadata: dict[str, str] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for field, defaults in RESPONSES_UNSUPPORTED.items():
                if field in data and not is_default(data[field], defaults):
                    raise refused("unsupported_parameter", field, "forja's /v1/responses is stateless and does not "
                                  "support this parameter; leave it out")
            tools = data.get("tools")
            for i, tool in enumerate(tools if isinstance(tools, list) else []):  # not a list: the field's own 422
                if isinstance(tool, dict) and tool.get("type") != "function":
                    raise refused("unsupported_parameter", f"tools.{i}.type",
                                  f"only function tools are supported, not {tool.get('type')!r}")
        return data

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages (function calls and outputs as assistant tool_calls and tool turns)."""
        items = [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        for item in items:
            if item.type == "message":
                messages.append({"role": "system" if item.role == "developer" else item.role, "content": item.text()})
            elif item.type == "function_call":
                call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return messages

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """Responses' flat function tools in chat's shape."""
        if not self.tools:
            return None
        return [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}} for tool in self.tools]

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
            return {"type": "function", "function": {"name": choice["name"]}}
        return choice

    def response_format(self) -> dict[str, Any] | None:
        """`text.format` as chat's response_format."""
        fmt = (self.text or {}).get("format")
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_schema":
            return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        return {"type": fmt.get("type")}


class ResponseObject(BaseModel):
    """A Response (the fields forja fills; see OpenAI's Responses API)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None
