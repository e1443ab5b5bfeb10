"""`/v1/fine_tuning/jobs` as OpenAI has it: create, list, retrieve, cancel, events (also as server-sent events:
`?stream=true`, an extension) and checkpoints; plus `promote` (an extension) to make a job's version the active
one. A job is a row in the store; the worker (in this server, or `forja worker` elsewhere) runs it as
`forja train`. With API keys configured, a key with the `train` scope: a client sees its own jobs."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from forja import files, jobs
from forja.config import TrainSettings
from forja.models import valid_name
from forja.serve.deps import ApiError, Caller, MonitorKeyDep, ServerState, StateDep, TrainKeyDep
from forja.serve.routes.admin import activate, check_activatable
from forja.serve.routes.files import found, store_of
from forja.serve.schemas import ActivateRequest
from forja.serve.schemas_jobs import (DpoHyperparameters, FineTuneCreate, FineTuningJob, FineTuningJobList,
                                      Hyperparameters, JobCheckpoint, JobCheckpointList, JobEvent, JobEventList,
                                      responses)

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])
MAX_PAGE = 100
STREAM_POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
# the OpenAI hyperparameters and the train.* settings they set
HYPER_TO_TRAIN = {"n_epochs": "epochs", "batch_size": "batch_size", "learning_rate_multiplier": "learning_rate_multiplier"}


@router.post("/jobs", responses=responses(400, 401, 403, 404, 409, 422))
async def create_job(body: FineTuneCreate, state: StateDep, caller: TrainKeyDep) -> FineTuningJob:
    """Start fine-tuning `model` on `training_file` (or, with `forja.source: feedback`, on the unused feedback);
    the job is queued for the worker and its `fine_tuned_model` is usable in /v1/chat/completions once it
    has succeeded."""
    spec, events = await asyncio.to_thread(_checked, state, body, caller)
    job = await asyncio.to_thread(jobs.create, store_of(state), jobs.FINE_TUNE, spec, caller.name, "queued", events)
    return job_object(state, job)


def _checked(state: ServerState, body: FineTuneCreate, caller: Caller) -> tuple[dict[str, Any], list[str]]:
    """The job as the worker will run it, every field checked, and its first events."""
    settings = state.settings
    method = body.method.type if body.method else "supervised"
    if method not in ("supervised", "dpo"):
        raise ApiError(400, f"method.type: forja fine-tunes with 'supervised' or 'dpo'; {method!r} training is "
                       "not available in this version", param="method.type", code="unsupported_parameter")
    if body.integrations:
        raise ApiError(400, "integrations: forja reports a job's progress as its events (GET .../events, also "
                       "streamed with ?stream=true), not to other services; leave integrations out",
                       param="integrations", code="unsupported_parameter")
    options = getattr(body.method, method, None) if body.method else None
    nested = options.hyperparameters if options else None
    if nested is not None and body.hyperparameters is not None:
        raise ApiError(400, f"give the hyperparameters once: in method.{method}.hyperparameters (or the older "
                       "top-level hyperparameters), not both", param="hyperparameters", code="invalid_value")
    hyper = nested or body.hyperparameters or (DpoHyperparameters() if method == "dpo" else Hyperparameters())
    source = body.forja.source
    if source == "feedback" and (body.training_file or body.validation_file):
        raise ApiError(400, "forja.source feedback learns from the feedback store: leave out training_file and "
                       "validation_file", param="training_file", code="invalid_value")
    if source == "file" and not body.training_file:
        raise ApiError(400, "training_file is missing: upload the data with POST /v1/files (purpose fine-tune) and "
                       "give its id (or use forja.source feedback)", param="training_file",
                       code="missing_required_parameter")
    check_activatable(state, body.model)
    paths = {}
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id:
            stored = found(state, file_id, caller, param=param, status=400)
            if stored.purpose != "fine-tune":
                raise ApiError(400, f"{param}: {file_id} was uploaded with purpose {stored.purpose!r}; a fine-tuning "
                               "job reads files uploaded with purpose 'fine-tune'", param=param, code="invalid_value")
            paths[param] = str(files.path_of(settings, stored))
    overrides = dict(body.forja.train)
    if method == "dpo":  # train.objective: the training file holds preference pairs (forja.train_prefs)
        if overrides.get("objective", "dpo") != "dpo":
            raise ApiError(400, f"method.type dpo and forja.train.objective {overrides['objective']!r} disagree: give one",
                           param="forja.train.objective", code="invalid_value")
        overrides["objective"] = "dpo"
    for name, setting in [*HYPER_TO_TRAIN.items(), ("seed", "seed"), ("beta", "beta")]:
        value = body.seed if name == "seed" else getattr(hyper, name, None)
        if value is None or value == "auto":
            continue
        if setting in overrides:
            raise ApiError(400, f"{name} and forja.train.{setting} both set it: give one", param=name,
                           code="invalid_value")
        overrides[setting] = value
    try:
        config = TrainSettings.model_validate({**settings.train.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "train"
        param = next((h for h, t in HYPER_TO_TRAIN.items() if t == field and h not in body.forja.train),
                     f"forja.train.{field}")
        raise ApiError(400, f"{param}: {err['msg']}", param=param, code="invalid_value") from None
    name = version_name(state, body.model, body.suffix)
    spec = {
        "model": body.model, "training_file": body.training_file, "validation_file": body.validation_file,
        "suffix": body.suffix, "seed": config.seed, "metadata": body.metadata,
        "hyperparameters": hyper.model_dump(), "method": method,
        "forja": {"source": source, "promote": body.forja.promote, "train": overrides, "name": name,
                  "training_path": paths.get("training_file"), "validation_path": paths.get("validation_file")},
    }
    events = ([f"Validating training file: {body.training_file}"
               + (f" and validation file: {body.validation_file}" if body.validation_file else "")]
              if source == "file" else ["Reading the unused feedback when the job starts"])
    return spec, events + ["Files validated, moving job to queued state"]


def version_name(state: ServerState, model: str, suffix: str | None) -> str:
    """The new version's name: ft-<suffix or base>-<8 hex>, a name no version or run has."""
    stem = suffix or re.sub(r"[^\w.-]+", "-", model.rsplit("/", 1)[-1]).strip("-.") or "model"
    while True:
        name = f"ft-{stem[:64]}-{uuid.uuid4().hex[:8]}"
        if valid_name(name) and not (state.settings.versions_dir / name).exists() \
                and not (state.settings.runs_dir / name).exists():
            return name


