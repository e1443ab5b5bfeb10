"""Two `forja serve` processes (real uvicorn, two ports) on one PostgreSQL and one FORJA_HOME, as behind a load
balancer: a promotion on A is answered by B within seconds, an exchange answered by A is rated on B, and a
fine-tuning job created on A runs on one worker only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import sqlalchemy as sa

ADMIN_KEY = "root-admin-key-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen in {timeout:.0f} s")


class Replica:
    def __init__(self, env: dict[str, str], log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "forja.cli", "serve", "--port", str(self.port)],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        assert self.process.poll() is None, f"the replica on {self.port} exited; see {self.log.name}"
        try:
            return httpx.get(self.url + "/health").status_code == 200
        except httpx.TransportError:
            return False

    def chat(self, text: str, **body) -> dict:
        reply = httpx.post(self.url + "/v1/chat/completions", headers=HEADERS, timeout=60,
                           json={"messages": [{"role": "user", "content": text}], "max_tokens": 4, **body})
        assert reply.status_code == 200, reply.text
        return reply.json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture
def replicas(postgres, tiny_model_dir, tmp_path):
    url = postgres.create_database()
    config = tmp_path / "forja.yaml"
    config.write_text(json.dumps({  # YAML reads JSON
        "model": str(tiny_model_dir), "dtype": "float32", "database_url": url,
        "serve": {"api_keys": [{"name": "root", "key": ADMIN_KEY, "admin": True}]},
        "jobs": {"poll_seconds": 0.2, "stale_seconds": 30}}))
    env = {**os.environ, "FORJA_HOME": str(tmp_path / "shared-home"), "FORJA_CONFIG": str(config)}
    env.pop("FORJA_DATABASE_URL", None)
    started = [Replica(env, tmp_path / "a.log"), Replica(env, tmp_path / "b.log")]
    try:
        for replica in started:
            wait_for(replica.ready, 120, f"replica {replica.port} answering /health")
        yield started[0], started[1], url
    finally:
        for replica in started:
            replica.stop()


def test_two_replicas_share_promotions_feedback_and_jobs(replicas, tmp_path):
    a, b, url = replicas
    pairs = "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]},
                               ensure_ascii=False) + "\n" for q, r in [("hola", "buenas"), ("¿horario?", "de 9 a 18")])
    upload = httpx.post(a.url + "/v1/files", headers=HEADERS, data={"purpose": "fine-tune"},
                        files={"file": ("faq.jsonl", pairs.encode())})
    assert upload.status_code == 200, upload.text
    job = httpx.post(a.url + "/v1/fine_tuning/jobs", headers=HEADERS, json={
        "model": a.chat("hola")["model"], "training_file": upload.json()["id"], "suffix": "faq",
        "forja": {"train": {"max_steps": 2, "eval_every": None, "stop_when_learned": False}}}).json()
    # both replicas' workers poll the one database; B reports the job A created
    done = wait_for(lambda: (j := httpx.get(f"{b.url}/v1/fine_tuning/jobs/{job['id']}", headers=HEADERS).json())
                    ["status"] in ("succeeded", "failed", "cancelled") and j, 240, "the job finishing")
    assert done["status"] == "succeeded", done.get("error")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT attempts, worker FROM jobs WHERE id = :id"), {"id": job["id"]}).one()
    assert row.attempts == 1  # claimed once, by one worker of one replica
    assert int(row.worker.split(":")[1]) in (a.process.pid, b.process.pid)

    # a promotion on A reaches B without a restart
    version = done["fine_tuned_model"]
    assert b.chat("hola")["model"] != version
    promoted = httpx.post(a.url + "/admin/models/activate", headers=HEADERS, json={"model": version}, timeout=120)
    assert promoted.status_code == 200 and promoted.json()["active"] == version, promoted.text
    started = time.monotonic()
    wait_for(lambda: b.chat("hola")["model"] == version, 10, "B answering with the promoted version")
    assert time.monotonic() - started < 10
    assert httpx.get(b.url + "/admin/models", headers=HEADERS).json()["active"] == version

    # an exchange answered by A is rated on B
    answered = a.chat("¿horario?")
    rated = httpx.post(b.url + "/feedback", headers=HEADERS, json={"id": answered["id"], "rating": "up"})
    assert rated.status_code == 201, rated.text
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT rating FROM feedback WHERE exchange_id = :id"),
                            {"id": answered["id"]}).scalar_one() == "up"
    engine.dispose()
