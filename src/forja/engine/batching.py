"""Continuous batching: one thread owns a model and decodes every active request in one batch, step
by step (a request joins or leaves the batch between two steps).

`Scheduler` is the part every backend shares: the queue, admission, the engine thread, turning
tokens into streamed text (EOS, stop strings, length, cancellation). `BatchingEngine` is the
PyTorch backend (`engine/llamacpp.py` holds the llama.cpp one); `forja serve` creates one engine per
loaded model and `forja bench serve` measures it.
How the PyTorch batch is kept: one KV cache whose rows are the active requests, aligned so that every
row's newest token sits in the last column; a [rows, columns] mask of valid columns hides the padding
(on the left, and between a shared prefix and the rest of a prompt) and explicit position ids keep each
row's positions its own.
A request is prefilled alone or with the others admitted at the same time (left-padded), on top of the
cached keys and values of the prefix it shares with other prompts, then its cache rows are padded and
concatenated to the batch; a finished row is dropped with index_select.
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
from forja.engine.pytorch import TextStream, chat_prompt_ids, pack_linears, sample_next
from forja.models import LoadedModel

log = logging.getLogger("forja.engine")
PREFILL_TOKENS = 4096  # most (padded) prompt tokens prefilled in one forward
ADMIT_GAP = 0.004  # an idle engine waits this long for another request of a burst...
ADMIT_WINDOW = 0.05  # ...and at most this long in all


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
                    if not self._active:
                        self._gather_burst()
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
    """Continuous batching over a transformers model (PyTorch, CPU or GPU), with shared prompt prefixes:
    the key/value cache of a prefix that several prompts start with (a persona's system turn, the chat
    template's default one) is computed once and kept (`PrefixCache`), so a prompt prefills only what
    follows it. The engine owns its model: on a CPU in float32 it packs the linear weights for oneDNN
    (`pack_linears`) unless `pack=False`."""

    backend = "pytorch"

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 8, max_queue: int = 64, name: str | None = None,
                 prefix_tokens: int = 2048, pack: bool = True):
        self.loaded = loaded
        self.packed_linears = pack_linears(loaded.model, max_batch_size) if pack else 0
        self._cache: Any = None  # the batch DynamicCache, rows in the order of self._active
        self._valid: torch.Tensor | None = None  # [rows, columns] which cache columns hold a real token
        self.prefixes = PrefixCache(prefix_tokens)
        super().__init__(loaded.tokenizer, loaded.eos_token_ids, loaded.context_length, loaded.model.device,
                         name=name or loaded.ref.name, max_batch_size=max_batch_size, max_queue=max_queue)

    def _reset(self) -> None:
        self._active, self._cache, self._valid = [], None, None

    def _admit(self, group: list[_Sequence]) -> None:
        """Prefill new requests (after the prefix they share with earlier prompts, when one is cached),
        sample their first tokens, join the batch."""
        for seq in group:
            if seq.stream.cancelled.is_set():
                self._finish(seq, "cancelled")
        plans: dict[int, tuple[Prefix | None, int, list[_Sequence]]] = {}
        for seq in group:
            if seq.done:
                continue
            prefix, shared = self.prefixes.lookup(seq.prompt_ids)
            _, known, members = plans.get(id(prefix), (prefix, shared, []))
            plans[id(prefix)] = (prefix, min(known, shared), [*members, seq])  # one forward per prefix
        for prefix, shared, members in plans.values():
            if prefix is None and len(members) > 1:  # new prompts that start alike: their common part first
                prefix, shared = self._prefill_common_part(members)
            self._prefill(members, prefix, shared)

    def _prefill_common_part(self, group: list[_Sequence]) -> tuple["Prefix | None", int]:
        """Prefill once, alone, the tokens every prompt of `group` starts with (when at least MIN_PREFIX)
        and cache them: one more (short) forward saves computing them once per prompt."""
        first = group[0].prompt_ids
        shared = min(min(common_prefix(first, seq.prompt_ids) for seq in group[1:]), *(len(s.prompt_ids) - 1 for s in group))
        if shared < MIN_PREFIX or shared > self.prefixes.max_tokens:
            return None, 0
        from transformers import DynamicCache

        cache = DynamicCache()
        self.loaded.model(input_ids=torch.tensor([first[:shared]], device=self.device), past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
        prefix = self.prefixes.add(first[:shared], [(layer.keys, layer.values) for layer in cache.layers])
        return (prefix, shared) if prefix is not None else (None, 0)

    def _prefill(self, group: list[_Sequence], prefix: "Prefix | None", start: int) -> None:
        """One left-padded forward over each prompt of `group` after its first `start` tokens, on top of
        those tokens' keys and values cut from `prefix` (everything, when there is no prefix)."""
        from transformers import DynamicCache

        model = self.loaded.model
        device = model.device
        rows = len(group)
        tails = [seq.prompt_ids[start:] for seq in group]
        width = max(len(t) for t in tails)
        pad_id = self.loaded.tokenizer.pad_token_id or 0
        inputs = torch.tensor([[pad_id] * (width - len(t)) + t for t in tails], device=device)
        pads = torch.tensor([width - len(t) for t in tails], device=device)
        columns = torch.arange(width, device=device)
        position_ids = start + (columns[None, :] - pads[:, None]).clamp(min=0)
        cache = DynamicCache()
        if prefix is not None:
            for index, (keys, values) in enumerate(prefix.layers):
                cache.update(keys[:, :, :start].expand(rows, -1, -1, -1), values[:, :, :start].expand(rows, -1, -1, -1), index)
        valid = torch.cat([torch.ones(rows, start, dtype=torch.bool, device=device), columns[None, :] >= pads[:, None]], dim=1)
        mask = None  # without padding the model's own causal mask is the right one (prefix included)
        if bool((pads > 0).any()):
            # each row sees the prefix, then its own tokens causally; padding is hidden, and a padding
            # query sees only itself, so no softmax row is empty (NaN)
            own = (columns[None, None, :] <= columns[None, :, None]) & (columns[None, None, :] >= pads[:, None, None])
            own |= torch.eye(width, dtype=torch.bool, device=device)[None]
            allowed = torch.cat([torch.ones(rows, width, start, dtype=torch.bool, device=device), own], dim=2)
            mask = torch.zeros(allowed.shape, dtype=model.dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(model.dtype).min)
            mask = mask[:, None]
        # logits_to_keep=1: only the last position's vocabulary projection (the rest would be thrown away)
        logits = model(input_ids=inputs, attention_mask=mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        if prefix is None:
            self._remember_prefixes(group, cache, pads)
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
            valid = valid[index]
        if self._cache is None:
            self._cache, self._valid = cache, valid
        else:
            self._cache, self._valid = _concat_rows(self._cache, self._valid, cache, valid)
        self._active.extend(group[row] for row in keep)
        self.max_rows_seen = max(self.max_rows_seen, len(self._active))

    def _remember_prefixes(self, group: list[_Sequence], cache: Any, pads: torch.Tensor) -> None:
        """Keep the keys and values of what a prompt just prefilled shares with another prompt of its group or
        a recent one (at least MIN_PREFIX tokens): cut from the cache the prefill made, no extra forward."""
        for row, seq in enumerate(group):
            shared = self.prefixes.shared_length(seq.prompt_ids, [s.prompt_ids for s in group if s is not seq])
            if shared < MIN_PREFIX or self.prefixes.lookup(seq.prompt_ids[:shared + 1], count=False)[1] >= shared:
                continue
            begin = int(pads[row])
            self.prefixes.add(seq.prompt_ids[:shared], [
                (layer.keys[row : row + 1, :, begin : begin + shared].clone(),
                 layer.values[row : row + 1, :, begin : begin + shared].clone()) for layer in cache.layers])

    def _step(self) -> None:
        """One forward over every active row, then one new token for each."""
        model = self.loaded.model
        device = model.device
        rows = len(self._active)
        valid = torch.cat([self._valid, torch.ones(rows, 1, dtype=torch.bool, device=device)], dim=1)
        lengths = torch.tensor([seq.length for seq in self._active], device=device)
        inputs = torch.tensor([[seq.next_token] for seq in self._active], device=device)
        # no holes in any row (one request alone, or rows of equal length): no mask to build at all
        mask = None if bool(valid.all()) else valid.long()
        logits = model(
            input_ids=inputs, attention_mask=mask, position_ids=lengths[:, None],
            past_key_values=self._cache, use_cache=True,
        ).logits[:, -1, :]
        self._valid = valid
        self.steps += 1
        for seq, token in zip(self._active, self._pick(logits)):
            seq.length += 1
            self._accept(seq, token)

    def _release(self, keep: list[int]) -> None:
        if not keep:
            self._cache, self._valid = None, None
            return
        # drop the rows, then the leading columns that no remaining row uses
        index = torch.tensor(keep, device=self.loaded.model.device)
        valid = self._valid.index_select(0, index)
        trim = int(valid.any(dim=0).nonzero()[0])
        self._valid = valid[:, trim:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:, :]
            layer.values = layer.values.index_select(0, index)[:, :, trim:, :]


MIN_PREFIX = 16  # shared tokens worth caching


@dataclass
class Prefix:
    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [1, heads, len, dim]
    used: float = 0.0


def common_prefix(a: Any, b: Any) -> int:
    """How many leading items (token ids, characters) two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Key/value caches of shared prompt prefixes, least recently used dropped first beyond `max_tokens`;
    also remembers the token ids of recent prompts, to see what a new one shares with them."""

    def __init__(self, max_tokens: int, remember: int = 32):
        self.max_tokens = max_tokens
        self.entries: list[Prefix] = []
        self.recent: collections.deque[list[int]] = collections.deque(maxlen=remember)
        self.hits = 0

    def lookup(self, ids: list[int], count: bool = True) -> tuple[Prefix | None, int]:
        """The cached prefix sharing the most leading tokens with `ids` (at least MIN_PREFIX, leaving one
        token to prefill) and how many it shares: a prefix of a cached prefix is a cut of its columns."""
        best, best_shared = None, 0
        for entry in self.entries:
            shared = min(common_prefix(entry.ids, ids), len(ids) - 1)
            if shared >= MIN_PREFIX and shared > best_shared:
                best, best_shared = entry, shared
        if count:
            if best is not None:
                best.used = time.monotonic()
                self.hits += 1
            self.recent.append(ids)
        return best, best_shared

    def shared_length(self, ids: list[int], others: list[list[int]]) -> int:
        """The longest prefix `ids` shares with one of `others` or a recent prompt (never all of `ids`)."""
        longest = max((common_prefix(ids, other) for other in [*others, *self.recent] if other is not ids), default=0)
        return min(longest, len(ids) - 1)

    def add(self, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Prefix | None:
        if len(ids) > self.max_tokens:
            return None
        entry = Prefix(tuple(ids), layers, time.monotonic())
        self.entries.append(entry)
        while sum(len(e.ids) for e in self.entries) > self.max_tokens:
            self.entries.remove(min(self.entries, key=lambda e: e.used))
        return entry if entry in self.entries else None


def _concat_rows(batch: Any, valid: torch.Tensor, new: Any, new_valid: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Append the rows of cache `new` to cache `batch`, left-padding the shorter one with zeros (columns
    marked not valid)."""
    width, new_width = batch.get_seq_length(), new.get_seq_length()
    for layer, new_layer in zip(batch.layers, new.layers):
        for attr in ("keys", "values"):
            a, b = getattr(layer, attr), getattr(new_layer, attr)
            if new_width < width:
                b = torch.nn.functional.pad(b, (0, 0, width - new_width, 0))
            elif width < new_width:
                a = torch.nn.functional.pad(a, (0, 0, new_width - width, 0))
            setattr(layer, attr, torch.cat([a, b], dim=0))
    if new_width < width:
        new_valid = torch.nn.functional.pad(new_valid, (width - new_width, 0), value=False)
    elif width < new_width:
        valid = torch.nn.functional.pad(valid, (new_width - width, 0), value=False)
    return batch, torch.cat([valid, new_valid], dim=0)