@router.get("/jobs", responses=responses(400, 401, 403, 409, 422))
async def list_jobs(state: StateDep, caller: TrainKeyDep,
                    after: str | None = Query(None, description="The id of the last job of the page before."),
                    limit: int = Query(20, ge=1, le=MAX_PAGE)) -> FineTuningJobList:
    """This client's jobs (every job for an admin key), newest first."""
    page, more = await job_page(state, jobs.FINE_TUNE, caller, after, limit)
    return FineTuningJobList(data=[job_object(state, job) for job in page], has_more=more)


async def job_page(state: ServerState, kind: str, caller: Caller, after: str | None, limit: int
                   ) -> tuple[list[jobs.Job], bool]:
    """A page of the caller's jobs of `kind` (every one for an admin), newest first; a bad `after` is a 400."""
    try:
        return await asyncio.to_thread(jobs.listing, store_of(state), kind, caller.name, caller.admin, after, limit)
    except jobs.UnknownJob as exc:
        raise ApiError(400, str(exc), param="after", code="invalid_value") from None


async def cancelled(state: ServerState, kind: str, job_id: str, caller: Caller, param: str) -> jobs.Job:
    """The job cancelled (or being cancelled); a job not the caller's is a 404, a finished one a 409."""
    try:
        return await asyncio.to_thread(jobs.cancel, store_of(state), job_id, kind, caller.name, caller.admin)
    except jobs.UnknownJob as exc:
        raise ApiError(404, str(exc), param=param, code="job_not_found") from None
    except jobs.JobError as exc:
        raise ApiError(409, str(exc), param=param, code="job_finished") from None


@router.get("/jobs/{job_id}", responses=responses(401, 403, 404, 409, 422))
async def retrieve_job(job_id: str, state: StateDep, caller: TrainKeyDep) -> FineTuningJob:
    return job_object(state, await asyncio.to_thread(job_of, state, job_id, caller))


