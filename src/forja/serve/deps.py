"""What the routes share: the server state (engines, personas), API-key checking and OpenAI-style errors.

Routes take these as Annotated dependencies (`StateDep`, `ApiKeyDep`); limits are checked here, once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, Request

from forja.config import ApiKey, Persona, Settings
from forja.engine import Engine, adapter_engine, make_engine, shared_base
from forja.data import read_rows
from forja.guard import Guards, published_pii
from forja.keys import KeyRing, Limited, count
from forja.models import trained_system, version_dir, with_system
from forja.monitor import Metrics
from forja.store import Store

log = logging.getLogger("forja.serve")
REGISTRY_RETRY_SECONDS = 5.0  # the database did not answer whether the active version moved: ask again after this


class ApiError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Target:
    """What a request's `model` names: the engine to run on, a persona's defaults, and the system prompt
    for requests without one (the persona's, else the one the model was trained with)."""

    name: str
    engine: Engine
    persona: Persona | None = None
    system: str | None = None
    published: tuple[str, ...] = ()  # contact data the model was trained to give: never redacted in its answers

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The system prompt goes first, unless the client sent its own."""
        return with_system(messages, self.system)


@dataclass
class ServerState:
    """Engines by model name (the served base first, trained versions loaded when first named).

    `active` answers requests that name no model (and personas without their own). When the server
    was started without --model it follows the registry's active version, so `forja models promote`
    or POST /admin/models/activate switch it without a restart."""

    settings: Settings
    base: str  # the model loaded at start: --model, else the active version
    follow_registry: bool = False
    store: Store | None = None
    engines: dict[str, Engine] = field(default_factory=dict)
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    metrics: Metrics = field(init=False)
    guards: Guards = field(init=False)
    keyring: KeyRing = field(init=False)
    mcp: Any = None  # forja.agents.mcp.McpHub when serve.mcp_servers names any
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _active: str = ""
    _registry_stamp: int | None = None
    _registry_retry: float = 0.0
    _systems: dict[str, str | None] = field(default_factory=dict)
    _published: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engines)
        self.guards = Guards(self.settings)
        self.keyring = KeyRing(self.settings, self.store)
        self._active = self.base
        self._registry_stamp = self._stamp()

    def _stamp(self) -> int | None:
        """The newest change of the active version in the database (every replica sharing it sees the same)."""
        if self.store is None or time.monotonic() < self._registry_retry:
            return self._registry_stamp
        try:
            return self.store.registry_mark()
        except sa.exc.SQLAlchemyError:  # the database is away: keep serving the version known, ask again later
            self._registry_retry = time.monotonic() + REGISTRY_RETRY_SECONDS
            return self._registry_stamp

    @property
    def active(self) -> str:
        """The default model; re-read when the registry in the database changed (one index lookup per request,
        so a promotion on any replica is followed at the next request on this one)."""
        if self.follow_registry:
            stamp = self._stamp()
            if stamp != self._registry_stamp:
                from forja.models import ModelError, active_model

                try:
                    self._active = active_model(self.settings, self.store)
                    self._registry_stamp = stamp
                except (ModelError, sa.exc.SQLAlchemyError) as exc:
                    log.error("keeping %s active: %s", self._active, exc)
        return self._active

    def activate(self, name: str) -> None:
        self._active = name
        self._registry_stamp = self._stamp()

    @property
    def ready(self) -> bool:
        return self.base in self.engines

    @property
    def personas(self) -> dict[str, Persona]:
        return {p.name: p for p in self.settings.serve.personas}

    def versions(self) -> list[str]:
        from forja.models import version_names

        return version_names(self.settings)

    async def target(self, name: str | None) -> Target:
        """Resolve `model` from a request, or answer 404 naming what can be used."""
        if not self.ready:
            if self.load_error:
                raise ApiError(503, f"the model {self.base} failed to load: {self.load_error}", type="server_error",
                               code="model_load_failed")
            raise ApiError(503, f"the model {self.base} is still loading; retry in a few seconds", type="server_error",
                           code="model_loading", headers={"Retry-After": "5"})
        if self.store is not None and self.store.backlog_full:  # nothing answered now could be stored
            raise ApiError(503, f"the database is unreachable and {len(self.store.backlog)} answered exchanges wait "
                           "for it in memory; retry when it is back", type="server_error",
                           code="database_unavailable", headers={"Retry-After": "5"})
        active = self.active
        name = name or active
        persona = self.personas.get(name)
        model = (persona.model if persona else None) or (active if persona else name)
        if not persona and model not in (self.base, active) and model not in self.engines and model not in self.versions():
            known = ", ".join(dict.fromkeys([active, *self.personas]))  # versions are listed to admins only
            raise ApiError(404, f"the model {name!r} does not exist; available: {known}", type="invalid_request_error",
                           param="model", code="model_not_found")
        engine = await self.engine(model, persona if persona is not None and persona.upstream_url else None)
        return Target(name, engine, persona, (persona.system if persona else None) or self.system_of(model),
                      self.published_of(model))

    def system_of(self, model: str) -> str | None:
        """The system prompt `model` was trained with, read once, like its engine is loaded once."""
        if model not in self._systems:
            self._systems[model] = trained_system(self.settings, model)
        return self._systems[model]

    def published_of(self, model: str) -> tuple[str, ...]:
        """The contact data `model`'s own training answers give (guard.published_pii), read once."""
        if model not in self._published:
            directory = version_dir(self.settings, model)
            rows = read_rows(directory / "data.jsonl") if directory is not None else []
            self._published[model] = published_pii(rows)
        return self._published[model]

    async def engine(self, model: str, persona: Persona | None = None) -> Engine:
        """The engine for `model`, made once; a persona with an upstream of its own gets its own."""
        key = f"{model}@{persona.upstream_url}" if persona is not None else model
        if key in self.engines:
            return self.engines[key]
        async with self._lock:  # two first requests for a version load it once
            if key not in self.engines:
                log.info("loading %s", key)
                try:
                    self.engines[key] = await asyncio.to_thread(self.make_engine, model, persona)
                except Exception as exc:  # ModelError and friends: say which model, keep serving the others
                    raise ApiError(500, f"cannot load the model {model}: {exc}", type="server_error",
                                   code="model_load_failed") from None
        return self.engines[key]

    def make_engine(self, model: str, persona: Persona | None = None) -> Engine:
        """A new engine for `model` (in a worker thread, holding `_lock` or before serving starts). A LoRA
        version whose base is loaded, or can be, is an adapter on that base's engine (serve.share_base):
        several assistants of one base hold one copy of its weights; one that cannot be is merged alone."""
        base = shared_base(model, self.settings) if persona is None else None
        if base is not None:
            host = self.engines.get(base)
            if host is None:
                log.info("loading %s, the base of %s", base, model)
                host = self.engines[base] = make_engine(base, self.settings)
            try:
                engine = adapter_engine(host, model, self.settings)
            except Exception as exc:  # ForjaError, or PEFT/llama.cpp refusing this adapter: merge it instead
                log.warning("loading %s as a model of its own, not as an adapter on %s: %s", model, base, exc)
            else:
                log.info("%s is served as an adapter on %s", model, base)
                return engine
        return make_engine(model, self.settings, persona=persona)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.guards.close()
        if self.store is not None:
            self.store.close()


def count_usage(state: ServerState, key_name: str | None, prompt_tokens: int, completion_tokens: int,
                requests: int = 1) -> None:
    """An answered request's tokens (an agent's steps count their tokens with requests=0, the request once),
    for its key's usage and limits (forja.keys) and /metrics; never an error for the request that was answered."""
    state.keyring.counted(key_name, prompt_tokens + completion_tokens)
    state.metrics.key_usage(key_name, prompt_tokens, completion_tokens, requests)
    if state.store is not None:
        try:
            count(state.store, key_name, prompt_tokens, completion_tokens, requests)
        except Exception as exc:
            log.error("cannot count the usage of %s: %s", key_name, exc)


def check_fits_queue(state: ServerState, prompts: int, n: int, param: str = "n") -> None:
    """A request is queued all or none: one needing more answers than the queue holds could never be
    answered (429 forever), so it is refused at once naming the limit."""
    answers, limit = prompts * n, state.settings.serve.max_queue
    if answers > limit:
        raise ApiError(422, f"this request asks for {answers} answers ({prompts} prompts x {param}={n}); this server "
                       f"queues at most {limit} at a time (serve.max_queue): send fewer prompts or a smaller {param}",
                       param=param, code="invalid_value")


def get_state(request: Request) -> ServerState:
    return request.app.state.forja


@dataclass(frozen=True)
class Caller:
    """Who calls a route that keeps things per client (files, jobs): the key's name (None on a server
    without keys) and whether it sees everyone's."""

    name: str | None
    admin: bool
    chat: bool = True  # may also chat (a batch of chat requests needs it)

    def owns(self, owner: str | None) -> bool:
        return self.admin or owner == self.name


def _key_holder(request: Request) -> ApiKey | None:
    """When keys are configured, demand `Authorization: Bearer KEY` and return the matching key."""
    signed_in = getattr(request.state, "console_key", None)  # a console user's session (forja.console sets it)
    if signed_in is not None and not request.headers.get("authorization"):  # a key sent is the key used
        request.state.api_key_name = signed_in.name
        return signed_in
    ring = get_state(request).keyring
    if not ring.configured:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                       type="authentication_error", code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    holder = ring.find(hashlib.sha256(token.strip().encode()).hexdigest())
    if holder is None:
        raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    try:
        ring.check(holder)
    except Limited as exc:
        raise ApiError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    request.state.api_key_name = holder.name
    return holder


def _scoped(request: Request, scope: str, what: str) -> ApiKey | None:
    holder = _key_holder(request)
    if holder is not None and not holder.may(scope):
        raise ApiError(403, f"the API key {holder.name!r} may not {what}: it needs the {scope!r} scope "
                       f"(serve.api_keys: scopes: [{scope}], or admin: true)", type="permission_error",
                       code="insufficient_scope")
    return holder


def check_api_key(request: Request) -> str | None:
    """The chat routes: a key with the `chat` scope when keys are configured; returns the key's name."""
    holder = _scoped(request, "chat", "call the chat, completion and embedding routes")
    return holder.name if holder is not None else None


def check_chat_caller(request: Request) -> Caller:
    """The chat routes, when they show more to an admin (the model list: trained versions): who calls.
    On a server without keys nobody is an admin here: the public sees what customers see."""
    holder = _scoped(request, "chat", "call the chat, completion and embedding routes")
    return Caller(None, False) if holder is None else Caller(holder.name, holder.admin)


def check_train_key(request: Request) -> Caller:
    """Files, fine-tuning and batch jobs: a key with the `train` scope when keys are configured; it sees its
    own files and jobs, an admin key everyone's (and so does everyone on a server without keys)."""
    holder = _scoped(request, "train", "upload files or run fine-tuning and batch jobs")
    return Caller(None, True) if holder is None else Caller(holder.name, holder.admin, holder.may("chat"))


def check_admin_key(request: Request) -> str:
    """The /admin routes need a configured key marked `admin: true`; returns its name."""
    holder = _key_holder(request)
    if holder is None or not holder.admin:
        raise ApiError(403, "this route needs an admin API key (serve.api_keys entry with admin: true)",
                       type="permission_error", code="admin_key_required")
    return holder.name


def check_monitor_key(request: Request) -> str | None:
    """/metrics, /admin/stats: the admin key when keys are configured (they show who uses the server
    and how much); open when the server has no keys at all."""
    return check_admin_key(request) if get_state(request).keyring.configured else None


StateDep = Annotated[ServerState, Depends(get_state)]
ApiKeyDep = Annotated[str | None, Depends(check_api_key)]
AdminKeyDep = Annotated[str, Depends(check_admin_key)]
MonitorKeyDep = Annotated[str | None, Depends(check_monitor_key)]
TrainKeyDep = Annotated[Caller, Depends(check_train_key)]
ChatCallerDep = Annotated[Caller, Depends(check_chat_caller)]
