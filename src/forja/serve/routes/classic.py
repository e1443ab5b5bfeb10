"""The classic routes: `POST /predict` (the body older web clients send), `POST /feedback` and `GET /health`."""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from forja.chat import CallCorrectionError, corrected_call
from forja.serve.deps import ApiError, ApiKeyDep, StateDep
from forja.serve.exchange import Exchange, Options
from forja.serve.rails import CONTENT_FILTER
from forja.serve.schemas import (GENERATING_ERRORS, FeedbackRequest, FeedbackRow, PredictRequest, PredictResponse,
                                 error_responses, new_response_id)
from forja.store import StoreError, UnknownExchange

router = APIRouter(tags=["classic"])


@router.post("/predict", response_model=None, responses={
    200: {"model": PredictResponse | list[PredictResponse], "description": "One answer, or a list when several"},
    **error_responses(*GENERATING_ERRORS)})
async def predict(body: PredictRequest, request: Request, state: StateDep, _: ApiKeyDep):
    """{"prompt", "max_length", "num_return_sequences"} → {"generated_text", "id"}, a list when more than one;
    a refusal of the guardrails also says "finish_reason": "content_filter"."""
    rid = new_response_id("pred")
    exchange = await Exchange.open(state, request, rid=rid, route="predict", model=body.model,
                                   prompts=[[{"role": "user", "content": body.prompt}]], n=body.num_return_sequences,
                                   options=Options(max_tokens=body.max_length, temperature=body.temperature, seed=body.seed,
                                                   stream=False),
                                   param="max_length", n_param="num_return_sequences", input_param="prompt")
    answers = await exchange.collect(request)
    replies = [PredictResponse(generated_text=a.text, id=rid if len(answers) == 1 else f"{rid}-{a.index}",
                               finish_reason=a.finish_reason if a.finish_reason == CONTENT_FILTER else None,
                               sources=a.sources() if a.grounding is not None else None).model_dump(exclude_none=True) for a in answers]
    return JSONResponse(replies[0] if len(replies) == 1 else replies)


@router.post("/feedback", status_code=201, responses=error_responses(400, 401, 404, 409, 413, 422))
@router.post("/v1/feedback", status_code=201, responses=error_responses(400, 401, 404, 409, 413, 422))
async def send_feedback(body: FeedbackRequest, request: Request, state: StateDep, key_name: ApiKeyDep) -> FeedbackRow:
    """Rate an answer (up/down), correct it, or comment on it; 201 once it is safely on disk."""
    if state.store is None or not state.settings.serve.log_exchanges:
        raise ApiError(409, "this server does not store exchanges (serve.log_exchanges is off), so it cannot take "
                       "feedback on them", code="exchanges_not_stored")
    exchange_id, choice = body.id, body.choice
    numbered = re.fullmatch(r"(pred-[0-9a-f]+)-(\d+)", exchange_id)  # /predict's ids when it returned several
    if numbered and choice is None:
        exchange_id, choice = numbered.group(1), int(numbered.group(2))
    rating = body.rating or ("down" if body.correction or body.tool_call else None)
    comment = state.guards.redact("\n".join(t for t in (body.comment, body.text) if t) or None)
    correction = state.guards.redact(body.correction)  # PII never reaches the store
    tool_call = None
    if body.tool_call is not None:  # checked against the steps the answer made and the tools it was offered
        exchange = await asyncio.to_thread(state.store.exchange, exchange_id)
        if exchange is None:
            raise ApiError(404, f"no exchange with id {exchange_id!r}", param="id", code="exchange_not_found")
        try:
            tool_call = corrected_call(exchange.messages, exchange.trace, (exchange.params or {}).get("tools"),
                                       body.tool_call.model_dump())
        except CallCorrectionError as exc:
            raise ApiError(422, str(exc), param="tool_call", code="invalid_value") from None
        tool_call["arguments"] = state.guards.redact_arguments(tool_call["arguments"])  # as for a correction
    try:
        row = await asyncio.to_thread(state.store.add_feedback, exchange_id, rating=rating, correction=correction,
                                      comment=comment, choice=choice or 0, sender=key_name, tool_call=tool_call)
    except UnknownExchange as exc:
        raise ApiError(404, str(exc), param="id", code="exchange_not_found") from None
    except StoreError as exc:
        raise ApiError(422, str(exc), param="choice", code="invalid_value") from None
    if rating:
        state.metrics.feedback.labels(row["model"], rating).inc()
    return FeedbackRow(**row)


@router.get("/health", responses={200: {"description": "The model is loaded and ready"}, **error_responses(503)})
async def health(state: StateDep) -> JSONResponse:
    """200 once the served model is loaded and ready; 503 while it loads (or when it failed to). The load
    (requests decoding and waiting) is the active model's, which answers requests that name none; `base`
    has the model loaded at start when another one is active."""
    if state.ready:
        active = state.active
        engine = state.engines.get(active) or state.engines[state.base]
        body = {"status": "ok", "model": state.base, "active_model": active, "active_loaded": active in state.engines,
                "backend": engine.backend, **getattr(engine, "load", {})}
        if engine is not state.engines[state.base]:
            base = state.engines[state.base]
            body["base"] = {"backend": base.backend, **getattr(base, "load", {})}
        return JSONResponse(body)
    if state.load_error:
        return JSONResponse({"status": "failed", "model": state.base, "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading", "model": state.base}, status_code=503)
