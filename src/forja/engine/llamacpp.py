"""The llama.cpp serving engine: a GGUF model run through llama-cpp-python's low-level API, with the
same continuous batching as the PyTorch engine (the shared `Scheduler`).

Every active request is a llama.cpp sequence id in one context whose KV cache all of them share. One
`llama_decode` per step takes one token of every active sequence (a `llama_batch` with several
sequence ids), so concurrent requests share each step instead of queueing behind a lock the way
llama-cpp-python's own server does. Prompts are rendered and tokenized with the model's Hugging Face
tokenizer (the same ids as the GGUF vocabulary) so chat templates, stop strings and UTF-8-safe
streaming behave exactly as with the PyTorch engine.

Prompts usually start alike (the chat template's system turn): one extra sequence keeps the KV cache
of the longest prefix recent prompts shared, and a new request copies it (llama_memory_seq_cp shares
the cells, nothing is recomputed) and prefills only the rest.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forja.engine import GenerationError
from forja.engine.scheduler import Scheduler, Sequence
from forja.models import common_prefix

log = logging.getLogger("forja.engine")
PREFILL_BATCH = 512  # most prompt tokens in one llama_decode
MIN_SHARED_PREFIX = 8  # a cached prompt prefix is reused when at least this many tokens match


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _llama_log(level: int, text: bytes, _user: Any) -> None:
    """llama.cpp's own log, through Python logging: warnings and errors only (it is chatty)."""
    if level in (3, 4) and text:  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        log.log(logging.WARNING if level == 3 else logging.ERROR, "llama.cpp: %s", text.decode(errors="replace").rstrip())


def route_llama_log() -> None:
    """Send llama.cpp's log to Python logging (warnings and errors only) instead of stderr."""
    import llama_cpp

    llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p())


