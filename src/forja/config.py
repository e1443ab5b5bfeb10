"""Typed settings for every forja command: defaults < forja.yaml < FORJA_* environment < CLI flags.

`forja config` prints the resolved settings. The YAML file mirrors these classes one to one;
nested fields are set from the environment with a double underscore (FORJA_GENERATE__TEMPERATURE=0.7).
"""

from __future__ import annotations

import ctypes.util
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_HOME = Path("~/.forja").expanduser()
CONFIG_FILE_NAME = "forja.yaml"


class ForjaError(Exception):
    """An error the user can fix; its message is one line. The CLI prints it without a traceback."""


class ConfigError(ForjaError):
    """A config file or value that cannot be used."""


# The sampling settings a request, a persona (None = not set) and `generate:` share, in that order of precedence.
SAMPLERS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


class GenerateSettings(BaseModel):
    """Default sampling for `forja generate` and the server (the chat page sends none of its own); `forja eval`
    answers greedily with these penalties. The defaults are measured: README, *Measured*, Default sampling."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(256, ge=1, le=32768, description="Most tokens generated per answer.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens with this mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens only; 0 = off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens less likely than min_p times the most likely one; 0 = off.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="transformers' rule: > 1 makes tokens already "
                                      "in the prompt or the answer less likely (greedy too); 1 = off.")
    frequency_penalty: float = Field(
        1.0, ge=-2.0, le=2.0, description="OpenAI's: minus this per earlier use of a token in the answer (greedy "
        "too); 0 = off. 1.0 keeps the bundled model's greedy Spanish answers from looping on both backends (0.5 still "
        "looped on one of three), where a repetition_penalty also penalises the question and the end of turn.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: minus this once a token is in the answer.")
    system: str | None = Field(None, description="System prompt; None: a version's trained one, else the chat "
                               "template's own default.")
    seed: int | None = Field(None, description="Seed for sampling; None draws a fresh one.")


class TrainSettings(BaseModel):
    """Hyper-parameters of `forja train`; every one can also be given as a flag."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "full"] = Field("lora", description="LoRA adapter (small, fast) or all weights.")
    objective: Literal["sft", "dpo", "kto", "orpo"] = Field(
        "sft", description="What the rows teach (forja.train_prefs). sft: conversations and texts word for word, and "
        "any preference rows in the data with their own losses (pairs DPO, rated rows KTO), one run; dpo: pairs "
        "{prompt, chosen, rejected} against the starting model (the reference); kto: rated rows {prompt, completion, "
        "label} (pairs count as one good and one bad row); orpo: pairs without a reference (the chosen answer's loss "
        "plus orpo_lambda times the odds-ratio term). `forja train --method dpo|kto|orpo` sets it.")
    beta: float = Field(0.1, gt=0, description="DPO/KTO: how far from the reference the preference may move the model "
                        "(the reward is beta times the log-probability ratio).")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the rows labelled true (thumbs-up).")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the rows labelled false (thumbs-down); "
                                          "raise it when good rows outnumber bad ones (the KTO paper: weights times "
                                          "counts between 1 and 4/3).")
    orpo_lambda: float = Field(0.1, gt=0, description="ORPO: weight of the odds-ratio term next to the chosen answer's loss.")
    goal: Literal["auto", "memorise", "adapt"] = Field(
        "auto", description="memorise: answers to learn word for word (a FAQ; a high learning rate, many epochs, "
        "stopped once the answers are reproduced); adapt: tone and style from a larger corpus (a low learning rate, "
        "few epochs, stopped when validation stops improving); auto: memorise up to small_data_rows dialogue rows.")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training data (ignored when max_steps is set); None = by goal: "
        "memorise at most 30 (usually stopped sooner, once learned), adapt 3.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate; None = by goal and method: memorise 1e-3 (LoRA) / 5e-5 (full), "
        "adapt 2e-4 / 2e-5.")
    learning_rate_multiplier: float = Field(
        1.0, gt=0, le=100, description="Times the learning rate by goal and method (a fine-tuning job's "
        "learning_rate_multiplier); ignored when learning_rate is set.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm.")
    batch_size: int = Field(8, ge=1, description="Sequences per batch (grouped by length, so little padding).")
    gradient_accumulation: int = Field(1, ge=1, description="Batches per optimizer step.")
    micro_batch_tokens: int = Field(
        256, ge=16, description="Most tokens in one forward pass (the examples of a batch are packed into it, no padding); a batch is split to fit. Bounds activation memory."
    )
    max_seq_length: int = Field(512, ge=16, description="Longest sequence in tokens; longer dialogues are left out and reported, longer text is split.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path (each dropout copies the layer input: memory).")
    lora_target_modules: str | list[str] = Field("all-linear", description="Modules that get adapters: 'all-linear' or a list of names.")
    seed: int = Field(0, description="Seeds the data order, the split and the initial adapter weights.")
    val_fraction: float | None = Field(
        None, ge=0, lt=1, description="Validation share when forja train prepares raw files itself; None = 0 up to "
        "small_data_rows rows (none is taken out of a small FAQ: validation then uses the training rows and their "
        "rewordings), else 0.1.")
    small_data_rows: int = Field(300, ge=0, description="Up to this many rows, data counts as small (see goal, val_fraction).")
    faq_retrieval: bool = Field(
        True, description="A version trained on a small FAQ (at most small_data_rows single-turn dialogue rows) keeps "
        "its questions and answers as knowledge: serving, eval and the feedback gate put the row nearest to each "
        "question into the prompt (knowledge.version_retrieval). Measured on the bench FAQ: reworded questions "
        "answered 2/30 without, 8/30 with.")
    faq_embedding_model: str = Field(
        "universal-sentence-encoder-multilingual-3", description="The sentence-embedding model that finds the FAQ row "
        "nearest to a question (faq_retrieval), in training and in serving: the bundled Universal Sentence Encoder "
        "multilingual v3 (Spanish among its 16 languages, offline), which finds the row of a reworded Spanish "
        "question far more often than the English MiniLM (20 of the bench FAQ's 30 rewordings first, against 15), or any "
        "name knowledge.embedding_model takes. A version is served with the one it was trained with.")
    stop_when_learned: bool = Field(
        True, description="Check (greedy, every epoch once the loss is low) whether the training answers are "
        "reproduced, and stop when all have been for an epoch and 6 steps; rows marked must_learn (corrections) are the "
        "ones checked when present.")
    augment_rewordings: int = Field(
        0, ge=0, le=4, description="memorise goal: also train each question reworded this many ways (forja.rewordings: "
        "case, accents, a greeting, bare keywords) with the same answer.")
    learn_check_rows: int = Field(64, ge=1, description="Most rows answered at each such check (a fixed sample of the data).")
    system: str | None = Field(
        None, description="System prompt put first in every dialogue row without one; recorded in the version, and "
        "used by serving, evaluation and export so the model is prompted as it was trained.")
    eval_every: int | None = Field(50, ge=1, description="Validation loss every N steps (and always at the end).")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evaluations without a better validation loss.")
    checkpoint_every: int | None = Field(50, ge=1, description="Checkpoint every N steps (also on Ctrl-C).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="bf16 autocast where the hardware runs it natively (auto), or forced."
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="Trade compute for memory; auto turns it on when activations would be large."
    )

    def resolved_goal(self, dialogue_rows: int) -> str:
        if self.goal != "auto":
            return self.goal
        return "memorise" if dialogue_rows <= self.small_data_rows else "adapt"

    def learning_rate_for(self, goal: str) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return self.learning_rate_multiplier * {("memorise", "lora"): 1e-3, ("memorise", "full"): 5e-5,
                                                ("adapt", "lora"): 2e-4, ("adapt", "full"): 2e-5}[goal, self.method]

    def epochs_for(self, goal: str) -> float:
        return self.epochs if self.epochs is not None else (30.0 if goal == "memorise" else 3.0)


