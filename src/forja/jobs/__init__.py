"""Fine-tuning and batch jobs: rows in the store, run jobs.concurrency at a time (1 by default) by a worker as
`forja` processes, so the server's event loop and memory are untouched.

This module is the jobs' rows: create, read, list, cancel, and the worker's side of them (claim a waiting job,
say it is alive, take over one whose worker died, finish it), plus their events. `worker.py` runs them.
A job waits for a worker while its `worker` column is NULL and its status is not a final one; a worker claims
it by writing its own id there in one conditional UPDATE, so two workers sharing a store never run one job twice.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from forja.config import ForjaError
from forja.store import Store, job_events, jobs

FINE_TUNE, BATCH = "fine_tune", "batch"
# The console's jobs: `forja eval` of versions side by side, `forja export` of a version to download.
EVAL, EXPORT = "eval", "export"
KINDS = (FINE_TUNE, BATCH, EVAL, EXPORT)
PREFIX = {FINE_TUNE: "ftjob-", BATCH: "batch_", EVAL: "evaljob-", EXPORT: "exportjob-"}
# Statuses as OpenAI names them; a job in FINAL never runs again.
FINAL = ("succeeded", "failed", "cancelled", "completed", "expired")
STOPPING = ("cancelling",)  # a batch being stopped: its worker writes what was answered, then cancels it


class JobError(ForjaError):
    """A job that cannot be created or changed as asked."""


class UnknownJob(JobError):
    """No job (of this kind, visible to this client) has this id."""


@dataclass
class Job:
    id: str
    kind: str
    status: str
    created_at: float
    request: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    api_key_name: str | None = None
    worker: str | None = None
    heartbeat_at: float | None = None
    attempts: int = 0

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass(frozen=True)
class Event:
    id: int
    job_id: str
    created_at: float
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


def create(store: Store, kind: str, request: dict[str, Any], owner: str | None, status: str,
           events: list[str] = ()) -> Job:
    """A new job waiting for a worker, with its first events, in one transaction."""
    job = Job(PREFIX[kind] + uuid.uuid4().hex[:24], kind, status, time.time(), request, api_key_name=owner)
    with store.engine.begin() as conn:
        conn.execute(jobs.insert().values(id=job.id, kind=kind, status=status, created_at=job.created_at,
                                          api_key_name=owner, request=request,
                                          result=_stamped(None, status, {}), attempts=0))
        for message in events:
            _insert_event(conn, job.id, message)
    return job


def get(store: Store, job_id: str, kind: str | None = None, owner: str | None = None, admin: bool = True) -> Job:
    """The job, if it is of `kind` and the client may see it (its own, or any for an admin); else UnknownJob,
    the same answer for a job that does not exist and one that is someone else's."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
    if row is None or (kind and row.kind != kind) or (not admin and row.api_key_name != owner):
        what = {FINE_TUNE: "fine-tuning job", BATCH: "batch", EVAL: "comparison", EXPORT: "export"}.get(kind, "job")
        raise UnknownJob(f"no {what} with id {job_id!r}")
    return _job(row)


def listing(store: Store, kind: str, owner: str | None = None, admin: bool = True,
            after: str | None = None, limit: int = 20) -> tuple[list[Job], bool]:
    """Newest first, as OpenAI lists jobs: the page after the job `after`, and whether there are more."""
    query = sa.select(jobs).where(jobs.c.kind == kind).order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
    if not admin:
        query = query.where(jobs.c.api_key_name == owner)
    with store.engine.connect() as conn:
        if after:
            mark = conn.execute(sa.select(jobs.c.created_at, jobs.c.id).where(jobs.c.id == after)).first()
            if mark is None:
                raise UnknownJob(f"after: no job with id {after!r}")
            query = query.where(sa.or_(jobs.c.created_at < mark.created_at,
                                       sa.and_(jobs.c.created_at == mark.created_at, jobs.c.id < mark.id)))
        rows = conn.execute(query.limit(limit + 1)).all()
    return [_job(r) for r in rows[:limit]], len(rows) > limit