@router.post("/jobs/{job_id}/cancel", responses=responses(401, 403, 404, 409, 422))
async def cancel_job(job_id: str, state: StateDep, caller: TrainKeyDep) -> FineTuningJob:
    """A queued job is cancelled at once; a running one is stopped by its worker within a few seconds,
    keeping its checkpoints."""
    return job_object(state, await cancelled(state, jobs.FINE_TUNE, job_id, caller, "fine_tuning_job_id"))


@router.post("/jobs/{job_id}/promote", responses=responses(400, 401, 403, 404, 409, 422))
async def promote_job(job_id: str, state: StateDep, key_name: MonitorKeyDep) -> dict:
    """Make the version a succeeded job made the active one (an extension; an admin key when keys are
    configured). Undo with POST /admin/models/rollback."""
    job = await asyncio.to_thread(job_of, state, job_id, Caller(key_name, True))
    if job.status != "succeeded":
        raise ApiError(409, f"{job_id} is {job.status}; only a succeeded job's model can be promoted",
                       param="fine_tuning_job_id", code="job_not_succeeded")
    return await activate(ActivateRequest(model=job.result["fine_tuned_model"]), state, key_name or "a client")


@router.get("/jobs/{job_id}/events", responses={**responses(400, 401, 403, 404, 409, 422), 200: {
    "description": "The events, newest first; with stream=true, server-sent events oldest first until the job ends",
    "content": {"application/json": {"schema": JobEventList.model_json_schema()}, "text/event-stream": {}}}})
async def list_events(job_id: str, state: StateDep, caller: TrainKeyDep,
                      after: str | None = Query(None, description="The id of the last event of the page before."),
                      limit: int = Query(20, ge=1, le=MAX_PAGE),
                      stream: bool = Query(False, description="Follow the job as server-sent events (an extension): "
                                           "every event from `after` on, oldest first, until the job ends.")):
    job = await asyncio.to_thread(job_of, state, job_id, caller)
    mark = event_number(after)
    if stream:
        return StreamingResponse(follow(state, job.id, mark), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    page, more = await asyncio.to_thread(jobs.events, store_of(state), job.id, mark, limit)
    return JobEventList(data=[event_object(e) for e in page], has_more=more)


async def follow(state: ServerState, job_id: str, after: int | None) -> AsyncIterator[str]:
    """Every new event as `data: {...}`; a comment now and then keeps proxies from closing a quiet stream;
    `data: [DONE]` when the job has ended and its last event is sent."""
    store, quiet_since = store_of(state), time.monotonic()
    while True:
        page, _ = await asyncio.to_thread(jobs.events, store, job_id, after, MAX_PAGE, None, True)
        for event in page:
            after = event.id
            yield f"data: {event_object(event).model_dump_json()}\n\n"
        if page:
            quiet_since = time.monotonic()
            continue
        if (await asyncio.to_thread(jobs.get, store, job_id)).final:
            page, _ = await asyncio.to_thread(jobs.events, store, job_id, after, MAX_PAGE, None, True)
            for event in page:
                yield f"data: {event_object(event).model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
            return
        if time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield ": still running\n\n"
        await asyncio.sleep(STREAM_POLL_SECONDS)


@router.get("/jobs/{job_id}/checkpoints", responses=responses(401, 403, 404, 409, 422))
async def list_checkpoints(job_id: str, state: StateDep, caller: TrainKeyDep,
                           after: str | None = Query(None, description="The id of the last checkpoint of the page before."),
                           limit: int = Query(10, ge=1, le=MAX_PAGE)) -> JobCheckpointList:
    """The checkpoints the job's run saved, newest first; a succeeded job's last one is its model version."""
    job = await asyncio.to_thread(job_of, state, job_id, caller)
    saved, _ = await asyncio.to_thread(jobs.events, store_of(state), job.id, None, 10_000, "checkpoint")
    points = []
    if job.status == "succeeded":
        metrics = job.result.get("metrics", {})
        points.append(JobCheckpoint(
            id=f"ftckpt-{job.id.removeprefix(jobs.PREFIX[jobs.FINE_TUNE])}-final", created_at=int(job.finished_at or 0),
            fine_tuned_model_checkpoint=job.result["fine_tuned_model"], fine_tuning_job_id=job.id,
            step_number=int(metrics.get("step", 0)), metrics=_losses(metrics),
            forja={"model_version": True, "available": True}))
    for event in saved:
        data = event.data or {}
        path = state.settings.home / data.get("path", "")
        points.append(JobCheckpoint(
            id=f"ftckpt-{event.id}", created_at=int(event.created_at), fine_tuned_model_checkpoint=data.get("path", ""),
            fine_tuning_job_id=job.id, step_number=data.get("step", 0), metrics=data.get("metrics", {}),
            forja={"model_version": False, "available": path.is_dir(), "path": data.get("path"),
                   "resume": "the job resumes from it after a stop (train.keep_checkpoints keeps the last ones)"}))
    ids = [p.id for p in points]
    start = ids.index(after) + 1 if after in ids else 0
    if after is not None and after not in ids:
        raise ApiError(400, f"after: {after!r} is not a checkpoint of this job", param="after", code="invalid_value")
    page = points[start:start + limit]
    return JobCheckpointList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                             has_more=start + limit < len(points))