class KeyLimits(BaseModel):
    """What one key may use; beyond it the server answers 429 with Retry-After."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1, le=1_000_000, description="Requests in any 60 s (per "
                                            "server process).")
    tokens_per_day: int | None = Field(None, ge=1, le=10**15, description="Prompt and completion tokens per UTC day.")


class ApiKey(BaseModel):
    """A key a client may send as `Authorization: Bearer KEY`. Give `key` (e.g. from the environment)
    or, to keep the secret out of files, `sha256`: the hex SHA-256 of the key."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="Who holds the key; shown in logs, never the key itself.")
    key: SecretStr | None = Field(None, min_length=16, description="The key itself (at least 16 characters); printed masked.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="Hex SHA-256 of the key instead of the key.")
    admin: bool = Field(False, description="May do everything: every scope, the /admin routes, and see every "
                        "client's files and jobs.")
    scopes: list[Literal["chat", "train"]] = Field(
        default_factory=lambda: ["chat"], description="What the key may do: chat (the chat, completion, embedding "
        "and /predict routes), train (upload files, fine-tuning and batch jobs: its own, unless admin).")

    limits: KeyLimits = Field(default_factory=KeyLimits)

    def may(self, scope: str) -> bool:
        return self.admin or scope in self.scopes

    @model_validator(mode="after")
    def _one_of(self) -> "ApiKey":
        if (self.key is None) == (self.sha256 is None):
            raise ValueError(f"api key {self.name!r}: give exactly one of 'key' or 'sha256'")
        return self

    @property
    def digest(self) -> str:
        return self.sha256.lower() if self.sha256 else hashlib.sha256(self.key.get_secret_value().encode()).hexdigest()  # type: ignore[union-attr]


PiiAction = Literal["block", "redact", "allow"]
SAFETY_CODES = [f"S{i}" for i in range(1, 15)]


class PiiSettings(BaseModel):
    """What the rails do with each kind of personal data they find: block the message, redact it (the model
    sees [EMAIL], [CARD], ...) or allow it. Whatever is chosen, it is redacted before anything is stored."""

    model_config = ConfigDict(extra="forbid")

    email: PiiAction = "redact"
    phone: PiiAction = "redact"
    credit_card: PiiAction = Field("redact", description="Card numbers that pass the Luhn check.")
    iban: PiiAction = Field("redact", description="IBANs that pass the mod-97 check.")
    national_id: PiiAction = Field("redact", description="Spanish DNI/NIE with a valid check letter; Argentine DNI and CUIT, Mexican CURP and RFC, Chilean RUT, Colombian cédula (check digits where they have one).")
    ip_address: PiiAction = "redact"
    allow: list[str] = Field(default_factory=list, description="Values never treated as PII (your support address or phone).")


class SafetySettings(BaseModel):
    """The safety classifier: asked the Llama Guard 3 question about each input and/or answer."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="A model forja can load (e.g. a Llama Guard 3 checkpoint) to ask.")
    endpoint: str | None = Field(None, description="Or the base URL of an OpenAI-compatible API (http://host:8080/v1).")
    endpoint_model: str = Field("llama-guard3", description="The `model` sent to the endpoint.")
    api_key: SecretStr | None = Field(None, description="Bearer key for the endpoint.")
    template: Literal["server", "forja"] = Field(
        "server", description="Endpoint only: send the conversation and let a Llama Guard server ask (server), or "
        "send forja's own Llama Guard question as one message (forja; for general models).")
    stages: list[Literal["input", "output"]] = Field(default_factory=lambda: ["input", "output"])
    on_error: Literal["allow", "block"] = Field("allow", description="When the classifier fails or answers nonsense.")
    timeout: float = Field(10.0, gt=0, description="Seconds to wait for the endpoint.")
    stream_chunk_chars: int = Field(200, ge=1, description="Streamed answers are checked and released in chunks this long.")

    @model_validator(mode="after")
    def _one_of(self) -> "SafetySettings":
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("guard.safety: give exactly one of 'model' or 'endpoint'")
        return self


class RailsSettings(BaseModel):
    """Guardrails on what clients send and what the model answers (`guard` at the top, or per persona)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run the rails at all.")
    max_input_chars: int = Field(8000, ge=1, description="Longest message a client may send (each user or assistant "
                                 "turn; a whole conversation is bounded by the model's context).")
    characters: Literal["block", "off"] = Field("block", description="Control characters and chat-template tokens in input.")
    injection: Literal["block", "flag", "off"] = Field(
        "block", description="Attempts to override or reveal the system prompt; answers quoting it.")
    topics: Literal["block", "flag", "off"] = Field(
        "block", description="Built-in phrase rules for blatant requests in the Llama Guard 3 categories.")
    safety_categories: list[str] = Field(
        default_factory=lambda: list(SAFETY_CODES), description="Llama Guard categories (S1-S14) that block; others are flagged.")
    blocklist: list[str] = Field(default_factory=list, description="Words or phrases that block (case and accents ignored).")
    block_patterns: list[str] = Field(default_factory=list, description="Regular expressions that block (case ignored).")
    pii: PiiSettings = Field(default_factory=PiiSettings)
    safety: SafetySettings | None = Field(None, description="A Llama Guard style classifier; none by default.")
    language: Literal["auto", "en", "es"] = Field("auto", description="Language of the refusals; auto = the user's.")
    refusals: dict[str, str] = Field(
        default_factory=dict, description="Your own refusal per category (pii, injection, S11, output, ...).")
    redact_logs: bool = Field(True, description="Redact PII from stored exchanges, feedback and exports.")

    @model_validator(mode="after")
    def _check(self) -> "RailsSettings":
        unknown = [c for c in self.safety_categories if c not in SAFETY_CODES]
        if unknown:
            raise ValueError(f"safety_categories: unknown {', '.join(unknown)} (use S1 to S14)")
        for pattern in self.block_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"block_patterns: {pattern!r} is not a valid regular expression ({exc})") from None
        return self