def cancel(store: Store, job_id: str, kind: str, owner: str | None = None, admin: bool = True) -> Job:
    """A waiting job is cancelled at once; a running fine-tune is marked cancelled and its worker stops the
    process (keeping its checkpoints); a running batch goes to `cancelling` until its worker has written what
    was answered. Cancelling a finished job is an error naming its status."""
    for _ in range(10):  # a worker that moved the job on meanwhile: look again (each try its own transaction)
        job = get(store, job_id, kind, owner, admin)
        if job.final or job.status in STOPPING:
            raise JobError(f"{job_id} is {job.status}; only a job that has not finished can be cancelled")
        status = "cancelling" if kind == BATCH and job.worker is not None else "cancelled"
        values: dict[str, Any] = {"status": status, "result": _stamped(job.result, status, {})}
        if status == "cancelled":
            values["finished_at"] = time.time()
        worker_now = jobs.c.worker.is_(None) if job.worker is None else jobs.c.worker == job.worker
        with store.engine.begin() as conn:
            done = conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == job.status, worker_now)
                                .values(**values))
            if done.rowcount:
                _insert_event(conn, job_id, "Job cancelled" if status == "cancelled" else "Cancelling: the "
                              "requests being answered are finished and written")
        if done.rowcount:
            return get(store, job_id)  # (read once the change is committed)
    raise JobError(f"{job_id} changes too fast to be cancelled now; try again")


def add_event(store: Store, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
    with store.engine.begin() as conn:
        _insert_event(conn, job_id, message, level, type, data)


def events(store: Store, job_id: str, after: int | None = None, limit: int = 20, type: str | None = None,
           oldest_first: bool = False) -> tuple[list[Event], bool]:
    """A job's events, newest first as OpenAI lists them (or oldest first, for a stream), the page after the
    event id `after`, and whether there are more."""
    order = job_events.c.id if oldest_first else job_events.c.id.desc()
    query = sa.select(job_events).where(job_events.c.job_id == job_id).order_by(order)
    if after is not None:
        query = query.where(job_events.c.id > after if oldest_first else job_events.c.id < after)
    if type:
        query = query.where(job_events.c.type == type)
    with store.engine.connect() as conn:
        rows = conn.execute(query.limit(limit + 1)).all()
    return [Event(r.id, r.job_id, r.created_at, r.level, r.type, r.message, r.data)
            for r in rows[:limit]], len(rows) > limit


# ---------------------------------------------------------------------------------------------- the worker's side


def worker_id() -> str:
    """This process's worker name: host, pid and a tag (two workers in one process are two workers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def claim(store: Store, worker: str, kinds: tuple[str, ...] = KINDS) -> Job | None:
    """The oldest job waiting for a worker, now this worker's; None when there is none."""
    waiting = (sa.select(jobs.c.id).where(jobs.c.worker.is_(None), jobs.c.status.not_in(FINAL),
                                          jobs.c.kind.in_(kinds))
               .order_by(jobs.c.created_at, jobs.c.id).limit(5))
    with store.engine.begin() as conn:
        for (job_id,) in conn.execute(waiting).all():
            now = time.time()
            taken = conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.worker.is_(None),
                                                     jobs.c.status.not_in(FINAL))
                                 .values(worker=worker, heartbeat_at=now, attempts=jobs.c.attempts + 1,
                                         started_at=sa.func.coalesce(jobs.c.started_at, now)))
            if taken.rowcount:
                return _job(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())
    return None


def heartbeat(store: Store, job_id: str, worker: str, **result: Any) -> Job | None:
    """Say the worker is alive (and, with `result`, merge what it has made so far); returns the job as it
    is now (a client may have cancelled it), or None when another worker has taken it over."""
    with store.engine.begin() as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None or row.worker != worker:
            return None
        values: dict[str, Any] = {"heartbeat_at": time.time()}
        if result:
            values["result"] = {**(row.result or {}), **result}
        conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.worker == worker).values(**values))
        return _job(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())


