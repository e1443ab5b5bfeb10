"""Continuous batching: one thread owns a model and decodes every active request in one batch, step
by step (a request joins or leaves the batch between two steps).

`Scheduler` is the part every backend shares: the queue, admission, the engine thread, turning
tokens into streamed text (EOS, stop strings, length, cancellation). `BatchingEngine` is the
PyTorch backend (`engine/llamacpp.py` holds the llama.cpp one); `forja serve` creates one engine per
loaded model and `forja bench serve` measures it.
How the PyTorch batch is kept: one KV cache whose rows are the active requests, left-padded so that every
row's newest token sits in the last column; an attention mask hides the padding and explicit
position ids keep each row's positions its own.
A request is prefilled alone or with the others admitted at the same time (left-padded), then its
cache rows are padded and concatenated to the batch; a finished row is dropped with index_select.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from forja.engine import (
    ContextLengthExceeded,
    Delta,
    Engine,
    Prompt,
    QueueFull,
    SamplingParams,
    Stream,
    Usage,
)
from forja.engine.pytorch import TextStream, chat_prompt_ids, sample_next
from forja.models import LoadedModel

log = logging.getLogger("forja.engine")
PREFILL_TOKENS = 4096  # most (padded) prompt tokens prefilled in one forward


class EngineStream(Stream):
    """The asyncio side of a request: the engine thread pushes deltas into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()

    def put(self, delta: Delta) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[Delta]:  # type: ignore[override]
        try:
            while True:
                delta = await self._queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            # the consumer stopped early (client gone, error): stop decoding for it
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Sequence:
    """A request inside the engine thread."""

    stream: EngineStream
    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    generator: torch.Generator | None
    usage: Usage
    length: int = 0  # real tokens of this row in the batch cache
    next_token: int = 0  # sampled, not yet fed to the model
    done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Scheduler(Engine):
    """Continuous batching, whatever runs the model: requests queue here, one thread admits them
    between steps, runs one decode step for every active request, and turns each sampled token into
    streamed text. A backend fills in `_admit` (prefill new requests, sample their first token),
    `_step` (one token for every active request) and `_release` (forget finished requests' state).
    `submit` is called from the event loop; the model is only ever touched by the engine's thread."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int], context_length: int, device: Any, *, name: str,
                 max_batch_size: int = 8, max_queue: int = 64):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.name = name
        self.context_length = context_length
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._pending: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._wake = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run, for tests and the benchmark
        self.max_rows_seen = 0
        self._thread = threading.Thread(target=self._run, name=f"forja-engine-{self.name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- event-loop side

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        return chat_prompt_ids(self.tokenizer, prompt)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.prompt_ids(prompt))

    def submit(self, prompt: Prompt, params: SamplingParams) -> EngineStream:
        ids = self.prompt_ids(prompt)
        if not ids:
            ids = [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]
        if len(ids) + params.max_new_tokens > self.context_length:
            raise ContextLengthExceeded(len(ids), params.max_new_tokens, self.context_length)
        stream = EngineStream(asyncio.get_running_loop())
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = _Sequence(stream, ids, params, TextStream(self.tokenizer, params.stop), generator,
                        Usage(prompt_tokens=len(ids)))
        with self._wake:
            if self._closed:
                raise QueueFull(f"the engine for {self.name} is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._pending)} requests are already waiting for {self.name} (serve.max_queue); retry shortly"
                )
            self._pending.append(seq)
            self._wake.notify()
        return stream

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def load(self) -> dict[str, int]:
        return {"active": len(self._active), "waiting": len(self._pending)}

    # ---------------------------------------------------------------- engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._pending and not self._active:
                        self._wake.wait()
                    if self._closed:
                        break
                    admitted = []
                    while (self._pending and len(self._active) + len(admitted) < self.max_batch_size
                           and self._fits(self._pending[0], admitted)):
                        admitted.append(self._pending.popleft())
                try:
                    for group in self._prefill_groups(admitted):
                        self._admit(group)
                    self._drop_finished()
                    if self._active:
                        self._step()
                        self._drop_finished()
                except Exception as exc:  # a broken batch must not hang its clients
                    log.exception("engine step failed")
                    for seq in self._active + admitted:
                        if not seq.done:
                            self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                    self._reset()
        for seq in list(self._pending) + self._active:
            self._finish(seq, "cancelled")
        self._shutdown()

    def _prefill_groups(self, admitted: list[_Sequence]) -> list[list[_Sequence]]:
        """Requests prefilled together, each group at most PREFILL_TOKENS once padded."""
        groups: list[list[_Sequence]] = []
        for seq in sorted(admitted, key=lambda s: len(s.prompt_ids)):
            if groups and len(seq.prompt_ids) * (len(groups[-1]) + 1) <= PREFILL_TOKENS:
                groups[-1].append(seq)
            else:
                groups.append([seq])
        return groups

    def _fits(self, seq: _Sequence, admitted: list[_Sequence]) -> bool:
        """Whether `seq` can join now, besides `admitted` (a backend with a fixed KV budget says no)."""
        return True

    def _admit(self, group: list[_Sequence]) -> None:
        """Prefill `group`, sample each one's first token (`_accept`), add the live ones to `_active`."""
        raise NotImplementedError

    def _step(self) -> None:
        """One decode step for every active request, then `_accept` the token each one got."""
        raise NotImplementedError

    def _release(self, keep: list[int]) -> None:
        """`_active` is about to become the requests at indices `keep`: drop the others' model state."""
        raise NotImplementedError

    def _reset(self) -> None:
        """After a failed step: forget every request's model state."""
        self._active = []

    def _shutdown(self) -> None:
        """The engine thread is ending: free the backend's resources."""

    def _pick(self, logits: torch.Tensor) -> list[int]:
        """A token for each active request from logits [rows, vocab] (greedy rows in one argmax)."""
        greedy = [i for i, seq in enumerate(self._active) if seq.params.temperature == 0]
        tokens: dict[int, int] = {}
        if greedy:
            tokens.update(zip(greedy, logits[greedy].argmax(dim=-1).tolist()))
        for i, seq in enumerate(self._active):
            if i not in tokens:
                tokens[i] = int(sample_next(logits[i : i + 1], seq.params, seq.generator)[0])
        return [tokens[i] for i in range(len(self._active))]

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Handle a sampled token: end on EOS, stop string or length; otherwise stream its text."""
        if seq.stream.cancelled.is_set():
            self._finish(seq, "cancelled")
            return
        if token in self.eos_token_ids:
            self._finish(seq, "stop")
            return
        seq.usage.completion_tokens += 1
        delta = seq.text.push(token)
        if seq.text.stopped:
            self._finish(seq, "stop", text=delta)
            return
        if seq.usage.completion_tokens >= seq.params.max_new_tokens:
            self._finish(seq, "length", text=delta + seq.text.finish())
            return
        if delta:
            seq.stream.put(Delta(delta))
        seq.next_token = token

    def _finish(self, seq: _Sequence, reason: str, text: str = "", error: str | None = None) -> None:
        seq.done = True
        if reason == "stop" and not text:
            text = seq.text.finish()
        seq.stream.put(Delta(text, finish_reason=reason, usage=seq.usage, error=error))

    def _drop_finished(self) -> None:
        for seq in self._active:
            if not seq.done and seq.stream.cancelled.is_set():
                self._finish(seq, "cancelled")
        keep = [i for i, seq in enumerate(self._active) if not seq.done]
        if len(keep) == len(self._active):
            return
        self._release(keep)
        self._active = [self._active[i] for i in keep]


class BatchingEngine(Scheduler):
    """Continuous batching over a transformers model (PyTorch, CPU or GPU)."""

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 8, max_queue: int = 64, name: str | None = None):
        self.loaded = loaded
        self._cache: Any = None  # the batch DynamicCache, rows in the order of self._active
        super().__init__(loaded.tokenizer, loaded.eos_token_ids, loaded.context_length, loaded.model.device,
                         name=name or loaded.ref.name, max_batch_size=max_batch_size, max_queue=max_queue)

    def _reset(self) -> None:
        self._active, self._cache = [], None

    def _admit(self, group: list[_Sequence]) -> None:
        """Prefill new requests in one left-padded forward, sample their first tokens, join the batch."""
        from transformers import DynamicCache

        for seq in group:
            if seq.stream.cancelled.is_set():
                self._finish(seq, "cancelled")
        group = [seq for seq in group if not seq.done]
        if not group:
            return
        model = self.loaded.model
        device = model.device
        width = max(len(seq.prompt_ids) for seq in group)
        pad_id = self.loaded.tokenizer.pad_token_id or 0
        inputs = torch.tensor([[pad_id] * (width - len(s.prompt_ids)) + s.prompt_ids for s in group], device=device)
        lengths = torch.tensor([len(s.prompt_ids) for s in group], device=device)
        pads = width - lengths
        columns = torch.arange(width, device=device)
        position_ids = (columns[None, :] - pads[:, None]).clamp(min=0)
        # causal, padding hidden; a padding query sees only itself, so no softmax row is empty (NaN)
        allowed = (columns[None, None, :] <= columns[None, :, None]) & (columns[None, None, :] >= pads[:, None, None])
        allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]
        mask = torch.zeros(allowed.shape, dtype=model.dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(model.dtype).min)
        cache = DynamicCache()
        # logits_to_keep=1: only the last position's vocabulary projection (the rest would be thrown away)
        logits = model(input_ids=inputs, attention_mask=mask[:, None], position_ids=position_ids,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        for row, seq in enumerate(group):
            seq.length = len(seq.prompt_ids)
            self._accept(seq, int(sample_next(logits[row : row + 1], seq.params, seq.generator)[0]))
        keep = [row for row, seq in enumerate(group) if not seq.done]
        if not keep:
            return
        if len(keep) < len(group):
            index = torch.tensor(keep, device=device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self._cache = cache if self._cache is None else _concat_rows(self._cache, cache)
        self._active.extend(group[row] for row in keep)
        self.max_rows_seen = max(self.max_rows_seen, len(self._active))

    def _step(self) -> None:
        """One forward over every active row, then one new token for each."""
        model = self.loaded.model
        device = model.device
        width = self._cache.get_seq_length()
        lengths = torch.tensor([seq.length for seq in self._active], device=device)
        columns = torch.arange(width + 1, device=device)
        attention_mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        inputs = torch.tensor([[seq.next_token] for seq in self._active], device=device)
        logits = model(
            input_ids=inputs, attention_mask=attention_mask, position_ids=lengths[:, None],
            past_key_values=self._cache, use_cache=True,
        ).logits[:, -1, :]
        self.steps += 1
        for seq, token in zip(self._active, self._pick(logits)):
            seq.length += 1
            self._accept(seq, token)

    def _release(self, keep: list[int]) -> None:
        if not keep:
            self._cache = None
            return
        # drop the rows, then the leading columns that are padding in every remaining row
        trim = self._cache.get_seq_length() - max(self._active[i].length for i in keep)
        index = torch.tensor(keep, device=self.loaded.model.device)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:, :]
            layer.values = layer.values.index_select(0, index)[:, :, trim:, :]


def _concat_rows(batch: Any, new: Any) -> Any:
    """Append the rows of cache `new` to cache `batch`, left-padding the shorter one with zeros."""
    width, new_width = batch.get_seq_length(), new.get_seq_length()
    for layer, new_layer in zip(batch.layers, new.layers):
        for attr in ("keys", "values"):
            a, b = getattr(layer, attr), getattr(new_layer, attr)
            if new_width < width:
                b = torch.nn.functional.pad(b, (0, 0, width - new_width, 0))
            elif width < new_width:
                a = torch.nn.functional.pad(a, (0, 0, new_width - width, 0))
            setattr(layer, attr, torch.cat([a, b], dim=0))
    return batch