DEFAULT_CONTEXT_TEMPLATE = (
    "Answer from these documents, and cite the ones you use by their number, like [1].\n\n{documents}")
DEFAULT_NOT_FOUND = {
    "es": "No encuentro esa información en mis documentos, así que no puedo responderte con seguridad.",
    "en": "I can't find that in my documents, so I can't answer it reliably.",
}


class RetrievalSettings(BaseModel):
    """How a persona with `knowledge` grounds its answers; `knowledge.retrieval` holds the defaults and a
    persona's own `retrieval` is laid over them (only the fields it sets)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(3, ge=1, le=20, description="Chunks put into the prompt (the best of all the persona's collections).")
    min_score: float = Field(
        0.3, ge=-1.0, le=1.0, description="Least cosine similarity between the question and a chunk's vector for "
        "the chunk to count as relevant. The bundled MiniLM is an English model: Spanish questions score 0.4-0.8 "
        "against related and unrelated chunks alike, so only clearly unrelated questions fall below 0.3.")
    mode: Literal["always", "off"] = Field(
        "always", description="always: retrieve for every chat request; off: answer without the collections.")
    when_none: Literal["say_unknown", "answer"] = Field(
        "say_unknown", description="No relevant chunk: say so (not_found, in the user's language) without asking "
        "the model, or let the model answer without documents.")
    not_found: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_NOT_FOUND),
                                      description="What say_unknown answers, by language (es, en).")
    template: str = Field(DEFAULT_CONTEXT_TEMPLATE, description="Added to the system prompt; {documents} becomes "
                          "the numbered chunks, each with its source.")
    follow_up_words: int = Field(
        6, ge=0, description="A last user message of fewer words than this is a follow-up: the one before it joins "
        "the query (\"¿y los domingos?\" after \"¿qué horario tenéis?\").")

    @field_validator("template")
    @classmethod
    def _has_documents(cls, value: str) -> str:
        if "{documents}" not in value:
            raise ValueError("the template must contain {documents}, where the chunks go")
        return value


BUILTIN_TOOLS = ("knowledge_search", "calculator", "current_time", "http_get", "python")


class McpServer(BaseModel):
    """A Model Context Protocol server whose tools personas may use: a command run over stdio, or a URL
    (streamable HTTP)."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] | None = Field(None, min_length=1, description="The program and its arguments (stdio).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment for the command (besides PATH, HOME).")
    url: str | None = Field(None, pattern=r"^https?://", description="A streamable HTTP endpoint instead.")
    timeout_seconds: float = Field(30.0, gt=0, description="Connecting and listing its tools at start.")

    @model_validator(mode="after")
    def _one_of(self) -> "McpServer":
        if (self.command is None) == (self.url is None):
            raise ValueError("an MCP server has exactly one of `command` or `url`")
        return self


class HttpGetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="The http_get tool fetches pages (off: the model could reach any host).")
    allow_hosts: list[str] = Field(default_factory=list, description="Hosts it may fetch (exact names, or "
                                   "'.example.com' for a domain and its subdomains).")
    max_bytes: int = Field(200_000, ge=1000, description="Most bytes of a page read.")
    timeout_seconds: float = Field(10.0, gt=0, description="Per fetch.")


class PythonToolSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="The python tool runs code the model writes, in a process of its own.")
    timeout_seconds: float = Field(20.0, gt=0, le=300, description="Wall-clock time a run may take.")
    memory_mb: int = Field(1024, ge=64, description="Address space a run may use.")
    network: bool = Field(False, description="Whether code may open sockets (off: every connection is refused).")


