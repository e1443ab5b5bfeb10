"""Admin routes (an API key with `admin: true`): which model answers by default, switched without a restart."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from forja import models
from forja.serve.deps import AdminKeyDep, ApiError, StateDep
from forja.serve.schemas import ActivateRequest

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/models")
async def active_models(state: StateDep, _: AdminKeyDep) -> dict:
    """The active model, the model loaded at start, the loaded engines and the promotion log."""
    return {"active": state.active, "base": state.base, "loaded": sorted(state.engines),
            "log": await asyncio.to_thread(models.activation_log, state.settings)}


@router.post("/models/activate")
async def activate(body: ActivateRequest, state: StateDep, key_name: AdminKeyDep) -> dict:
    """Load `model` (if not loaded yet), make it answer requests that name no model, and record it as
    the active version, so a restarted server comes back with it."""
    previous = state.active
    if body.model == previous:
        return {"active": previous, "previous": previous, "changed": False}
    try:
        await asyncio.to_thread(models.resolve, body.model, state.settings)
    except models.ModelError as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found") from None
    await state.engine(body.model)  # loads before switching: requests keep flowing to the old one meanwhile
    if state.follow_registry:
        await asyncio.to_thread(models.promote, state.settings, body.model, f"activated through the API by {key_name}")
    state.activate(body.model)
    return {"active": body.model, "previous": previous, "changed": True}
