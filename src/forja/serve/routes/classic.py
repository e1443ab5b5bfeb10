"""The classic routes: `POST /predict` (the body older web clients send) and `GET /health`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from forja.serve.deps import ApiKeyDep, StateDep
from forja.serve.routes.openai import collect, log_answer, log_prompt, prepare, submit
from forja.serve.schemas import PredictRequest, PredictResponse, new_response_id

router = APIRouter(tags=["classic"])


@router.post("/predict", response_model=None)
async def predict(body: PredictRequest, request: Request, state: StateDep, _: ApiKeyDep):
    """{"prompt", "max_length", "num_return_sequences"} → {"generated_text", "id"}, a list when more than one."""
    target = await state.target(body.model)
    messages = target.messages([{"role": "user", "content": body.prompt}])
    request_like = _Classic(body)
    jobs = prepare(state, target, [messages], request_like, body.max_length, "max_length")
    rid = new_response_id("pred")
    log_prompt(state, rid, messages)
    texts, _, _ = await collect(submit(target, jobs), request, body.num_return_sequences)
    log_answer(state, rid, texts)
    answers = [PredictResponse(generated_text=text, id=rid if len(texts) == 1 else f"{rid}-{i}")
               for i, text in enumerate(texts)]
    return answers[0] if len(answers) == 1 else answers


class _Classic:
    """The classic body seen with the field names the OpenAI routes use."""

    def __init__(self, body: PredictRequest):
        self.n = body.num_return_sequences
        self.temperature = body.temperature
        self.top_p = None
        self.seed = body.seed
        self.stop = None


@router.get("/health")
async def health(state: StateDep) -> JSONResponse:
    """200 once the served model is loaded and ready; 503 while it loads (or when it failed to)."""
    if state.ready:
        engine = state.engines[state.base]
        return JSONResponse({"status": "ok", "model": state.base, **getattr(engine, "load", {})})
    if state.load_error:
        return JSONResponse({"status": "failed", "model": state.base, "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading", "model": state.base}, status_code=503)