class LlamaCppEngine(Scheduler):
    """Continuous batching over a GGUF file with llama.cpp."""

    backend = "llamacpp"

    def __init__(self, gguf_path: Path, tokenizer: Any, *, name: str, max_batch_size: int = 8, max_queue: int = 64,
                 kv_tokens: int = 8192, threads: int | None = None):
        import llama_cpp

        self.llama = llama_cpp
        self.path = Path(gguf_path)
        route_llama_log()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise GenerationError(f"llama.cpp cannot load {self.path}")
        threads = threads or os.cpu_count() or 1
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = kv_tokens
        params.n_batch = params.n_ubatch = PREFILL_BATCH
        params.n_seq_max = max_batch_size + 1  # one sequence per request, and the shared prompt prefix
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # one pool of KV cells, shared by whichever requests are running
        params.flash_attn_type = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED: measured faster here for prefill and batches
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise GenerationError(f"llama.cpp cannot create a context for {self.path} ({kv_tokens} KV tokens)")
        self.kv_tokens = llama_cpp.llama_n_ctx(self._ctx)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(max(PREFILL_BATCH, max_batch_size), 0, 1)
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        if len(tokenizer) > self.n_vocab:
            raise GenerationError(f"{self.path} has {self.n_vocab} tokens but its tokenizer {len(tokenizer)}; "
                                  "they do not belong together")
        eos = {tokenizer.eos_token_id, llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)}
        eos = {int(t) for t in eos if t is not None and 0 <= int(t) < self.n_vocab}
        context = min(llama_cpp.llama_model_n_ctx_train(self._model), self.kv_tokens)
        self._free_slots = list(range(max_batch_size))
        self._prefix_slot = max_batch_size
        self._prefix: list[int] = []  # the tokens whose KV the prefix sequence holds
        self.prefix_hits = 0  # prompt tokens not recomputed thanks to the prefix, for tests and the benchmark
        self._reserved = 0  # KV cells promised to admitted requests (prompt + max_new_tokens each)
        super().__init__(tokenizer, eos, context, "cpu", name=name, max_batch_size=max_batch_size, max_queue=max_queue)

    # ---------------------------------------------------------------- the Scheduler's hooks

    def _fits(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """Every running request keeps room for its whole answer, so a decode never runs out of cells."""
        need = sum(len(s.prompt_ids) + s.params.max_new_tokens for s in [*admitted, seq])
        if self._reserved + need + len(self._prefix) > self.kv_tokens and not self._active and self._prefix:
            self._drop_prefix()  # the cached prefix gives way to a request that needs its cells
        return self._reserved + need + len(self._prefix) <= self.kv_tokens

    def _admit(self, group: list[Sequence]) -> None:
        for seq in group:
            if seq.stream.cancelled.is_set():
                self._finish(seq, "cancelled")
        group = [seq for seq in group if not seq.done]
        for seq in group:
            seq.extra["slot"] = self._free_slots.pop()
            seq.extra["cells"] = len(seq.prompt_ids) + seq.params.max_new_tokens
            self._reserved += seq.extra["cells"]
        # one prompt at a time (PREFILL_BATCH tokens per decode), shortest first: each request streams its
        # first token as soon as its own prompt is in, instead of after the whole group's
        for seq in group:
            ids, slot = seq.prompt_ids, seq.extra["slot"]
            shared = self._shared_prefix(ids)
            if shared:
                self.llama.llama_memory_seq_cp(self._memory, self._prefix_slot, slot, 0, shared)
                self.prefix_hits += shared
            for start in range(shared, len(ids), PREFILL_BATCH):
                chunk = ids[start : start + PREFILL_BATCH]
                self._decode([(token, start + i, slot) for i, token in enumerate(chunk)], [len(chunk) - 1])
            self._keep_prefix(ids, slot, shared)
            seq.length = len(ids)
            self._active.append(seq)  # joins before its first token, so a request that ends at once is dropped normally
            self._accept(seq, self._pick_logits(seq, self._logits(len(chunk) - 1)))
        self.max_rows_seen = max(self.max_rows_seen, len(self._active))

    def _step(self) -> None:
        rows = [(seq.next_token, seq.length, seq.extra["slot"]) for seq in self._active]
        self._decode(rows, list(range(len(rows))))
        if all(seq.sampler.plain for seq in self._active):  # greedy: argmax in place, no copies
            tokens = [int(self._logits(i).argmax()) for i in range(len(rows))]
        else:
            tokens = self._pick(torch.from_numpy(np.stack([self._logits(i).copy() for i in range(len(rows))])))
        self.steps += 1
        for seq, token in zip(self._active, tokens):
            seq.length += 1
            self._accept(seq, token)

    def _release(self, keep: list[int]) -> None:
        kept = {id(self._active[i]) for i in keep}
        for seq in self._active:
            if id(seq) not in kept:
                self._forget(seq)

    def _reset(self) -> None:
        for seq in self._active:
            self._forget(seq)
        self._active = []
        self._prefix = []
        self.llama.llama_memory_clear(self._memory, True)

    def _shutdown(self) -> None:
        self.llama.llama_batch_free(self._batch)
        self.llama.llama_free(self._ctx)
        self.llama.llama_model_free(self._model)

    # ---------------------------------------------------------------- the shared prompt prefix

    def _shared_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the prefix sequence holds (at least one token is left to prefill)."""
        shared = common_prefix(ids[: len(ids) - 1], self._prefix)
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _keep_prefix(self, ids: list[int], slot: int, shared: int) -> None:
        """Narrow the cached prefix to what this prompt shares with it, or start over from this prompt."""
        if shared and shared < len(self._prefix):
            self.llama.llama_memory_seq_rm(self._memory, self._prefix_slot, shared, -1)
            self._prefix = self._prefix[:shared]
        elif not shared and len(ids) > MIN_SHARED_PREFIX:
            self._drop_prefix()
            self.llama.llama_memory_seq_cp(self._memory, slot, self._prefix_slot, 0, len(ids) - 1)
            self._prefix = ids[: len(ids) - 1]

    def _drop_prefix(self) -> None:
        self.llama.llama_memory_seq_rm(self._memory, self._prefix_slot, -1, -1)
        self._prefix = []

    # ---------------------------------------------------------------- llama.cpp calls

    def _forget(self, seq: Sequence) -> None:
        slot = seq.extra.pop("slot", None)
        if slot is not None:
            self.llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._free_slots.append(slot)
            self._reserved -= seq.extra.pop("cells", 0)

    def _decode(self, tokens: list[tuple[int, int, int]], wanted: list[int]) -> None:
        """One llama_decode of (token, position, sequence) triples; logits kept for the `wanted` indices."""
        batch = self._batch
        want = set(wanted)
        for i, (token, position, slot) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = i in want
        batch.n_tokens = len(tokens)
        status = self.llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise GenerationError(f"llama_decode failed with status {status} "
                                  f"({'no room left in the KV cache' if status == 1 else 'see the log'})")

    def _logits(self, index: int) -> np.ndarray:
        """The logits of batch row `index`: a view into llama.cpp's buffer, valid until the next decode."""
        pointer = self.llama.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def _pick_logits(self, seq: Sequence, logits: np.ndarray) -> int | None:
        """A token from a row of llama.cpp's logits: argmax in place for plain greedy, else a copy sampled."""
        if seq.sampler.plain:
            return int(logits.argmax())
        return self._pick_one(seq, torch.from_numpy(logits.copy()))