def set_status(store: Store, job_id: str, worker: str, status: str, message: str | None = None,
               **result: Any) -> bool:
    """Move a running job to another status that is not final (queued -> running); False when it was
    cancelled meanwhile or is no longer this worker's."""
    with store.engine.begin() as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None or row.worker != worker or row.status in FINAL or row.status in STOPPING:
            return False
        values: dict[str, Any] = {"status": status, "heartbeat_at": time.time(),
                                  "result": _stamped(row.result, status, result)}
        done = conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == row.status,
                                                jobs.c.worker == worker).values(**values))
        if not done.rowcount:  # cancelled (or taken over) between the read and the write
            return False
        if message:
            _insert_event(conn, job_id, message)
        return True


def finish(store: Store, job_id: str, worker: str, status: str, message: str, *, level: str = "info",
           error: dict[str, Any] | None = None, **result: Any) -> bool:
    """The end of a job: its final status, what it made, its last event. A job cancelled meanwhile stays
    cancelled (the result is still merged: what was made before the stop); False when it is not this
    worker's any more."""
    for _ in range(10):  # a cancel between the read and the write: read it again (a transaction each)
        with store.engine.begin() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            if row is None or row.worker != worker:
                return False
            values: dict[str, Any] = {"result": _stamped(row.result, None, result), "heartbeat_at": time.time(),
                                      "finished_at": row.finished_at or time.time()}
            if row.status not in FINAL:
                values.update(status=status, error=error or None,
                              result=_stamped(row.result, status, result))
            done = conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == row.status,
                                                    jobs.c.worker == worker).values(**values))
            if done.rowcount:
                _insert_event(conn, job_id, message, level)
                return True
    return False


def release(store: Store, job_id: str, worker: str, message: str) -> None:
    """Give a job back to the queue (it could not start now: its run is still held by a process that is
    stopping); another worker, or this one, claims it again."""
    with store.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.worker == worker).values(worker=None))
        _insert_event(conn, job_id, message)


def take_over(store: Store, stale_seconds: float) -> list[str]:
    """Jobs whose worker died go back to the queue (to be resumed from their last checkpoint): a worker on
    this machine whose process is gone, or any worker silent for `stale_seconds`. A batch that was being
    cancelled is cancelled. Returns their ids."""
    host, now = socket.gethostname(), time.time()
    taken = []
    with store.engine.begin() as conn:
        running = conn.execute(sa.select(jobs).where(jobs.c.worker.is_not(None), jobs.c.finished_at.is_(None))).all()
        for row in running:
            where, pid = _host_pid(row.worker)
            dead = (where == host and not _alive(pid)) or (row.heartbeat_at or 0) < now - stale_seconds
            if not dead:
                continue
            values: dict[str, Any] = {"worker": None}
            if row.status in STOPPING:
                values.update(status="cancelled", finished_at=now, result=_stamped(row.result, "cancelled", {}))
            done = conn.execute(jobs.update().where(jobs.c.id == row.id, jobs.c.worker == row.worker).values(**values))
            if done.rowcount:
                taken.append(row.id)
                _insert_event(conn, row.id, f"The worker {row.worker} stopped"
                              + ("; the job is cancelled" if row.status in STOPPING else
                                 "; the job is resumed by the next free worker from where it stopped"), "warn")
    return taken


def _host_pid(worker: str) -> tuple[str, int]:
    host, _, rest = worker.partition(":")
    pid = rest.partition(":")[0]
    return host, int(pid) if pid.isdigit() else -1


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that pid: alive, as far as we can tell
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _insert_event(conn: sa.Connection, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> None:
    conn.execute(job_events.insert().values(job_id=job_id, created_at=time.time(), level=level, type=type,
                                            message=message, data=data))


def _stamped(result: dict[str, Any] | None, status: str | None, more: dict[str, Any]) -> dict[str, Any]:
    """A job's result with `more` merged in and, with `status`, when the job entered it (`status_times`:
    a batch's in_progress_at, completed_at, ...)."""
    merged = {**(result or {}), **more}
    if status:
        merged["status_times"] = {**merged.get("status_times", {}), status: time.time()}
    return merged


def _job(row: Any) -> Job:
    return Job(row.id, row.kind, row.status, row.created_at, row.request, row.result or {},
               row.error or None, row.started_at, row.finished_at, row.api_key_name,
               row.worker, row.heartbeat_at, row.attempts)