def _losses(metrics: dict[str, Any]) -> dict[str, Any]:
    return {name: metrics[key] for name, key in (("train_loss", "train_loss"), ("valid_loss", "val_loss"),
                                                  ("step", "step")) if key in metrics}


def event_number(after: str | None) -> int | None:
    if after is None:
        return None
    number = after.removeprefix("ftevent-")
    if not re.fullmatch(r"[0-9]{1,18}", number):
        raise ApiError(400, f"after: {after!r} is not an event id (ftevent-N)", param="after", code="invalid_value")
    return int(number)


def job_of(state: ServerState, job_id: str, caller: Caller, kind: str = jobs.FINE_TUNE,
           param: str = "fine_tuning_job_id") -> jobs.Job:
    """The caller's job of `kind` (any for an admin); another's, or none, is a 404 naming `param`."""
    try:
        return jobs.get(store_of(state), job_id, kind, caller.name, caller.admin)
    except jobs.UnknownJob as exc:
        raise ApiError(404, str(exc), param=param, code="job_not_found") from None


def event_object(event: jobs.Event) -> JobEvent:
    return JobEvent(id=f"ftevent-{event.id}", created_at=int(event.created_at), level=event.level,
                    message=event.message, type="metrics" if event.type == "metrics" else "message", data=event.data)


def job_object(state: ServerState, job: jobs.Job) -> FineTuningJob:
    spec, result = job.request, job.result
    hyper = dict(spec["hyperparameters"])
    train = state.settings.train
    if hyper["batch_size"] == "auto":
        hyper["batch_size"] = spec["forja"]["train"].get("batch_size", train.batch_size)
    if hyper["learning_rate_multiplier"] == "auto":
        hyper["learning_rate_multiplier"] = spec["forja"]["train"].get("learning_rate_multiplier",
                                                                       train.learning_rate_multiplier)
    if hyper.get("beta") == "auto":
        hyper["beta"] = spec["forja"]["train"].get("beta", train.beta)
    metrics = result.get("metrics", {})
    if hyper["n_epochs"] == "auto" and "epochs" in metrics:
        hyper["n_epochs"] = round(metrics["epochs"], 2)  # what the run did (a FAQ stops once it is learned)
    progress = result.get("progress")
    estimated = (int(time.time() + progress["eta_seconds"]) if job.status == "running" and progress
                 and progress.get("eta_seconds") is not None else None)
    return FineTuningJob(
        id=job.id, created_at=int(job.created_at), error=job.error, fine_tuned_model=result.get("fine_tuned_model"),
        finished_at=int(job.finished_at) if job.finished_at else None, hyperparameters=hyper, model=spec["model"],
        seed=spec["seed"], status=job.status, trained_tokens=result.get("trained_tokens"),
        training_file=spec["training_file"], validation_file=spec["validation_file"], estimated_finish=estimated,
        metadata=spec.get("metadata"), user_provided_suffix=spec.get("suffix"),
        method={"type": spec.get("method", "supervised"), spec.get("method", "supervised"): {"hyperparameters": hyper}},
        forja={"name": spec["forja"]["name"], "source": spec["forja"]["source"], "train": spec["forja"]["train"],
               "progress": progress, "gate": result.get("gate"), "attempts": job.attempts,
               "worker": job.worker, "metrics": metrics or None})
