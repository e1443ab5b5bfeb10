"""`/v1/batches` as OpenAI has it: create over an uploaded JSONL of requests, list, retrieve, cancel. The worker
answers the requests through forja's own request path (in a `forja jobs run-batch` process, many at a time, so
the engine batches them) and writes `output_file_id` and `error_file_id` as OpenAI does, lines matched to the
requests by `custom_id`. With API keys configured, a key with the `train` scope: a client sees its own batches."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query

from forja import files, jobs
from forja.serve.deps import ApiError, Caller, ServerState, StateDep, TrainKeyDep
from forja.serve.routes.files import found, store_of
from forja.serve.routes.fine_tuning import MAX_PAGE, cancelled, job_of, job_page
from forja.serve.schemas_jobs import BatchCreate, BatchList, BatchObject, RequestCounts, responses

router = APIRouter(prefix="/v1", tags=["batches"])
WINDOW_SECONDS = 24 * 3600  # completion_window 24h


@router.post("/batches", responses=responses(400, 401, 403, 409, 422))
async def create_batch(body: BatchCreate, state: StateDep, caller: TrainKeyDep) -> BatchObject:
    """Answer every request of `input_file_id` (uploaded with purpose batch); a line that is not a request
    for `endpoint` is refused here, naming the line."""
    if not caller.chat:
        raise ApiError(403, f"the API key {caller.name!r} may not chat: a batch's requests are chat, completion or "
                       "embedding requests, answered as the key's own (it needs the 'chat' scope too)",
                       type="permission_error", code="insufficient_scope")
    total = await asyncio.to_thread(_checked, state, body, caller)
    if body.output_expires_after is not None:
        raise ApiError(400, "output_expires_after: forja keeps a batch's output files until they are deleted "
                       "(DELETE /v1/files/{id}); leave it out", param="output_expires_after",
                       code="unsupported_parameter")
    spec = {"input_file_id": body.input_file_id, "endpoint": body.endpoint, "completion_window": body.completion_window,
            "metadata": body.metadata, "total": total}
    job = await asyncio.to_thread(jobs.create, store_of(state), jobs.BATCH, spec, caller.name, "validating",
                                  [f"{total} requests for {body.endpoint} read from {body.input_file_id}"])
    return batch_object(job)


def _checked(state: ServerState, body: BatchCreate, caller: Caller) -> int:
    from forja.jobs.batch import BatchError, read_requests

    stored = found(state, body.input_file_id, caller, param="input_file_id", status=400)
    if stored.purpose != "batch":
        raise ApiError(400, f"input_file_id: {body.input_file_id} was uploaded with purpose {stored.purpose!r}; a batch "
                       "reads a file uploaded with purpose 'batch'", param="input_file_id", code="invalid_value")
    try:
        requests = read_requests(files.path_of(state.settings, stored))
    except BatchError as exc:
        raise ApiError(400, f"input_file_id: {exc}".replace(str(files.path_of(state.settings, stored)), stored.filename),
                       param="input_file_id", code="invalid_file") from None
    if requests[0]["url"] != body.endpoint:
        raise ApiError(400, f"endpoint is {body.endpoint} but the requests in {stored.filename} are for "
                       f"{requests[0]['url']}", param="endpoint", code="invalid_value")
    return len(requests)


@router.get("/batches", responses=responses(400, 401, 403, 409, 422))
async def list_batches(state: StateDep, caller: TrainKeyDep,
                       after: str | None = Query(None, description="The id of the last batch of the page before."),
                       limit: int = Query(20, ge=1, le=MAX_PAGE)) -> BatchList:
    """This client's batches (every one for an admin key), newest first."""
    page, more = await job_page(state, jobs.BATCH, caller, after, limit)
    data = [batch_object(job) for job in page]
    return BatchList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                     has_more=more)


@router.get("/batches/{batch_id}", responses=responses(401, 403, 404, 409, 422))
async def retrieve_batch(batch_id: str, state: StateDep, caller: TrainKeyDep) -> BatchObject:
    return batch_object(await asyncio.to_thread(job_of, state, batch_id, caller, jobs.BATCH, "batch_id"))


@router.post("/batches/{batch_id}/cancel", responses=responses(401, 403, 404, 409, 422))
async def cancel_batch(batch_id: str, state: StateDep, caller: TrainKeyDep) -> BatchObject:
    """A waiting batch is cancelled at once; a running one goes to `cancelling` while the requests being
    answered finish, then `cancelled`, with what was answered in its output file."""
    return batch_object(await cancelled(state, jobs.BATCH, batch_id, caller, "batch_id"))


def batch_object(job: jobs.Job) -> BatchObject:
    spec, result = job.request, job.result
    times = {status: int(at) for status, at in result.get("status_times", {}).items()}
    counts = result.get("request_counts") or {"total": spec["total"], "completed": 0, "failed": 0}
    errors = ({"object": "list", "data": [{"code": job.error.get("code"), "message": job.error.get("message"),
                                           "param": job.error.get("param"), "line": None}]} if job.error else None)
    return BatchObject(
        id=job.id, endpoint=spec["endpoint"], errors=errors, input_file_id=spec["input_file_id"],
        completion_window=spec["completion_window"], status=job.status, output_file_id=result.get("output_file_id"),
        error_file_id=result.get("error_file_id"), created_at=int(job.created_at),
        in_progress_at=times.get("in_progress"), expires_at=int(job.created_at + WINDOW_SECONDS),
        finalizing_at=times.get("finalizing"), completed_at=times.get("completed"), failed_at=times.get("failed"),
        expired_at=times.get("expired"), cancelling_at=times.get("cancelling"), cancelled_at=times.get("cancelled"),
        request_counts=RequestCounts(**counts), metadata=spec.get("metadata"))
