"""Monitoring routes: `GET /metrics` for Prometheus, `GET /dashboard` (a page of charts) and the figures it
draws, `GET /admin/stats?hours=24`, from the exchange log. With API keys configured /metrics and the
stats need an admin key (they tell who uses the server and how much); with no keys they are open."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response

from forja.monitor import CONTENT_TYPE
from forja.serve.deps import ApiError, MonitorKeyDep, StateDep
from forja.serve.schemas import error_responses

router = APIRouter(tags=["monitoring"])
WEB_DIR = Path(__file__).parents[1] / "web"
MAX_HOURS = 24 * 90
BUCKETS = 48  # points per chart, whatever the window


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep, _: MonitorKeyDep) -> Response:
    return Response(state.metrics.scrape(), media_type=CONTENT_TYPE)


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    """The page itself holds no figures (a browser cannot send a bearer key when it opens a URL): it asks
    for the admin key, like the chat page, and fetches /admin/stats with it."""
    return FileResponse(WEB_DIR / "dashboard.html")


@router.get("/admin/stats", responses=error_responses(401, 403, 409, 422))
async def stats(state: StateDep, _: MonitorKeyDep,
                hours: float = Query(24, gt=0, le=MAX_HOURS, description="How far back to look.")) -> dict:
    """Requests, latency p50/p95 and tokens/s per time bucket, thumbs up per version, and totals."""
    if state.store is None:
        raise ApiError(409, "this server has no database, so there is no exchange log to chart",
                       code="exchanges_not_stored")
    now = time.time()
    return await asyncio.to_thread(state.store.traffic, now - hours * 3600, hours * 3600 / BUCKETS, now)
