"""Admin routes (an API key with `admin: true`): which model answers by default, switched without a restart; API
keys made and revoked without a restart, and the usage per key."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query

from forja import keys, models
from forja.serve.deps import AdminKeyDep, ApiError, ServerState, StateDep
from forja.serve.schemas import ActivateRequest, KeyCreate, error_responses

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/models", responses=error_responses(401, 403))
async def active_models(state: StateDep, _: AdminKeyDep) -> dict:
    """The active model, the model loaded at start, the loaded engines and the promotion log."""
    return {"active": state.active, "base": state.base, "loaded": sorted(state.engines),
            "log": await asyncio.to_thread(models.activation_log, state.settings)}


@router.post("/models/activate", responses=error_responses(400, 401, 403, 404, 413, 422, 500))
async def activate(body: ActivateRequest, state: StateDep, key_name: AdminKeyDep) -> dict:
    """Load `model` (if not loaded yet), make it answer requests that name no model, and record it as
    the active version, so a restarted server comes back with it."""
    previous = state.active
    if body.model == previous:
        return {"active": previous, "previous": previous, "changed": False}
    check_activatable(state, body.model)
    try:
        await asyncio.to_thread(models.resolve, body.model, state.settings)
    except models.ModelError as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found") from None
    await state.engine(body.model)  # loads before switching: requests keep flowing to the old one meanwhile
    if state.follow_registry:
        await asyncio.to_thread(models.promote, state.settings, body.model, f"activated through the API by {key_name}")
    state.activate(body.model)
    return {"active": body.model, "previous": previous, "changed": True}


def check_activatable(state: ServerState, name: str) -> None:
    """A client names a model the server knows: a trained version, a bundled model, or one already loaded
    (--model, a persona's model). Never a path or a hub id: that would let a key load any file, and the
    error would tell which paths exist, so a path is refused saying nothing about it."""
    if name in state.engines or name in (state.base, state.active):
        return
    if name in state.personas:
        raise ApiError(400, f"{name!r} is a persona, not a model: requests use it by naming it as their model",
                       param="model", code="invalid_value")
    if not models.valid_name(name):
        raise ApiError(400, "model must be the name of a trained version or a bundled model (letters, digits, '-', "
                       "'_' and '.'); paths and hub ids are not accepted here: start the server with --model "
                       "to serve one", param="model", code="invalid_value")
    known = [*models.BUNDLED, *state.versions()]
    if name not in known:
        raise ApiError(404, f"no model named {name!r}; available: {', '.join(known)}", param="model",
                       code="model_not_found")


@router.post("/models/rollback", responses=error_responses(401, 403, 409))
async def rollback(state: StateDep, key_name: AdminKeyDep) -> dict:
    """Go back to the version that was active before the current one (as `forja models rollback`)."""
    previous = state.active
    try:
        now = await asyncio.to_thread(models.rollback, state.settings, f"rolled back through the API by {key_name}")
    except models.ModelError as exc:
        raise ApiError(409, str(exc), code="nothing_to_roll_back") from None
    await state.engine(now)
    state.activate(now)
    return {"active": now, "previous": previous, "changed": now != previous}


@router.post("/keys", status_code=201, responses=error_responses(400, 401, 403, 409, 422))
async def create_key(body: KeyCreate, state: StateDep, _: AdminKeyDep) -> dict:
    """A new API key, answered once (only its SHA-256 is stored): its scopes, admin or not, and its limits."""
    store = _store(state)
    try:
        stored, secret = await asyncio.to_thread(keys.create, state.settings, store, body.name, body.scopes,
                                                 body.admin, body.limits)
    except keys.KeyExists as exc:
        raise ApiError(409, str(exc), param="name", code="key_exists") from None
    except keys.ApiKeyError as exc:
        raise ApiError(400, str(exc), param="name", code="invalid_value") from None
    state.keyring.refresh()
    return {**key_object(stored), "key": secret}


@router.get("/keys", responses=error_responses(401, 403, 409))
async def list_keys(state: StateDep, _: AdminKeyDep) -> dict:
    """Every key the server accepts: the config's (`source: config`) and those made here (`source: database`)."""
    stored = await asyncio.to_thread(keys.listing, _store(state))
    used = {row["key"]: row for row in await asyncio.to_thread(keys.usage_rows, state.settings, _store(state), 1)}
    configured = [{"id": f"config:{key.name}", "name": key.name, "scopes": sorted(key.scopes), "admin": key.admin,
                   "limits": key.limits.model_dump(), "created_at": None, "source": "config"}
                  for key in state.settings.serve.api_keys]
    data = configured + [key_object(k) for k in stored]
    for item in data:
        item["requests_today"] = used.get(item["name"], {}).get("requests", 0)
    return {"object": "list", "data": data}


@router.delete("/keys/{key_id}", responses=error_responses(401, 403, 404, 409, 422))
async def revoke_key(key_id: str, state: StateDep, _: AdminKeyDep) -> dict:
    """Revoke a key made here (by id or name): the next request with it is a 401."""
    if key_id.startswith("config:"):
        raise ApiError(409, "a key in the config is removed from serve.api_keys (and the server restarted)",
                       param="key_id", code="config_key")
    try:
        stored = await asyncio.to_thread(keys.revoke, _store(state), key_id)
    except keys.ApiKeyError as exc:
        raise ApiError(404, str(exc), param="key_id", code="key_not_found") from None
    state.keyring.refresh()
    return {"id": stored.id, "name": stored.name, "deleted": True}


@router.get("/usage", responses=error_responses(401, 403, 409, 422))
async def usage(state: StateDep, _: AdminKeyDep, days: int = Query(7, ge=1, le=366)) -> dict:
    """Requests and tokens per key per UTC day, and what a hosted API would have cost (serve.price_per_1k_tokens)."""
    rows = await asyncio.to_thread(keys.usage_rows, state.settings, _store(state), days)
    return {"object": "list", "days": days, "price_per_1k_tokens": state.settings.serve.price_per_1k_tokens,
            "data": rows}


def key_object(stored: keys.StoredKey) -> dict:
    return {"id": stored.id, "name": stored.name, "scopes": stored.scopes, "admin": stored.admin,
            "limits": stored.limits.model_dump(), "created_at": int(stored.created_at), "source": "database"}


def _store(state: ServerState):
    if state.store is None:
        raise ApiError(409, "this server has no database, so it keeps no keys", code="no_database")
    return state.store