class ToolSettings(BaseModel):
    """The built-in tools' limits (serve.tools); a persona names the tools it uses."""

    model_config = ConfigDict(extra="forbid")

    http_get: HttpGetSettings = Field(default_factory=HttpGetSettings)
    python: PythonToolSettings = Field(default_factory=PythonToolSettings)
    max_result_chars: int = Field(4000, ge=200, description="A tool's result is cut to this many characters "
                                  "before the model reads it (it says so).")


class PersonaPage(BaseModel):
    """What the chat page shows while a persona is selected, in place of serve.page's own."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, description="The page's title; None = serve.page.title.")
    welcome: str | None = Field(None, description="The first message shown; None = serve.page.welcome.")


class Persona(BaseModel):
    """A named assistant: a system prompt and default sampling on a model; selectable as `model`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[\w.-]+$", description="What clients put in `model` (letters, digits, _ . -).")
    description: str = Field("", description="One line shown in the web page and /v1/models.")
    system: str | None = Field(None, description="System prompt put before the conversation.")
    model: str | None = Field(None, description="A trained version or other model; None = the served base model. "
                              "With serve.backend openai: the upstream's model name (a LoRA adapter vLLM serves, say).")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default temperature (a request may override).")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default top_p.")
    top_k: int | None = Field(None, ge=0, description="Default top_k (0 = off).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Default min_p.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, description="Default repetition penalty (1 = off).")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Default frequency penalty.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Default presence penalty.")
    max_tokens: int | None = Field(None, ge=1, description="Default answer length in tokens.")
    upstream_url: str | None = Field(
        None, description="An OpenAI-compatible upstream of this persona's own (a hosted API, another vLLM), whatever "
        "serve.backend is; `model` is its name for the model there. serve.upstream_timeout, _max_retries and "
        "_sampling apply.")
    upstream_api_key_env: str | None = Field(
        None, description="With upstream_url: the environment variable holding that upstream's key; None = "
        "serve.upstream_api_key_env.")
    guard: RailsSettings | None = Field(
        None, description="Guardrail settings laid over the top-level `guard` (a list given here replaces the top-level one).")
    knowledge: list[str] = Field(default_factory=list, description="Knowledge collections the persona answers "
                                 "from (forja knowledge add NAME ...); its answers cite the chunks they were given.")
    retrieval: RetrievalSettings | None = Field(
        None, description="Retrieval settings laid over `knowledge.retrieval` (only the fields given here).")
    tools: list[str] = Field(default_factory=list, description="Tools the server runs for this persona in a loop "
                             "(built in: " + ", ".join(BUILTIN_TOOLS) + "; an MCP server's: mcp:NAME for all of "
                             "them, mcp:NAME/TOOL for one). With knowledge_search the persona retrieves when the "
                             "model asks, not before every answer.")
    max_steps: int = Field(4, ge=1, le=16, description="Tool calls at most before the model must answer.")
    tool_timeout_seconds: float = Field(20.0, gt=0, le=600, description="A tool that takes longer is cut and the "
                                        "model told so.")
    files: list[str] = Field(default_factory=list, description="For the python tool: uploaded files (their "
                             "file-... ids) or paths, copied into the working directory of every run.")
    first_tool_choice: Literal["auto", "required"] = Field(
        "auto", description="required: the first step must call a tool (a small model that answers without "
        "looking things up); later steps choose.")
    page: PersonaPage | None = Field(None, description="The chat page's title and welcome while this persona is selected.")

    @model_validator(mode="after")
    def _upstream_model(self) -> "Persona":
        if self.upstream_url and not self.model:
            raise ValueError(f"persona {self.name!r}: with upstream_url, `model` names the upstream's model")
        return self


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".avif", ".ico")


def _is_url(value: str) -> bool:
    return value.lower().startswith(("http://", "https://"))


class PageSettings(BaseModel):
    """The chat page at `/` as the people you serve see it: your name, logo and words. Every text left None
    is the built-in one in the page's language (serve/web/texts.json, Spanish and English)."""

    model_config = ConfigDict(extra="forbid")

    language: Literal["auto", "es", "en"] = Field(
        "auto", description="The page's language; auto = the browser's (Spanish when it starts with es, else English).")
    title: str | None = Field(None, description="The name at the top of the page and in the browser tab (your shop's).")
    logo: str | None = Field(
        None, description="An image shown next to the title: an http(s) URL, or a file (absolute, or relative to "
        f"FORJA_HOME) served at /page/logo; one of {', '.join(IMAGE_SUFFIXES)}.")
    welcome: str | None = Field(None, description="The first message of every conversation (not sent to the model).")
    ai_notice: str | None = Field(None, description="The notice that the visitor is talking to an AI model.")
    placeholder: str | None = Field(None, description="The hint in the empty message box.")
    send: str | None = Field(None, description="The send button.")
    stop: str | None = Field(None, description="The button that stops an answer.")
    new_chat: str | None = Field(None, description="The button that starts a new conversation.")
    good: str | None = Field(None, description="The button rating an answer good.")
    bad: str | None = Field(None, description="The button rating an answer bad.")
    improve: str | None = Field(None, description="The button opening the correction box.")
    correction_placeholder: str | None = Field(None, description="The hint in the correction box.")
    send_correction: str | None = Field(None, description="The button sending a correction.")
    thanks: str | None = Field(None, description="Shown once a rating is sent.")
    correction_saved: str | None = Field(None, description="Shown once a correction is sent.")

    @field_validator("logo")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlparse

        path = urlparse(value).path if _is_url(value) else value
        if not path.lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(f"{value!r} is not an image: name a file or URL ending in one of {', '.join(IMAGE_SUFFIXES)}")
        return value

    @property
    def logo_url(self) -> str | None:
        """Where the page loads the logo from: the URL given, or /page/logo for a file."""
        return None if self.logo is None else self.logo if _is_url(self.logo) else "/page/logo"

    def logo_file(self, home: Path) -> Path | None:
        """The logo's file (None: no logo, or a URL the browser loads itself)."""
        if self.logo is None or _is_url(self.logo):
            return None
        path = Path(self.logo).expanduser()
        return path if path.is_absolute() else home / path


