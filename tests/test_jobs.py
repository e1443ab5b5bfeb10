"""Fine-tuning jobs over REST with the official `openai` client against uvicorn, on the tiny model: a job
uploaded, created, polled through its events to `succeeded` and chatted with; another cancelled mid-run with
its checkpoint kept; a `forja serve` killed with -9 mid-job resumes the job after its restart; scopes and
per-client jobs; every bad field a 400 naming it; the worker's claim and takeover on the store itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from forja import jobs
from forja.config import load_settings
from forja.serve.app import create_app
from forja.store import Store, jobs as jobs_table

TRAIN_KEY = "ana-train-key-0123456789"
OTHER_KEY = "bob-train-key-0123456789"
CHAT_KEY = "chat-only-key-0123456789"
ADMIN_KEY = "root-admin-key-0123456789"
PAIRS = [("hola", "buenas"), ("¿horario?", "de 9 a 18"), ("¿dónde estáis?", "calle Mayor 3")]
FAST = {"jobs": {"poll_seconds": 0.2, "stale_seconds": 30, "cancel_seconds": 15}}


def pairs_file(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n"
                            for q, a in PAIRS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory, start_server):
    home = tmp_path_factory.mktemp("jobs-home")
    keys = [{"name": "ana", "key": TRAIN_KEY, "scopes": ["chat", "train"]},
            {"name": "bob", "key": OTHER_KEY, "scopes": ["train"]},
            {"name": "carla", "key": CHAT_KEY},
            {"name": "root", "key": ADMIN_KEY, "admin": True}]
    settings = load_settings(home=home, model=str(tiny_model_dir), dtype="float32", serve={"api_keys": keys}, **FAST)
    server = start_server(create_app(settings, str(tiny_model_dir)))
    server.settings, server.model = settings, str(tiny_model_dir)
    return server


def client(served, key: str = TRAIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def training_file(served, tmp_path_factory):
    return client(served).files.create(file=pairs_file(tmp_path_factory.mktemp("data") / "faq.jsonl").open("rb"),
                                       purpose="fine-tune")


def wait_for(check, timeout: float = 240, what: str = "the job"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not get there in {timeout:.0f} s")


def create(api: openai.OpenAI, model: str, file_id: str, **train) -> object:
    return api.fine_tuning.jobs.create(model=model, training_file=file_id, suffix="faq",
                                       extra_body={"forja": {"train": {"eval_every": None, **train}}})


def test_a_job_is_created_polled_through_its_events_to_succeeded_and_its_model_answers(served, training_file):
    api = client(served)
    job = create(api, served.model, training_file.id, max_steps=6, checkpoint_every=2, seed=3,
                 stop_when_learned=False)
    assert job.status == "queued" and job.fine_tuned_model is None and job.training_file == training_file.id
    done = wait_for(lambda: (j := api.fine_tuning.jobs.retrieve(job.id)).status in jobs.FINAL and j)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft-faq-") and done.trained_tokens > 0 and done.finished_at
    events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # newest first, as OpenAI lists them
    last = next(e for e in events if e.type == "metrics" and e.data.get("step") == 6 and "train_loss" in e.data)
    assert last.data["total_steps"] == 6 and last.data["eta_seconds"] == 0 and last.data["tokens_per_second"] > 0
    assert events[0].message == "The job has successfully completed"
    page = api.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    assert api.fine_tuning.jobs.list_events(job.id, after=page.data[-1].id, limit=3).data[0].id != page.data[-1].id
    points = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert points[0].fine_tuned_model_checkpoint == done.fine_tuned_model and points[0].step_number == 6
    assert [p.step_number for p in points[1:]] == [6, 4, 2]
    reply = api.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hola"}],
                                        max_tokens=4)
    assert reply.model == done.fine_tuned_model and reply.usage.completion_tokens > 0
    assert done.id in [j.id for j in api.fine_tuning.jobs.list(limit=100).data]


def test_the_events_stream_follows_a_job_to_its_end(served, training_file):
    api = client(served)
    job = create(api, served.model, training_file.id, max_steps=4, checkpoint_every=None, stop_when_learned=False)
    with httpx.stream("GET", f"{served.url}/v1/fine_tuning/jobs/{job.id}/events", params={"stream": "true"},
                      headers={"Authorization": f"Bearer {TRAIN_KEY}"}, timeout=240) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    messages = [json.loads(line)["message"] for line in lines[:-1]]
    assert messages[0].startswith("Validating training file") and messages[-1] == "The job has successfully completed"
    assert [m for m in messages if m.startswith("Step ")][:1] == ["Step 1/4: training loss=" + messages[3].split("=")[1]]


def test_a_running_job_is_cancelled_within_seconds_and_keeps_its_checkpoint(served, training_file):
    api = client(served)
    job = create(api, served.model, training_file.id, max_steps=100_000, checkpoint_every=10_000,
                 stop_when_learned=False)
    wait_for(lambda: any(e.type == "metrics" for e in api.fine_tuning.jobs.list_events(job.id).data), what="a step")
    cancelled = api.fine_tuning.jobs.cancel(job.id)
    asked = time.monotonic()
    assert cancelled.status == "cancelled"
    last = wait_for(lambda: (e := api.fine_tuning.jobs.list_events(job.id, limit=1).data[0]).message.startswith(
        "The job was cancelled") and e, timeout=60, what="the stop")
    assert time.monotonic() - asked < 20, "the process took too long to stop"
    assert "its checkpoints are kept" in last.message
    run = served.settings.runs_dir / cancelled.forja["name"]
    saved = [p for p in (run / "checkpoints").glob("step-*") if (p / "state.pt").is_file()]
    assert saved, "SIGINT saves a checkpoint before the process stops"
    assert api.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError, match="cancelled"):
        api.fine_tuning.jobs.cancel(job.id)


def test_clients_see_only_their_own_jobs_and_files_and_need_the_train_scope(served, training_file):
    ana, bob, admin = client(served), client(served, OTHER_KEY), client(served, ADMIN_KEY)
    job = create(ana, served.model, training_file.id, max_steps=1)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(training_file.id)
    with pytest.raises(openai.BadRequestError, match="training_file"):  # someone else's file is no file
        create(bob, served.model, training_file.id, max_steps=1)
    assert job.id not in [j.id for j in bob.fine_tuning.jobs.list(limit=100).data]
    assert training_file.id not in [f.id for f in bob.files.list()]
    assert admin.fine_tuning.jobs.retrieve(job.id).id == job.id
    with pytest.raises(openai.PermissionDeniedError, match="train"):
        client(served, CHAT_KEY).fine_tuning.jobs.list()
    with pytest.raises(openai.PermissionDeniedError, match="train"):
        client(served, CHAT_KEY).files.list()
    with pytest.raises(openai.PermissionDeniedError, match="chat"):
        bob.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hola"}], max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):  # promoting changes every client's answers: admin only
        ana.post(f"/fine_tuning/jobs/{job.id}/promote", cast_to=object)
    wait_for(lambda: ana.fine_tuning.jobs.retrieve(job.id).status in jobs.FINAL)


@pytest.mark.parametrize("body, param, text", [
    ({"model": "no-such-model"}, "model", "no model named"),
    ({"training_file": "file-nope"}, "training_file", "no file with id"),
    ({"training_file": None}, "training_file", "training_file is missing"),
    ({"method": {"type": "reinforcement"}}, "method.type", "'supervised' or 'dpo'"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, None, "beta must be"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations", "events"),
    ({"hyperparameters": {"n_epochs": 0}}, None, "n_epochs"),
    ({"hyperparameters": {"batch_size": 2}, "method": {"type": "supervised", "supervised": {"hyperparameters": {
        "batch_size": 3}}}}, "hyperparameters", "once"),
    ({"forja": {"train": {"lora_r": 0}}}, "forja.train.lora_r", "greater than or equal to 1"),
    ({"forja": {"train": {"no_such_setting": 1}}}, "forja.train.no_such_setting", "Extra inputs"),
    ({"forja": {"source": "feedback"}}, "training_file", "feedback"),
    ({"suffix": "../up"}, None, "suffix"),
    ({"learning_rate": 0.1}, None, "learning_rate"),
])
def test_a_bad_field_is_a_400_naming_it_and_creates_no_job(served, training_file, body, param, text):
    api = client(served)
    before = len(api.fine_tuning.jobs.list(limit=100).data)
    request = {"model": served.model, "training_file": training_file.id, **body}
    response = httpx.post(f"{served.url}/v1/fine_tuning/jobs", json=request,
                          headers={"Authorization": f"Bearer {TRAIN_KEY}"})
    assert response.status_code in (400, 404, 422), response.text  # 422: the value fails its field's rule
    error = response.json()["error"]
    assert text in error["message"]
    if param:
        assert error["param"] == param
    assert len(api.fine_tuning.jobs.list(limit=100).data) == before


def test_a_batch_file_is_no_training_file(served, tmp_path):
    api = client(served)
    (tmp_path / "requests.jsonl").write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
                                             '"body": {"messages": [{"role": "user", "content": "hola"}]}}\n')
    batch_file = api.files.create(file=(tmp_path / "requests.jsonl").open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune'"):
        create(api, served.model, batch_file.id)


# ------------------------------------------------------------------------------------------------ kill -9


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(tiny_model_dir: Path, home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "FORJA_HOME": str(home), "FORJA_JOBS__POLL_SECONDS": "0.2"}
    process = subprocess.Popen([sys.executable, "-m", "forja.cli", "serve", "--model", str(tiny_model_dir),
                                "--port", str(port)], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    wait_for(lambda: _up(port), timeout=120, what="forja serve")
    return process


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_server_killed_mid_job_resumes_the_job_from_its_checkpoint_after_a_restart(tiny_model_dir, tmp_path):
    home, port = tmp_path / "home", free_port()
    process = start_serve(tiny_model_dir, home, port, tmp_path / "serve.log")
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        uploaded = api.files.create(file=pairs_file(tmp_path / "faq.jsonl").open("rb"), purpose="fine-tune")
        job = create(api, str(tiny_model_dir), uploaded.id, max_steps=200, checkpoint_every=5,
                     stop_when_learned=False)
        run = home / "runs" / job.forja["name"]
        wait_for(lambda: any(e.message.startswith("Checkpoint saved") for e in api.fine_tuning.jobs.list_events(
            job.id, limit=100).data), what="a checkpoint")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        steps_before = sum("loss" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
        assert steps_before < 200, "the job ended before the server was killed: nothing left to resume"
        process = start_serve(tiny_model_dir, home, port, tmp_path / "serve.log")
        done = wait_for(lambda: (j := api.fine_tuning.jobs.retrieve(job.id)).status in jobs.FINAL and j, timeout=300)
        assert done.status == "succeeded", done.error
        assert done.forja["attempts"] == 2
        messages = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=100)]  # every page
        assert any("stopped; the job is resumed" in m for m in messages)
        assert any(m.startswith("Resuming the fine-tuning job") for m in messages)
        steps = [e.data["step"] for e in api.fine_tuning.jobs.list_events(job.id, limit=100)
                 if e.type == "metrics" and "train_loss" in e.data]
        assert sorted(steps) == list(range(1, 201)), "each step reported once, across both attempts"
        log = (home / "jobs" / job.id / "train.log").read_text()
        assert "resuming " + job.forja["name"] + " from step" in log
        # the process outlived the killed server by one step, and saved it: not a stop mid-step (as a
        # second SIGINT would be, the kernel sending the parent-death signal again as each thread ends)
        assert "checkpoint saved, continue with" in log and "stopped during step" not in log, log
        assert json.loads((home / "models" / "versions" / done.fine_tuned_model / "version.json").read_text()
                          )["metrics"]["step"] == 200
    finally:
        process.kill()
        process.wait()


# ------------------------------------------------------------------------------------------------ the store


def test_one_job_is_claimed_by_one_worker_and_a_dead_workers_job_is_taken_over(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'forja.db'}")
    job = jobs.create(store, jobs.FINE_TUNE, {"x": 1}, "ana", "queued")
    won: list[object] = []
    threads = [threading.Thread(target=lambda i=i: won.append(jobs.claim(store, f"w{i}"))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [w.id for w in won if w is not None] == [job.id]
    dead = f"{socket.gethostname()}:999999:abc"  # this machine, a pid nobody has
    with store.engine.begin() as conn:
        conn.execute(jobs_table.update().values(worker=dead))
    assert jobs.take_over(store, stale_seconds=3600) == [job.id]
    again = jobs.claim(store, "w9")
    assert again.id == job.id and again.attempts == 2
    assert jobs.take_over(store, stale_seconds=3600) == []  # w9 is not a process of this machine: silent, not dead
    with store.engine.begin() as conn:
        conn.execute(jobs_table.update().values(heartbeat_at=time.time() - 7200))
    assert jobs.take_over(store, stale_seconds=3600) == [job.id]
    with pytest.raises(jobs.UnknownJob):
        jobs.get(store, job.id, jobs.FINE_TUNE, owner="bob", admin=False)
    store.close()


def test_a_jobs_steps_are_reported_once_across_a_rewritten_metrics_file_and_a_failed_database_write(
        tmp_path, monkeypatch):
    from forja.jobs.worker import Running, Worker

    settings = load_settings(home=tmp_path / "home")
    store = Store(f"sqlite:///{tmp_path / 'forja.db'}")
    job = jobs.create(store, jobs.FINE_TUNE, {"x": 1}, "ana", "queued")
    worker, running = Worker(settings, store), Running(job)
    run = settings.runs_dir / "r"
    run.mkdir(parents=True)
    metrics = run / "metrics.jsonl"

    def step(n: int, speed: float = 100.0) -> str:
        return json.dumps({"step": n, "loss": 1.0 / n, "tokens": 10, "tokens_per_second": speed,
                           "total_steps": 20}) + "\n"

    def reported() -> list[int]:
        return sorted(e.data["step"] for e in jobs.events(store, job.id, limit=1000, type="metrics")[0])

    checkpoint = json.dumps({"step": 5, "checkpoint": "step-000005"}) + "\n"
    metrics.write_text("".join(map(step, range(1, 6))) + checkpoint + step(6) + step(7) + step(8)[:10])  # 8 half-written
    worker._progress(running, run)
    assert reported() == [1, 2, 3, 4, 5, 6, 7]
    # the process stopped mid-step 8 (no checkpoint then); the next resumes from step 5 in a new file that grows past the old
    # one's length before the next poll: read from its start, not from where the old one ended
    rewritten = tmp_path / "new.jsonl"
    rewritten.write_text("".join(map(step, range(1, 6))) + checkpoint  # the same lines up to the checkpoint,
                         + "".join(step(n, 9.5) for n in range(6, 12)))  # then shorter lines
    os.replace(rewritten, metrics)
    worker._progress(running, run)
    assert reported() == list(range(1, 12))
    add_event = jobs.add_event
    monkeypatch.setattr(jobs, "add_event", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("database is locked")))
    with metrics.open("a") as stream:
        stream.write(step(12) + step(13))
    with pytest.raises(RuntimeError):
        worker._progress(running, run)
    monkeypatch.setattr(jobs, "add_event", add_event)
    worker._progress(running, run)  # the next poll
    assert reported() == list(range(1, 14)), "a step whose event was not written is reported at the next poll"
    assert len(jobs.events(store, job.id, limit=1000, type="checkpoint")[0]) == 1
    store.close()


def test_a_feedback_job_retrains_with_the_gate_and_an_admin_promotes_and_rolls_back_over_rest(
        tiny_model_dir, tmp_path, start_server):
    settings = load_settings(home=tmp_path / "home", model=str(tiny_model_dir), dtype="float32", **FAST,
                             serve={"api_keys": [{"name": "root", "key": ADMIN_KEY, "admin": True}]})
    server = start_server(create_app(settings))  # no --model: follows the registry's active version
    store = server.app.state.forja.store
    store.log_exchange(id="chatcmpl-1", route="chat", model=str(tiny_model_dir), persona=None,
                       messages=[{"role": "user", "content": "¿Quién fundó Forja?"}], answers=["No sé."], params={},
                       prompt_tokens=5, completion_tokens=3, latency_ms=10.0, finish_reason="stop", api_key_name=None)
    store.add_feedback("chatcmpl-1", rating="down", correction="Ana Herrera.")
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    job = api.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=None, extra_body={"forja": {
        "source": "feedback", "train": {"max_steps": 1, "eval_every": None, "method": "full"}}})
    done = wait_for(lambda: (j := api.fine_tuning.jobs.retrieve(job.id)).status in jobs.FINAL and j)
    assert done.status == "succeeded", done.error  # the version was made; the gate decided not to promote it
    gate = done.forja["gate"]
    assert gate["passed"] is False and gate["promoted"] is False and gate["decided_by"] == "feedback"
    assert any("not promoted" in e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=100))
    promoted = admin.post(f"/v1/fine_tuning/jobs/{job.id}/promote").json()
    assert promoted["active"] == done.fine_tuned_model and promoted["changed"]

    def answered_by() -> str:
        return admin.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hola"}],
                                                        "max_tokens": 2}).json()["model"]

    assert answered_by() == done.fine_tuned_model
    back = admin.post("/admin/models/rollback").json()
    assert back == {"active": str(tiny_model_dir), "previous": done.fine_tuned_model, "changed": True}
    assert answered_by() == str(tiny_model_dir)
    assert admin.post("/admin/models/rollback").status_code == 409  # nothing left to roll back


def test_a_dpo_job_trains_on_openai_preference_pairs(served, tmp_path):
    """OpenAI's DPO shape: method {type: dpo, dpo: {hyperparameters: {beta}}} on a file of
    {input: {messages}, preferred_output, non_preferred_output} lines."""
    lines = [{"input": {"messages": [{"role": "user", "content": q}]},
              "preferred_output": [{"role": "assistant", "content": good}],
              "non_preferred_output": [{"role": "assistant", "content": bad}]}
             for q, good, bad in [("Hola", "Buenos días.", "Hi."), ("¿Horario?", "De 7 a 14.", "No sé."),
                                  ("¿Dónde?", "Calle Yunque 12.", "Lejos.")]]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    api = client(served)
    upload = api.files.create(file=path.open("rb"), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model=served.model, training_file=upload.id, suffix="prefs",
                                      method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
                                      extra_body={"forja": {"train": {"eval_every": None, "max_steps": 3}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_for(lambda: (j := api.fine_tuning.jobs.retrieve(job.id)).status in jobs.FINAL and j)
    assert done.status == "succeeded", done.error
    assert done.method.type == "dpo"
    version = json.loads((served.settings.versions_dir / done.fine_tuned_model / "version.json").read_text())
    assert version["objective"] == "dpo" and version["config"]["beta"] == 0.2
    assert version["metrics"]["preference_items"]["pairs"] == 3
