"""The job worker: claims waiting jobs from the store and runs each as a `forja` process of its own.

A fine-tuning job is `forja train` (a new run, or `--resume` of the job's run when a worker took it over after
a crash); its progress is read from the run's metrics.jsonl (steps, evaluations, checkpoints) and written as
job events. A batch is `forja jobs run-batch ID`, which answers the requests and counts them in the job itself.
The worker says it is alive every jobs.poll_seconds; a cancelled fine-tune's process gets SIGINT (it saves a
checkpoint and stops), a cancelled batch stops by itself once its requests in flight are written, and either
is killed after jobs.cancel_seconds. The process stops with its worker (Linux PR_SET_PDEATHSIG: SIGTERM,
which `forja train` takes as a stop at the end of the step however many times it comes, so even a worker
killed with -9 leaves a checkpoint behind), and the run's lock keeps a new worker from resuming it before
the old process is gone.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forja import files, jobs
from forja.config import Settings
from forja.models import CHECKPOINTS_DIR, METRICS_FILE, RUN_FILE, VERSION_FILE, active_model, run_held
from forja.store import Store

log = logging.getLogger("forja.jobs")
GATE_FAILED_EXIT = 2  # forja train --from-feedback: the version was made, the gate did not pass
OUTPUT_FILE, ERROR_FILE = "output.jsonl", "errors.jsonl"  # a batch's answers in FORJA_HOME/jobs/<id>/


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job's process: the worker's own, with the home and the database it uses (a
    worker made from settings in code, as in tests, has no FORJA_HOME to pass on otherwise)."""
    env = {name: value for name, value in os.environ.items()  # a job's own train.* win over the worker's
           if not (extra and "FORJA_CONFIG" in extra and name.startswith("FORJA_TRAIN__"))}
    env = {**env, "FORJA_HOME": str(settings.home), **(extra or {})}
    if settings.database_url:
        env["FORJA_DATABASE_URL"] = settings.database_url
    return env


try:  # loaded here, not in the child: between fork and exec nothing may take a lock another thread held
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _PRCTL, _SIGNAL = _LIBC.prctl, _LIBC.signal
    _SIGNAL.argtypes, _SIGNAL.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
except (OSError, AttributeError):  # not Linux
    _PRCTL = _SIGNAL = None
PR_SET_PDEATHSIG = 1


def job_config(settings: Settings, job_id: str, train: dict[str, Any] | None = None) -> Path:
    """The worker's settings as a config file for the job's process, with the job's train.* settings laid over
    them (a worker made from settings in code, as in tests, has no file to pass on). API keys are left out:
    the job's process serves no one."""
    values = json.loads(settings.model_dump_json(exclude={"serve": {"api_keys": True}, "database_url": True}))
    values = _revealed(settings, values)
    values["train"] = {**values["train"], **(train or {})}
    path = job_dir(settings, job_id) / "forja.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may hold secrets (a classifier's key)
    with os.fdopen(fd, "w") as out:
        out.write(yaml.safe_dump(values, allow_unicode=True, sort_keys=False))
    return path


