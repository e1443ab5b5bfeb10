"""The optional second stage of a search (knowledge.reranker): a cross-encoder reads the query and each of the
best fused chunks together and scores how well the chunk answers it, which two separate embeddings and a
keyword count cannot. Any sequence-classification model made for it loads by folder or Hugging Face id
(cross-encoder/ms-marco-MiniLM-L-6-v2, BAAI/bge-reranker-base, a multilingual one): one relevance logit, or
two classes of which the second is "relevant"."""

from __future__ import annotations

import dataclasses
import threading
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from forja.embeddings import EmbeddingError, model_dir
from forja.models import quiet_transformers

if TYPE_CHECKING:
    from forja.knowledge.index import Hit

BATCH = 16  # query-chunk pairs per forward pass
_busy = threading.Lock()  # one scoring at a time: the tokenizer keeps state, and the cores are few


@lru_cache(maxsize=2)
def _load(name: str) -> tuple[Any, Any, int]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    directory = model_dir(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"reranker {name!r} ({directory}): cannot load it as a cross-encoder "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if model.config.num_labels not in (1, 2):
        raise EmbeddingError(f"reranker {name!r} classifies into {model.config.num_labels} labels; a cross-encoder "
                             "has one relevance score (or two classes)")
    window = min(int(getattr(model.config, "max_position_embeddings", 512) or 512),
                 int(getattr(tokenizer, "model_max_length", 512) or 512))
    return tokenizer, model, window


def scores(name: str, query: str, texts: list[str]) -> list[float]:
    """How well each text answers `query`, 0 to 1 (the logit's sigmoid, or the "relevant" class's probability).
    A long chunk is cut, never the query."""
    import torch

    tokenizer, model, window = _load(name)
    out: list[float] = []
    with _busy, torch.inference_mode():
        for start in range(0, len(texts), BATCH):
            part = texts[start:start + BATCH]
            batch = tokenizer([query] * len(part), part, padding=True, truncation="only_second", max_length=window,
                              return_tensors="pt")
            logits = model(**batch).logits.float()
            relevance = logits[:, 0].sigmoid() if logits.shape[1] == 1 else logits.softmax(-1)[:, 1]
            out += relevance.tolist()
    return out


def rerank(name: str, query: str, hits: list[Hit]) -> list[Hit]:
    """`hits` re-ordered by the cross-encoder, best first (ties keep the fused order), each with its score."""
    if not hits:
        return []
    relevance = scores(name, query, [hit.text for hit in hits])
    order = sorted(range(len(hits)), key=lambda i: (-relevance[i], i))
    return [dataclasses.replace(hits[i], rerank_score=round(relevance[i], 6)) for i in order]