class ServeSettings(BaseModel):
    """`forja serve`: where it listens, its limits, who may call it and the personas it offers."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 = every interface).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    backend: Literal["auto", "pytorch", "llamacpp", "openai"] = Field(
        "auto", description="Engine: llama.cpp (GGUF, fastest on CPU), PyTorch, auto = llama.cpp on a CPU when installed, "
        "or openai = an OpenAI-compatible upstream (vLLM, llama-server, Ollama, a hosted API) at upstream_url."
    )
    upstream_url: str | None = Field(
        None, description="backend openai: the upstream's base URL, /v1 included (http://gpu-box:8000/v1).")
    upstream_model: str | None = Field(
        None, description="backend openai: the upstream's name for the served base model; None = forja's model name "
        "as it is. Other models (a persona's `model`, a version) are sent under their own names.")
    upstream_api_key_env: str | None = Field(
        None, description="backend openai: the environment variable holding the upstream's API key (OPENAI_API_KEY); "
        "None = no key sent.")
    upstream_timeout: float = Field(
        60.0, gt=0, description="backend openai: seconds to wait for the upstream to connect, answer or send the next "
        "piece of a stream; past it the request is a 504.")
    upstream_max_retries: int = Field(
        2, ge=0, le=10, description="backend openai: retries (the openai SDK's, with exponential backoff) of a request "
        "the upstream refused with 408/409/429/5xx or could not be reached for, before any answer came.")
    upstream_sampling: dict[Literal["top_k", "min_p", "repetition_penalty"], str] = Field(
        default_factory=dict, description="backend openai: the sampling settings beyond OpenAI's that the upstream "
        "takes, and its name for each (sent in the body): vLLM {top_k: top_k, min_p: min_p, repetition_penalty: "
        "repetition_penalty}; llama.cpp's servers {top_k: top_k, min_p: min_p, repetition_penalty: repeat_penalty}; "
        "empty for OpenAI. A request that sets one the upstream does not take is a 400.")
    gguf_quant: Literal["f16", "q8_0", "q4_k_m"] = Field(
        "f16", description="llama.cpp backend: what trained versions (and, see gguf_source, the bundled model) are "
        "exported at. f16 gives the float weights' answers; q8_0 and q4_k_m are smaller and faster for one stream."
    )
    gguf_source: Literal["auto", "original", "export"] = Field(
        "auto", description="llama.cpp backend, for a model that is itself a GGUF: serve that file (original) or "
        "re-export it at gguf_quant (export); auto: export the bundled model (its Q4_1 file answers worse than its "
        "own weights), serve a .gguf you name as it is."
    )
    kv_tokens: int = Field(8192, ge=256, description="llama.cpp backend: KV-cache cells shared by all running requests.")
    max_batch_size: int = Field(8, ge=1, le=256, description="Requests decoded together in one batch.")
    pack_weights: bool = Field(
        True, description="PyTorch backend on a CPU in float32: lay the linear weights out for oneDNN's kernel once at "
        "load (decode steps 1.2-1.4x faster; results equal to float32 rounding). Off: plain torch matmuls."
    )
    share_base: bool | Literal["auto"] = Field(
        "auto", description="Serve a trained LoRA version as an adapter on one loaded copy of its base (the base, and "
        "every LoRA assistant of that base, in the memory of one model; PyTorch decodes their requests in one batch, "
        "llama.cpp one llama_decode per adapter). auto: on llama.cpp (the CPU default), not yet on PyTorch, whose "
        "adapter server slowed down in the benchmark (README); true: on both; false: each version is merged and "
        "loaded as a model of its own."
    )
    max_queue: int = Field(64, ge=1, description="Requests waiting for a batch slot; beyond this the server answers 429.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body; beyond this 413.")
    max_n: int = Field(8, ge=1, le=64, description="Largest `n` (answers per request).")
    api_keys: list[ApiKey] = Field(
        default_factory=list, description="When not empty every route but /health and the page needs one of these keys."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Other origins (https://app.example.com) allowed to call the API from a browser; empty = same origin only."
    )
    personas: list[Persona] = Field(default_factory=list, description="Named assistants offered as models.")
    mcp_servers: dict[str, McpServer] = Field(default_factory=dict, description="MCP servers whose tools personas "
                                              "name as mcp:NAME; started with the server.")
    tools: ToolSettings = Field(default_factory=ToolSettings)
    page: PageSettings = Field(default_factory=PageSettings, description="The chat page's title, logo, language and texts.")
    log_requests: bool = Field(True, description="Log one line per request (method, path, status, time).")
    log_prompts: bool = Field(False, description="Also log prompts and answers (off: they may be private).")
    log_exchanges: bool = Field(
        True, description="Store every exchange (messages, answer, model, timing) in the database so users can rate and correct it."
    )
    conversation_overflow: Literal["summarize", "drop"] = Field(
        "summarize", description="A conversation kept on the server (conversation_id) that outgrows the model's "
        "context: its older turns are summarised by the model into one note, or dropped.")
    price_per_1k_tokens: float = Field(
        0.0, ge=0, description="What a hosted API would charge per 1000 tokens (prompt and completion), for the "
        "estimated cost per key in GET /admin/usage and forja keys usage; 0 shows no cost.")

    @model_validator(mode="after")
    def _upstream(self) -> "ServeSettings":
        if self.backend == "openai" and not self.upstream_url:
            raise ValueError("serve.backend openai needs serve.upstream_url (the upstream's base URL, e.g. "
                             "http://127.0.0.1:8080/v1)")
        return self

    @model_validator(mode="after")
    def _unique_personas(self) -> "ServeSettings":
        names = [p.name for p in self.personas]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"persona names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _known_tools(self) -> "ServeSettings":
        for persona in self.personas:
            for tool in persona.tools:
                server = tool.removeprefix("mcp:").split("/", 1)[0] if tool.startswith("mcp:") else None
                if server is None and tool not in BUILTIN_TOOLS:
                    raise ValueError(f"persona {persona.name!r}: unknown tool {tool!r}; the built-in tools are "
                                     f"{', '.join(BUILTIN_TOOLS)}, and mcp:NAME names an MCP server's")
                if server is not None and server not in self.mcp_servers:
                    raise ValueError(f"persona {persona.name!r}: tool {tool!r} names the MCP server {server!r}, "
                                     f"which is not in serve.mcp_servers ({', '.join(self.mcp_servers) or 'none'})")
                if tool == "http_get" and not self.tools.http_get.enabled:
                    raise ValueError(f"persona {persona.name!r} uses http_get, which is off: set "
                                     "serve.tools.http_get.enabled and its allow_hosts")
                if tool == "python" and not self.tools.python.enabled:
                    raise ValueError(f"persona {persona.name!r} uses python, which is off: set "
                                     "serve.tools.python.enabled (code runs in a process of its own, with limits)")
        return self


class FeedbackSettings(BaseModel):
    """`forja train --from-feedback`: how feedback becomes a new version, and when it is promoted."""

    model_config = ConfigDict(extra="forbid")

    trust: Literal["reviewed", "api_keys", "anyone"] = Field(
        "api_keys", description="Whose thumbs-up train an answer word for word: only reviewed ones (forja feedback "
        "review), also those sent with an API key, or anyone's (also anonymous page visitors). Corrections always "
        "count unless rejected in review.")
    replay_ratio: float = Field(
        4.0, ge=0, description="Rows of the starting version's own training data replayed per feedback pair (keeps old "
        "knowledge); all of them when it has at most train.small_data_rows. A row whose question was corrected is never replayed."
    )
    holdout_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of the feedback pairs held back from training to check the new version "
        "(0: every correction is learned; the gate checks their rewordings instead)."
    )
    min_pairs_for_holdout: int = Field(10, ge=2, description="Hold feedback pairs back only when there are at least this many.")
    gate_metrics: list[str] = Field(
        default_factory=lambda: ["token_f1", "rouge_l"], description="Evaluation metrics the new version must not regress on."
    )
    gate_tolerance: float = Field(0.02, ge=0, le=1, description="How much lower a gate metric's mean may be and still pass.")
    gate_testset: Path | None = Field(
        None, description="Your own test set (any format forja eval reads): the regression check of the gate. None = the "
        "starting version's training rows and validation split.")
    gate_corrections: float = Field(
        1.0, ge=0, le=1, description="Share of the corrected (and approved) prompts the new version must answer as sent.")
    gate_max_cases: int = Field(40, ge=1, description="Most held-out questions answered by each version at the gate.")
    gate_max_tokens: int = Field(64, ge=1, description="Answer length at the gate.")


class KnowledgeSettings(BaseModel):
    """How `forja knowledge` cuts files into chunks and ranks them for a query."""

    model_config = ConfigDict(extra="forbid")

    embedding_model: str = Field(
        "all-MiniLM-L6-v2", description="The sentence-embedding model new collections are indexed with: the bundled "
        "all-MiniLM-L6-v2 (English, offline), a model's folder, or a Hugging Face id such as "
        "intfloat/multilingual-e5-small (loaded from the cache, else downloaded). A collection keeps the model it "
        "was made with (forja knowledge show says which): remove it and add its files again to change it.")
    chunk_tokens: int = Field(
        200, ge=16, description="Most tokens in a chunk, counted with the embedding model's tokenizer; at most its "
        "window less its two special tokens (254 for the bundled model), so a chunk is embedded whole.")
    overlap_tokens: int = Field(
        32, ge=0, description="A chunk cut between sentences (not at a heading or paragraph break) repeats up to "
        "this many tokens from the end of the one before, so a fact on the boundary is whole in one of them.")
    top_k: int = Field(5, ge=1, le=100, description="Chunks a search returns when the caller names no number.")
    candidates: int = Field(50, ge=1, description="Chunks each retriever (vectors, keywords) ranks before fusion.")
    rrf_k: int = Field(60, ge=1, description="Reciprocal rank fusion constant: a chunk scores the sum of "
                       "1 / (rrf_k + rank) over the retrievers that found it.")
    reranker: str | None = Field(
        None, description="A cross-encoder that re-scores the best fused chunks against the query (a folder, or a "
        "Hugging Face id such as cross-encoder/ms-marco-MiniLM-L-6-v2 or BAAI/bge-reranker-base); None = the fused "
        "ranking as it is.")
    rerank_candidates: int = Field(10, ge=1, le=200, description="The best fused chunks the reranker re-scores; "
                                   "the top_k asked for come out of them.")
    store: Literal["auto", "sqlite", "postgresql"] = Field(
        "auto", description="Where collections live: sqlite = FORJA_HOME/knowledge/knowledge.db; postgresql = the "
        "store's PostgreSQL database (database_url), with the pgvector extension, so that every replica sharing it "
        "sees the same collections; auto = postgresql when database_url is a PostgreSQL one, else sqlite.")
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings,
                                         description="How personas with knowledge ground their answers.")
    version_retrieval: RetrievalSettings = Field(
        default_factory=lambda: RetrievalSettings(top_k=1, when_none="answer"),
        description="How a version trained on a small FAQ (train.faq_retrieval) grounds its answers in its own rows: "
        "the nearest row; with none relevant the model answers alone.")

    @model_validator(mode="after")
    def _overlap_below_half(self) -> "KnowledgeSettings":
        if self.overlap_tokens * 2 > self.chunk_tokens:
            raise ValueError(f"overlap_tokens ({self.overlap_tokens}) must be at most half of chunk_tokens "
                             f"({self.chunk_tokens})")
        return self


class DataSource(BaseModel):
    """A file, folder or `hf:owner/name` dataset that `forja data` reads with options of its own (the same as
    the flags of `forja data inspect`/`prepare`, which override them)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="File, folder or hf:owner/name; a path given on the command line inside it gets these options.")
    map: dict[str, str] = Field(
        default_factory=dict, description="Which column is which: {question: Consulta, answer: Contestación} "
        "(also system, context, text; multi-turn conversation, role, content).")
    guess: bool = Field(False, description="Where no known format matches and map is empty, guess the mapping.")
    encoding: str | None = Field(None, description="Text encoding (e.g. cp1252); None = detected.")
    assistant: str | None = Field(None, description="Chat exports: the participant who is the assistant.")
    gap_hours: float | None = Field(None, gt=0, description="Chat exports: a pause this long starts a new conversation (default 6).")
    split: str | None = Field(None, description="hf: datasets: the split to read (default: train).")
    subset: str | None = Field(None, description="hf: datasets: the subset (configuration) to read.")


