"""Continuous batching, whatever runs the model: one thread owns a model and decodes every active request
in one batch, step by step (a request joins or leaves the batch between two steps).

`Scheduler` holds the queue, admission, the engine thread and turning sampled tokens into streamed text
(EOS, stop strings, length, cancellation); a backend (`pytorch.py`, `llamacpp.py`) fills in prefill, one
decode step and forgetting a finished request. Every caller gets its engine from `forja.engine.make_engine`.
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
    GenerationError,
    Prompt,
    QueueFull,
    SamplingParams,
    Stream,
    Usage,
)
from forja.engine.sampling import Sampler
from forja.engine.text import TextStream, chat_prompt_ids

log = logging.getLogger("forja.engine")
PREFILL_TOKENS = 4096  # most (padded) prompt tokens prefilled in one forward
ADMIT_GAP = 0.004  # an idle engine waits this long for another request of a burst...
ADMIT_WINDOW = 0.05  # ...and at most this long in all


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The token ids a local engine decodes for `prompt` (the chat template applied to messages)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if all(isinstance(item, int) for item in prompt):
        return list(prompt)  # type: ignore[arg-type]
    return chat_prompt_ids(tokenizer, prompt)  # type: ignore[arg-type]


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
class Sequence:
    """A request inside the engine thread."""

    stream: EngineStream
    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    sampler: Sampler
    usage: Usage
    length: int = 0  # real tokens of this row in the batch cache
    next_token: int = 0  # sampled, not yet fed to the model
    done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None  # the LoRA adapter this request decodes with (None: the plain base)


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
        self._pending: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._wake = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run, for tests and the benchmark
        self.max_rows_seen = 0
        self.adapters: dict[str, Any] = {}  # LoRA adapters loaded on this engine's model, by name (add_adapter)
        # held by the engine thread around each step, so an adapter is loaded between two steps, never in one
        self._model_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"forja-engine-{self.name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- event-loop side

    def tokenize(self, prompt: Prompt) -> list[int]:
        return prompt_ids(self.tokenizer, prompt)

    def submit(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> EngineStream:
        """As Engine.submit; `adapter` names a LoRA adapter added with `add_adapter` to decode with."""
        if adapter is not None and adapter not in self.adapters:
            raise GenerationError(f"the engine for {self.name} has no adapter {adapter!r}")
        ids = self.tokenize(prompt)
        if not ids:
            ids = [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]
        if len(ids) + params.max_new_tokens > self.context_length:
            raise ContextLengthExceeded(len(ids), params.max_new_tokens, self.context_length)
        stream = EngineStream(asyncio.get_running_loop())
        seq = Sequence(stream, ids, params, TextStream(self.tokenizer, params.stop), Sampler(params, ids, self.device),
                       Usage(prompt_tokens=len(ids)), adapter=adapter)
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

    def load_of(self, adapter: str | None) -> dict[str, int]:
        """`load`, counting only the requests of one adapter (None: the plain base's)."""
        return {"active": sum(s.adapter == adapter for s in list(self._active)),
                "waiting": sum(s.adapter == adapter for s in list(self._pending))}

    def add_adapter(self, name: str, path: Any) -> None:
        """Load the LoRA adapter at `path` (a trained version's directory) as `name`, so requests submitted
        with adapter=name decode with it on this engine's one copy of the base weights."""
        raise GenerationError(f"the {self.backend} engine cannot serve LoRA adapters")

    # ---------------------------------------------------------------- engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._pending and not self._active:
                        self._wake.wait()
                    if self._closed:
                        break
                    if not self._active:
                        self._gather_burst()
                    admitted = []
                    while (self._pending and len(self._active) + len(admitted) < self.max_batch_size
                           and self._fits(self._pending[0], admitted)):
                        admitted.append(self._pending.popleft())
                try:
                    with self._model_lock:
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

    def _gather_burst(self) -> None:
        """The engine was idle and a request came: requests sent together reach it a few milliseconds apart
        (each is parsed and tokenized on the event loop), so wait while they keep coming, ADMIT_GAP at a
        time and ADMIT_WINDOW at most, to prefill them in one batch. A request alone waits ADMIT_GAP.
        Called holding `_wake`."""
        deadline = time.monotonic() + ADMIT_WINDOW
        seen = len(self._pending)
        while len(self._pending) < self.max_batch_size and time.monotonic() < deadline and not self._closed:
            self._wake.wait(timeout=ADMIT_GAP)
            if len(self._pending) == seen:
                return
            seen = len(self._pending)

    def _prefill_groups(self, admitted: list[Sequence]) -> list[list[Sequence]]:
        """Requests prefilled together, each group at most PREFILL_TOKENS once padded, and of one adapter (a
        cached prefix is the keys and values of one adapter's weights)."""
        groups: list[list[Sequence]] = []
        for seq in sorted(admitted, key=lambda s: (s.adapter or "", len(s.prompt_ids))):
            if (groups and groups[-1][0].adapter == seq.adapter
                    and len(seq.prompt_ids) * (len(groups[-1]) + 1) <= PREFILL_TOKENS):
                groups[-1].append(seq)
            else:
                groups.append([seq])
        return groups

    def _fits(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """Whether `seq` can join now, besides `admitted` (a backend with a fixed KV budget says no)."""
        return True

    def _admit(self, group: list[Sequence]) -> None:
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

    def _pick(self, logits: torch.Tensor) -> list[int | None]:
        """A token for each active request from logits [rows, vocab] (plain greedy rows in one argmax)."""
        plain = [i for i, seq in enumerate(self._active) if seq.sampler.plain]
        tokens: dict[int, int | None] = {}
        if plain:
            tokens.update(zip(plain, logits[plain].argmax(dim=-1).tolist()))
        for i, seq in enumerate(self._active):
            if i not in tokens:
                tokens[i] = self._pick_one(seq, logits[i])
        return [tokens[i] for i in range(len(self._active))]

    def _pick_one(self, seq: Sequence, logits: torch.Tensor) -> int | None:
        """One request's token from its logits [vocab]; a failure (a sampling error, a grammar that allows
        nothing) ends that request alone, with finish_reason "error", and gives None."""
        try:
            return seq.sampler.pick(logits)
        except Exception as exc:
            log.warning("request on %s ended by a sampling error: %s", self.name, exc)
            self._finish(seq, "error", error=f"sampling failed: {type(exc).__name__}: {exc}")
            return None

    def _accept(self, seq: Sequence, token: int | None) -> None:
        """Handle a sampled token: end on EOS, stop string, a completed grammar or length; otherwise stream
        its text."""
        if seq.done or token is None:
            return
        if seq.stream.cancelled.is_set():
            self._finish(seq, "cancelled")
            return
        if token in self.eos_token_ids:
            self._finish(seq, "stop")
            return
        seq.usage.completion_tokens += 1
        delta = seq.text.push(token)
        if seq.text.stopped or seq.sampler.done:
            self._finish(seq, "stop", text=delta + seq.text.finish())
            return
        if seq.usage.completion_tokens >= seq.params.max_new_tokens:
            self._finish(seq, "length", text=delta + seq.text.finish())
            return
        if delta:
            seq.stream.put(Delta(delta, logprobs=seq.sampler.take_logprobs()))
        seq.next_token = token

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: str | None = None) -> None:
        seq.done = True
        if reason == "stop" and not text:
            text = seq.text.finish()
        seq.stream.put(Delta(text, finish_reason=reason, usage=seq.usage, error=error,
                             logprobs=seq.sampler.take_logprobs()))

    def _drop_finished(self) -> None:
        for seq in self._active:
            if not seq.done and seq.stream.cancelled.is_set():
                self._finish(seq, "cancelled")
        keep = [i for i, seq in enumerate(self._active) if not seq.done]
        if len(keep) == len(self._active):
            return
        self._release(keep)
        self._active = [self._active[i] for i in keep]
