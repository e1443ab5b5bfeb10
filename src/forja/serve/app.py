"""Builds the FastAPI application: routers, the web page, errors in OpenAI's JSON shape, body-size
limit, API keys and CORS. `forja serve` runs it under uvicorn; the model loads in the background
(/health answers 503 until it is ready)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forja.config import Settings
from forja.console import routes as console
from forja.console.sessions import ConsoleSessions
from forja.engine import Engine
from forja.knowledge.vector_stores import drop_queued as drop_queued_indexing
from forja.serve.deps import ApiError, ServerState
from forja.monitor import CountRequests
from forja.serve.routes import (admin, batches, classic, conversations, embeddings, files, fine_tuning, monitoring,
                                openai, page, responses, vector_stores)
from forja.serve.schemas import BAD_REQUEST_ERRORS
from forja.store import DatabaseAway, Store, safe_url

WEB_DIR = Path(__file__).parent / "web"
log = logging.getLogger("forja.serve")


def create_app(settings: Settings, model: str | None = None, engine: Engine | None = None) -> FastAPI:
    """The server for `model` (default: the active version, else settings.model, following later
    promotions); pass `engine` to serve one already built."""
    from forja.models import active_model

    state = ServerState(settings=settings, base=model or active_model(settings), follow_registry=model is None,
                        store=Store.open(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = worker = None
        if engine is not None:
            state.engines[state.base] = engine
        else:
            loader = asyncio.create_task(load_base(state))
        if settings.serve.mcp_servers:  # their tools are listed before the first request
            from forja.agents.mcp import McpHub

            state.mcp = McpHub(settings.serve.mcp_servers)
            await state.mcp.start()
        if settings.jobs.run_in_server and state.store is not None:
            from forja.jobs.worker import Worker

            worker = Worker(settings, state.store)  # jobs run as processes of their own; this only watches them
            worker.start()
        try:
            yield
        finally:
            if loader is not None:
                loader.cancel()
            if worker is not None:  # a running job saves a checkpoint and waits for the next start
                await asyncio.to_thread(worker.stop, settings.jobs.cancel_seconds + 5)
            if state.mcp is not None:
                await state.mcp.stop()
            drop_queued_indexing(settings)  # files waiting to be indexed would keep the process alive
            state.close()

    app = FastAPI(title="Forja", summary="OpenAI-compatible API over your own model", lifespan=lifespan)
    app.state.forja = state
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(embeddings.router)
    app.include_router(classic.router)
    app.include_router(admin.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    app.include_router(batches.router)
    app.include_router(conversations.router)
    app.include_router(vector_stores.router)
    app.include_router(monitoring.router)
    app.include_router(page.router)  # the chat page at / in serve.page's words, and its logo
    app.include_router(console.router)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(DatabaseAway)
    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(sa.exc.InterfaceError)
    async def database_away(request: Request, exc: Exception) -> JSONResponse:
        # the database went away (a restart, a failover): a clear 503 to retry, never a 500; answered
        # exchanges wait in the store's backlog meanwhile
        message = str(exc) if isinstance(exc, DatabaseAway) else \
            f"the database {safe_url(settings.database)} is unreachable; retry in a few seconds"
        error = ApiError(503, message, type="server_error", code="database_unavailable", headers={"Retry-After": "5"})
        return JSONResponse(error.body(), status_code=503, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 400:  # FastAPI could not parse the body: not UTF-8, or JSON nested too deep
            message += " (send JSON encoded as UTF-8)"
        error = ApiError(exc.status_code, message, code=code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    serve = settings.serve
    if serve.cors_origins:
        # bearer keys travel in a header, never in cookies: credentials stay off, so "*" is never combined with them
        app.add_middleware(CORSMiddleware, allow_origins=serve.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
    # a console session cookie is the user's credential for every route (with its CSRF token when it changes things)
    app.add_middleware(ConsoleSessions, state=state)
    # uploads are streamed to disk by their route, which holds them to files.max_bytes as they arrive
    app.add_middleware(BodyLimit, max_bytes=serve.max_body_bytes, streamed=(("POST", "/v1/files"),))
    # outermost: counts (and logs) 413s too
    app.add_middleware(CountRequests, metrics=state.metrics, log=log if serve.log_requests else None)
    return app


async def load_base(state: ServerState) -> None:
    try:
        state.engines[state.base] = await asyncio.to_thread(state.make_engine, state.base)
        log.info("model %s ready", state.base)
    except Exception as exc:  # reported by /health and every request
        state.load_error = f"{type(exc).__name__}: {exc}" if not str(exc).startswith(state.base) else str(exc)
        log.error("cannot load %s: %s", state.base, exc)


def validation_error(exc: RequestValidationError) -> ApiError:
    """422 naming the first offending field (`messages.0.role`), as OpenAI's `param`; 400 for the errors
    schemas.BAD_REQUEST_ERRORS lists (a validator that sees the whole body names the field in its context)."""
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    param = (err.get("ctx") or {}).get("param") or ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({err.get('msg')})", code="invalid_json")
    message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
    code = BAD_REQUEST_ERRORS.get(err.get("type", ""))
    return ApiError(400 if code else 422, message, param=param, code=code or "invalid_value")


class BodyLimit:
    """413 for a body over `max_bytes`, by its Content-Length or, when chunked, while it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int, streamed: tuple[tuple[str, str], ...] = ()):
        self.app, self.max_bytes, self.streamed = app, max_bytes, streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.streamed:
            return await self.app(scope, receive, send)
        too_big = ApiError(413, f"the request body is larger than {self.max_bytes} bytes (serve.max_body_bytes)",
                           code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read the body here, at most max_bytes, then hand it on
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > self.max_bytes:
                return await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def serve(settings: Settings, model: str | None = None, host: str | None = None, port: int | None = None,
          **uvicorn_kwargs: Any) -> None:
    """Run the server until Ctrl-C (used by `forja serve`)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(settings, model)
    uvicorn.run(app, host=host or settings.serve.host, port=port or settings.serve.port, log_level="warning",
                **uvicorn_kwargs)