class DataSettings(BaseModel):
    """What `forja data` reads when given no paths, and how to read each source."""

    model_config = ConfigDict(extra="forbid")

    sources: list[DataSource] = Field(default_factory=list, description="Sources with their reading options.")


class FilesSettings(BaseModel):
    """Uploads through `POST /v1/files` (stored under FORJA_HOME/files)."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(100_000_000, ge=1, description="Largest file one upload may hold; beyond this 413.")


class ConsoleSettings(BaseModel):
    """The operator's console at /console (users: forja users add)."""

    model_config = ConfigDict(extra="forbid")

    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="A console login lasts this long.")


class JobsSettings(BaseModel):
    """Fine-tuning and batch jobs (`/v1/fine_tuning/jobs`, `/v1/batches`): rows in the store, run by a worker
    (in the server, or `forja worker` on any machine sharing the store and FORJA_HOME) as `forja` processes."""

    model_config = ConfigDict(extra="forbid")

    run_in_server: bool = Field(True, description="`forja serve` runs a worker too; off when `forja worker` runs "
                                "them elsewhere.")
    concurrency: int = Field(1, ge=1, le=16, description="Jobs one worker runs at the same time.")
    poll_seconds: float = Field(1.0, gt=0, le=60, description="How often a worker looks for jobs and cancellations.")
    stale_seconds: float = Field(
        60.0, ge=5, description="A running job whose worker has not been heard from for this long is taken over by "
        "another worker and resumed from its last checkpoint (a worker on the same machine sees a dead one at once).")
    cancel_seconds: float = Field(20.0, gt=0, description="A cancelled job's process is asked to stop (saving a "
                                  "checkpoint), and killed if it has not after this long.")


