"""/v1/batches through the official `openai` client against uvicorn, on the tiny model: 50 chat requests
answered by the worker into an output file matched by custom_id, a bad request in the error file, a batch
cancelled mid-run keeping what was answered, embeddings, and files refused naming the line."""

from __future__ import annotations

import json
import time

import openai
import pytest

from forja.config import load_settings
from forja.serve.app import create_app

KEY = "batch-key-0123456789abcd"
OTHER = "other-key-0123456789abcd"
TRAIN_ONLY = "train-only-key-0123456789"


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory, start_server):
    home = tmp_path_factory.mktemp("batches-home")
    keys = [{"name": "erp", "key": KEY, "scopes": ["chat", "train"]},
            {"name": "other", "key": OTHER, "scopes": ["chat", "train"]},
            {"name": "trainer", "key": TRAIN_ONLY, "scopes": ["train"]}]
    settings = load_settings(home=home, model=str(tiny_model_dir), dtype="float32", serve={"api_keys": keys},
                             jobs={"poll_seconds": 0.2})
    server = start_server(create_app(settings, str(tiny_model_dir)))
    server.settings = settings
    return server


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)


def upload(client, lines: list[dict]) -> str:
    body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    return client.files.create(file=("requests.jsonl", body), purpose="batch").id


def chat_line(i: int, **body) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": f"pregunta {i}"}], "max_tokens": 3, **body}}


def finished(client, batch_id: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout:.0f} s")


def lines_of(client, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def test_fifty_requests_come_back_in_the_output_file_matched_by_custom_id(client):
    lines = [chat_line(i, seed=i) for i in range(49)] + [chat_line(49, temperature=9)]  # the last one is bad
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "nightly"})
    assert batch.status == "validating" and batch.request_counts.total == 50 and batch.metadata == {"run": "nightly"}
    done = finished(client, batch.id)
    assert done.status == "completed", done.errors
    assert done.request_counts.total == 50 and done.request_counts.completed == 49 and done.request_counts.failed == 1
    assert done.in_progress_at and done.finalizing_at and done.completed_at >= done.in_progress_at
    answered = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in answered) == sorted(f"req-{i}" for i in range(49))
    for line in answered:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
        assert line["response"]["body"]["usage"]["completion_tokens"] > 0
    failed = lines_of(client, done.error_file_id)
    assert [line["custom_id"] for line in failed] == ["req-49"]
    assert failed[0]["response"]["status_code"] in (400, 422)
    assert "temperature" in json.dumps(failed[0]["response"]["body"])
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_embeddings_in_a_batch(client):
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "all-MiniLM-L6-v2", "input": f"texto {i}"}} for i in range(3)]
    done = finished(client, client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/embeddings",
                                                  completion_window="24h").id)
    assert done.status == "completed", done.errors
    vectors = {line["custom_id"]: line["response"]["body"]["data"][0]["embedding"]
               for line in lines_of(client, done.output_file_id)}
    assert sorted(vectors) == ["e0", "e1", "e2"] and len(vectors["e0"]) == 384


def test_a_batch_cancelled_mid_run_keeps_what_was_answered(client):
    lines = [chat_line(i, max_tokens=40, temperature=0) for i in range(400)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 5:
        assert time.monotonic() < deadline, "no request answered"
        time.sleep(0.2)
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = finished(client, batch.id, timeout=120)
    assert done.status == "cancelled" and done.cancelled_at
    kept = lines_of(client, done.output_file_id)
    assert 5 <= len(kept) < 400 and done.request_counts.completed == len(kept)
    assert len({line["custom_id"] for line in kept}) == len(kept)


@pytest.mark.parametrize("lines, text", [
    ([chat_line(0), chat_line(0)], "line 2"),                                   # custom_id twice
    ([chat_line(0), {**chat_line(1), "url": "/v1/embeddings"}], "line 2"),       # two endpoints
    ([{**chat_line(0), "method": "GET"}], "line 1"),
])
def test_a_file_that_is_not_a_batch_is_refused_naming_the_line(client, lines, text):
    with pytest.raises(openai.BadRequestError, match=text):
        client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                              completion_window="24h")


def test_the_endpoint_must_be_the_files_and_batches_are_per_client(client, served):
    file_id = upload(client, [chat_line(0)])
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    other = openai.OpenAI(base_url=served.url + "/v1", api_key=OTHER, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.BadRequestError, match="input_file_id"):
        other.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    finished(client, batch.id)
    trainer = openai.OpenAI(base_url=served.url + "/v1", api_key=TRAIN_ONLY, max_retries=0)
    own = trainer.files.create(file=("r.jsonl", json.dumps(chat_line(0)).encode() + b"\n"), purpose="batch")
    with pytest.raises(openai.PermissionDeniedError, match="chat"):  # a batch of chat requests needs the chat scope
        trainer.batches.create(input_file_id=own.id, endpoint="/v1/chat/completions", completion_window="24h")
