"""API keys made over REST and the CLI (stored hashed in the database), their scopes and limits (429 with
Retry-After), revocation (the next call is a 401), and the usage per key in /admin/usage, forja keys usage
and /metrics, through the official `openai` client against uvicorn on the tiny model."""

from __future__ import annotations

import hashlib
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from forja.cli import app
from forja.config import load_settings
from forja.serve.app import create_app
from forja.store import Store, api_keys

ADMIN_KEY = "root-admin-key-0123456789"
runner = CliRunner()


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory, start_server):
    home = tmp_path_factory.mktemp("keys-home")
    settings = load_settings(home=home, model=str(tiny_model_dir), dtype="float32",
                             serve={"api_keys": [{"name": "root", "key": ADMIN_KEY, "admin": True}],
                                    "price_per_1k_tokens": 0.5})
    server = start_server(create_app(settings, str(tiny_model_dir)))
    server.settings, server.model = settings, str(tiny_model_dir)
    server.admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    return server


def chat(served, key: str, text: str = "hola") -> object:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": text}],
                                          max_tokens=3)


def test_a_key_made_over_rest_is_shown_once_used_counted_and_revoked(served):
    made = served.admin.post("/admin/keys", json={"name": "erp", "scopes": ["chat"]})
    assert made.status_code == 201, made.text
    key = made.json()
    assert key["key"].startswith("fk-") and key["id"].startswith("key_") and key["source"] == "database"
    store = Store.open(served.settings)
    stored = store.engine.connect().execute(api_keys.select().where(api_keys.c.name == "erp")).one()
    assert stored.sha256 == hashlib.sha256(key["key"].encode()).hexdigest()  # the key itself is nowhere
    assert key["key"] not in str(tuple(stored))
    store.close()
    listed = served.admin.get("/admin/keys").json()["data"]
    assert {k["name"]: k["source"] for k in listed} == {"root": "config", "erp": "database"}
    assert "key" not in next(k for k in listed if k["name"] == "erp")

    for _ in range(3):
        assert chat(served, key["key"]).usage.completion_tokens > 0
    usage = served.admin.get("/admin/usage", params={"days": 7}).json()
    erp = next(row for row in usage["data"] if row["key"] == "erp")
    assert erp["requests"] == 3 and erp["prompt_tokens"] > 0 and erp["completion_tokens"] > 0
    assert erp["estimated_cost"] == pytest.approx((erp["prompt_tokens"] + erp["completion_tokens"]) / 1000 * 0.5)
    metrics = served.admin.get("/metrics").text
    assert 'forja_key_requests_total{key="erp"} 3.0' in metrics

    with pytest.raises(openai.PermissionDeniedError):  # a chat key is no admin
        openai.OpenAI(base_url=served.url, api_key=key["key"], max_retries=0).post(
            "/admin/keys", body={"name": "x"}, cast_to=object)
    gone = served.admin.delete(f"/admin/keys/{key['id']}")
    assert gone.status_code == 200 and gone.json()["deleted"]
    with pytest.raises(openai.AuthenticationError):
        chat(served, key["key"])
    assert served.admin.delete(f"/admin/keys/{key['id']}").status_code == 404
    again = served.admin.post("/admin/keys", json={"name": "erp"})  # a revoked key keeps its name (and files)
    assert again.status_code == 409 and "existed" in again.json()["error"]["message"]


def test_limits_answer_429_with_retry_after(served):
    rpm = served.admin.post("/admin/keys", json={"name": "busy", "limits": {"requests_per_minute": 2}}).json()["key"]
    chat(served, rpm)
    chat(served, rpm)
    with pytest.raises(openai.RateLimitError) as refused:
        chat(served, rpm)
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    assert "2 requests a minute" in refused.value.message

    daily = served.admin.post("/admin/keys", json={"name": "small", "limits": {"tokens_per_day": 5}}).json()["key"]
    chat(served, daily)  # more than 5 tokens: this one is answered, the next is over the day's budget
    with pytest.raises(openai.RateLimitError, match="tokens for today") as over:
        chat(served, daily)
    assert int(over.value.response.headers["retry-after"]) <= 86400


@pytest.mark.parametrize("body", [{"name": "root"}, {"name": "x", "scopes": ["admin"]}, {"name": ""},
                                  {"name": "console:ana"}, {"name": "   "},
                                  {"name": "x", "limits": {"requests_per_minute": 0}}, {"name": "x", "extra": 1}])
def test_a_bad_key_request_is_refused_naming_why(served, body):
    response = served.admin.post("/admin/keys", json=body)
    assert response.status_code in (400, 409, 422), response.text
    assert response.json()["error"]["message"]


def test_the_cli_makes_lists_revokes_and_counts_keys(tiny_model_dir, tmp_path, start_server):
    made = runner.invoke(app, ["keys", "create", "tienda", "--scope", "chat", "--scope", "train", "--rpm", "30"])
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    assert secret.startswith("fk-") and "first key" in made.stderr
    listed = runner.invoke(app, ["keys"])
    assert "tienda" in listed.stdout and "chat,train" in listed.stdout and "requests_per_minute=30" in listed.stdout
    settings = load_settings(model=str(tiny_model_dir), dtype="float32")
    server = start_server(create_app(settings, str(tiny_model_dir)))
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the first key turned keys on
    chat(type("S", (), {"url": server.url, "model": str(tiny_model_dir)}), secret)
    usage = runner.invoke(app, ["keys", "usage", "--days", "1"])
    assert "tienda" in usage.stdout and "1 requests" in usage.stdout
    assert runner.invoke(app, ["keys", "revoke", "tienda"]).exit_code == 0
    time.sleep(2.1)  # another process revoked it: this server sees it within keys.RING_SECONDS
    with pytest.raises(openai.AuthenticationError):
        chat(type("S", (), {"url": server.url, "model": str(tiny_model_dir)}), secret)
    assert httpx.get(server.url + "/v1/models").status_code == 401  # revoking the last key opens nothing
    bad = runner.invoke(app, ["keys", "create", "x", "--scope", "admin"])
    assert bad.exit_code == 1 and "unknown scope 'admin'" in bad.output