# ---------------------------------------------------------------------------------------------
# `forja run`: assistants built from shared defaults, step by step (forja/pipeline.py)

PIPELINE_STEPS = ("prepare", "train", "eval", "gate", "promote", "export", "package")
MODEL_FORMATS = ("gguf", "ollama", "hf")  # the export step writes these
PACKAGE_FORMATS = ("cog", "docker", "systemd")  # the package step writes these deployment packages


class PipelinePersona(BaseModel):
    """How an assistant answers: its system prompt (trained in, and served) and default sampling."""

    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(None, description="System prompt trained into every dialogue without one and "
                               "served with the assistant.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default temperature when served.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default top_p when served.")
    max_tokens: int | None = Field(None, ge=1, description="Default answer length when served.")
    knowledge: list[str] = Field(default_factory=list, description="Knowledge collections it answers from when served.")


class PipelineEval(BaseModel):
    """The assistant's test set and the gate its version must pass to be promoted and exported."""

    model_config = ConfigDict(extra="forbid")

    testset: Path | None = Field(None, description="Questions with ground truth (.csv, .jsonl, .xlsx); None: no "
                                 "eval, and the gate passes.")
    fail_under: dict[str, float] = Field(default_factory=dict, description="METRIC: VALUE (token_f1, rouge_l, "
                                         "exact_match, semantic, contains_fact): the gate fails when the mean is lower.")
    max_tokens: int = Field(128, ge=1, description="Most tokens per answer (greedy).")

    @field_validator("fail_under")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        known = ("exact_match", "token_f1", "rouge_l", "semantic", "contains_fact")
        for metric in value:
            if metric not in known:
                raise ValueError(f"unknown metric {metric!r}; choose among {', '.join(known)}")
        return value


