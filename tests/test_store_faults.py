"""The database going away for a few seconds under a running server (PostgreSQL stopped and started again):
chats are still answered and their exchanges wait in memory, in order, to be written when it is back; what
needs the database now (rating, listing files) is a clear 503 to retry; a full backlog is a 503 before any
answer is generated, so nothing answered is ever lost."""

from __future__ import annotations

import time

import httpx
import pytest

from forja.config import load_settings
from forja.serve.app import create_app


def chat(url: str, text: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": text}], "max_tokens": 4})


@pytest.fixture
def served(postgres, tiny_model_dir, tmp_path, start_server):
    settings = load_settings(home=tmp_path / "home", model=str(tiny_model_dir), dtype="float32",
                             database_url=postgres.create_database())
    server = start_server(create_app(settings, str(tiny_model_dir)))
    yield server, server.app.state.forja.store
    if not postgres.running():  # a failed test leaves the session's cluster running for the next ones
        postgres.start()


def test_answers_wait_in_memory_while_postgresql_is_away_and_are_stored_when_it_is_back(served, postgres):
    server, store = served
    before = chat(server.url, "Hola").json()["id"]
    postgres.stop()
    try:
        during = [chat(server.url, f"¿Sigues ahí? {i}") for i in range(3)]
        assert [r.status_code for r in during] == [200, 200, 200]  # answered all the same
        assert len(store.backlog) == 3
        rated = httpx.post(server.url + "/feedback", json={"id": during[0].json()["id"], "rating": "up"})
        assert rated.status_code == 503 and rated.headers["retry-after"] == "5"
        assert rated.json()["error"]["code"] == "database_unavailable"
        assert "unreachable" in rated.json()["error"]["message"]
        listed = httpx.get(server.url + "/v1/files")
        assert listed.status_code == 503 and listed.json()["error"]["code"] == "database_unavailable"
    finally:
        postgres.start()
    deadline = time.monotonic() + 15
    while store.backlog and time.monotonic() < deadline:  # the retry writes them within a few seconds
        time.sleep(0.2)
    assert not store.backlog
    stored = [store.exchange(r.json()["id"]) for r in during]
    assert [e.messages[-1]["content"] for e in stored] == [f"¿Sigues ahí? {i}" for i in range(3)]
    assert stored[0].created_at < stored[1].created_at < stored[2].created_at  # when answered, not when written
    assert store.exchange(before) is not None
    assert httpx.post(server.url + "/feedback", json={"id": during[0].json()["id"], "rating": "up"}).status_code == 201


def test_a_full_backlog_refuses_new_requests_before_answering(served, postgres):
    server, store = served
    store.backlog_limit = 2
    assert chat(server.url, "Hola").status_code == 200  # (a server that never read its keys lets nobody in)
    postgres.stop()
    try:
        assert [chat(server.url, f"q{i}").status_code for i in range(2)] == [200, 200]
        refused = chat(server.url, "one too many")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "database_unavailable"
        assert "2 answered exchanges wait" in refused.json()["error"]["message"]
    finally:
        postgres.start()
    assert store.flush() and chat(server.url, "back").status_code == 200
