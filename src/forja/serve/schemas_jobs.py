"""Bodies of /v1/fine_tuning/jobs and /v1/batches, in OpenAI's shapes (the `openai` client's fine_tuning and
batches resources read them), with forja's own options and facts under `forja`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forja.serve.schemas import ERROR_STATUSES, ErrorResponse, StrictInt, _Body

STATUSES = {**ERROR_STATUSES,
            400: "A field is missing or has a value forja cannot use (its name in `param`): an unknown model, a file "
                 "that is not there or not of the right purpose, a batch line that is not a request",
            403: "The API key lacks the `train` scope (when API keys are configured)",
            404: "No job with this id (among this client's, unless the key is an admin's)",
            409: "The job has finished (it cannot be cancelled), or this server has no database"}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": STATUSES[status]} for status in statuses}


Auto = Literal["auto"]
MAX_METADATA_KEYS = 16


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | StrictInt = Field("auto", description="Passes over the data; auto = by goal (a small FAQ until "
                                       "its answers are learned, at most train.epochs_for).")
    batch_size: Auto | StrictInt = Field("auto", description="Sequences per batch; auto = train.batch_size.")
    learning_rate_multiplier: Auto | float = Field("auto", description="Times forja's learning rate for the goal "
                                                   "and method.")

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, value: Any) -> Any:
        if value != "auto" and not 1 <= value <= 100:
            raise ValueError("n_epochs must be 'auto' or from 1 to 100")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: Any) -> Any:
        if value != "auto" and not 1 <= value <= 256:
            raise ValueError("batch_size must be 'auto' or from 1 to 256")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, value: Any) -> Any:
        if value != "auto" and not 0 < value <= 100:
            raise ValueError("learning_rate_multiplier must be 'auto' or above 0 and at most 100")
        return value


class MethodOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Auto | float = Field("auto", description="How far from the starting model the preferences may move it; "
                               "auto = train.beta.")

    @field_validator("beta")
    @classmethod
    def _beta(cls, value: Any) -> Any:
        if value != "auto" and not 0 < value <= 100:
            raise ValueError("beta must be 'auto' or above 0 and at most 100")
        return value


class DpoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: MethodOptions | None = None
    dpo: DpoOptions | None = Field(None, description="DPO on a training file of preference pairs (OpenAI's "
                                   "{input, preferred_output, non_preferred_output} lines, or prompt/chosen/rejected).")
    reinforcement: dict[str, Any] | None = None


class ForjaJobOptions(BaseModel):
    """forja's own options (an extension of OpenAI's body)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["file", "feedback"] = Field(
        "file", description="file: train on training_file; feedback: retrain from the unused feedback (as forja train "
        "--from-feedback), starting from `model`, and promote the result when it passes the gate.")
    promote: bool = Field(True, description="source feedback: promote the new version when it passes the gate.")
    train: dict[str, Any] = Field(default_factory=dict, description="Any train.* setting for this job (method, goal, "
                                  "max_steps, lora_r, system, ...), as in forja.yaml.")


class FineTuneCreate(_Body):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="The model to start from: the configured model, a bundled one, "
                       "or a version.")
    training_file: str | None = Field(None, description="A file uploaded with purpose fine-tune (not with source "
                                      "feedback).")
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64, description="Part of the new version's name.")
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    forja: ForjaJobOptions = Field(default_factory=ForjaJobOptions)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("suffix may hold letters, digits, '-', '_' and '.', starting with a letter or digit")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)


def check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None:
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_KEYS} keys")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
    return value


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str = "forja"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str | None = None
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None
    forja: dict[str, Any] = Field(default_factory=dict, description="The version name, the source, the progress "
                                  "(step, total, ETA), the gate and promotion of a feedback job, attempts.")


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool = False


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool = False


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int
    forja: dict[str, Any] = Field(default_factory=dict, description="Where the checkpoint is, and whether it is "
                                  "still there (a run keeps its last train.keep_checkpoints).")


class JobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


# --------------------------------------------------------------------------------------------- batches


class BatchCreate(_Body):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(..., min_length=1, description="A file uploaded with purpose batch.")
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
