"""`POST /v1/embeddings`: OpenAI's embeddings contract over the two bundled models (all-MiniLM-L6-v2 and the
multilingual Universal Sentence Encoder) and the configured knowledge.embedding_model and
train.faq_embedding_model (forja.embeddings), the one a request names or, naming none,
knowledge.embedding_model.
One worker thread embeds, one request after another, off the event loop: the generating routes keep
streaming while it works, and two embedding requests never split the cores between them."""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Request

from forja import embeddings
from forja.config import Settings
from forja.embeddings import EMBEDDING_MODEL, EmbeddingError, count_tokens, embed
from forja.serve.deps import ApiError, ApiKeyDep, StateDep, count_usage
from forja.serve.schemas import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage, error_responses

MAX_EMBEDDING_INPUTS = 2048  # texts in one request, as OpenAI

router = APIRouter(prefix="/v1", tags=["openai"])
worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forja-embeddings")


@router.post("/embeddings", responses=error_responses(400, 401, 404, 413, 422, 500))
async def create_embeddings(body: EmbeddingRequest, request: Request, state: StateDep,
                            key_name: ApiKeyDep) -> EmbeddingList:
    model = chosen_model(body, state.settings)
    texts = checked_texts(body)
    names = ["input"] if isinstance(body.input, str) else [f"input.{i}" for i in range(len(texts))]
    request.state.model = model  # for the request counter
    data, tokens = await asyncio.get_running_loop().run_in_executor(worker, embed_texts, texts, names,
                                                                    body.encoding_format, model, body.dimensions)
    await asyncio.to_thread(count_usage, state, key_name, tokens, 0)
    return EmbeddingList(data=data, model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def chosen_model(body: EmbeddingRequest, settings: Settings) -> str:
    """The model the request names (one of served_models), or the configured one; else 404."""
    served = embeddings.served(settings)
    if body.model is None:
        return served[-1]
    if embeddings.canonical(body.model) in served:  # a bundled model's alias answers as the model
        return embeddings.canonical(body.model)
    raise ApiError(404, f"the model {body.model!r} does not make embeddings; the embedding "
                   f"model{'s are' if len(served) > 1 else ' is'} {', '.join(served)}", param="model",
                   code="model_not_found")


def checked_texts(body: EmbeddingRequest) -> list[str]:
    """The texts to embed, or 400 naming the field that cannot be served."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input is an empty list; send a text or a list of texts", param="input",
                       code="invalid_value")
    if not all(isinstance(text, str) for text in texts):
        # token ids belong to one tokenizer: a client's (tiktoken's) ids mean other words to MiniLM
        raise ApiError(400, "input as token ids is not supported: send the text itself, a string or a list of strings "
                       "(LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))", param="input",
                       code="unsupported_parameter")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input has {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS} per request",
                       param="input", code="invalid_value")
    for index, text in enumerate(texts):
        if not text:
            name = "input" if isinstance(body.input, str) else f"input.{index}"
            raise ApiError(400, f"{name} is an empty string; there is nothing to embed", param=name,
                           code="invalid_value")
    return texts  # type: ignore[return-value]  # all strings, checked above


def embed_texts(texts: list[str], names: list[str], encoding_format: str, model: str = EMBEDDING_MODEL,
                asked_dimensions: int | None = None) -> tuple[list[Embedding], int]:
    """In the worker thread (a model named for the first time loads here): check the dimensions asked for,
    count, refuse a text over the window (never cut it), embed."""
    try:
        size, window = embeddings.dimensions(model), embeddings.max_tokens(model)
        if asked_dimensions is not None and asked_dimensions != size:
            raise ApiError(400, f"dimensions is {asked_dimensions}; {model} makes {size}-dimensional vectors only "
                           f"(send {size} or leave dimensions out)", param="dimensions", code="invalid_value")
        counts = count_tokens(texts, model=model)
        for name, count in zip(names, counts):
            if count > window:
                raise ApiError(400, f"{name} has {count} tokens; {model} reads at most {window} "
                               "(its special tokens included); shorten it or split it in parts", param=name,
                               code="context_length_exceeded")
        vectors = embed(texts, model=model).numpy()
    except EmbeddingError as exc:
        raise ApiError(500, str(exc), type="server_error", code="model_load_failed") from None
    if encoding_format == "base64":  # what the openai SDK decodes: little-endian float32 bytes
        rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    else:
        rows = vectors.tolist()
    return [Embedding(index=i, embedding=row) for i, row in enumerate(rows)], sum(counts)

