"""The models behind knowledge search: an embedding model named in the config (a folder here; a hub id offline
fails in one line) and the optional cross-encoder re-ranker. Both are tiny random BERTs built by the tests on
the bundled MiniLM's tokenizer, so what is checked is the plumbing (prompts, pooling, window, order, scores),
computed a second time straight with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from typer.testing import CliRunner

from forja.cli import app
from forja.config import load_settings
from forja.embeddings import EMBEDDING_MODEL, EmbeddingError, embed, embedding_model_dir
from forja.knowledge import add, retrieve, search, show
from forja.knowledge.chunks import embedding_text, read_document
from forja.serve.app import create_app

runner = CliRunner()
KEY = "knowledge-models-key-0123456789"
DOCS = {
    "oven.md": "# Oven\n\nDescale the steam nozzle every 37 bakes with citric acid.\n\n"
               "## Warranty\n\nA faulty oven is repaired free for 41 months.",
    "shop.md": "# Shop\n\nThe shop opens on weekdays from nine to five.\n\n"
               "## Parts\n\nA spare heating coil costs 88 euros and ships from Tarragona.",
    "notes.md": "# Notes\n\nThe lamp blinks twice when the oven is ready.\n\n"
                "## Water\n\nFill the tank with 400 ml of filtered water.",
}


def _tokenizer_files(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (embedding_model_dir() / name).is_file():
            shutil.copy(embedding_model_dir() / name, folder / name)


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **extra)


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory) -> Path:
    """A sentence-transformers folder: CLS pooling, a 48-token window, e5-style query and document prompts."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny-embedder")
    torch.manual_seed(0)
    BertModel(_bert_config()).save_pretrained(folder)
    _tokenizer_files(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: "}}))
    return folder


def _reranker(folder: Path, labels: int) -> Path:
    from transformers import BertForSequenceClassification

    torch.manual_seed(labels)
    BertForSequenceClassification(_bert_config(num_labels=labels)).save_pretrained(folder)
    _tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory) -> Path:
    return _reranker(tmp_path_factory.mktemp("tiny-reranker"), 1)


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def direct_embedding(folder: Path, text: str) -> np.ndarray:
    """CLS pooling, normalised, computed with transformers alone."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(str(folder)), AutoModel.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        hidden = model(**tokenizer([text], truncation=True, max_length=48, return_tensors="pt")).last_hidden_state
    return torch.nn.functional.normalize(hidden[:, 0], dim=-1)[0].numpy()


def test_a_model_named_by_folder_embeds_with_its_prompts_pooling_and_window(embedder_dir):
    query = embed(["when to descale"], model=str(embedder_dir), kind="query")[0].numpy()
    assert query.shape == (32,) and np.isclose(np.linalg.norm(query), 1, atol=1e-5)
    assert np.allclose(query, direct_embedding(embedder_dir, "query: when to descale"), atol=1e-5)
    plain = embed(["when to descale"], model=str(embedder_dir))[0].numpy()
    assert np.allclose(plain, direct_embedding(embedder_dir, "when to descale"), atol=1e-5)
    assert np.abs(plain - query).max() > 1e-4  # the prompt is part of what is embedded
    long = " ".join(["bread"] * 200)  # cut at the model's 48-token window, as sentence-transformers does
    assert np.allclose(embed([long], model=str(embedder_dir))[0].numpy(), direct_embedding(embedder_dir, long), atol=1e-5)


def test_a_collection_keeps_the_model_it_was_made_with(embedder_dir, docs, monkeypatch):
    settings = load_settings(knowledge={"embedding_model": str(embedder_dir), "chunk_tokens": 40,
                                        "overlap_tokens": 8})
    add(settings, "shop", [docs])
    assert show(settings, "shop").embedding_model == str(embedder_dir.resolve())
    hits = search(settings, "shop", "spare coil price", top_k=6)
    assert any("88 euros" in h.text for h in hits[:2])  # the keywords find it whatever the random vectors say
    query = direct_embedding(embedder_dir, "query: spare coil price")
    document = read_document(docs / "shop.md", settings.knowledge, lambda texts: [len(t.split()) + 4 for t in texts])
    parts = {c.text: direct_embedding(embedder_dir, "passage: " + embedding_text(c)) for c in document.chunks}
    for hit in hits:  # the similarity is the query's against the chunk's, both with their prompts
        if hit.text in parts:
            assert hit.similarity == pytest.approx(float(query @ parts[hit.text]), abs=1e-4)

    # The bundled model made another collection; a changed setting changes neither.
    bundled = load_settings()
    add(bundled, "manual", [docs / "oven.md"])
    assert show(settings, "manual").embedding_model == EMBEDDING_MODEL
    assert "37 bakes" in search(settings, "manual", "how often should I descale the nozzle?", top_k=1)[0].text
    result = runner.invoke(app, ["knowledge", "add", "manual", str(docs / "notes.md")],
                           env={"FORJA_KNOWLEDGE__EMBEDDING_MODEL": str(embedder_dir)})
    assert result.exit_code == 0, result.output
    assert "note: manual is embedded with all-MiniLM-L6-v2, the model it was made with" in result.stderr
    hits = retrieve(settings, ["manual", "shop"], "filtered water tank", top_k=3, min_score=-1)
    assert {h.collection for h in hits} <= {"manual", "shop"} and any("400 ml" in h.text for h in hits)


def test_model_errors_are_one_line(embedder_dir, docs, tmp_path):
    result = runner.invoke(app, ["knowledge", "add", "shop", str(docs)],
                           env={"FORJA_KNOWLEDGE__EMBEDDING_MODEL": str(embedder_dir)})
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"forja: error: knowledge.chunk_tokens is 200; the embedding model {embedder_dir.resolve()} reads at most 46 tokens "
        "of a chunk: set it to 46 or less"]
    assert "no collections yet" in runner.invoke(app, ["knowledge", "list"]).output  # a refused add made none
    result = runner.invoke(app, ["knowledge", "add", "shop", str(docs)],
                           env={"FORJA_KNOWLEDGE__EMBEDDING_MODEL": "someone/multilingual-embedder",
                                "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "forja: error: embedding model 'someone/multilingual-embedder' is not in the local Hugging Face cache and "
        "HF_HUB_OFFLINE is set"]
    with pytest.raises(EmbeddingError, match="hub is not reachable"):  # HF_ENDPOINT is a closed port in the tests
        embed(["x"], model="someone/another-embedder")
    with pytest.raises(EmbeddingError, match="not a folder of a model, nor a Hugging Face repository id"):
        embed(["x"], model=str(tmp_path / "no" / "such" / "folder"))


def test_the_embeddings_api_serves_the_configured_model_too(embedder_dir, tiny_model_dir, tmp_path, start_server):
    settings = load_settings(home=tmp_path / "home", model=str(tiny_model_dir), dtype="float32",
                             knowledge={"embedding_model": str(embedder_dir)},
                             serve={"api_keys": [{"name": "alice", "key": KEY}]})
    server = start_server(create_app(settings))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    unnamed = httpx.post(server.url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                         json={"input": ["hola", "adiós"]}, timeout=30).json()  # no model: the configured one
    assert unnamed["model"] == str(embedder_dir) and len(unnamed["data"][0]["embedding"]) == 32
    reply = client.embeddings.create(model=str(embedder_dir), input=["hola", "adiós"])
    expected = embed(["hola", "adiós"], model=str(embedder_dir)).numpy()
    assert np.allclose([d.embedding for d in reply.data], expected, atol=1e-6)
    assert np.allclose([d["embedding"] for d in unnamed["data"]], expected, atol=1e-6)
    assert len(client.embeddings.create(model=EMBEDDING_MODEL, input="hola").data[0].embedding) == 384
    assert {m.id for m in client.models.list().data} >= {EMBEDDING_MODEL, str(embedder_dir)}
    refused = httpx.post(server.url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                         json={"input": "x", "dimensions": 384}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["message"] == (
        f"dimensions is 384; {embedder_dir} makes 32-dimensional vectors only (send 32 or leave dimensions out)")
    too_long = httpx.post(server.url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                          json={"input": " ".join(["pan"] * 60)}, timeout=30)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def direct_relevance(folder: Path, query: str, texts: list[str]) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        logits = model(**tokenizer([query] * len(texts), texts, padding=True, truncation="only_second",
                                   max_length=64, return_tensors="pt")).logits
    return (logits[:, 0].sigmoid() if logits.shape[1] == 1 else logits.softmax(-1)[:, 1]).tolist()


def test_the_reranker_reorders_the_best_fused_chunks_by_its_own_scores(reranker_dir, docs):
    plain = load_settings(knowledge={"chunk_tokens": 40, "overlap_tokens": 8})
    add(plain, "shop", [docs])
    query = "what does a spare part cost?"
    fused = search(plain, "shop", query, top_k=4)
    assert all(h.rerank_score is None for h in fused)

    settings = load_settings(knowledge={"chunk_tokens": 40, "overlap_tokens": 8, "reranker": str(reranker_dir),
                                        "rerank_candidates": 4})
    timings: dict[str, float] = {}
    reranked = search(settings, "shop", query, top_k=2, timings=timings)
    relevance = direct_relevance(reranker_dir, query, [h.text for h in fused])
    order = sorted(range(len(fused)), key=lambda i: (-relevance[i], i))[:2]
    assert [h.chunk_id for h in reranked] == [fused[i].chunk_id for i in order]  # out of the 4 candidates
    assert [h.rerank_score for h in reranked] == pytest.approx([relevance[i] for i in order], abs=1e-5)
    assert timings["rerank_ms"] > 0
    hits = retrieve(settings, ["shop"], query, top_k=2, min_score=-1)
    assert [h.chunk_id for h in hits] == [h.chunk_id for h in reranked]

    result = runner.invoke(app, ["knowledge", "search", "shop", query, "-k", "1"],
                           env={"FORJA_KNOWLEDGE__RERANKER": str(reranker_dir),
                                "FORJA_KNOWLEDGE__CHUNK_TOKENS": "40", "FORJA_KNOWLEDGE__OVERLAP_TOKENS": "8",
                                "FORJA_KNOWLEDGE__RERANK_CANDIDATES": "4"})
    assert result.exit_code == 0 and f"(reranker {reranked[0].rerank_score:.3f})" in result.output


def test_a_two_class_reranker_scores_the_relevant_class_and_others_are_refused(tmp_path, docs):
    two = _reranker(tmp_path / "two", 2)
    settings = load_settings(knowledge={"reranker": str(two)})
    add(settings, "shop", [docs])
    hits = search(settings, "shop", "opening hours", top_k=3)
    assert [h.rerank_score for h in hits] == pytest.approx(
        sorted(direct_relevance(two, "opening hours", [h.text for h in hits]), reverse=True), abs=1e-5)
    three = _reranker(tmp_path / "three", 3)
    result = runner.invoke(app, ["knowledge", "search", "shop", "opening hours"],
                           env={"FORJA_KNOWLEDGE__RERANKER": str(three)})
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"forja: error: reranker {str(three)!r} classifies into 3 labels; a cross-encoder has one relevance score "
        "(or two classes)"]
