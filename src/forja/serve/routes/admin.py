"""Admin routes (an API key with `admin: true`): which model answers by default, switched without a restart."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from forja import models
from forja.serve.deps import AdminKeyDep, ApiError, ServerState, StateDep
from forja.serve.schemas import ActivateRequest, error_responses

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
