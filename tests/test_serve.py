"""The HTTP API through real HTTP: the official `openai` client against uvicorn on the tiny model,
/predict, every error status, concurrent streams, disconnects, API keys and CORS."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from conftest import answer_alone

from forja.config import load_settings
from forja.engine import SamplingParams
from forja.engine.text import chat_messages, chat_prompt_ids
from forja.serve.app import create_app

KEY = "test-key-0123456789abcdef"
PERSONAS = [
    {"name": "panadero", "description": "Atiende la panadería", "system": "Eres el panadero. Responde en español.",
     "temperature": 0.0, "max_tokens": 12},
    {"name": "pirate", "system": "You are a pirate.", "max_tokens": 8},
]


def settings_for(model_dir, tmp_path_factory, **serve):
    home = tmp_path_factory.mktemp("serve-home")
    # float32: batched and alone agree token for token (bf16, the default on a CPU with avx512_bf16, rounds a
    # batch differently from one row, and a random tiny model has near-ties)
    return load_settings(home=home, model=str(model_dir), dtype="float32", serve={"personas": PERSONAS, **serve})


@pytest.fixture(scope="module")
def server(varied_model_dir, tiny_model_dir, tmp_path_factory, start_server):
    personas = PERSONAS + [{"name": "other", "model": str(tiny_model_dir), "description": "on another model"},
                           {"name": "broken", "model": "/no/such/dir"}]
    settings = settings_for(varied_model_dir, tmp_path_factory, cors_origins=["http://allowed.example"],
                            personas=personas)
    return start_server(create_app(settings))


@pytest.fixture(scope="module")
def model_name(varied_model_dir):
    return str(varied_model_dir)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_health_and_models(server, client, model_name):
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {model_name, "panadero", "pirate", "other", "broken", "all-MiniLM-L6-v2",
                          "universal-sentence-encoder-multilingual-3"}
    assert cards["panadero"].model_extra["kind"] == "persona"
    assert cards["all-MiniLM-L6-v2"].model_extra["kind"] == "embedding"  # POST /v1/embeddings (test_embeddings.py)


def test_chat_completion_non_streaming(client, model_name, varied_model_dir):
    reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hola"}],
                                           max_tokens=16)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 16 and reply.usage.total_tokens == reply.usage.prompt_tokens + 16
    from forja.models import load

    loaded = load(model_name, load_settings(), dtype="float32")
    ids = chat_prompt_ids(loaded.tokenizer, chat_messages("Hola"))
    served = SamplingParams(max_new_tokens=16, frequency_penalty=load_settings().generate.frequency_penalty)  # generate:'s
    assert reply.choices[0].message.content == answer_alone(loaded, chat_messages("Hola"), served).text
    assert reply.usage.prompt_tokens == len(ids)


def test_chat_completion_streaming_equals_non_streaming(client, model_name):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Forja?"},
                {"role": "assistant", "content": "A tool."}, {"role": "user", "content": "Tell me more"}]
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=20)
    chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_format(server, model_name):
    body = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_completions_with_a_list_of_prompts_and_n(client, model_name):
    reply = client.completions.create(model=model_name, prompt=["The capital of France", "Hola"], max_tokens=6, n=2,
                                      temperature=1.0, seed=11)
    assert reply.id.startswith("cmpl-") and len(reply.choices) == 4
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.completion_tokens == sum(6 for _ in reply.choices if True)
    again = client.completions.create(model=model_name, prompt=["The capital of France", "Hola"], max_tokens=6, n=2,
                                      temperature=1.0, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]
    streamed = list(client.completions.create(model=model_name, prompt="The capital of France", max_tokens=6,
                                              stream=True))
    greedy = client.completions.create(model=model_name, prompt="The capital of France", max_tokens=6)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == greedy.choices[0].text


def test_chat_n_and_seed(client, model_name):
    ask = dict(model=model_name, messages=[{"role": "user", "content": "Hola"}], max_tokens=12, temperature=1.0, n=3)
    first = client.chat.completions.create(seed=5, **ask)
    assert len(first.choices) == 3 and len({c.message.content for c in first.choices}) > 1
    assert [c.message.content for c in client.chat.completions.create(seed=5, **ask).choices] == \
        [c.message.content for c in first.choices]
    streamed = list(client.chat.completions.create(seed=5, stream=True, **ask))
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in first.choices]


def test_stop_strings(client, model_name):
    full = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hola"}],
                                          max_tokens=30).choices[0].message.content
    stop = full[8:11]
    cut = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hola"}],
                                         max_tokens=30, stop=[stop, "zzzz"])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_personas_share_the_base_model(server, client, model_name):
    base = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hola"}])
    persona = client.chat.completions.create(model="panadero", messages=[{"role": "user", "content": "Hola"}])
    assert persona.model == "panadero"
    assert persona.usage.completion_tokens <= 12  # the persona's max_tokens
    assert persona.usage.prompt_tokens > base.usage.prompt_tokens  # its system prompt was put first
    state = server.app.state.forja
    assert list(state.engines) == [model_name]  # one loaded model serves every persona


def test_a_persona_on_another_model_loads_it_once(server, client, model_name, tiny_model_dir):
    reply = client.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hola"}], max_tokens=4)
    assert reply.model == "other" and reply.usage.completion_tokens <= 4
    assert set(server.app.state.forja.engines) == {model_name, str(tiny_model_dir)}
    broken = httpx.post(server.url + "/v1/chat/completions",
                        json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert broken.status_code == 500 and error(broken)["code"] == "model_load_failed"
    assert "/no/such/dir" in error(broken)["message"]


def test_predict_classic_body(server):
    one = httpx.post(server.url + "/predict", json={"prompt": "Hola", "max_length": 8})
    assert one.status_code == 200
    assert set(one.json()) == {"generated_text", "id"} and one.json()["id"].startswith("pred-")
    several = httpx.post(server.url + "/predict",
                         json={"prompt": "Hola", "max_length": 8, "num_return_sequences": 2, "temperature": 1.0,
                               "seed": 1}).json()
    assert isinstance(several, list) and len(several) == 2 and all(set(s) == {"generated_text", "id"} for s in several)
    persona = httpx.post(server.url + "/predict", json={"prompt": "Hola", "model": "pirate"})
    assert persona.status_code == 200


def error(response):
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors_are_openai_shaped(server, model_name):
    post = lambda path, body: httpx.post(server.url + path, json=body)  # noqa: E731
    chat = {"model": model_name, "messages": [{"role": "user", "content": "hola " * 120}], "max_tokens": 200}
    too_long = post("/v1/chat/completions", chat)
    assert too_long.status_code == 400
    err = error(too_long)
    assert err["code"] == "context_length_exceeded" and "256" in err["message"] and "200" in err["message"]

    unknown = post("/v1/chat/completions", {**chat, "model": "nope", "max_tokens": 1})
    assert unknown.status_code == 404 and error(unknown)["code"] == "model_not_found"
    assert "panadero" in error(unknown)["message"]

    invalid = post("/v1/chat/completions", {"model": model_name, "messages": [{"role": "robot", "content": "x"}]})
    assert invalid.status_code == 422 and error(invalid)["param"] == "messages.0.role"
    bad_temperature = post("/v1/chat/completions", {**chat, "temperature": 9})
    assert bad_temperature.status_code == 422 and error(bad_temperature)["param"] == "temperature"
    missing = post("/predict", {"max_length": 5})
    assert missing.status_code == 422 and error(missing)["param"] == "prompt"
    too_many = post("/v1/completions", {"prompt": "x", "n": 50})
    assert too_many.status_code == 422 and error(too_many)["param"] == "n"

    huge = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 1_100_000,
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and error(huge)["code"] == "request_too_large"

    def chunked():
        for _ in range(12):
            yield b"x" * 100_000

    huge_chunked = httpx.post(server.url + "/v1/completions", content=chunked())
    assert huge_chunked.status_code == 413

    not_json = httpx.post(server.url + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and error(not_json)["code"] == "invalid_json"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256") as raised:
        client.completions.create(model="panadero", prompt="hola " * 300, max_tokens=10)
    assert raised.value.code == "context_length_exceeded"


def test_eight_concurrent_streams_are_independent(server, model_name):
    """Each greedy answer streamed among 8 concurrent ones equals the same request served alone."""
    prompts = [f"Pregunta {i}: " + "pan " * i for i in range(8)]

    async def stream(http, prompt):
        body = {"model": model_name, "prompt": prompt, "max_tokens": 40, "stream": True}
        text = ""
        async with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*[stream(http, p) for p in prompts])

    engine = server.app.state.forja.engines[model_name]
    steps_before = engine.steps
    together = asyncio.run(main())
    batched_steps = engine.steps - steps_before
    alone = [httpx.post(server.url + "/v1/completions", json={"model": model_name, "prompt": p, "max_tokens": 40},
                        timeout=60).json()["choices"][0]["text"] for p in prompts]
    assert together == alone
    assert len(set(together)) == 8
    assert batched_steps < 8 * 39  # decode steps were shared


def test_client_disconnect_stops_generation(server, model_name):
    engine = server.app.state.forja.engines[model_name]
    body = {"model": model_name, "prompt": "x", "max_tokens": 230, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
    steps = engine.steps
    deadline = time.monotonic() + 5
    while engine.load["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load["active"] == 0
    assert engine.steps - steps < 150  # far fewer than the 230 tokens asked for


def test_cors(server):
    preflight = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "access-control-allow-credentials" not in allowed.headers
    other = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.fixture(scope="module")
def locked_server(tiny_model_dir, tmp_path_factory, start_server):
    settings = settings_for(tiny_model_dir, tmp_path_factory,
                            api_keys=[{"name": "alice", "key": KEY},
                                      {"name": "bob", "sha256": "a" * 64}])
    return start_server(create_app(settings))


def test_api_keys(locked_server, tiny_model_dir):
    url = locked_server.url
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/").status_code == 200
    assert httpx.get(url + "/static/app.js").status_code == 200
    missing = httpx.get(url + "/v1/models")
    assert missing.status_code == 401 and error(missing)["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(url + "/predict", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong-key"})
    assert wrong.status_code == 401 and error(wrong)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": "x"}]).choices


def test_default_server_has_no_cors_and_no_keys(tiny_model_dir, tmp_path_factory, start_server):
    settings = load_settings(home=tmp_path_factory.mktemp("plain"), model=str(tiny_model_dir))
    server = start_server(create_app(settings))
    try:
        response = httpx.get(server.url + "/v1/models", headers={"Origin": "http://elsewhere.example"})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    finally:
        server.stop()


def test_queue_full_answers_429(tiny_model_dir, tmp_path_factory, start_server):
    import threading

    from forja.engine.pytorch import PyTorchEngine
    from forja.models import load

    settings = load_settings(home=tmp_path_factory.mktemp("busy"), model=str(tiny_model_dir))
    engine = PyTorchEngine(load(str(tiny_model_dir), settings), max_batch_size=1, max_queue=1)
    gate, step = threading.Event(), engine._step
    engine._step = lambda: (gate.wait(10), step())  # decoding waits until the test opens the gate
    server = start_server(create_app(settings, engine=engine))
    body = {"prompt": "x", "max_tokens": 20, "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as first:
            assert first.status_code == 200  # holds the only batch slot
            while engine.load["active"] == 0:
                time.sleep(0.01)
            with httpx.stream("POST", server.url + "/v1/completions", json=body) as second:
                assert second.status_code == 200  # waits in the queue
                third = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert third.status_code == 429 and error(third)["code"] == "queue_full"
                assert third.headers["retry-after"] == "1"
                gate.set()
                assert second.read().decode().endswith("data: [DONE]\n\n")
            assert first.read().decode().endswith("data: [DONE]\n\n")
    finally:
        gate.set()
        server.stop()


def test_health_is_503_until_the_model_loads(tmp_path_factory, start_server):
    settings = load_settings(home=tmp_path_factory.mktemp("broken"), model="/no/such/model")
    server = start_server(create_app(settings), ready_path=None)
    try:
        deadline = time.monotonic() + 10
        while (health := httpx.get(server.url + "/health")).json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "does not exist" in health.json()["error"]
        reply = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
        assert reply.status_code == 503 and error(reply)["code"] == "model_load_failed"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bundled_server(bundled_home, start_server):
    settings = load_settings(home=bundled_home, model="smollm2-135m", dtype="float32")  # see settings_for
    return start_server(create_app(settings), timeout=300)


@pytest.mark.slow
def test_bundled_model_answers_the_openai_client(bundled_server):
    client = openai.OpenAI(base_url=bundled_server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="smollm2-135m", max_tokens=32, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    streamed = client.chat.completions.create(model="smollm2-135m", max_tokens=32, temperature=0, stream=True,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content


@pytest.mark.slow
def test_bundled_model_batched_greedy_answers_match_alone(bundled_server):
    """8 concurrent greedy answers of the real model equal each served alone over (at least) 32 tokens."""
    from forja.models import load_tokenizer

    topics = ["bread", "Paris", "rain", "cats", "coffee", "the sea", "music", "trains"]
    prompts = [f"Tell me about {t}." for t in topics]

    async def ask(http, prompt):
        body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 36,
                "temperature": 0}
        return (await http.post(bundled_server.url + "/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]

    async def together():
        async with httpx.AsyncClient(timeout=300) as http:
            return await asyncio.gather(*[ask(http, p) for p in prompts])

    async def one_by_one():
        async with httpx.AsyncClient(timeout=300) as http:
            return [await ask(http, p) for p in prompts]

    batched, alone = asyncio.run(together()), asyncio.run(one_by_one())
    tokenizer = load_tokenizer("smollm2-135m", load_settings())
    for b, a in zip(batched, alone):
        b_ids, a_ids = tokenizer(b)["input_ids"], tokenizer(a)["input_ids"]
        agree = next((i for i, (x, y) in enumerate(zip(b_ids, a_ids)) if x != y), min(len(b_ids), len(a_ids)))
        assert agree >= min(32, len(a_ids)), (b, a)
