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
the cells, nothing is recomputed) and prefills only the rest. A finished request's sequence keeps its
cells too (its prompt and answer) until the slot or the cells are needed: the next turn of that
conversation, or the same prompt again, takes that slot and prefills only what is new (llama-server
keeps each slot's last prompt the same way). Requests admitted together are prefilled
together, the way llama.cpp's own server does: their tokens are packed into llama_batches of up to
PREFILL_BATCH tokens, a token that several prompts share (same position, same tokens before it) is one
row for all their sequences, and only each prompt's last token asks for logits.

LoRA versions of the engine's base are GGUF LoRA adapters on its one copy of the weights (`add_adapter`).
llama.cpp applies an adapter to the whole context, so a step decodes each adapter's requests in a
llama_decode of their own, with that adapter set before it (PyTorch batches them in one); a cached prefix
and a finished request's cells serve only prompts of the adapter that computed them.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forja.engine import GenerationError
from forja.engine.scheduler import Scheduler, Sequence
from forja.models import common_prefix

log = logging.getLogger("forja.engine")
PREFILL_BATCH = 512  # most prompt tokens in one llama_decode
# llama.cpp's CPU flash attention switches to another kernel, which rounds differently, at 64 query rows
# (GGML_FA_TILE_Q): micro-batches below that give a prompt the same KV cache whatever else shares its
# llama_decode, so a greedy answer does not depend on the other requests (measured: identical logits, and
# prefill within the noise of 512-token micro-batches; the weights are read once per micro-batch)
MICRO_BATCH = 63
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
                 kv_tokens: int = 8192, threads: int | None = None, prefill_batch: int = PREFILL_BATCH):
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
        # A token that is not a plain greedy argmax (a grammar, logprobs, temperature, penalties) is picked by
        # torch ops on one logits row, between llama_decode calls on the same thread. torch's OpenMP pool gains
        # nothing on one row and its spinning workers took the cores from llama.cpp's threads (measured: a
        # json_schema answer cost 2.9x a free one per token, 0.93x with one torch thread). llama.cpp owns the
        # cores of this process, so torch gets one thread (process-wide, as torch's setting is).
        import torch

        torch.set_num_threads(1)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = kv_tokens
        self.prefill_batch = prefill_batch
        params.n_batch = max(prefill_batch, max_batch_size)
        params.n_ubatch = min(MICRO_BATCH, params.n_batch)
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
        # a row may belong to every request's sequence and the prefix's (a prompt token they share)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, params.n_seq_max)
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        if len(tokenizer) > self.n_vocab:
            raise GenerationError(f"{self.path} has {self.n_vocab} tokens but its tokenizer {len(tokenizer)}; "
                                  "they do not belong together")
        eos = {tokenizer.eos_token_id, llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)}
        eos = {int(t) for t in eos if t is not None and 0 <= int(t) < self.n_vocab}
        context = min(llama_cpp.llama_model_n_ctx_train(self._model), self.kv_tokens)
        self._free_slots = list(range(max_batch_size))  # the least recently freed first
        self._kept: dict[int, Kept] = {}  # a free slot -> what its cells still hold (a finished request's)
        self._prefix_slot = max_batch_size
        self._prefix: list[int] = []  # the tokens whose KV the prefix sequence holds
        self.prefix_hits = 0  # prompt tokens not recomputed (cached prefix or a finished request's cells), for tests
        self._reserved = 0  # KV cells promised to admitted requests (prompt + max_new_tokens each)
        self._prefix_adapter: str | None = None  # the adapter the prefix sequence's cells were computed with
        self._adapter_set: str | None = None  # the adapter set on the context now
        self.decodes = 0  # llama_decode calls, for tests
        super().__init__(tokenizer, eos, context, "cpu", name=name, max_batch_size=max_batch_size, max_queue=max_queue)

    # ---------------------------------------------------------------- the Scheduler's hooks

    def _fits(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """Every running request keeps room for its whole answer, so a decode never runs out of cells. Finished
        requests' cells give way first (the least recently freed), then the cached prefix."""
        need = sum(len(s.prompt_ids) + s.params.max_new_tokens for s in [*admitted, seq])

        def used() -> int:
            return self._reserved + need + len(self._prefix) + sum(len(kept.tokens) for kept in self._kept.values())

        for slot in [s for s in self._free_slots if s in self._kept]:
            if used() <= self.kv_tokens:
                break
            self.llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
            del self._kept[slot]
        if used() > self.kv_tokens and not self._active and self._prefix:
            self._drop_prefix()
        return used() <= self.kv_tokens

    def add_adapter(self, name: str, path: Any) -> None:
        """Load a GGUF LoRA adapter (forja.export_lora writes one from a version) as `name`, between two steps."""
        if name in self.adapters:
            return
        with self._model_lock:
            adapter = self.llama.llama_adapter_lora_init(self._model, str(path).encode())
            if not adapter:
                raise GenerationError(f"llama.cpp cannot load the LoRA adapter {path} on {self.path}")
            self.adapters[name] = adapter

    def _use_adapter(self, name: str | None) -> None:
        """Set the context's adapter to `name` (None: the plain base) before a llama_decode."""
        if name == self._adapter_set:
            return
        if name is None:
            status = self.llama.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            adapters = (self.llama.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            status = self.llama.llama_set_adapters_lora(self._ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        if status != 0:
            raise GenerationError(f"llama.cpp cannot set the LoRA adapter {name} (status {status})")
        self._adapter_set = name

    def _prefill_groups(self, admitted: list[Sequence]) -> list[list[Sequence]]:
        """The admitted requests of each adapter in one group: llama.cpp packs prompts of any lengths without
        padding, and an adapter applies to a whole llama_decode."""
        groups: dict[str | None, list[Sequence]] = {}
        for seq in admitted:
            groups.setdefault(seq.adapter, []).append(seq)
        return list(groups.values())

    def _admit(self, group: list[Sequence]) -> None:
        for seq in group:
            if seq.stream.cancelled.is_set():
                self._finish(seq, "cancelled")
        group = [seq for seq in group if not seq.done]
        if not group:
            return
        adapter = group[0].adapter  # one adapter per group (_prefill_groups)
        if self._prefix and self._prefix_adapter != adapter:
            self._drop_prefix()  # another adapter's keys and values: of no use to these prompts
        self._prefix_adapter = adapter
        starts, fresh, same = [], [], []
        for seq in group:
            seq.extra["slot"], start, logits = self._take_slot(seq.prompt_ids, adapter)
            if logits is None:
                fresh.append(seq)
                starts.append(start)
            else:  # the very same prompt as a finished request's: nothing to prefill, its first token at once
                seq.extra["prompt_logits"] = logits
                same.append(seq)
            seq.extra["cells"] = len(seq.prompt_ids) + seq.params.max_new_tokens
            seq.extra["tokens"] = list(seq.prompt_ids)  # what its cells hold, once prefilled
            self._reserved += seq.extra["cells"]
            self.prefix_hits += start
        for seq in same:  # running from now on: the prefill of the others steps it too
            seq.length = len(seq.prompt_ids)
            self._active.append(seq)
            self._accept(seq, self._pick_logits(seq, seq.extra["prompt_logits"]))
        if fresh:
            prompts, slots = [seq.prompt_ids for seq in fresh], [seq.extra["slot"] for seq in fresh]
            rows, paths = prefill_rows(prompts, starts, slots)
            self._keep_prefix(prompts, starts, slots, rows, paths)
            self._prefill(fresh, rows, [path[-1] for path in paths])
        self.max_rows_seen = max(self.max_rows_seen, len(self._active))

    def _prefill(self, group: list[Sequence], rows: list[Row], last_rows: list[int]) -> None:
        """Decode `rows`, prefill_batch at a time; each request of `group` joins `_active` with its first token
        right after the batch that holds its prompt's last token (last_rows[i] for group[i]). Requests already
        running take their next token in the first of those batches (a mixed batch, as llama-server does):
        they do not wait for the prefill, and the weights are read once for both."""
        ending: dict[int, list[Sequence]] = {}
        for seq, r in zip(group, last_rows):
            rows[r].logits = True
            ending.setdefault(r, []).append(seq)
        adapter = group[0].adapter
        # requests already running with the same adapter share the prefill's decodes; the others step after
        running = [seq for seq in self._active if not seq.done and seq.adapter == adapter]
        waiting = list(group)
        position = 0
        while position < len(rows):
            self._cancel_waiting(waiting, rows[position:])
            stepping = [self._step_row(seq) for seq in running]
            batch: list[int] = []
            while position < len(rows) and len(stepping) + len(batch) < self.prefill_batch:
                if rows[position].slots:
                    batch.append(position)
                position += 1
            if not batch and not stepping:
                break
            self._use_adapter(adapter)
            self._decode(stepping + [rows[r] for r in batch])
            for index, seq in enumerate(running):
                seq.length += 1
                self._accept(seq, self._pick_logits(seq, self._logits(index)))
            if running:
                self.steps += 1
                running = []
            for index, r in enumerate(batch, start=len(stepping)):
                for seq in ending.get(r, []):
                    if seq.done:
                        continue
                    waiting.remove(seq)
                    seq.length = len(seq.prompt_ids)
                    seq.extra["prompt_logits"] = self._logits(index).copy()  # kept with its cells when it ends
                    self._active.append(seq)  # joins before its first token, so one that ends at once is dropped normally
                    self._accept(seq, self._pick_logits(seq, seq.extra["prompt_logits"]))

    def _cancel_waiting(self, waiting: list[Sequence], rows: list[Row]) -> None:
        """A request cancelled between two prefill batches ends now; its rows still to come are dropped."""
        for seq in [seq for seq in waiting if seq.stream.cancelled.is_set()]:
            slot = seq.extra["slot"]
            for row in rows:
                if slot in row.slots:
                    row.slots.remove(slot)
            waiting.remove(seq)
            self._finish(seq, "cancelled")
            self._forget(seq)

    def _step(self) -> None:
        if any(seq.adapter != self._active[0].adapter for seq in self._active):
            self._step_by_adapter()
            return
        rows = [self._step_row(seq) for seq in self._active]
        self._use_adapter(self._active[0].adapter)
        self._decode(rows)
        if all(seq.sampler.plain for seq in self._active):  # greedy: argmax in place, no copies
            tokens = [int(self._logits(i).argmax()) for i in range(len(rows))]
        else:
            tokens = self._pick(torch.from_numpy(np.stack([self._logits(i).copy() for i in range(len(rows))])))
        self.steps += 1
        for seq, token in zip(self._active, tokens):
            seq.length += 1
            self._accept(seq, token)

    def _step_by_adapter(self) -> None:
        """One step of requests with different adapters: one llama_decode per adapter, each row's token
        picked from its logits before the next decode overwrites them."""
        tokens: dict[int, int | None] = {}
        groups: dict[str | None, list[Sequence]] = {}
        for seq in self._active:
            groups.setdefault(seq.adapter, []).append(seq)
        for adapter, members in groups.items():
            self._use_adapter(adapter)
            self._decode([self._step_row(seq) for seq in members])
            for index, seq in enumerate(members):
                tokens[id(seq)] = self._pick_logits(seq, self._logits(index))
        self.steps += 1
        for seq in list(self._active):
            seq.length += 1
            self._accept(seq, tokens[id(seq)])

    def _step_row(self, seq: Sequence) -> Row:
        """The row that feeds a running request's last sampled token."""
        seq.extra["tokens"].append(seq.next_token)
        return Row(seq.next_token, seq.length, [seq.extra["slot"]], logits=True)

    def _release(self, keep: list[int]) -> None:
        kept = {id(self._active[i]) for i in keep}
        for seq in self._active:
            if id(seq) not in kept:
                self._forget(seq, keep_cells=True)

    def _reset(self) -> None:
        # every slot comes back, also those of requests that failed before joining `_active`
        self._active = []
        self._prefix = []
        self._free_slots = list(range(self.max_batch_size))
        self._kept = {}
        self._reserved = 0
        self.llama.llama_memory_clear(self._memory, True)

    def _shutdown(self) -> None:
        for adapter in self.adapters.values():
            self.llama.llama_adapter_lora_free(adapter)
        self.llama.llama_batch_free(self._batch)
        self.llama.llama_free(self._ctx)
        self.llama.llama_model_free(self._model)

    # ---------------------------------------------------------------- the shared prompt prefix

    def _take_slot(self, ids: list[int], adapter: str | None = None) -> tuple[int, int, np.ndarray | None]:
        """A free slot for a prompt, how many of its leading tokens that slot already holds, and the logits after
        the whole prompt when a finished request had the very same one (nothing is left to prefill then). Else
        the free slot whose finished request shares the most of them (a conversation's previous turn), cut back
        to what it shares, when that beats the cached prefix; else an empty slot (the least recently freed one
        if none is empty) with the cached prefix copied in. Only cells `adapter` computed are reused."""
        head = ids[: len(ids) - 1]  # without kept logits one token is left to prefill: its logits give the first

        def kept(slot: int) -> list[int]:
            entry = self._kept.get(slot)
            return entry.tokens if entry is not None and entry.adapter == adapter else []

        same = next((slot for slot in self._free_slots  # (prompt_length is 0 when no logits were kept)
                     if (entry := self._kept.get(slot)) is not None and entry.prompt_length == len(ids)
                     and kept(slot)[: len(ids)] == ids), None)
        if same is not None:
            logits = self._kept.pop(same).prompt_logits
            self._free_slots.remove(same)
            self.llama.llama_memory_seq_rm(self._memory, same, len(ids), -1)
            return same, len(ids), logits
        best = max(self._free_slots, key=lambda slot: common_prefix(head, kept(slot)))
        reused = common_prefix(head, kept(best))
        shared = self._shared_prefix(ids)
        if reused >= max(shared, MIN_SHARED_PREFIX):
            self._free_slots.remove(best)
            del self._kept[best]
            self.llama.llama_memory_seq_rm(self._memory, best, reused, -1)
            return best, reused, None
        slot = next((slot for slot in self._free_slots if slot not in self._kept), self._free_slots[0])
        self._free_slots.remove(slot)
        if self._kept.pop(slot, None) is not None:
            self.llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
        if shared:
            self.llama.llama_memory_seq_cp(self._memory, self._prefix_slot, slot, 0, shared)
        return slot, shared, None

    def _shared_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the prefix sequence holds (at least one token is left to prefill)."""
        shared = common_prefix(ids[: len(ids) - 1], self._prefix)
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _keep_prefix(self, prompts: list[list[int]], starts: list[int], slots: list[int], rows: list[Row],
                     paths: list[list[int]]) -> None:
        """The cached prefix becomes the longest prefix two of these prompts share, or the longest prompt when
        none share MIN_SHARED_PREFIX tokens (a prompt admitted alone): the cache is cut back to what it has in
        common with that, and the prefix sequence joins this prefill's rows for the rest (computed once)."""
        pairs = [(min(common_prefix(a, b), len(a) - 1, len(b) - 1), i)
                 for i, a in enumerate(prompts) for b in prompts[i + 1 :]]
        length, owner = max(pairs, default=(0, 0))
        if length < MIN_SHARED_PREFIX:
            owner = max(range(len(prompts)), key=lambda i: len(prompts[i]))
            length = len(prompts[owner]) - 1
        if length < MIN_SHARED_PREFIX:
            return  # too short to be worth keeping: the cache stays as it was
        target = prompts[owner][:length]
        kept = common_prefix(target, self._prefix)
        if kept < MIN_SHARED_PREFIX:
            self._drop_prefix()
            kept = 0
        elif kept < len(self._prefix):
            self.llama.llama_memory_seq_rm(self._memory, self._prefix_slot, kept, -1)
        # the owner's slot holds its first starts[owner] tokens (>= kept): share those cells, then its rows
        start = starts[owner]
        if start > kept:
            self.llama.llama_memory_seq_cp(self._memory, slots[owner], self._prefix_slot, kept, min(start, length))
        for position in range(start, length):
            rows[paths[owner][position - start]].slots.append(self._prefix_slot)
        self._prefix = target

    def _drop_prefix(self) -> None:
        self.llama.llama_memory_seq_rm(self._memory, self._prefix_slot, -1, -1)
        self._prefix = []

    # ---------------------------------------------------------------- llama.cpp calls

    def _forget(self, seq: Sequence, keep_cells: bool = False) -> None:
        """Free a request's slot; a finished one's cells stay there (`_kept`) for a prompt that starts the same."""
        slot = seq.extra.pop("slot", None)
        logits = seq.extra.pop("prompt_logits", None)
        if slot is not None:
            tokens = seq.extra.pop("tokens")[: seq.length]
            if keep_cells and len(tokens) >= MIN_SHARED_PREFIX:
                whole = logits is not None and len(tokens) >= len(seq.prompt_ids)  # the logits' prompt still there
                self._kept[slot] = Kept(tokens, seq.adapter, len(seq.prompt_ids) if whole else 0,
                                        logits if whole else None)
            else:
                self.llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._free_slots.append(slot)
            self._reserved -= seq.extra.pop("cells", 0)

    def _decode(self, rows: list[Row]) -> None:
        """One llama_decode of `rows` (with the adapter `_use_adapter` set); logits kept for those that ask
        (read them with `_logits(index)`)."""
        self.decodes += 1
        batch = self._batch
        for i, row in enumerate(rows):
            batch.token[i] = row.token
            batch.pos[i] = row.position
            batch.n_seq_id[i] = len(row.slots)
            for k, slot in enumerate(row.slots):
                batch.seq_id[i][k] = slot
            batch.logits[i] = row.logits
        batch.n_tokens = len(rows)
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


@dataclass
class Kept:
    """What a finished request left in its slot: the tokens its cells hold (prompt and answer), the adapter that
    computed them, and the logits after its prompt (prompt_length tokens), so that the very same prompt again (a
    retry, a regenerate button, n answers sent as several requests) samples its first token from them at once."""

    tokens: list[int]
    adapter: str | None
    prompt_length: int
    prompt_logits: np.ndarray | None


@dataclass
class Row:
    """One token of a llama_batch: its position, the sequences (slots) it belongs to, whether to keep its logits."""

    token: int
    position: int
    slots: list[int]
    logits: bool = False


def prefill_rows(prompts: list[list[int]], starts: list[int], slots: list[int]) -> tuple[list[Row], list[list[int]]]:
    """The rows that prefill `prompts` (prompt i from position starts[i] on, in sequence slots[i]), and each
    prompt's path: paths[i][p - starts[i]] is the row of its token at position p. Prompts that start at the
    same place and have the same tokens up to p share that row (llama.cpp requires the sequences of a row to
    hold the same cache before it). Prompts with the least left to prefill come first, so when the rows fill
    several batches those get their first token soonest; a row always comes after the rows before it on each
    of its prompts, as llama.cpp requires of one sequence's positions."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) - starts[i])
    rows: list[Row] = []
    paths: list[list[int]] = [[] for _ in prompts]
    seen: dict[tuple[int, int], int] = {}  # (position, first prompt sharing it) -> row
    for i in order:
        ids = prompts[i]
        common = [common_prefix(ids, other) for other in prompts]
        for position in range(starts[i], len(ids)):
            sharing = [j for j in order if starts[j] == starts[i] and position < common[j]]
            key = (position, sharing[0])
            if key not in seen:
                seen[key] = len(rows)
                rows.append(Row(ids[position], position, [slots[j] for j in sharing]))
            paths[i].append(seen[key])
    return rows, paths