class AssistantDefaults(BaseModel):
    """What every assistant of a pipeline shares; an assistant overrides any of it."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = Field(None, description="Model each version is trained from; None = the top-level `model`.")
    data: list[str] = Field(default_factory=list, description="Files, folders or hf:owner/name datasets, read as "
                            "`forja data prepare` reads them (data.sources options apply).")
    persona: PipelinePersona = Field(default_factory=PipelinePersona)
    train: dict[str, Any] = Field(default_factory=dict, description="Train settings laid over `train:` (method, "
                                  "max_steps, learning_rate, ...).")
    eval: PipelineEval = Field(default_factory=PipelineEval)
    export: list[str] = Field(default_factory=list, description=f"Formats written once the gate passes: "
                              f"{', '.join(MODEL_FORMATS + PACKAGE_FORMATS)}.")
    quant: Literal["f32", "f16", "q8_0", "q4_k_m"] = Field("q8_0", description="GGUF quantization of gguf/ollama exports.")
    activate: bool = Field(False, description="The promote step also makes the version the active model "
                           "(what `forja serve` answers with without a persona); one assistant at most.")

    @field_validator("train")
    @classmethod
    def _train_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(TrainSettings.model_fields))
        if unknown:
            raise ValueError(f"unknown train setting {unknown[0]!r}; see `train:` in forja.example.yaml")
        TrainSettings.model_validate(value)
        return value

    @field_validator("export")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        for fmt in value:
            if fmt not in MODEL_FORMATS + PACKAGE_FORMATS:
                raise ValueError(f"unknown export format {fmt!r}; choose among {', '.join(MODEL_FORMATS + PACKAGE_FORMATS)}")
        return value


class Assistant(BaseModel):
    """One assistant of a pipeline: a name and what it changes of the defaults (None / unset: the default's)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^\w[\w.-]*$", description="Names its versions and served persona (letters, digits, _ . -).")
    base: str | None = None
    data: list[str] | None = None
    persona: PipelinePersona | None = None
    train: dict[str, Any] | None = None
    eval: PipelineEval | None = None
    export: list[str] | None = None
    quant: Literal["f32", "f16", "q8_0", "q4_k_m"] | None = None
    activate: bool | None = None

    @field_validator("train")
    @classmethod
    def _train_fields(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return value if value is None else AssistantDefaults._train_fields(value)

    @field_validator("export")
    @classmethod
    def _formats(cls, value: list[str] | None) -> list[str] | None:
        return value if value is None else AssistantDefaults._formats(value)

    def resolved(self, defaults: AssistantDefaults) -> AssistantDefaults:
        """The defaults with this assistant's values laid over them: train settings and persona field by
        field, the rest replaced whole."""
        merged = defaults.model_dump()
        for key in self.model_fields_set - {"name"}:
            value = getattr(self, key)
            if key == "train":
                merged["train"] = {**defaults.train, **value}
            elif key == "persona":
                merged["persona"] = {**defaults.persona.model_dump(), **value.model_dump(exclude_unset=True)}
            elif key == "eval":
                merged["eval"] = {**defaults.eval.model_dump(), **value.model_dump(exclude_unset=True)}
            else:
                merged[key] = value
        return AssistantDefaults.model_validate(merged)


class PipelineSettings(BaseModel):
    """`forja run`: several assistants from shared defaults, each prepared, trained, evaluated, gated,
    promoted, exported and packaged, every step skipped when its inputs have not changed."""

    model_config = ConfigDict(extra="forbid")

    defaults: AssistantDefaults = Field(default_factory=AssistantDefaults)
    assistants: list[Assistant] = Field(default_factory=list, description="Run in this order.")

    @model_validator(mode="after")
    def _distinct(self) -> "PipelineSettings":
        names = [a.name for a in self.assistants]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"assistant {twice[0]!r} is named twice; give each a name of its own")
        active = [a.name for a in self.assistants if a.resolved(self.defaults).activate]
        if len(active) > 1:
            raise ValueError(f"activate is set for {', '.join(active)}; one active model at most")
        return self


class Settings(BaseSettings):
    """Everything forja reads from its configuration."""

    model_config = SettingsConfigDict(
        env_prefix="FORJA_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(DEFAULT_HOME, description="Models, runs, caches and the database live here (FORJA_HOME).")
    model: str = Field("smollm2-135m", description="Model used when a command gets no --model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for inference; auto = bfloat16 where the hardware runs it fast, else float32."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; None lets torch decide.")
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    guard: RailsSettings = Field(default_factory=RailsSettings)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    files: FilesSettings = Field(default_factory=FilesSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings, description="`forja run`: assistants "
                                       "built from one base.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the exchange and feedback store; None = sqlite:///FORJA_HOME/forja.db."
    )

    # The YAML file sits below the environment and the CLI flags (init kwargs).
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def versions_dir(self) -> Path:
        return self.home / "models" / "versions"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def knowledge_dir(self) -> Path:
        return self.home / "knowledge"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'forja.db'}"


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the file named by FORJA_CONFIG, else ./forja.yaml when it exists."""

    path: Path | None = None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = config_path()
        if path is None:
            return {}
        return read_yaml(path)


def config_path() -> Path | None:
    explicit = os.environ.get("FORJA_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (set by FORJA_CONFIG or --config)")
        return path
    local = Path.cwd() / CONFIG_FILE_NAME
    return local if local.is_file() else None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
    return data


def load_settings(**overrides: Any) -> Settings:
    """Resolve the settings; `overrides` are CLI flags (None values are ignored)."""
    flags = {key: value for key, value in overrides.items() if value is not None}
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        raise ConfigError(f"setting {where!r}: {err['msg']}") from None
    settings.home = settings.home.expanduser()
    return settings


def jemalloc_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """The environment for a training process that allocates through jemalloc, or None when it already
    does, when FORJA_ALLOCATOR=system says not to, or when jemalloc is not installed (libjemalloc2).

    glibc's malloc keeps the memory of freed activations (a few hundred KB each, thousands a step) in a
    fragmented heap it cannot give back: the same training run peaks about 300 MB lower under jemalloc,
    at the same speed (`forja bench train` measures it). The library must be there before the first
    allocation, so `forja train` starts itself again with it in LD_PRELOAD."""
    library = ctypes.util.find_library("jemalloc") if wants_jemalloc(env) else None
    if library is None:
        return None
    preload = env.get("LD_PRELOAD", "")
    return {**env, "LD_PRELOAD": f"{preload}:{library}" if preload else library}


def wants_jemalloc(env: Mapping[str, str]) -> bool:
    """Whether a training process with this environment should be started again under jemalloc: on Linux,
    unless it already runs under it or FORJA_ALLOCATOR=system says not to."""
    return (sys.platform.startswith("linux") and env.get("FORJA_ALLOCATOR", "jemalloc") != "system"
            and "jemalloc" not in env.get("LD_PRELOAD", ""))