def _revealed(settings: Settings, values: Any, model: Any = None) -> Any:
    """The dumped settings with every secret as it is, not masked ('**********'): the job's process needs them."""
    from pydantic import BaseModel, SecretStr

    model = settings if model is None else model
    if isinstance(model, BaseModel) and isinstance(values, dict):
        for name, value in list(values.items()):
            field = getattr(model, name, None)
            if isinstance(field, SecretStr):
                values[name] = field.get_secret_value()
            else:
                values[name] = _revealed(settings, value, field)
    elif isinstance(model, (list, tuple)) and isinstance(values, list):
        values = [_revealed(settings, v, m) for v, m in zip(values, model)]
    elif isinstance(model, dict) and isinstance(values, dict):
        values = {k: _revealed(settings, v, model.get(k)) for k, v in values.items()}
    return values


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGINT as by default (a server started in the background, `nohup forja
    serve &`, ignores it, and a child would inherit that: a cancel would then save no checkpoint), and
    SIGTERM when the worker's thread that started it dies. That comes once more for each thread
    of the worker's process that the child passes to as that process ends: a second SIGINT would stop
    training mid-step, with no checkpoint."""
    if _PRCTL is not None:
        _SIGNAL(signal.SIGINT, 0)  # SIG_DFL (libc's own call: Python's would touch its handler table)
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Running:
    job: jobs.Job
    process: subprocess.Popen | None = None
    stopping: str | None = None  # why we asked it to stop: "cancelled", "taken over", "worker stopping"
    asked_at: float = 0.0
    seen: dict[str, Any] = field(default_factory=dict)


class Worker:
    """Runs jobs from the store until stopped; `start()` in a thread (the server), `run()` in the foreground
    (`forja worker`), `drain()` until nothing is left (tests, cron)."""

    def __init__(self, settings: Settings, store: Store | None = None):
        self.settings = settings
        self.store = store or Store.open(settings)
        self.id = jobs.worker_id()
        self._own_store = store is None
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="forja-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; running jobs' processes save a checkpoint and stop, and their jobs go back to the
        queue (the next worker resumes them)."""
        self._stop.set()
        for thread in list(self._threads.values()):
            thread.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._own_store:
            self.store.close()

    def run(self) -> None:
        log.info("job worker %s started", self.id)
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # a database hiccup must not end the worker
                log.exception("job worker step failed")
            self._stop.wait(self.settings.jobs.poll_seconds)

    def drain(self, timeout: float = 600) -> None:
        """Run jobs until none is waiting or running (in this worker), at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.step()
            if not self._threads:
                return
            time.sleep(self.settings.jobs.poll_seconds)
        raise TimeoutError(f"jobs still running after {timeout:.0f} s")

    def step(self) -> None:
        """Take over dead workers' jobs, forget finished ones, claim while there is room."""
        for job_id in jobs.take_over(self.store, self.settings.jobs.stale_seconds):
            log.warning("job %s: its worker stopped; queued again", job_id)
        for job_id, thread in list(self._threads.items()):
            if not thread.is_alive():
                del self._threads[job_id]
        while not self._stop.is_set() and len(self._threads) < self.settings.jobs.concurrency:
            job = jobs.claim(self.store, self.id)
            if job is None:
                return
            thread = threading.Thread(target=self._run, args=(job,), name=f"forja-job-{job.id}", daemon=True)
            self._threads[job.id] = thread
            thread.start()

    # ------------------------------------------------------------------ one job

    def _run(self, job: jobs.Job) -> None:
        running = Running(job)
        try:
            {jobs.FINE_TUNE: self._fine_tune, jobs.BATCH: self._batch}.get(job.kind, self._command)(running)
        except Exception as exc:  # the worker's own trouble (the database away): the job goes back to the queue
            log.exception("job %s: the worker failed; giving it back", job.id)
            if running.process is not None and running.process.poll() is None:
                running.process.send_signal(signal.SIGINT)  # it saves a checkpoint
                try:
                    running.process.wait(self.settings.jobs.cancel_seconds)
                except subprocess.TimeoutExpired:
                    running.process.kill()
            try:
                jobs.release(self.store, job.id, self.id, f"The worker failed ({type(exc).__name__}: {exc}); "
                             "the job is resumed by the next free worker")
            except Exception:  # noqa: BLE001 - then the takeover finds it (this worker's heartbeat stops)
                log.exception("job %s: cannot give it back", job.id)
        finally:
            (job_dir(self.settings, job.id) / "forja.yaml").unlink(missing_ok=True)  # it may hold secrets

    def _supervise(self, running: Running, command: list[str], env: dict[str, str], log_path: Path,
                   on_poll=None) -> int | None:
        """Run the job's process to its end, saying the worker is alive, stopping it when the job is cancelled,
        taken over or the worker stops; its exit code, or None when the job is no longer this worker's."""
        job = running.job
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as output:
            running.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                               stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        poll = self.settings.jobs.poll_seconds
        while True:
            try:
                code = running.process.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                code = None
            if on_poll is not None:
                try:
                    on_poll(running)
                except Exception:  # progress is reported again at the next poll
                    log.exception("job %s: progress not reported", job.id)
            if code is not None:
                return code
            try:
                now = jobs.heartbeat(self.store, job.id, self.id)
            except Exception:  # a database hiccup: the process goes on, the next poll tries again
                log.exception("job %s: heartbeat failed", job.id)
                continue
            if now is None:
                if running.stopping is None:
                    self._ask_stop(running, "taken over")
            elif now.status in ("cancelled", "cancelling") and running.stopping is None:
                # a batch stops by itself (it polls the job) once its requests in flight are written
                self._ask_stop(running, "cancelled", signal_process=job.kind != jobs.BATCH)
            elif self._stop.is_set() and running.stopping is None:
                self._ask_stop(running, "worker stopping")
            if running.stopping and time.monotonic() - running.asked_at > self.settings.jobs.cancel_seconds:
                running.process.kill()

    @staticmethod
    def _ask_stop(running: Running, why: str, signal_process: bool = True) -> None:
        running.stopping, running.asked_at = why, time.monotonic()
        if signal_process and running.process is not None and running.process.poll() is None:
            running.process.send_signal(signal.SIGINT)

    def _stopped(self, running: Running, what: str) -> bool:
        """After the process ended: when we stopped it, say so in the job (cancelled stays cancelled; a worker
        that stops gives the job back); True when that was the case."""
        job = running.job
        if running.stopping == "worker stopping":
            jobs.release(self.store, job.id, self.id, f"The worker stopped ({what}); the job is resumed from there "
                         "by the next free worker")
            return True
        if running.stopping == "cancelled":
            jobs.finish(self.store, job.id, self.id, "cancelled", f"The job was cancelled ({what})")
            return True
        return running.stopping == "taken over"

    # ------------------------------------------------------------------ fine-tuning

    def _fine_tune(self, running: Running) -> None:
        job, settings = running.job, self.settings
        spec = job.request
        name = spec["forja"]["name"]
        run_dir = settings.runs_dir / name
        version = settings.versions_dir / name / VERSION_FILE
        if not version.is_file():
            waited = False
            while run_held(run_dir):  # the process of the worker that died is still saving its checkpoint
                if not waited:
                    jobs.add_event(self.store, job.id, "Waiting for the previous process of this job to stop")
                    waited = True
                if self._stop.wait(settings.jobs.poll_seconds) or jobs.heartbeat(self.store, job.id, self.id) is None:
                    return
            resume = (run_dir / RUN_FILE).is_file()
            if not jobs.set_status(self.store, job.id, self.id, "running",
                                   f"Resuming the fine-tuning job (attempt {job.attempts})" if resume
                                   else "Fine-tuning job started"):
                jobs.finish(self.store, job.id, self.id, "cancelled", "The job was cancelled before it started")
                return
            command = [sys.executable, "-m", "forja.cli", "train", "--quiet"]
            if resume:  # a feedback run resumed is gated (and promoted) as an uninterrupted one
                command += ["--resume", name] + ([] if spec["forja"]["promote"] else ["--no-promote"])
            elif spec["forja"]["source"] == "feedback":
                command += ["--from-feedback", "--name", name, "--base", spec["model"]]
                command += [] if spec["forja"]["promote"] else ["--no-promote"]
            else:
                command += ["--name", name, "--base", spec["model"], "--data", spec["forja"]["training_path"]]
                if spec["forja"].get("validation_path"):
                    command += ["--validation", spec["forja"]["validation_path"]]
            env = child_env(settings, {"FORJA_CONFIG": str(job_config(settings, job.id, spec["forja"]["train"]))})
            if resume:  # what an earlier attempt reported is not reported twice
                saved, _ = jobs.events(self.store, job.id, limit=100_000, type="checkpoint")
                last, _ = jobs.events(self.store, job.id, limit=1, type="metrics")
                reported = max([(e.data or {}).get("step", 0) for e in last] or [0])
                running.seen.update(step=reported, reported=reported,
                                    checkpoints={(e.data or {}).get("step") for e in saved})
            code = self._supervise(running, command, env, job_dir(settings, job.id) / "train.log",
                                   on_poll=lambda r: self._progress(r, run_dir))
            self._progress(running, run_dir)
            step = running.seen.get("step", 0)
            if self._stopped(running, f"at step {step}; its checkpoints are kept in runs/{name}/checkpoints"):
                return
            if code not in (0, GATE_FAILED_EXIT) or not version.is_file():
                message = _last_error(job_dir(settings, job.id) / "train.log")
                jobs.finish(self.store, job.id, self.id, "failed", f"Fine-tuning failed: {message}", level="error",
                            error={"code": "training_failed", "message": message, "param": None})
                return
        self._succeeded(running, name)

    def _succeeded(self, running: Running, name: str) -> None:
        settings, job = self.settings, running.job
        directory = settings.versions_dir / name
        metrics = json.loads((directory / VERSION_FILE).read_text()).get("metrics", {})
        result: dict[str, Any] = {"fine_tuned_model": name, "trained_tokens": metrics.get("tokens"),
                                  "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        gate_path = directory / "gate.json"
        message = f"New fine-tuned model created: {name}"
        if gate_path.is_file():
            gate = json.loads(gate_path.read_text())
            active = active_model(settings)
            result["gate"] = {"passed": gate.get("passed"), "reason": gate.get("reason"),
                              "decided_by": gate.get("decided_by"), "promoted": active == name}
            message += (f"; the gate passed and it is the active version" if active == name else
                        f"; not promoted (gate {'passed' if gate.get('passed') else 'not passed'}: {gate.get('reason')})")
        jobs.add_event(self.store, job.id, message)
        jobs.finish(self.store, job.id, self.id, "succeeded", "The job has successfully completed", **result)

    def _progress(self, running: Running, run_dir: Path) -> None:
        """New step records and checkpoints of the run, as job events (OpenAI's metrics events, with
        tokens/s and the time left). A line counts as read once its event is written, so a database error
        loses none: the next poll reads it again."""
        seen = running.seen
        try:
            stream = (run_dir / METRICS_FILE).open("rb")
        except OSError:
            return
        with stream:
            file = os.fstat(stream.fileno()).st_ino
            if file != seen.get("file"):  # a resumed run writes a new one, up to its checkpoint
                seen.update(file=file, offset=0)
            stream.seek(seen["offset"])
            block = stream.read()
        for line in block.splitlines(keepends=True):
            if not line.endswith(b"\n"):  # still being written
                break
            try:
                record = json.loads(line)
            except ValueError:  # not a record: passed over
                pass
            else:
                self._record(running, record, run_dir)
            seen["offset"] += len(line)

    def _record(self, running: Running, record: dict[str, Any], run_dir: Path) -> None:
        seen, step = running.seen, record.get("step", 0)
        if "checkpoint" in record:  # the trainer notes each checkpoint it saved (it may be rotated out later)
            if step in seen.setdefault("checkpoints", set()):
                return
            metrics = {k: v for k, v in seen.get("last", {}).items() if k in ("train_loss", "valid_loss")}
            path = run_dir / CHECKPOINTS_DIR / record["checkpoint"]
            jobs.add_event(self.store, running.job.id, f"Checkpoint saved at step {step}", type="checkpoint",
                           data={"step": step, "path": str(path.relative_to(self.settings.home)), "metrics": metrics})
            seen["checkpoints"].add(step)
        elif "loss" in record and step > seen.get("step", 0):
            seconds = seen.get("seconds", 0.0) + record["tokens"] / max(record["tokens_per_second"], 1e-9)
            timed = seen.get("steps_timed", 0) + 1
            total = record.get("total_steps")
            eta = round((total - step) * seconds / timed, 1) if total else None
            data = {"step": step, "total_steps": total, "train_loss": round(record["loss"], 4),
                    "tokens_per_second": round(record["tokens_per_second"], 1), "eta_seconds": eta,
                    "learning_rate": record.get("lr")}
            if "val_loss" in record:
                data["valid_loss"] = round(record["val_loss"], 4)
            jobs.add_event(self.store, running.job.id, f"Step {step}/{total or '?'}: training loss={record['loss']:.4f}",
                           type="metrics", data=data)
            seen.update(step=step, seconds=seconds, steps_timed=timed, last=data)
            try:
                jobs.heartbeat(self.store, running.job.id, self.id, progress=data)
            except Exception:  # noqa: BLE001 - the job's progress only; the next step's heartbeat carries it
                log.exception("job %s: progress not saved", running.job.id)
        elif "loss" not in record and ("val_loss" in record or "learned" in record):  # (the final evaluation,
            key = ("learned" if "learned" in record else "val_loss", step)  # an answer check)
            # skipped when an earlier attempt reported it, or this one did from the file the run had before
            # this attempt's process resumed it
            if step <= seen.get("reported", 0) or key in seen.setdefault("noted", set()):
                return
            if "learned" in record:
                jobs.add_event(self.store, running.job.id, f"Step {step}: {record['learned']} of {record['checked']} "
                               "training answers reproduced", data={"step": step, "learned": record["learned"],
                                                                     "checked": record["checked"]})
            else:
                jobs.add_event(self.store, running.job.id, f"Step {step}: validation loss={record['val_loss']:.4f}",
                               type="metrics", data={"step": step, "valid_loss": round(record["val_loss"], 4)})
            seen["noted"].add(key)

    # ------------------------------------------------------------------ batches

    def _batch(self, running: Running) -> None:
        job, settings = running.job, self.settings
        if not jobs.set_status(self.store, job.id, self.id, "in_progress",
                               "Batch started" if job.attempts == 1 else f"Batch resumed (attempt {job.attempts})"):
            jobs.finish(self.store, job.id, self.id, "cancelled", "Batch cancelled before it started")
            return
        command = [sys.executable, "-m", "forja.cli", "jobs", "run-batch", job.id, "--worker", self.id]
        env = child_env(settings, {"FORJA_CONFIG": str(job_config(settings, job.id))})
        code = self._supervise(running, command, env, job_dir(settings, job.id) / "batch.log")
        if running.stopping in ("taken over", "worker stopping"):
            self._stopped(running, "while answering")
            return
        now = jobs.get(self.store, job.id)
        if code != 0 and running.stopping is None and now.status not in ("cancelling", "cancelled"):
            message = _last_error(job_dir(settings, job.id) / "batch.log")
            jobs.finish(self.store, job.id, self.id, "failed", f"The batch failed: {message}", level="error",
                        error={"code": "batch_failed", "message": message, "param": None})
            return
        cancelled = now.status in ("cancelling", "cancelled")
        if not cancelled:
            jobs.set_status(self.store, job.id, self.id, "finalizing", "Writing the output files")
        kept: dict[str, Any] = {}
        lines = {}
        for key, name in (("output_file_id", OUTPUT_FILE), ("error_file_id", ERROR_FILE)):
            path = job_dir(settings, job.id) / name
            lines[name] = len(path.read_bytes().splitlines()) if path.is_file() else 0
            if lines[name]:
                kept[key] = keep_output(settings, self.store, path, f"{job.id}_{name}", job.api_key_name)
        # what the files hold is what was answered (the last count the process sent may be older)
        kept["request_counts"] = {"total": job.request["total"], "completed": lines[OUTPUT_FILE],
                                  "failed": lines[ERROR_FILE]}
        jobs.finish(self.store, job.id, self.id, "cancelled" if cancelled else "completed",
                    "Batch cancelled" if cancelled else "Batch completed", **kept)


    # ------------------------------------------------------------------ the console's comparisons and exports

    def _command(self, running: Running) -> None:
        """An eval job is `forja eval` of two or more versions on an uploaded test set (the report's rows and
        means become the job's result, report.html a file); an export job is `forja export` of a version,
        whose files become files of the files API, to download."""
        job, settings = running.job, self.settings
        spec, directory = job.request, job_dir(settings, job.id)
        what = "Comparison" if job.kind == jobs.EVAL else "Export"
        if not jobs.set_status(self.store, job.id, self.id, "running", f"{what} started"):
            jobs.finish(self.store, job.id, self.id, "cancelled", f"{what} cancelled before it started")
            return
        out = directory / "out"
        shutil.rmtree(out, ignore_errors=True)  # a job taken over starts again: each is minutes at most
        command = [sys.executable, "-m", "forja.cli"]
        if job.kind == jobs.EVAL:
            testset = files.path_of(settings, files.get(self.store, spec["testset_file_id"]))
            first, *others = spec["models"]
            command += ["eval", "--quiet", "--testset", str(testset), "--model", first, "--out", str(out),
                        "--max-tokens", str(spec["max_tokens"])]
            for other in others:
                command += ["--compare", other]
            if spec.get("judge"):
                command += ["--judge", spec["judge"]]
        else:
            command += ["export", "--model", spec["model"], "--format", spec["format"], "--quant", spec["quant"],
                        "--out", str(out)]
        env = child_env(settings, {"FORJA_CONFIG": str(job_config(settings, job.id))})
        log_path = directory / f"{job.kind}.log"
        code = self._supervise(running, command, env, log_path)
        if self._stopped(running, "before it finished"):
            return
        if code != 0:
            message = _last_error(log_path)
            jobs.finish(self.store, job.id, self.id, "failed", f"{what} failed: {message}", level="error",
                        error={"code": f"{job.kind}_failed", "message": message, "param": None})
            return
        if job.kind == jobs.EVAL:
            rows = [json.loads(line) for line in (out / "rows.jsonl").read_text(encoding="utf-8").splitlines() if line]
            result = {"summary": json.loads((out / "summary.json").read_text(encoding="utf-8")), "rows": rows,
                      "report_file_id": keep_output(settings, self.store, out / "report.html",
                                                    f"{job.id}_report.html", job.api_key_name, move=True)}
        else:
            kept = [{"filename": path.name, "bytes": path.stat().st_size,
                     "id": keep_output(settings, self.store, path, path.name, job.api_key_name, move=True)}
                    for path in sorted(out.iterdir()) if path.is_file()]
            result = {"files": kept}
        jobs.finish(self.store, job.id, self.id, "succeeded", f"{what} finished", **result)


def keep_output(settings: Settings, store: Store, path: Path, filename: str, owner: str | None,
                move: bool = False) -> str:
    """A job's output as a file of the files API (purpose batch_output); returns its id. `move` for a file
    nothing reads again (an export's GGUF is not copied)."""
    file_id = files.new_file_id()
    incoming = files.incoming_dir(settings, file_id)
    incoming.mkdir(parents=True, exist_ok=True)
    (shutil.move if move else shutil.copyfile)(path, incoming / files.safe_filename(filename))
    return files.keep(settings, store, file_id, filename, files.OUTPUT_PURPOSE, owner).id


def _last_error(log_path: Path) -> str:
    """The one line a failed `forja` process said (its 'forja: error: ...'), else its last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "the process left no log"
    for line in reversed(lines):
        if line.startswith("forja: error: "):
            return line.removeprefix("forja: error: ")
    return lines[-1][:500] if lines else "the process ended without saying why"


def run_batch_job(settings: Settings, job_id: str, worker: str) -> None:
    """In the batch's own process (`forja jobs run-batch`): answer the requests not answered yet (an interrupted
    batch continues), counting them in the job as they come; stop early when the job is being cancelled."""
    from forja.jobs.batch import run_batch

    store = Store.open(settings)
    try:
        job = jobs.get(store, job_id, jobs.BATCH)
        source = files.path_of(settings, files.get(store, job.request["input_file_id"]))
        directory = job_dir(settings, job_id)
        directory.mkdir(parents=True, exist_ok=True)
        last = {"at": 0.0, "status": job.status}

        def progress(counts) -> None:
            now = time.monotonic()
            if now - last["at"] >= 0.5 or counts.completed + counts.failed >= counts.total:
                last["at"] = now
                seen = jobs.heartbeat(store, job_id, worker, request_counts={
                    "total": counts.total, "completed": counts.completed, "failed": counts.failed})
                last["status"] = seen.status if seen is not None else "taken over"

        def cancelled() -> bool:
            if time.monotonic() - last["at"] >= 0.5:
                last["at"] = time.monotonic()
                seen = jobs.heartbeat(store, job_id, worker)
                last["status"] = seen.status if seen is not None else "taken over"
            return last["status"] in ("cancelling", "cancelled", "taken over")

        counts = run_batch(settings, source, directory / OUTPUT_FILE, directory / ERROR_FILE, owner=job.api_key_name,
                           endpoint=job.request["endpoint"], progress=progress, cancelled=cancelled)
        jobs.heartbeat(store, job_id, worker, request_counts={"total": counts.total, "completed": counts.completed,
                                                              "failed": counts.failed})
    finally:
        store.close()
